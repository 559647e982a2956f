"""Stage: evaluate segmentation priors (CAMs) against ground truth with a background-threshold sweep.

One pass over the CAM files fills one confusion matrix per threshold; the best
threshold's per-class IoU, FP/FN ratios and the class-group table (paper Tables 1/3)
are written to ``metrics.json`` and ``table.md``, and the prior masks at the best
threshold are written as index PNGs. Diagnostics: the mIoU with a ground-truth
foreground oracle as background (what perfect extent would give) and the precision of
CAM pixels above 0.4 (what hints at δ_fg = 0.4 would be worth).

Caveat kept from the paper's protocol: the threshold is chosen on the evaluated split.
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
from pnoc.evaluation import (ThresholdSweep, class_groups, class_statistics, confusion, group_table, markdown_table,
                             prior_prediction, scores)
from pnoc.io import DataError, atomic_dir, load_maps, write_json, write_mask, write_text

log = logging.getLogger("pnoc.cam.evaluate_priors")


@dataclass
class Config(DataSource):
    """Evaluate priors over a threshold sweep."""

    split: str
    maps_dir: Path
    out: Path
    masks_dir: Path
    variant: str = "cam"
    th_min: float = 0.05
    th_max: float = 0.80
    th_step: float = 0.05
    hint_threshold: float = 0.4


def thresholds(lo: float, hi: float, step: float) -> list[float]:
    n = int(round((hi - lo) / step)) + 1
    return [round(lo + i * step, 6) for i in range(n)]


def per_class_dict(values: np.ndarray, ds) -> dict[str, float]:
    return {name: float(v) for name, v in zip(["background"] + ds.classes, values)}


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    ds = cfg.open_dataset(cfg.split)
    n = ds.n_classes + 1
    ths = thresholds(cfg.th_min, cfg.th_max, cfg.th_step)
    sweep = ThresholdSweep(n, ths)
    oracle = np.zeros((n, n), np.int64)
    hint_tp = hint_all = 0
    masks, labels = [], []
    for image_id in tqdm(ds.ids, desc=f"priors {cfg.split}", mininterval=10):
        path = Path(cfg.maps_dir) / f"{image_id}.npz"
        if not path.is_file():
            raise DataError(f"{path}: no maps for image {image_id}; rerun the inference rule for split {cfg.split}")
        z = load_maps(path)
        maps, keys = z["maps"], z["keys"]
        hw = ds.image_size(image_id)
        if maps.shape[1:] != hw:
            raise DataError(f"{path}: maps are {maps.shape[1:]} but image {image_id} is {hw}; rerun inference")
        gt = ds.read_mask(image_id, hw)
        sweep.update(maps, keys, gt)
        fg = (gt > 0) & (gt != 255)
        if maps.shape[0]:
            cls = np.asarray(keys)[maps.argmax(0)]
            oracle += confusion(np.where(fg, cls, 0), gt, n)
            strong = maps.max(0) > cfg.hint_threshold
            valid = gt != 255
            hint_tp += int((strong & fg).sum())
            hint_all += int((strong & valid).sum())
        masks.append(gt)
        labels.append(ds.labels(image_id))
    results = sweep.results()
    best = max(results, key=lambda r: r["miou"])
    t_best = best["threshold"]
    stats = class_statistics(masks, labels)
    groups = class_groups(stats, ds.classes)
    rows = group_table(best["iou"], ds.classes, groups, stats)
    orc = scores(oracle)
    metrics = {
        "stage": "priors", "variant": cfg.variant, "split": cfg.split, "miou": best["miou"], "threshold": t_best,
        "per_class_iou": per_class_dict(best["iou"], ds),
        "fp": best["fp"], "fn": best["fn"],
        "fp_per_class": per_class_dict(best["fp_per_class"], ds),
        "fn_per_class": per_class_dict(best["fn_per_class"], ds),
        "sweep": [{"threshold": r["threshold"], "miou": r["miou"]} for r in results],
        "oracle_gt_foreground_miou": orc["miou"],
        "oracle_per_class_iou": per_class_dict(orc["iou"], ds),
        f"precision_of_cam_above_{cfg.hint_threshold}": hint_tp / max(1, hint_all),
        "class_groups": rows,
        "class_statistics": {k: per_class_dict(np.concatenate([[np.nan], v]), ds) for k, v in stats.items()},
        "images": len(ds), "masks": str(cfg.masks_dir),
    }
    # prior masks at the best threshold, for inspection or scoring with another tool
    with atomic_dir(cfg.masks_dir) as tmp:
        for image_id in tqdm(ds.ids, desc="masks", mininterval=10):
            z = load_maps(Path(cfg.maps_dir) / f"{image_id}.npz")
            write_mask(tmp / f"{image_id}.png", prior_prediction(z["maps"], z["keys"], t_best))
    table = [{"class": k, "iou": v, "fp": metrics["fp_per_class"][k], "fn": metrics["fn_per_class"][k]}
             for k, v in metrics["per_class_iou"].items()]
    md = (f"# Priors `{cfg.variant}` on {cfg.dataset}/{cfg.split}\n\n"
          f"mIoU **{best['miou']:.4f}** at background threshold {t_best:.2f} "
          f"(oracle GT-foreground mIoU {orc['miou']:.4f}; precision of CAM > {cfg.hint_threshold}: "
          f"{metrics[f'precision_of_cam_above_{cfg.hint_threshold}']:.3f})\n\n"
          + markdown_table(table) + "\n## Threshold sweep\n\n" + markdown_table(metrics["sweep"])
          + "\n## Class groups\n\n" + markdown_table(rows))
    write_text(Path(cfg.out).with_suffix(".md"), md)
    metrics["seconds"] = time.perf_counter() - t0  # the whole evaluation (benchmarks/rehearsal.py)
    write_json(cfg.out, metrics)
    log.info("priors %s/%s: mIoU %.4f at t=%.2f (oracle %.4f)", cfg.variant, cfg.split, best["miou"], t_best, orc["miou"])
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
