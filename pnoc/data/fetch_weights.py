"""Stage: fetch one backbone's ImageNet weights into the weights folder, verified (a local rule: submit host).

    python -m pnoc.data.fetch_weights --backbone resnest269 --out weights/resnest269-0cc87c48.pth \\
        --urls https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/resnest269-0cc87c48.pth

Tries each URL in order, writes the file atomically, checks its sha256 (``--sha256``, else the hash in its
torch.hub-style name) and records the digest beside it (``<file>.sha256``). A file already placed there by hand
is checked instead. Where no URL can be reached, the error lists each URL with its error and names the exact file
and folder to place by hand. See :mod:`pnoc.models.pretrained`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from pnoc import cli
from pnoc.models.pretrained import fetch

log = logging.getLogger("pnoc.data.fetch_weights")


@dataclass
class Config:
    """Fetch one backbone's ImageNet weights (imagenet_weights.sources.<backbone> of config.yaml)."""

    backbone: str = dataclasses.field(metadata={"help": "backbone name (what the weights are for)"})
    out: Path = dataclasses.field(metadata={"help": "weights file to write"})
    urls: list[str] = dataclasses.field(default_factory=list, metadata={"help": "addresses tried in order"})
    sha256: str | None = dataclasses.field(default=None, metadata={"help": "full sha256 to check (else the name's)"})
    timeout: float = dataclasses.field(default=60.0, metadata={"help": "seconds per connection attempt"})


def run(cfg: Config) -> dict:
    info = fetch(cfg.urls, cfg.out, cfg.sha256, cfg.timeout)
    log.info("%s ImageNet weights: %s (%d bytes, sha256 %s, from %s)", cfg.backbone, info["file"], info["bytes"],
             info["sha256"], info["url"])
    return info


if __name__ == "__main__":
    cli.main(run, Config)
