"""Stage: segmentation inference — multi-scale + flip, optional dense CRF, one index PNG per image.

For every image of the split: softmax of the scale-averaged, flip-summed logits
(:func:`pnoc.segmentation.multiscale.multiscale_logits`), optionally refined by the
DeepLab-v2 dense CRF (:func:`pnoc.crf.crf_prob`, t = ``crf_t``), then the argmax is
written as ``<out_dir>/<id>.png`` (raw 8-bit class indices, no palette).

For the ``test`` split (or with ``--submission true``) the same masks are also written
as VOC palette PNGs in the evaluation server's layout,
``<out_dir>/submission/results/VOC2012/Segmentation/comp6_test_cls/<id>.png``; pack it
with ``tar -czf results.tgz -C <out_dir>/submission results``.

The folder is written atomically; ``_info.json`` holds the settings and the timing.
Image labels and ground truth are not needed (the test split has neither). With ``shard: kofK`` only
the k-th of K slices of the split is processed (:mod:`pnoc.shards`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pnoc import cli
from pnoc.data.datasets import DataSource
from pnoc.data.transforms import normalize, to_tensor_image
from pnoc.io import atomic_dir, write_json
from pnoc.models.deeplab import segmenter_from_artifact
from pnoc.segmentation.multiscale import multiscale_logits, to_voc_submission, write_index_png
from pnoc.shards import shard_ids
from pnoc.training import load_weights, memory_guard, peak_memory, resolve_device, set_threads

log = logging.getLogger("pnoc.segmentation.infer_segmentation")

SUBMISSION_SUBDIR = "submission/results/VOC2012/Segmentation/comp6_test_cls"


@dataclass
class Config(DataSource):
    """Segmentation inference (multi-scale + flip, optional dCRF)."""

    split: str
    model: Path
    out_dir: Path
    scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0])
    flip: bool = True
    crf: bool = False
    crf_t: int = 10
    submission: bool | None = None
    device: str = "auto"
    threads: int = 0
    shard: str = "1of1"


def predict(model, img: np.ndarray, device: torch.device, scales, flip: bool, crf: bool, crf_t: int) -> np.ndarray:
    """Class indices (H, W) for one uint8 RGB image (H, W, 3)."""
    x = normalize(to_tensor_image(img))[None].to(device)
    probs = multiscale_logits(model, x, scales, flip).cpu().numpy()
    if crf:
        from pnoc.crf import crf_prob

        # a writable copy: pydensecrf cannot take the read-only buffers PIL hands out
        probs = crf_prob(np.array(img, dtype=np.uint8, copy=True), probs, t=crf_t)
    return probs.argmax(0).astype(np.uint8)


def run(cfg: Config) -> dict:
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ds = cfg.open_dataset(cfg.split)
    ids = shard_ids(ds.ids, cfg.shard)
    ds.validate(need_labels=False, ids=ids)
    model = segmenter_from_artifact(load_weights(cfg.model)).to(device).eval()
    submission = cfg.split == "test" if cfg.submission is None else cfg.submission
    t0 = time.perf_counter()
    with atomic_dir(cfg.out_dir) as tmp:
        for image_id in tqdm(ids, desc=f"segmentation {cfg.split}", mininterval=10):
            img = ds.read_image(image_id)
            with memory_guard(device, [image_id], img.shape[:2], "lower the largest of segmentation.scales"):
                mask = predict(model, img, device, cfg.scales, cfg.flip, cfg.crf, cfg.crf_t)
            write_index_png(mask, tmp / f"{image_id}.png")
            if submission:
                to_voc_submission(mask, tmp / SUBMISSION_SUBDIR / f"{image_id}.png")
        dt = time.perf_counter() - t0
        info = {"stage": "infer_segmentation", "split": cfg.split, "model": str(cfg.model), "images": len(ids),
                "scales": cfg.scales, "flip": cfg.flip, "crf": cfg.crf, "crf_t": cfg.crf_t,
                "submission": SUBMISSION_SUBDIR if submission else None,
                "seconds": dt, "images_per_s": len(ids) / max(dt, 1e-9), **peak_memory(device)}
        write_json(tmp / "_info.json", info)
    log.info("%d images in %.1fs (%.2f img/s)%s", len(ids), dt, info["images_per_s"],
             f"; VOC submission in {cfg.out_dir}/{SUBMISSION_SUBDIR}" if submission else "")
    return info


if __name__ == "__main__":
    cli.main(run, Config)
