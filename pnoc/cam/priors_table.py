"""Paper-style tables as DAG targets (priors: Tables 2 and 3).

``python -m pnoc.cam.priors_table --out T.md --priors M1.json ... --training T1.json ...``
writes ``T.md`` and ``T.csv``: per variant the no-TTA prior mIoU after each epoch and
the final TTA prior mIoU (mean ± std over seeds), the per-class IoU and the class-group
scores.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from pnoc.cli import setup_logging
from pnoc.evaluation import markdown_table, percent_mean_std
from pnoc.io import read_json, write_csv, write_text

log = logging.getLogger("pnoc.cam.priors_table")


def _variant_of(path: str) -> str:
    parts = Path(path).parts
    i = [k for k, p in enumerate(parts) if p.startswith("seed")][0]
    return parts[i - 1]


def priors_table(priors: list[str], training: list[str]) -> tuple[str, list[dict]]:
    by_var = defaultdict(list)
    for p in priors:
        by_var[_variant_of(p)].append(read_json(p))
    train_by_var = defaultdict(list)
    for p in training:
        train_by_var[_variant_of(p)].append(read_json(p))
    variants = list(by_var)
    n_epochs = max((len(t["epochs"]) for ts in train_by_var.values() for t in ts), default=0)
    rows2, csv_rows = [], []
    base_cost = None
    for v in variants:
        ts = train_by_var.get(v, [])
        cost = np.mean([t["seconds_per_iteration"] for t in ts]) if ts else float("nan")
        if v == "cam":
            base_cost = cost
        row = {"variant": v, "seeds": len(by_var[v])}
        for e in range(n_epochs):
            vals = [t["epochs"][e]["prior_miou_no_tta"] for t in ts if len(t["epochs"]) > e]
            row[f"ep{e + 1}"] = percent_mean_std(vals) if vals else ""
        row["final (TTA)"] = percent_mean_std([m["miou"] for m in by_var[v]])
        row["threshold"] = f"{np.mean([m['threshold'] for m in by_var[v]]):.2f}"
        row["_cost"] = cost
        rows2.append(row)
        csv_rows.append({"variant": v, "miou_mean": float(np.mean([m["miou"] for m in by_var[v]])),
                         "miou_std": float(np.std([m["miou"] for m in by_var[v]], ddof=1)) if len(by_var[v]) > 1 else 0.0,
                         "seeds": len(by_var[v]), "seconds_per_iteration": float(cost)})
    for row in rows2:
        c = row.pop("_cost")
        row["cost / iter vs cam"] = f"{c / base_cost:.2f}×" if base_cost and np.isfinite(c) else ""
    for r in csv_rows:
        r["cost_vs_cam"] = r["seconds_per_iteration"] / base_cost if base_cost else None
    classes = list(next(iter(by_var.values()))[0]["per_class_iou"])
    rows3 = []
    for c in classes:
        row = {"class": c}
        for v in variants:
            row[v] = percent_mean_std([m["per_class_iou"][c] for m in by_var[v]])
        rows3.append(row)
    groups = [g["group"] for g in next(iter(by_var.values()))[0]["class_groups"]]
    rows_g = []
    for gi, g in enumerate(groups):
        row = {"group": g, "classes": next(iter(by_var.values()))[0]["class_groups"][gi]["classes"]}
        for v in variants:
            vals = [m["class_groups"][gi]["miou"] for m in by_var[v]]
            row[v] = percent_mean_std(vals) if not g.startswith("correlation") else f"{np.nanmean(vals):+.2f}"
        rows_g.append(row)
    md = ("# Priors (paper Tables 2 and 3)\n\nmIoU (%) on the evaluated split; mean ± std over seeds. "
          "Per-epoch columns: single scale, no flip; final: TTA.\n\n" + markdown_table(rows2)
          + "\n## Per-class IoU (%)\n\n" + markdown_table(rows3)
          + "\n## Class groups (mIoU %, ρ = correlation of class IoU with the property)\n\n" + markdown_table(rows_g))
    return md, csv_rows


def main(argv=None) -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--priors", nargs="+", required=True)
    p.add_argument("--training", nargs="*", default=[])
    a = p.parse_args(argv)
    md, rows = priors_table(a.priors, a.training)
    write_csv(a.out.with_suffix(".csv"), rows)
    write_text(a.out, md)
    log.info("\n%s", md)


if __name__ == "__main__":
    main()
