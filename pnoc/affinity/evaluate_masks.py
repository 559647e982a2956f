"""Stage: score pseudo masks against the ground truth of a split (paper Table 7).

Writes ``metrics.json`` (``stage: "pseudo_masks"``, ``variant`` = ``<prior>+<affinity method>``,
``split``, ``miou``, ``per_class_iou``, FP/FN ratios, ``masks`` = the folder) and a markdown
table beside it. With ``--prior-metrics`` (the ``metrics.json`` of rule evaluate_priors for the
same prior and split) the prior's mIoU is copied in, so every pseudo-mask row carries the
mIoU it started from.

Caveats kept from the paper's protocol: the val masks use ground-truth image labels, and the
prior's background threshold is chosen on the evaluated split (the RW one is fixed).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pnoc import cli
from pnoc.data.datasets import DataSource
from pnoc.evaluation import evaluate_mask_folder, markdown_table
from pnoc.io import read_json, write_json, write_text

log = logging.getLogger("pnoc.affinity.evaluate_masks")


@dataclass
class Config(DataSource):
    """Evaluate a folder of pseudo masks."""

    split: str
    masks_dir: Path
    out: Path
    variant: str = "pnoc_ls+saliency"
    prior_metrics: Path | None = None


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    ds = cfg.open_dataset(cfg.split)
    ds.validate(need_labels=False, need_masks=True)
    s = evaluate_mask_folder(ds, Path(cfg.masks_dir))
    prior, _, method = cfg.variant.partition("+")
    metrics = {
        "stage": "pseudo_masks", "variant": cfg.variant, "split": cfg.split, "miou": s["miou"],
        "prior_variant": prior, "affinity_method": method or None,
        "per_class_iou": s["per_class_iou"], "fp": s["fp"], "fn": s["fn"],
        "per_class_fp": s["per_class_fp"], "per_class_fn": s["per_class_fn"],
        "miou_fg": s["miou_fg"], "pixel_accuracy": s["pixel_accuracy"],
        "images": len(ds), "masks": str(cfg.masks_dir),
    }
    if cfg.prior_metrics is not None:
        pm = read_json(cfg.prior_metrics)
        metrics["prior_miou"] = float(pm["miou"])
        metrics["prior_threshold"] = pm.get("threshold")
        metrics["prior_metrics"] = str(cfg.prior_metrics)
    table = [{"class": k, "iou": v, "fp": metrics["per_class_fp"][k], "fn": metrics["per_class_fn"][k]}
             for k, v in metrics["per_class_iou"].items()]
    head = f"mIoU **{s['miou']:.4f}** (FP {s['fp']:.3f}, FN {s['fn']:.3f})"
    if "prior_miou" in metrics:
        head += f"; the prior `{prior}` scored {metrics['prior_miou']:.4f} (threshold {metrics['prior_threshold']})"
    md = f"# Pseudo masks `{cfg.variant}` on {cfg.dataset}/{cfg.split}\n\n{head}\n\n" + markdown_table(table)
    write_text(Path(cfg.out).with_suffix(".md"), md)
    metrics["seconds"] = time.perf_counter() - t0  # the whole evaluation (benchmarks/rehearsal.py)
    write_json(cfg.out, metrics)
    log.info("pseudo masks %s/%s: mIoU %.4f%s", cfg.variant, cfg.split, s["miou"],
             f" (prior {metrics['prior_miou']:.4f})" if "prior_miou" in metrics else "")
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
