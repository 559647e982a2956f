"""Stage: foreground hints for C²AM-H, stored as an explicit artifact (paper §4.1, spec §6).

For every image of a split the hint is the per-pixel maximum over the present classes of
the normalised CAMs, ``hint = max_c ψ(A^c)`` in [0, 1] (zeros for an image without maps).
The reference recomputes it on the fly inside its data loader; here it is a folder of
8-bit grayscale PNGs (``<id>.png``, value·255) that C²AM-H training reads, so that the
hints can be inspected and scored on their own.

``summary.json`` (in the folder) holds, computed on the stored 8-bit values:

* ``fg_coverage``: fraction of pixels with hint ≥ δ_fg (the C²AM-H foreground hints);
* ``bg_coverage``: fraction with hint ≤ δ_bg (the background hints of the paper's Fig. 4,
  unused by the loss);
* where ground-truth masks exist (pixels labelled 255 ignored): ``fg_precision`` — the
  fraction of hint pixels ≥ δ_fg that are true foreground, the quantity the paper checks
  by inspection before choosing δ_fg — ``fg_recall`` (fraction of true foreground covered)
  and ``bg_precision`` (fraction of hint pixels ≤ δ_bg that are true background).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pnoc import cli
from pnoc.data.datasets import DataSource
from pnoc.io import DataError, atomic_dir, load_maps, write_gray, write_json

log = logging.getLogger("pnoc.saliency.extract_hints")


@dataclass
class Config(DataSource):
    """Extract foreground hints (max over classes of the CAMs)."""

    split: str
    cams_dir: Path
    out_dir: Path
    fg_threshold: float = 0.4
    bg_threshold: float = 0.1


def hint_map(maps: np.ndarray) -> np.ndarray:
    """Foreground hint of one image.

    Args:
        maps: (K, H, W) normalised CAMs in [0, 1] of the present classes (K may be 0).

    Returns:
        float32 (H, W) = max over K (zeros when K = 0).
    """
    if maps.shape[0] == 0:
        return np.zeros(maps.shape[1:], np.float32)
    return np.clip(maps.max(0), 0.0, 1.0).astype(np.float32)


def quantize(x: np.ndarray) -> np.ndarray:
    """The value an 8-bit PNG stores and :func:`pnoc.io.read_gray` returns (round(x·255)/255)."""
    return (np.clip(np.round(np.asarray(x, np.float32) * 255.0), 0, 255) / 255.0).astype(np.float32)


class HintStats:
    """Accumulates coverage and (with ground truth) precision/recall of hints over images."""

    def __init__(self, fg_threshold: float, bg_threshold: float):
        self.fg_t, self.bg_t = fg_threshold, bg_threshold
        self.pixels = self.fg = self.bg = 0
        self.gt_images = self.gt_pixels = self.fg_hint_gt = self.fg_hint_tp = 0
        self.bg_hint_gt = self.bg_hint_tn = self.true_fg = 0

    def update(self, hint: np.ndarray, gt: np.ndarray | None = None) -> None:
        """Add one image. hint (H, W) in [0, 1]; gt (H, W) index mask (0 bg, 1..C, 255 ignore) or None."""
        fg = hint >= self.fg_t
        bg = hint <= self.bg_t
        self.pixels += hint.size
        self.fg += int(fg.sum())
        self.bg += int(bg.sum())
        if gt is not None:
            valid = gt != 255
            true_fg = valid & (gt > 0)
            self.gt_images += 1
            self.gt_pixels += int(valid.sum())
            self.fg_hint_gt += int((fg & valid).sum())
            self.fg_hint_tp += int((fg & true_fg).sum())
            self.bg_hint_gt += int((bg & valid).sum())
            self.bg_hint_tn += int((bg & valid & (gt == 0)).sum())
            self.true_fg += int(true_fg.sum())

    def summary(self) -> dict:
        def ratio(a: int, b: int):
            return a / b if b else None

        out = {"fg_threshold": self.fg_t, "bg_threshold": self.bg_t,
               "fg_coverage": ratio(self.fg, self.pixels), "bg_coverage": ratio(self.bg, self.pixels),
               "gt_images": self.gt_images}
        if self.gt_images:
            out.update(fg_precision=ratio(self.fg_hint_tp, self.fg_hint_gt),
                       fg_recall=ratio(self.fg_hint_tp, self.true_fg),
                       bg_precision=ratio(self.bg_hint_tn, self.bg_hint_gt))
        return out


def run(cfg: Config) -> dict:
    ds = cfg.open_dataset(cfg.split)
    stats = HintStats(cfg.fg_threshold, cfg.bg_threshold)
    t0 = time.perf_counter()
    with atomic_dir(cfg.out_dir) as tmp:
        for image_id in tqdm(ds.ids, desc=f"hints {cfg.split}", mininterval=10):
            path = Path(cfg.cams_dir) / f"{image_id}.npz"
            if not path.is_file():
                raise DataError(f"{path}: no CAMs for image {image_id}; rerun rule infer_cams for split {cfg.split}")
            maps = load_maps(path)["maps"]
            hw = ds.image_size(image_id)
            if maps.shape[1:] != hw:
                raise DataError(f"{path}: maps are {maps.shape[1:]} but image {image_id} is {hw}; rerun infer_cams")
            hint = quantize(hint_map(maps))
            write_gray(tmp / f"{image_id}.png", hint)
            gt = ds.read_mask(image_id, hw) if ds.mask_path(image_id).is_file() else None
            stats.update(hint, gt)
        summary = {"stage": "extract_hints", "split": cfg.split, "cams": str(cfg.cams_dir), "images": len(ds),
                   **stats.summary(), "seconds": time.perf_counter() - t0}
        write_json(tmp / "summary.json", summary)
    if summary["gt_images"] < len(ds):
        log.warning("%d of %d images have no ground-truth mask: precision uses the other %d",
                    len(ds) - summary["gt_images"], len(ds), summary["gt_images"])
    log.info("hints %s: fg coverage %.3f, bg coverage %.3f, fg precision %s", cfg.split, summary["fg_coverage"],
             summary["bg_coverage"], f"{summary['fg_precision']:.3f}" if summary.get("fg_precision") is not None else "n/a")
    return summary


if __name__ == "__main__":
    cli.main(run, Config)
