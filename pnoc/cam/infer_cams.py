"""Stage: CAM inference with test-time augmentation.

For every image of a split: CAMs over ``scales`` × horizontal flip (ReLU, flip-merged,
summed over scales), positive classes only (ground-truth image labels — also on val,
as in the paper's protocol), each channel divided by its own max. One compressed
float16 ``<id>.npz`` per image with ``maps`` (K, H, W), ``lr`` (K, ⌈H/4⌉, ⌈W/4⌉) and
``keys`` (K,) = 1-based class ids. The folder is written atomically. With ``shard: kofK`` only
the k-th of K slices of the split is processed (:mod:`pnoc.shards`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pnoc import cli
from pnoc.cam.tta import max_normalize, tta_maps
from pnoc.data.datasets import DataSource
from pnoc.data.transforms import to_tensor_image
from pnoc.io import atomic_dir, save_maps, write_json
from pnoc.models.classifier import classifier_from_artifact
from pnoc.shards import shard_ids
from pnoc.training import load_weights, memory_guard, peak_memory, resolve_device, set_threads

log = logging.getLogger("pnoc.cam.infer_cams")
# images of one size run as one batch through every scale of the TTA (the largest dominates the memory)
OOM_FIX = "lower inference.batch_size (images of one size run together) or the largest of inference.scales"


@dataclass
class Config(DataSource):
    """CAM inference with TTA."""

    split: str
    model: Path
    out_dir: Path
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    batch_size: int = 8
    device: str = "auto"
    threads: int = 0
    shard: str = "1of1"


def run(cfg: Config) -> dict:
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ds = cfg.open_dataset(cfg.split)
    ids = shard_ids(ds.ids, cfg.shard)
    ds.validate(need_labels=True, ids=ids)
    model = classifier_from_artifact(load_weights(cfg.model)).to(device).eval()
    forward = lambda x: model(x.to(device))[1]  # noqa: E731
    # images of one size are batched together (synthetic sets are all one size)
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id in ids:
        by_size[ds.image_size(image_id)].append(image_id)
    t0 = time.perf_counter()
    n_bytes = 0
    # expect: one .npz per image and _info.json, for the space estimate of a full disk's message
    with atomic_dir(cfg.out_dir, expect=len(ids) + 1) as tmp, \
            tqdm(total=len(ids), desc=f"CAMs {cfg.split}", mininterval=10) as bar:
        for size, group in by_size.items():
            for i in range(0, len(group), cfg.batch_size):
                chunk = group[i:i + cfg.batch_size]
                imgs = torch.stack([to_tensor_image(ds.read_image(j)) for j in chunk])
                with memory_guard(device, chunk, size, OOM_FIX):
                    hr, lr = tta_maps(forward, imgs.to(device), cfg.scales, cfg.flip, reduce="sum")
                for b, image_id in enumerate(chunk):
                    y = ds.labels(image_id)
                    cls = np.flatnonzero(y)
                    keys = cls + 1
                    maps = max_normalize(hr[b, cls]).cpu().numpy()
                    lrm = max_normalize(lr[b, cls]).cpu().numpy()
                    save_maps(tmp / f"{image_id}.npz", maps, keys, lr=lrm)
                    n_bytes += (tmp / f"{image_id}.npz").stat().st_size
                bar.update(len(chunk))
        dt = time.perf_counter() - t0
        info = {"stage": "infer_cams", "split": cfg.split, "images": len(ids), "scales": cfg.scales,
                "flip": cfg.flip, "seconds": dt, "images_per_s": len(ids) / max(dt, 1e-9),
                "bytes_per_image": n_bytes / max(1, len(ids)), **peak_memory(device)}
        write_json(tmp / "_info.json", info)
    log.info("%d images in %.1fs (%.1f img/s), %.0f bytes/image", len(ids), dt, info["images_per_s"],
             info["bytes_per_image"])
    return info


if __name__ == "__main__":
    cli.main(run, Config)
