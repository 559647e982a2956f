"""Stage: gather every evaluation's ``metrics.json`` into ``results/summary.{json,md}``.

``summary.json`` is the machine-readable index other tools read::

    {"dataset_root": ..., "rows": [{"stage", "variant", "split", "miou", "masks", "seed"?, ...}],
     "aggregates": [{"stage", "variant", "split", "miou_mean", "miou_std", "seeds"}]}
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pnoc import cli
from pnoc.evaluation import markdown_table
from pnoc.io import read_json, write_json, write_text

log = logging.getLogger("pnoc.report.summary")

STAGE_ORDER = {"priors": 0, "saliency": 1, "pseudo_masks": 2, "segmentation": 3}


@dataclass
class Config:
    """Collect metrics into the run summary."""

    dataset_root: Path
    out: Path
    metrics: list[Path] = field(default_factory=list)


def _seed_of(path: Path) -> int | None:
    for part in path.parts:
        if part.startswith("seed") and part[4:].isdigit():
            return int(part[4:])
    return None


def run(cfg: Config) -> dict:
    rows = []
    for p in cfg.metrics:
        m = read_json(p)
        row = {"stage": m["stage"], "variant": m["variant"], "split": m["split"], "miou": float(m["miou"])}
        if m.get("threshold") is not None:
            row["threshold"] = m["threshold"]
        if m.get("masks"):
            row["masks"] = m["masks"]
        seed = _seed_of(Path(p))
        if seed is not None:
            row["seed"] = seed
        row["metrics"] = str(p)
        rows.append(row)
    rows.sort(key=lambda r: (STAGE_ORDER.get(r["stage"], 9), r["variant"], r["split"], r.get("seed", 0)))
    groups = defaultdict(list)
    for r in rows:
        groups[(r["stage"], r["variant"], r["split"])].append(r)
    aggregates = []
    for (stage, variant, split), rs in groups.items():
        v = np.array([r["miou"] for r in rs])
        aggregates.append({"stage": stage, "variant": variant, "split": split, "miou_mean": float(v.mean()),
                           "miou_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "runs": len(v)})
    summary = {"dataset_root": str(cfg.dataset_root), "rows": rows, "aggregates": aggregates}
    table = [{"stage": a["stage"], "variant": a["variant"], "split": a["split"],
              "mIoU (%)": f"{100 * a['miou_mean']:.2f}" + (f" ± {100 * a['miou_std']:.2f}" if a["runs"] > 1 else ""),
              "runs": a["runs"]} for a in aggregates]
    md = "# pnoc results\n\n" + markdown_table(table)
    write_text(Path(cfg.out).with_suffix(".md"), md)
    write_json(cfg.out, summary)
    log.info("\n%s", md)
    return summary


if __name__ == "__main__":
    cli.main(run, Config)
