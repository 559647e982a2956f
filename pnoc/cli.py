"""Thin command-line layer: each stage declares a dataclass, this builds its argparse.

A stage module looks like::

    @dataclass
    class Config:
        dataset: Path          # required (no default) -> --dataset PATH
        epochs: int = 10       # -> --epochs 10
        scales: list[float] = field(default_factory=lambda: [1.0])  # -> --scales 0.5 1.0

    def run(cfg: Config) -> dict: ...

    if __name__ == "__main__":
        cli.main(run, Config)

Field names with ``_`` become flags with ``-``. ``bool`` fields take ``true/false``.
Defaults live in ``config.yaml`` (the Snakefile passes every value); the dataclass
defaults only serve direct library use and tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _none_or(tp):
    def conv(s: str):
        if s.strip().lower() in ("none", "null", ""):
            return None
        return tp(s)
    return conv


def build_parser(cfg_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """Build an ``argparse`` parser whose flags are the dataclass fields of ``cfg_cls``."""
    p = argparse.ArgumentParser(description=description or cfg_cls.__doc__)
    hints = typing.get_type_hints(cfg_cls)
    for f in dataclasses.fields(cfg_cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name}
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        optional = False
        if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
            non_none = [a for a in args if a is not type(None)]
            optional = len(non_none) < len(args)
            tp = non_none[0]
            origin = typing.get_origin(tp)
            args = typing.get_args(tp)
        if origin in (list, tuple):
            elem = args[0] if args else str
            kw["nargs"] = "*"
            kw["type"] = _parse_bool if elem is bool else elem
        elif tp is bool:
            kw["type"] = _parse_bool
        else:
            kw["type"] = _none_or(tp) if optional else tp
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            kw["default"] = f.default_factory()  # type: ignore[misc]
        else:
            kw["required"] = True
        help_text = f.metadata.get("help", "") if f.metadata else ""
        kw["help"] = f"{help_text} (default: {kw.get('default', 'required')})"
        p.add_argument(flag, **kw)
    return p


def parse(cfg_cls: type[T], argv: list[str] | None = None) -> T:
    ns = build_parser(cfg_cls).parse_args(argv)
    return cfg_cls(**vars(ns))


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines on stderr; under ``torchrun`` each line names its rank (``[rank 1/2]``)."""
    import os

    world = os.environ.get("WORLD_SIZE", "1")
    rank = f"[rank {os.environ.get('RANK', '0')}/{world}] " if world not in ("", "1") else ""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def main(run: Callable[[T], Any], cfg_cls: type[T], argv: list[str] | None = None) -> None:
    """Parse flags into ``cfg_cls``, set up logging, call ``run``.

    A :class:`pnoc.io.DataError`, or a :class:`pnoc.io.ResourceError` (disk full, not enough memory), ends the
    process with exit code 2 and its message (which names the file or key and the fix) on stderr, without a
    traceback.
    """
    from pnoc.io import DataError, ResourceError

    from pnoc.distributed import shutdown

    setup_logging()
    cfg = parse(cfg_cls, argv)
    try:
        run(cfg)
    except (DataError, ResourceError) as e:
        logging.getLogger("pnoc").error("%s", e)
        sys.exit(2)
    finally:
        shutdown()  # leaves the process group of a torchrun launch (no-op otherwise)


def as_path(p: str | Path | None) -> Path | None:
    return None if p is None else Path(p)


def run_rules_with_this_python() -> None:
    """Make the Snakefile's rules run pnoc with the interpreter running this code: its folder goes first on PATH.

    Called by the Snakefile (workflow/rules/common.smk) when Snakemake reads it. A rule that ran whatever
    ``python`` is first on PATH would fail inside its job with "No module named torch" whenever Snakemake was
    started as ``.venv/bin/snakemake`` without activating the venv. The rules' shell commands (``python -m
    pnoc...``, ``torchrun ...``) inherit Snakemake's environment, and SLURM jobs run Snakemake again with this same
    interpreter (the executor plugin passes ``sys.executable``), which reads the Snakefile again, so the jobs'
    rules get it too. With ``--use-conda`` the activated envs/pnoc.yaml comes first inside the job instead.
    Changing PATH, not the shell lines, keeps the interpreter's location out of the rules' recorded parameters:
    another clone or venv reruns nothing.

    Raises:
        ImportError: this interpreter cannot import torch; the message says how to start Snakemake instead.
    """
    import importlib
    import os

    try:
        importlib.import_module("torch")
    except ImportError as e:
        raise ImportError(
            f"Snakemake runs with {sys.executable}, which cannot import torch ({e}); every rule runs pnoc with this "
            f"interpreter. Run Snakemake from pnoc's environment (`source .venv/bin/activate` first, or "
            f"`.venv/bin/snakemake ...`), or install pnoc into this one: `{sys.executable} -m pip install -e "
            f"'.[workflow]'`"
        ) from e
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, *path])

