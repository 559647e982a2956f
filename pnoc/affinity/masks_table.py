"""Stage: the paper's Table 7 on this run — pseudo-mask mIoU of RW over the priors.

Reads the ``metrics.json`` files of rule evaluate_masks (variant ``<prior>+<method>``, each
holding ``prior_miou`` of the prior it started from) and writes a markdown table plus a CSV:
one row per prior (P-OC / P-NOC, with and without label smoothing) and affinity-label method
(``classic`` IRN labels vs ``saliency`` = saliency-aware labels of the chain's saliency method),
with, per split, the prior mIoU,
the pseudo-mask mIoU and the gain (mean ± std over seeds).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pnoc import cli
from pnoc.evaluation import markdown_table, mean_of_present, percent_mean_std
from pnoc.io import read_json, write_csv, write_text

log = logging.getLogger("pnoc.affinity.masks_table")

SALIENCY_NAMES = {"c2am": "C²AM", "c2amh": "C²AM-H"}


@dataclass
class Config:
    """Write the pseudo-mask table (paper Table 7)."""

    out: Path
    metrics: list[Path] = field(default_factory=list)
    saliency_method: str = "c2amh"
    saliency_gate: float | None = None


def prior_flags(prior: str) -> dict:
    """``pnoc_ls`` -> strategy P-NOC, LS yes, NOC yes."""
    base = prior[:-3] if prior.endswith("_ls") else prior
    return {"strategy": {"poc": "P-OC", "pnoc": "P-NOC"}.get(base, base), "ls": "✓" if prior.endswith("_ls") else "",
            "noc": "✓" if base == "pnoc" else ""}


def run(cfg: Config) -> dict:
    saliency = SALIENCY_NAMES.get(cfg.saliency_method, cfg.saliency_method)
    names = {"classic": "classic (IRN)", "saliency": f"saliency ({saliency})"}
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    splits: list[str] = []
    for p in cfg.metrics:
        m = read_json(p)
        if m.get("stage") != "pseudo_masks":
            raise ValueError(f"{p}: not a pseudo-mask evaluation (stage {m.get('stage')!r})")
        prior, _, method = m["variant"].partition("+")
        groups[(prior, method)][m["split"]].append(m)
        if m["split"] not in splits:
            splits.append(m["split"])
    md_rows, csv_rows = [], []
    for (prior, method), by_split in groups.items():
        f = prior_flags(prior)
        md = {"prior": prior, "strategy": f["strategy"], "+LS": f["ls"], "+NOC": f["noc"],
              "affinity labels": names.get(method, method)}
        row = {"prior": prior, "method": method}
        for split in splits:
            ms = by_split.get(split, [])
            rw = [m["miou"] for m in ms]
            pr = [m.get("prior_miou") for m in ms]
            gain = [m["miou"] - m["prior_miou"] for m in ms if m.get("prior_miou") is not None]
            md[f"prior {split}"] = percent_mean_std(pr)
            md[f"pseudo masks {split}"] = percent_mean_std(rw)
            md[f"Δ {split}"] = (("+" if np.mean(gain) >= 0 else "") + percent_mean_std(gain)) if gain else ""
            row.update({f"prior_miou_{split}": mean_of_present(pr), f"miou_{split}": mean_of_present(rw),
                        f"gain_{split}": mean_of_present(gain), f"seeds_{split}": len(ms)})
        md_rows.append(md)
        csv_rows.append(row)
    gate = "" if cfg.saliency_gate is None else (
        f", then background where the {saliency} saliency is ≤ {cfg.saliency_gate:g}, for both label methods")
    md = ("# Pseudo masks: random walk over the priors (paper Table 7)\n\n"
          f"mIoU (%) of the pseudo masks (RW + dCRF{gate}) next to the prior they started from (best background "
          "threshold of the prior, chosen on the evaluated split); mean ± std over seeds.\n\n"
          + markdown_table(md_rows))
    write_text(cfg.out, md)
    write_csv(Path(cfg.out).with_suffix(".csv"), csv_rows)
    log.info("\n%s", md)
    return {"rows": csv_rows}


if __name__ == "__main__":
    cli.main(run, Config)
