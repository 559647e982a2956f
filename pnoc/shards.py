"""Sharded inference: which images a shard processes, and the gather of the shard folders.

With ``resources.shards: K`` (config) every per-image stage (``infer_cams``, ``infer_saliency``,
``infer_poolnet``, ``make_affinity_labels``, ``propagate``, ``make_pseudo_masks``,
``infer_segmentation``) runs as K jobs. Job ``k`` gets ``--shard kofK`` and processes only
:func:`shard_ids` of the split, writing ``<folder>.shards/kofK``; the gather job, ::

    python -m pnoc.shards --out results/cams/cam/seed0/train --shards results/cams/cam/seed0/train.shards/{1,2,3}of3

then puts the K folders together into ``<folder>``, the folder the unsharded stage writes, so the
consumers do not change. Per-image files are hard-linked (copied where the file system has no hard
links): they are the same bytes as in an unsharded run, because no stage lets one image's output depend
on the other images of its run (a batch holds images of one size, each computed on its own; the walk's
operator is block-diagonal). ``tests/test_shards.py`` checks this byte for byte on CPU, and on a GPU where
one is present: GPU libraries may pick their kernels by batch size, and the shards batch differently.
Identity also assumes the shards run on the same kind of hardware as the unsharded job would.
The top-level JSON files (``_info.json``, ``summary.json``) hold settings, counts and timings of their
shard; :func:`merge_info` merges them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pnoc import cli
from pnoc.io import DataError, atomic_dir, read_json, write_json

log = logging.getLogger("pnoc.shards")

_SHARD = re.compile(r"(\d+)of(\d+)")


def parse_shard(shard: str) -> tuple[int, int]:
    """``"2of3"`` -> ``(2, 3)``.

    Raises:
        DataError: not of the form ``kofK`` with ``1 <= k <= K``.
    """
    m = _SHARD.fullmatch(str(shard).strip())
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise DataError(
            f"shard {shard!r}: expected kofK with 1 <= k <= K, e.g. 1of1 (everything) or 2of3 (the second of "
            f"three slices); the workflow names the shards itself from resources.shards (an integer >= 1)"
        )
    return int(m.group(1)), int(m.group(2))


def shard_ids(ids: Sequence[str], shard: str = "1of1") -> list[str]:
    """The ids of one shard: the k-th of K contiguous slices of ``ids``, in their order.

    The slices' sizes differ by at most one, the larger ones first (10 ids in 3 shards: 4, 3, 3);
    together they are ``ids``. A shard is empty when K exceeds the number of ids.

    Args:
        ids: the image ids of a split, in list order.
        shard: ``kofK`` (:func:`parse_shard`); ``1of1`` is every id.
    """
    k, n_shards = parse_shard(shard)
    ids = list(ids)
    size, extra = divmod(len(ids), n_shards)
    start = (k - 1) * size + min(k - 1, extra)
    return ids[start:start + size + (1 if k <= extra else 0)]


def merge_info(infos: Sequence[dict]) -> dict:
    """Merge the JSON summaries of K shards into the summary of the whole split (keys in the first's order).

    * ``images``, and every key ending in ``seconds`` or ``bytes``: summed. ``seconds`` is thus the
      compute time of all shards together (they may have run in parallel).
    * ``images_per_s``: recomputed as images / seconds, the throughput of one job.
    * every key starting with ``peak_`` (peak memory, :func:`pnoc.training.peak_memory`): the largest of the
      shards' numbers (None where no shard has one).
    * ``counts`` (a dict of numbers): summed key by key; every ``ratios`` entry ``key: [num, den]``
      is recomputed as ``counts[num] / counts[den]`` (None when that is 0), exactly as the stage
      computed it for its own images (:func:`ratios`).
    * a value that is equal in every shard (settings, paths, the model): kept.
    * any other number that differs: a per-image mean (e.g. ``bytes_per_image``, ``mean_saliency``),
      weighted by the shards' ``images``.
    * any other value that differs (e.g. ``device``, for shards run on different machines): the list
      of the shards' values, in shard order.

    Raises:
        DataError: no summary, or a key missing from some shards.
    """
    if not infos:
        raise DataError("no shard summary to merge")
    keys = list(infos[0])
    for i, info in enumerate(infos):
        if set(info) != set(keys):
            raise DataError(f"shard {i + 1}'s summary has keys {sorted(info)}, shard 1's {sorted(keys)}: the shards "
                            f"were written by different versions of pnoc; rerun them")
    weights = [info.get("images", 1) for info in infos]
    out: dict = {}
    for key in keys:
        values = [info[key] for info in infos]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numbers and (key == "images" or key.endswith(("seconds", "bytes"))):
            out[key] = sum(values)
        elif key.startswith("peak_") and all(v is None or isinstance(v, (int, float)) for v in values):
            out[key] = max((v for v in values if v is not None), default=None)
        elif key == "counts" and all(isinstance(v, dict) for v in values):
            out[key] = {c: sum(v[c] for v in values) for c in values[0]}
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        elif numbers:
            total = sum(weights)
            out[key] = sum(w * v for w, v in zip(weights, values)) / total if total else values[0]
        else:
            out[key] = values
    if "images_per_s" in out:
        out["images_per_s"] = out.get("images", 0) / max(out.get("seconds", 0.0), 1e-9)
    if isinstance(out.get("ratios"), dict) and isinstance(out.get("counts"), dict):
        out.update(ratios(out["counts"], out["ratios"]))
    return out


def ratios(counts: dict, spec: dict) -> dict:
    """``{key: counts[num] / counts[den]}`` for every ``key: (num, den)`` of ``spec``; None where the count is 0.

    A stage whose summary holds ratios of pixel counts computes them with this and stores ``counts`` and
    ``spec`` (as ``ratios``) beside them, so that :func:`merge_info` recomputes them exactly.
    """
    return {key: (counts[num] / counts[den] if counts[den] else None) for key, (num, den) in spec.items()}


def _check_names(dirs: Sequence[Path]) -> None:
    """The shard folders must be named 1ofK .. KofK, each once."""
    if not dirs:
        raise DataError("no shard folder given; pass --shards <folder>.shards/1ofK ... <folder>.shards/KofK")
    parsed = []
    for d in dirs:
        try:
            parsed.append(parse_shard(d.name))
        except DataError:
            raise DataError(f"{d}: not a shard folder (its name must be kofK, e.g. 2of3)") from None
    n_shards = parsed[0][1]
    if any(n != n_shards for _, n in parsed):
        raise DataError(f"shard folders of different shard counts: {[d.name for d in dirs]}; gather the K folders of "
                        f"one run")
    got = sorted(k for k, _ in parsed)
    missing = [f"{k}of{n_shards}" for k in range(1, n_shards + 1) if k not in got]
    if missing or len(got) != n_shards:
        raise DataError(f"shard folders {[d.name for d in dirs]}: missing {missing or 'none'}, repeated "
                        f"{sorted({k for k in got if got.count(k) > 1})}; pass each of 1of{n_shards} .. "
                        f"{n_shards}of{n_shards} once")
    for d in dirs:
        if not d.is_dir():
            raise DataError(f"{d}: shard folder missing; rerun the shard job that writes it")


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (another file system, some network mounts): copy the bytes
        shutil.copy2(src, dst)


def gather(out: str | os.PathLike, shards: Sequence[str | os.PathLike]) -> dict:
    """Put the shard folders of one stage together into ``out`` (written atomically).

    Every file of a shard folder, sub-folders included (e.g. the VOC submission folder of
    ``infer_segmentation``), is hard-linked to the same relative path in ``out``; hidden files
    (``.``-names: Snakemake's timestamps, temporary files) are skipped. The JSON files at the top
    of the folders are merged with :func:`merge_info` instead.

    Args:
        out: the folder the unsharded stage writes.
        shards: the K shard folders, named ``1ofK`` .. ``KofK`` (any order).

    Returns:
        ``{"shards": K, "files": number of per-image files, "summaries": merged JSON names}``.

    Raises:
        DataError: a shard folder missing, misnamed or repeated; a file in two shards; a summary
            that only some shards have.
    """
    dirs = [Path(d) for d in shards]
    _check_names(dirs)
    dirs.sort(key=lambda d: parse_shard(d.name)[0])
    owner: dict[Path, Path] = {}
    infos: dict[str, list[dict]] = {}
    with atomic_dir(out) as tmp:
        for d in dirs:
            for src in sorted(d.rglob("*")):
                rel = src.relative_to(d)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if src.is_dir():
                    (tmp / rel).mkdir(parents=True, exist_ok=True)
                elif len(rel.parts) == 1 and rel.suffix == ".json":
                    infos.setdefault(rel.name, []).append(read_json(src))
                elif rel in owner:
                    raise DataError(f"{rel} is in shard folders {owner[rel]} and {d}: the shards overlap; rerun them "
                                    f"with the same image list")
                else:
                    owner[rel] = d
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    _link(src, tmp / rel)
        for name, found in infos.items():
            if len(found) != len(dirs):
                raise DataError(f"{name} is in {len(found)} of the {len(dirs)} shard folders of {out}; rerun the "
                                f"shards that lack it")
            write_json(tmp / name, merge_info(found))
    log.info("gathered %d shards into %s: %d files, summaries %s", len(dirs), out, len(owner), sorted(infos))
    return {"shards": len(dirs), "files": len(owner), "summaries": sorted(infos)}


@dataclass
class Config:
    """Gather the shard folders of a sharded stage into the folder of the unsharded stage."""

    out: Path
    shards: list[Path]


def run(cfg: Config) -> dict:
    return gather(cfg.out, cfg.shards)


if __name__ == "__main__":
    cli.main(run, Config)
