"""Stage: random-walk propagation of the CAMs over AffinityNet's boundaries (spec §9, RW inference).

For every image of a split:

1. boundary probabilities from AffinityNet on the full-size image (logits of the image and
   of its un-flipped mirror averaged, then the sigmoid), on the stride-4 grid of the CAMs;
2. seeds = stride-4 CAMs (``lr`` of the CAM file) × (1 − boundary) (``seed_mask: true``, the reference), or the
   CAMs themselves (``seed_mask: false``: a cell on a boundary keeps its own seed; where objects are only a few
   cells wide, the reference rule empties a large share of every object, see :mod:`pnoc.affinity.walk_share`);
3. the random walk ``seeds · T^(2^exp_times)`` with T = column-normalised A^β over pairs of
   radius ``radius`` (:func:`pnoc.affinity.random_walk.random_walk`, sparse and exact);
4. bilinear upsampling ×4, crop to H×W, division by the global max over all classes.

One ``<id>.npz`` per image (:func:`pnoc.io.save_maps`): ``maps`` (K, H, W) RW maps,
``keys`` the CAM file's keys, ``boundary`` (h, w) the stride-4 boundary map. Images of one
size are walked together (one block-diagonal operator), which keeps a GPU busy. The folder
is written atomically; a missing CAM file raises :class:`DataError` naming the image. With
``shard: kofK`` only the k-th of K slices of the split is walked (:mod:`pnoc.shards`): an image's
walk does not depend on the images walked with it (its block of the operator is its own).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pnoc import cli
from pnoc.affinity.random_walk import random_walk
from pnoc.data.datasets import DataSource
from pnoc.data.transforms import normalize, to_tensor_image
from pnoc.io import DataError, atomic_dir, load_maps, save_maps, write_json
from pnoc.models.affinitynet import affinitynet_from_artifact
from pnoc.shards import shard_ids
from pnoc.training import autocast, load_weights, memory_guard, peak_memory, resolve_device, set_threads

OOM_FIX = ("lower affinity.rw.batch_size (images of one size are walked together; the transition matrix grows with "
           "the image area) or affinity.rw.radius")

log = logging.getLogger("pnoc.affinity.propagate")


@dataclass
class Config(DataSource):
    """Random-walk propagation of CAMs with a trained AffinityNet."""

    split: str
    model: Path
    cams_dir: Path
    out_dir: Path
    radius: float = 5
    beta: float = 10
    exp_times: int = 8
    seed_mask: bool = True
    flip: bool = True
    batch_size: int = 8
    device: str = "auto"
    amp: bool = True
    threads: int = 0
    shard: str = "1of1"


def read_lr_cams(cams_dir: str | Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Stride-4 CAMs ``(K, h, w)`` and keys of one image; DataError naming the image if absent."""
    path = Path(cams_dir) / f"{image_id}.npz"
    if not path.is_file():
        raise DataError(f"{path}: CAMs missing for image {image_id}; rerun rule infer_cams for this split")
    z = load_maps(path)
    if "lr" not in z:
        raise DataError(f"{path}: no stride-4 'lr' CAMs; rerun rule infer_cams with this version of pnoc")
    return z["lr"], z["keys"]


def propagate_batch(cams: list[torch.Tensor], boundaries: list[torch.Tensor] | None, sizes: list[tuple[int, int]],
                    radius: float = 5, beta: float = 10, exp_times: int = 8,
                    affinities: list[torch.Tensor] | None = None, seed_mask: bool = True) -> list[torch.Tensor]:
    """Walk several images at once and bring the results to full resolution.

    Args:
        cams: per image (K, h, w) stride-4 CAMs.
        boundaries: per image (h, w) boundary probabilities (None with ``affinities``).
        sizes: per image the full (H, W).
        affinities: per image (D, h, w) pair affinities to walk over instead of a boundary map
            (:func:`pnoc.affinity.random_walk.label_affinity`); the seeds are then the CAMs themselves.
        seed_mask: with boundaries, multiply the seeds by (1 − boundary) (the reference); False walks the
            CAMs themselves.

    Returns:
        per image (K, H, W) float32 maps: ``propagate_cams(..., normalise=False)`` upsampled ×4
        (bilinear), cropped to (H, W) and divided by their global max.
    """
    if affinities is None:
        seeds = [c.float() * (1.0 - b.float())[None] if seed_mask else c.float() for c, b in zip(cams, boundaries)]
        rws = random_walk(seeds, list(boundaries), radius=radius, beta=beta, exp_times=exp_times)
    else:
        rws = random_walk([c.float() for c in cams], None, radius=radius, beta=beta, exp_times=exp_times,
                          affinity=list(affinities))
    out = []
    for rw, (h, w) in zip(rws, sizes):
        if rw.shape[0] == 0:
            out.append(rw.new_zeros(0, h, w, dtype=torch.float32))
            continue
        up = F.interpolate(rw.float()[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :h, :w]
        out.append(up / up.max().clamp(min=1e-12))
    return out


@torch.no_grad()
def run(cfg: Config) -> dict:
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ds = cfg.open_dataset(cfg.split)
    model = affinitynet_from_artifact(load_weights(cfg.model)).to(device).eval()
    ids = shard_ids(ds.ids, cfg.shard)
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id in ids:
        by_size[ds.image_size(image_id)].append(image_id)
    t0 = time.perf_counter()
    t_walk = 0.0
    with atomic_dir(cfg.out_dir) as tmp, tqdm(total=len(ids), desc=f"random walk {cfg.split}", mininterval=10) as bar:
        for (h, w), group in by_size.items():
            for i in range(0, len(group), cfg.batch_size):
                chunk = group[i:i + cfg.batch_size]
                cams, keys = zip(*(read_lr_cams(cfg.cams_dir, j) for j in chunk))
                x = torch.stack([normalize(to_tensor_image(ds.read_image(j))) for j in chunk]).to(device)
                with memory_guard(device, chunk, (h, w), OOM_FIX), autocast(device, cfg.amp):
                    bnd = model.boundary(x, flip=cfg.flip)
                bnd = bnd.float()[:, 0]
                lh, lw = cams[0].shape[1:]
                if bnd.shape[-2] < lh or bnd.shape[-1] < lw:
                    raise DataError(f"{cfg.cams_dir}: stride-4 CAMs of {chunk[0]} are {lh}x{lw} but the boundary map "
                                    f"is {tuple(bnd.shape[-2:])}; CAMs and AffinityNet disagree on the grid")
                bnd = bnd[:, :lh, :lw]
                t1 = time.perf_counter()
                with memory_guard(device, chunk, (h, w), OOM_FIX):
                    rws = propagate_batch([torch.from_numpy(c).to(device) for c in cams], list(bnd),
                                          [(h, w)] * len(chunk), cfg.radius, cfg.beta, cfg.exp_times,
                                          seed_mask=cfg.seed_mask)
                t_walk += time.perf_counter() - t1
                for image_id, rw, k, b in zip(chunk, rws, keys, bnd):
                    save_maps(tmp / f"{image_id}.npz", rw.cpu().numpy(), k, boundary=b.cpu().numpy())
                bar.update(len(chunk))
        dt = time.perf_counter() - t0
        info = {"stage": "propagate", "split": cfg.split, "images": len(ids), "radius": cfg.radius, "beta": cfg.beta,
                "exp_times": cfg.exp_times, "flip": cfg.flip, "seconds": dt, "walk_seconds": t_walk,
                "images_per_s": len(ids) / max(dt, 1e-9), "device": str(device), **peak_memory(device)}
        write_json(tmp / "_info.json", info)
    log.info("random walk on %d images in %.1fs (walk %.1fs) on %s", len(ids), dt, t_walk, device)
    return info


if __name__ == "__main__":
    cli.main(run, Config)
