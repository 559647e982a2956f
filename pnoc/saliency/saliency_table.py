"""Stage: the paper's Table 6 on this run — C²AM vs C²AM-H, raw maps (P.) and PoolNet-refined (R.).

Reads the ``metrics.json`` of rule evaluate_saliency (variants ``<method>_raw`` = P.,
``<method>`` = R.), the hint ``summary.json`` and the C²AM training metrics, and writes a
markdown table plus a CSV with, per method: binary fg mIoU, saliency + CAM-priors mIoU and
saliency + GT-priors mIoU for P. and R. (mean ± std over seeds), the recorded direction
decision, and the hint statistics (coverage and precision at δ_fg).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pnoc import cli
from pnoc.evaluation import markdown_table, mean_of_present, percent_mean_std
from pnoc.io import read_json, write_csv, write_text

log = logging.getLogger("pnoc.saliency.saliency_table")


@dataclass
class Config:
    """Write the saliency table (paper Table 6)."""

    out: Path
    metrics: list[Path] = field(default_factory=list)
    hints: list[Path] = field(default_factory=list)
    training: list[Path] = field(default_factory=list)


def run(cfg: Config) -> dict:
    evals = defaultdict(list)  # (method, kind) -> metrics
    for p in cfg.metrics:
        m = read_json(p)
        variant = m["variant"]
        method, kind = (variant[:-4], "P") if variant.endswith("_raw") else (variant, "R")
        evals[(method, kind)].append(m)
    train = defaultdict(list)
    for p in cfg.training:
        m = read_json(p)
        train[m["method"]].append(m)
    hints = [read_json(p) for p in cfg.hints]
    methods = list(dict.fromkeys(k[0] for k in evals))
    rows, csv_rows = [], []
    for method in methods:
        row = {"method": {"c2am": "C²AM", "c2amh": "C²AM-H"}.get(method, method),
               "hints": "fg ≥ δ_fg" if method == "c2amh" else "-"}
        csv_row = {"method": method}
        for kind in ("P", "R"):
            ms = evals.get((method, kind), [])
            row[f"{kind}. binary"] = percent_mean_std([m["miou"] for m in ms])
            row[f"{kind}. + CAM priors"] = percent_mean_std([m.get("cam_combined", {}).get("miou") for m in ms])
            row[f"{kind}. + GT priors"] = percent_mean_std([m["gt_priors"]["miou"] for m in ms])
            csv_row[f"{kind.lower()}_binary_miou"] = mean_of_present([m["miou"] for m in ms])
            csv_row[f"{kind.lower()}_binary_threshold"] = mean_of_present([m["threshold"] for m in ms])
            csv_row[f"{kind.lower()}_cam_combined_miou"] = mean_of_present(
                [m.get("cam_combined", {}).get("miou") for m in ms])
            csv_row[f"{kind.lower()}_gt_priors_miou"] = mean_of_present([m["gt_priors"]["miou"] for m in ms])
            csv_row[f"{kind.lower()}_runs"] = len(ms)
        ts = train.get(method, [])
        if ts:
            d = ts[0]["direction"]
            row["direction"] = f"flip={d['flip']} ({d['method']})"
            csv_row["flip"] = d["flip"]
            csv_row["direction_method"] = d["method"]
            csv_row["ccam_seconds_per_iteration"] = mean_of_present([t.get("seconds_per_iteration") for t in ts])
        rows.append(row)
        csv_rows.append(csv_row)
    md = ("# Saliency from weak supervision (paper Table 6)\n\n"
          "mIoU (%) on the evaluated split; P. = raw C²AM/C²AM-H maps, R. = PoolNet trained on their "
          "pseudo-saliency masks. *binary*: mean of background and foreground IoU; *+ CAM priors*: background "
          "where not salient, else the CAM argmax (mIoU over all classes); *+ GT priors*: the same with the "
          "ground-truth classes, measuring the saliency alone. Thresholds chosen on the evaluated split.\n\n"
          + markdown_table(rows))
    if hints:
        hrows = [{"hints": h.get("cams", ""), "split": h["split"], "δ_fg": h["fg_threshold"],
                  "fg coverage": h["fg_coverage"], "fg precision": h.get("fg_precision"),
                  "fg recall": h.get("fg_recall"), "δ_bg": h["bg_threshold"], "bg coverage": h["bg_coverage"],
                  "bg precision": h.get("bg_precision")} for h in hints]
        md += "\n## Hints (max over classes of the CAMs)\n\n" + markdown_table(hrows)
        for r in csv_rows:
            r["hint_fg_precision"] = mean_of_present([h.get("fg_precision") for h in hints])
            r["hint_fg_coverage"] = mean_of_present([h["fg_coverage"] for h in hints])
    write_csv(Path(cfg.out).with_suffix(".csv"), csv_rows)
    write_text(cfg.out, md)
    log.info("\n%s", md)
    return {"rows": csv_rows}


if __name__ == "__main__":
    cli.main(run, Config)
