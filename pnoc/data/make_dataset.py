"""Stage: generate the embedded synthetic benchmark (Pascal VOC layout).

    python -m pnoc.data.make_dataset --out results/dataset/synthetic --n-train 1000 --n-val 200

Every field of :class:`pnoc.data.synthetic.SyntheticConfig` is a flag; ``dataset.json`` (written
last) marks a complete dataset and holds the class names, the configuration and the statistics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pnoc import cli
from pnoc.data.synthetic import SyntheticConfig, generate

log = logging.getLogger("pnoc.data.make_dataset")


@dataclass(kw_only=True)
class Config(SyntheticConfig):
    """Generate the synthetic WSSS benchmark."""

    out: Path = dataclasses.field(metadata={"help": "dataset root folder to write"})


def synthetic_config(cfg: Config) -> SyntheticConfig:
    return SyntheticConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SyntheticConfig)})


def run(cfg: Config) -> dict:
    syn = synthetic_config(cfg)
    try:
        syn.validate()
    except ValueError as e:
        raise SystemExit(f"make_dataset: {e}") from e
    stats = generate(Path(cfg.out), syn)
    log.info("dataset %s: %s", cfg.out, json.dumps(stats, indent=1))
    return stats


if __name__ == "__main__":
    cli.main(run, Config)
