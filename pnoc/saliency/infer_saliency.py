"""Stage: C²AM / C²AM-H saliency inference with TTA, and pseudo-saliency masks for PoolNet.

For every image of a split:

1. **Map.** The logit map z of the trained CCAM, with the stored direction applied first
   (z → −z when the artifact's ``direction.flip`` is true, i.e. the other partition), goes
   through test-time augmentation (:func:`pnoc.cam.tta.tta_maps`, ``reduce="mean"``: the two
   flips are summed, the scales averaged — the reference's C²AM rule). ``activation``:

   * ``relu`` (default, the reference's): ReLU(z), then each image's map is divided by its
     max. z is BatchNorm-centred, so ReLU keeps the side the network calls foreground and
     the max-normalisation makes maps comparable across images (threshold 0.2 = 20 % of the
     image's strongest response).
   * ``sigmoid``: σ(z) averaged over the passes (divided by 2 for the flip sum), not
     normalised — an absolute probability, for comparison.

   Saved as ``raw/<id>.npz`` (:func:`pnoc.io.save_maps`: ``maps`` (1, H, W) float16 in
   [0, 1], ``keys`` = [1], ``lr`` the stride-4 copy).

2. **Pseudo-saliency mask.** Foreground where the map exceeds ``pseudo_threshold`` (a
   background plane at 0.2, then argmax), refined with a 2-label dense CRF (``crf_t``
   iterations, unary ``crf_gt_prob``; ``crf_t: 0`` skips it) and written as an 8-bit gray PNG
   with values 0 / 255 (``pseudo/<id>.png``) — the PoolNet training targets.

Both folders are written atomically. With ``shard: kofK`` only the k-th of K slices of the split is
processed (:mod:`pnoc.shards`).
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
from pnoc.io import atomic_dir, save_maps, write_json, write_mask
from pnoc.models.ccam import ccam_from_artifact
from pnoc.shards import shard_ids
from pnoc.training import load_weights, memory_guard, peak_memory, resolve_device, set_threads

log = logging.getLogger("pnoc.saliency.infer_saliency")

ACTIVATIONS = ("relu", "sigmoid")


@dataclass
class Config(DataSource):
    """C²AM saliency inference (TTA) + pseudo-saliency masks."""

    split: str
    model: Path
    raw_dir: Path
    pseudo_dir: Path
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    activation: str = "relu"
    batch_size: int = 16
    pseudo_threshold: float = 0.2
    crf_t: int = 10
    crf_gt_prob: float = 0.7
    device: str = "auto"
    threads: int = 0
    shard: str = "1of1"


def make_forward(model: torch.nn.Module, flip_direction: bool, activation: str, device: torch.device):
    """The map function handed to :func:`tta_maps`: normalised images (N, 3, h, w) → (N, 1, h', w').

    The stored direction is applied on the logits (sign · z), so that ReLU(−z) and σ(−z) = 1 − σ(z)
    both select the other partition.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: use one of {ACTIVATIONS}")
    sign = -1.0 if flip_direction else 1.0

    def forward(x: torch.Tensor) -> torch.Tensor:
        z = sign * model(x.to(device))[0].float()
        return z if activation == "relu" else torch.sigmoid(z)

    return forward


def finish_maps(hr: torch.Tensor, lr: torch.Tensor, activation: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn TTA outputs (B, 1, H, W) into maps in [0, 1]: max-normalise (relu) or undo the flip sum (sigmoid)."""
    if activation == "relu":
        return max_normalize(hr), max_normalize(lr)
    d = 2.0 if flip else 1.0
    return (hr / d).clamp(0, 1), (lr / d).clamp(0, 1)


def pseudo_mask(img: np.ndarray, sal: np.ndarray, threshold: float, crf_t: int, gt_prob: float) -> np.ndarray:
    """Binary pseudo-saliency mask of one image.

    Args:
        img: uint8 (H, W, 3) RGB.
        sal: float (H, W) saliency in [0, 1].
        threshold: foreground where ``sal > threshold``.
        crf_t: dense-CRF iterations (0: no CRF).
        gt_prob: CRF unary confidence of the thresholded label.

    Returns:
        uint8 (H, W) with values 0 and 255.
    """
    fg = (sal > threshold).astype(np.int64)
    if crf_t > 0:
        from pnoc.crf import crf_label

        # a writable copy: pydensecrf cannot take PIL's read-only buffers
        fg = crf_label(np.array(img, dtype=np.uint8, copy=True), fg, 2, t=crf_t, gt_prob=gt_prob)
    return (fg > 0).astype(np.uint8) * 255


def run(cfg: Config) -> dict:
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ds = cfg.open_dataset(cfg.split)
    ids = shard_ids(ds.ids, cfg.shard)
    ds.validate(need_labels=False, ids=ids)
    state = load_weights(cfg.model)
    direction = state.get("direction") or {"flip": False, "method": "none recorded"}
    model = ccam_from_artifact(state).to(device).eval()
    forward = make_forward(model, bool(direction["flip"]), cfg.activation, device)
    log.info("%s model %s: direction flip=%s (%s), activation %s", state.get("method", "?"), cfg.model,
             direction["flip"], direction["method"], cfg.activation)
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id in ids:
        by_size[ds.image_size(image_id)].append(image_id)
    t0 = time.perf_counter()
    t_crf = 0.0
    fg_frac = 0.0
    with atomic_dir(cfg.raw_dir) as raw_tmp, atomic_dir(cfg.pseudo_dir) as pseudo_tmp, \
            tqdm(total=len(ids), desc=f"saliency {cfg.split}", mininterval=10) as bar:
        for size, group in by_size.items():
            for i in range(0, len(group), cfg.batch_size):
                chunk = group[i:i + cfg.batch_size]
                imgs_np = [ds.read_image(j) for j in chunk]
                imgs = torch.stack([to_tensor_image(im) for im in imgs_np])
                with memory_guard(device, chunk, size, "lower saliency.inference.batch_size (images of one size "
                                  "run together) or the largest of saliency.inference.scales"):
                    hr, lr = tta_maps(forward, imgs.to(device), cfg.scales, cfg.flip, reduce="mean")
                hr, lr = finish_maps(hr, lr, cfg.activation, cfg.flip)
                hr, lr = hr.cpu().numpy(), lr.cpu().numpy()
                for b, image_id in enumerate(chunk):
                    save_maps(raw_tmp / f"{image_id}.npz", hr[b], np.array([1]), lr=lr[b])
                    tc = time.perf_counter()
                    mask = pseudo_mask(imgs_np[b], hr[b, 0], cfg.pseudo_threshold, cfg.crf_t, cfg.crf_gt_prob)
                    t_crf += time.perf_counter() - tc
                    fg_frac += float((mask > 0).mean())
                    write_mask(pseudo_tmp / f"{image_id}.png", mask, palette=False)
                bar.update(len(chunk))
        dt = time.perf_counter() - t0
        info = {"stage": "infer_saliency", "split": cfg.split, "images": len(ids), "model": str(cfg.model),
                "direction": direction, "activation": cfg.activation, "scales": cfg.scales, "flip": cfg.flip,
                "pseudo_threshold": cfg.pseudo_threshold, "crf_t": cfg.crf_t, "crf_gt_prob": cfg.crf_gt_prob,
                "pseudo_fg_fraction": fg_frac / max(1, len(ids)), "seconds": dt, "crf_seconds": t_crf,
                "images_per_s": len(ids) / max(dt, 1e-9), **peak_memory(device)}
        write_json(raw_tmp / "_info.json", info)
        write_json(pseudo_tmp / "_info.json", info)
    log.info("%d images in %.1fs (CRF %.1fs); pseudo-mask foreground %.3f", len(ids), dt, t_crf,
             info["pseudo_fg_fraction"])
    return info


if __name__ == "__main__":
    cli.main(run, Config)
