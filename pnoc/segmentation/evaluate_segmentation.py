"""Stage: score segmentation predictions against ground truth.

Reads the index PNGs of ``--masks-dir`` (written by ``infer_segmentation``; no extra CRF),
resizes a prediction to its ground truth with nearest neighbour if needed, and writes
``metrics.json`` (``stage: segmentation``, ``variant``, ``split``, ``miou``,
``per_class_iou`` with the background, FP/FN ratios, the class-group table of the
paper's Table 1 grouping) and ``metrics.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pnoc import cli
from pnoc.data.datasets import DataSource
from pnoc.evaluation import class_groups, class_statistics, evaluate_mask_folder, group_table, markdown_table
from pnoc.io import write_json, write_text

log = logging.getLogger("pnoc.segmentation.evaluate_segmentation")


@dataclass
class Config(DataSource):
    """Evaluate segmentation predictions (mIoU, per-class IoU, FP/FN)."""

    split: str
    masks_dir: Path
    out: Path
    variant: str = "deeplabv3plus"
    stage: str = "segmentation"


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    ds = cfg.open_dataset(cfg.split)
    ds.validate(need_labels=False, need_masks=True)
    s = evaluate_mask_folder(ds, cfg.masks_dir)
    masks = [ds.read_mask(i) for i in ds.ids]
    labels = [ds.labels(i) for i in ds.ids]
    stats = class_statistics(masks, labels)
    rows = group_table(s["iou"], ds.classes, class_groups(stats, ds.classes), stats)
    metrics = {
        "stage": cfg.stage, "variant": cfg.variant, "split": cfg.split, "miou": s["miou"],
        "miou_fg": s["miou_fg"], "pixel_accuracy": s["pixel_accuracy"],
        "per_class_iou": s["per_class_iou"], "fp": s["fp"], "fn": s["fn"],
        "fp_per_class": s["per_class_fp"], "fn_per_class": s["per_class_fn"],
        "confusion": s["confusion"], "class_groups": rows, "images": s["images"],
        "pred_ignored_pixels": s["pred_ignored_pixels"], "masks": str(cfg.masks_dir),
    }
    table = [{"class": k, "iou": v, "fp": s["per_class_fp"][k], "fn": s["per_class_fn"][k]}
             for k, v in s["per_class_iou"].items()]
    md = (f"# {cfg.stage.replace('_', ' ').capitalize()} `{cfg.variant}` on {cfg.dataset}/{cfg.split}\n\n"
          f"mIoU **{s['miou']:.4f}** (foreground {s['miou_fg']:.4f}, pixel accuracy {s['pixel_accuracy']:.4f}, "
          f"mean FP {s['fp']:.3f}, mean FN {s['fn']:.3f}) over {s['images']} images; masks `{cfg.masks_dir}`\n\n"
          + markdown_table(table) + "\n## Class groups\n\n" + markdown_table(rows))
    write_text(Path(cfg.out).with_suffix(".md"), md)
    metrics["seconds"] = time.perf_counter() - t0  # the whole evaluation (benchmarks/rehearsal.py)
    write_json(cfg.out, metrics)
    log.info("%s %s/%s: mIoU %.4f (fg %.4f)", cfg.stage, cfg.variant, cfg.split, s["miou"],
             s["miou_fg"] if not np.isnan(s["miou_fg"]) else float("nan"))
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
