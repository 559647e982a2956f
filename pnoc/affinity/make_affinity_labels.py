"""Stage: affinity labels from the priors (paper §5, spec §8).

One uint8 PNG per training image: 0 = confident background, 1..C = confident class,
255 = uncertain (ignored when AffinityNet is trained). Two methods:

* ``classic`` (IRN/PSA): a conservative foreground map (background plane at ``fg_threshold``,
  0.30) and a conservative background map (plane at ``bg_threshold``, 0.05), each refined
  with a label dCRF; pixels that only the background map calls background are uncertain.
* ``saliency`` (P-NOC): the saliency map decides the background (saliency ≤ ``bg_threshold``,
  0.10, after a 2-label dCRF); salient pixels get a class where the CAM exceeds
  ``fg_threshold`` (0.40) and are uncertain where it does not. With ``salient_threshold``
  (pnoc; None = the reference) only pixels above it may take a class, and the band between
  the two thresholds is uncertain.

Besides the PNGs the folder holds ``summary.json``: the fractions of background, foreground
and uncertain pixels and, on data with ground truth, the precision of the confident labels,
with the pixel ``counts`` they are ``ratios`` of (so that the summaries of shards merge exactly,
:func:`pnoc.shards.merge_info`). The folder is written atomically. With ``shard: kofK`` only the
k-th of K slices of the split is labelled (:mod:`pnoc.shards`). A missing CAM or saliency map
raises :class:`DataError` naming the image (the reference skips such images silently).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pnoc import cli
from pnoc.affinity.labels import IGNORE, affinity_labels_classic, affinity_labels_saliency
from pnoc.data.datasets import DataSource
from pnoc.io import DataError, atomic_dir, load_maps, write_json, write_mask
from pnoc.parallel import map_images
from pnoc.saliency.maps import read_saliency
from pnoc.shards import ratios, shard_ids

log = logging.getLogger("pnoc.affinity.make_affinity_labels")

METHODS = ("classic", "saliency")
DEFAULT_THRESHOLDS = {"classic": (0.30, 0.05), "saliency": (0.40, 0.10)}
# summary ratio -> (numerator, denominator) in the summary's pixel counts (label_counts, summed)
RATIOS = {"fraction_bg": ("bg", "pixels"), "fraction_fg": ("fg", "pixels"),
          "fraction_uncertain": ("uncertain", "pixels"),
          # precision of the confident labels against the ground truth (void pixels not scored)
          "precision_bg": ("correct_bg", "scored_bg"), "precision_fg": ("correct_fg", "scored_fg"),
          "precision_confident": ("correct", "scored")}


@dataclass
class Config(DataSource):
    """Make affinity labels for every image of a split."""

    split: str
    cams_dir: Path
    out_dir: Path
    method: str = "saliency"
    saliency_dir: Path | None = None
    fg_threshold: float | None = None
    bg_threshold: float | None = None
    salient_threshold: float | None = None
    crf: bool = True
    crf_t: int = 10
    crf_gt_prob: float = 0.7
    threads: int = 1
    shard: str = "1of1"


def read_cams(cams_dir: str | Path, image_id: str, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Full-resolution CAMs ``(K, H, W)`` and keys of one image; DataError naming the image if absent."""
    path = Path(cams_dir) / f"{image_id}.npz"
    if not path.is_file():
        raise DataError(f"{path}: CAMs missing for image {image_id}; rerun rule infer_cams for this split")
    z = load_maps(path)
    if z["maps"].shape[1:] != tuple(hw):
        raise DataError(f"{path}: CAMs are {z['maps'].shape[1:]} but image {image_id} is {tuple(hw)}; rerun infer_cams")
    return z["maps"], z["keys"]


def thresholds_of(cfg: Config) -> tuple[float, float]:
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r}: use one of {METHODS}")
    fg, bg = DEFAULT_THRESHOLDS[cfg.method]
    fg = fg if cfg.fg_threshold is None else cfg.fg_threshold
    bg = bg if cfg.bg_threshold is None else cfg.bg_threshold
    return fg, bg


def label_image(cfg: Config, ds, image_id: str) -> np.ndarray:
    """Affinity label map (H, W) uint8 of one image."""
    img = np.array(ds.read_image(image_id))  # writable copy: pydensecrf refuses read-only (PIL-backed) buffers
    hw = img.shape[:2]
    cams, keys = read_cams(cfg.cams_dir, image_id, hw)
    fg, bg = thresholds_of(cfg)
    crf = {"t": cfg.crf_t, "gt_prob": cfg.crf_gt_prob} if cfg.crf else None
    if cfg.method == "classic":
        return affinity_labels_classic(cams, keys, img, fg, bg, crf)
    if cfg.saliency_dir is None:
        raise DataError("method saliency needs --saliency-dir (the PoolNet saliency maps of the split)")
    sal = read_saliency(cfg.saliency_dir, image_id, hw, fmt="png")
    return affinity_labels_saliency(cams, keys, sal, img, fg, bg, crf, salient_thr=cfg.salient_threshold)


def label_counts(label: np.ndarray, gt: np.ndarray | None) -> np.ndarray:
    """Counts ``[bg, fg, uncertain, scored bg, correct bg, scored fg, correct fg]`` of one image."""
    bg, unsure = label == 0, label == IGNORE
    fg = ~bg & ~unsure
    out = [bg.sum(), fg.sum(), unsure.sum(), 0, 0, 0, 0]
    if gt is not None:
        valid = gt != 255
        out[3] = (bg & valid).sum()
        out[4] = (bg & valid & (gt == 0)).sum()
        out[5] = (fg & valid).sum()
        out[6] = (fg & valid & (gt == label)).sum()
    return np.asarray(out, np.int64)


# process-pool plumbing: the config, dataset and output folder live in module globals of a worker
_W: dict = {}


def _init_worker(cfg: Config, out: Path) -> None:
    _W["cfg"], _W["out"] = cfg, out
    _W["ds"] = cfg.open_dataset(cfg.split)


def _work(image_id: str) -> np.ndarray:
    cfg, ds, out = _W["cfg"], _W["ds"], _W["out"]
    label = label_image(cfg, ds, image_id)
    write_mask(out / f"{image_id}.png", label)
    gt = ds.read_mask(image_id, label.shape) if ds.mask_path(image_id).is_file() else None
    return label_counts(label, gt)


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    fg_thr, bg_thr = thresholds_of(cfg)
    ds = cfg.open_dataset(cfg.split)
    ids = shard_ids(ds.ids, cfg.shard)
    ds.validate(need_labels=True, ids=ids)
    totals = np.zeros(7, np.int64)
    with atomic_dir(cfg.out_dir) as tmp:
        for c in map_images(ids, _work, _init_worker, (cfg, tmp), cfg.threads,
                            f"affinity labels {cfg.method} {cfg.split}"):
            totals += c
        bg, fg, unsure, scored_bg, correct_bg, scored_fg, correct_fg = (int(t) for t in totals)
        counts = {"bg": bg, "fg": fg, "uncertain": unsure, "pixels": bg + fg + unsure, "scored_bg": scored_bg,
                  "correct_bg": correct_bg, "scored_fg": scored_fg, "correct_fg": correct_fg,
                  "scored": scored_bg + scored_fg, "correct": correct_bg + correct_fg}
        summary = {
            "stage": "affinity_labels", "method": cfg.method, "split": cfg.split, "images": len(ids),
            "fg_threshold": fg_thr, "bg_threshold": bg_thr,
            "crf": {"t": cfg.crf_t, "gt_prob": cfg.crf_gt_prob} if cfg.crf else None,
            "cams": str(cfg.cams_dir), "saliency": str(cfg.saliency_dir) if cfg.method == "saliency" else None,
            **ratios(counts, RATIOS), "counts": counts, "ratios": RATIOS,
            "config": {k: str(v) for k, v in asdict(cfg).items() if k not in ("out_dir", "threads", "shard")},
            "seconds": time.perf_counter() - t0,
        }
        write_json(tmp / "summary.json", summary)
    log.info("affinity labels (%s) of %d images: bg %s, fg %s, uncertain %s, confident precision %s", cfg.method,
             len(ids), *("n/a" if summary[k] is None else f"{summary[k]:.4f}"
                         for k in ("fraction_bg", "fraction_fg", "fraction_uncertain", "precision_confident")))
    return summary


if __name__ == "__main__":
    cli.main(run, Config)
