"""Stage: check one split of a dataset up front and write its manifest.

    python -m pnoc.data.check_dataset --dataset custom --root data/my_set --split val --kind masks \\
        --out results/dataset/manifest/val/masks.json --threads 4

A split has two manifests, one per kind of reader:

* ``images``: every listed image is decoded (gray, CMYK, palette and PNG bytes in a .jpg are accepted:
  stages read RGB), the labels of every image are read from the dataset's label source (count, not
  empty, every image covered), and the list is checked for duplicates. Training and inference read this.
* ``masks``: every ground-truth mask decodes, has its image's size and holds the values of its folder's
  convention (0..C or 255; COCO's category ids where the folder holds those); with ``--need-masks`` (an
  evaluated split) every listed image has one. Where the labels come from a label file or annotations, each
  mask is compared with its image's labels: the images whose labels and mask disagree (a class in the mask
  but not in the labels, or the reverse) are counted in the summary with the first examples, and above
  ``--max-label-mismatch`` (a share of the images with a mask) they are an error. Evaluations read this, and
  so do the stages that score their output against the masks where present (CAM epochs, hints, affinity
  labels); the classifier waits for the training split's masks check, so a label file that disagrees with
  the masks stops the run before anything trains.

Every problem is collected - the first 20 are printed with the file and the fix, then a count - and the
stage fails without writing anything. Images are checked in parallel (``--threads`` worker processes).
Where the files could be read in more than one way (which of several mask folders, the mask values'
convention, the label file's key format, a two-column list, RGB masks), the log and the manifest
(``layout``, ``mask_encodings``) say what was assumed.

On success the manifest ``--out`` lists every file of the kind with its size and modification time (ns),
and ``--record`` their SHA-256 too (:func:`checked_record`). The manifest is the DAG input of every rule that
reads that kind of that split. The rule that writes it does not take those files as inputs (at COCO's size
Snakemake's bookkeeping of one input a file took most of every dry run: docs/benchmarks.md) but their
fingerprint as a parameter (:func:`dataset_fingerprint`, computed by the Snakefile), so a changed, added or
removed file reruns the check and exactly the stages that read it: a corrected val mask reruns the val
evaluations, not the training; a file touched or copied back with the same bytes reruns nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pnoc import cli
from pnoc.data.datasets import DataSource, WSSSDataset, present_classes
from pnoc.io import MASK_ENCODINGS, DataError, write_json, write_text
from pnoc.parallel import pool_map

log = logging.getLogger("pnoc.data.check_dataset")

MAX_LISTED = 20
"""Errors printed in full; the rest are counted."""
MISMATCH_EXAMPLES = 5
"""Images whose labels disagree with their mask, listed in the summary."""


@dataclass
class Config(DataSource):
    """Check a dataset split (images, masks, labels, list) and write its manifest."""

    split: str = dataclasses.field(metadata={"help": "split to check"})
    out: Path = dataclasses.field(metadata={"help": "manifest (JSON) to write"})
    kind: str = dataclasses.field(default="images", metadata={"help": "images (+ labels) | masks"})
    need_masks: bool = dataclasses.field(
        default=False, metadata={"help": "masks: every image needs one (the split is evaluated); else where present"})
    max_label_mismatch: float = dataclasses.field(
        default=0.05, metadata={"help": "masks: largest share of images whose labels disagree with their mask"})
    threads: int = dataclasses.field(default=1, metadata={"help": "worker processes"})
    record: Path | None = dataclasses.field(
        default=None, metadata={"help": "where to record the size, mtime and SHA-256 of every file read "
                                        "(dataset_fingerprint reads it)"})


# ---------------------------------------------------------------------------------- file lists


KINDS = ("images", "masks")


def compares_labels(ds: WSSSDataset) -> bool:
    """Whether the masks check compares the masks with the labels (not when the labels are the masks' classes)."""
    return ds.label_source != "masks"


def split_files(ds: WSSSDataset, kind: str) -> list[Path]:
    """Every existing file of one kind of a split: what its check reads and its manifest lists.

    ``images``: the split list, the class and label files, each listed image and annotation (and each
    mask when the labels come from the masks). ``masks``: the list, the class file, each listed mask
    and image (its size), and the labels the masks are compared with (label file or annotations). A
    listed file that is missing is left out (the check itself reports it).
    """
    return [p for p in _candidate_files(ds, kind) if p.is_file()]


def _candidate_files(ds: WSSSDataset, kind: str) -> list[Path]:
    """The files of :func:`split_files`, those missing included."""
    root = ds.root
    files = [p for p in [ds.list_path] if p is not None] + [root / "classes.txt", root / "dataset.json"]
    per_image = [ds.image_path]
    if kind == "masks" or ds.label_source == "masks":
        per_image.append(ds.mask_path)
    if kind == "images" or compares_labels(ds):
        files += [p for p in [ds.label_file_path] if p is not None]
        if ds.label_source == "Annotations":
            per_image.append(ds.label_path)
    files += [f(i) for i in dict.fromkeys(ds.ids) for f in per_image]
    return list(dict.fromkeys(files))


def split_file_stats(ds: WSSSDataset, kind: str) -> dict[str, list[int]]:
    """``{path relative to the root: [size, mtime_ns]}`` of :func:`split_files`, one ``stat`` a file."""
    out = {}
    for p in _candidate_files(ds, kind):
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            out[_rel(ds, p)] = [st.st_size, st.st_mtime_ns]
    return out


def dataset_files(name: str, root: str | Path, split: str, kind: str = "images", **options) -> list[str]:
    """The files the check of one kind of a split reads (:func:`split_files`), whose fingerprint decides when it
    reruns (:func:`dataset_fingerprint`). The synthetic benchmark is a rule output: its marker ``dataset.json``
    stands for all its files (the check's one input).

    Args:
        options: the dataset options of :class:`pnoc.data.datasets.WSSSDataset` (label_file, list_dir, ...).

    Raises:
        DataError: the split list is missing (the dry run fails with the path and the fix).
    """
    if name == "synthetic":
        return [str(Path(root) / "dataset.json")]
    return [str(p) for p in split_files(WSSSDataset(name, root, split, **options), kind)]


# ---------------------------------------------------------------------------------- the DAG input


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_or_none(path: str | Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:  # unreadable: changed, as far as the fingerprint knows; the check names it
        return None


RECORD_FORMAT = 2
"""Version of the check's record (:func:`checked_record`); a record of another version is ignored."""


def _load_record(path: Path) -> dict[str, list]:
    """The record of the last successful check (:func:`checked_record`), or {} (none, or unreadable)."""
    try:
        with open(path) as f:
            record = json.load(f)
        return record["files"] if record.get("format") == RECORD_FORMAT else {}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}


def dataset_fingerprint(name: str, root: str | Path, split: str, kind: str, record: str | Path | None = None,
                        **options) -> str:
    """A digest of the files of one kind of a split (:func:`split_files`): their paths, sizes and modification
    times, ``"<n> files, sha256 <hex>"``.

    It is a parameter of the check's job (``params.fingerprint``, computed when Snakemake builds the DAG), whose
    files are not its inputs: a changed, added or removed file changes the digest, and Snakemake reruns the check
    (its params trigger) and, through the manifest, exactly the stages that read it; an unchanged dataset reruns
    nothing. A file that ``record`` (what the last successful check read: :func:`checked_record`) holds with the
    same size and SHA-256 counts with the time recorded there: a file touched or copied back with the same bytes
    reruns nothing. Only the files whose time is neither of the record's two are read (hashed); the rest is one
    ``stat`` a file (COCO's four checks: 6 s, where one Snakemake input a file took about 30 s a run:
    docs/benchmarks.md).

    Args:
        options: the dataset options of :class:`pnoc.data.datasets.WSSSDataset` (label_file, list_dir, ...).

    Raises:
        DataError: the split list is missing (the dry run fails with the path and the fix).
    """
    ds = WSSSDataset(name, root, split, **options)
    files = split_file_stats(ds, kind)
    checked = _load_record(Path(record)) if record is not None and files else {}
    h = hashlib.sha256()
    for rel in sorted(files):
        size, mtime = files[rel]
        rec = checked.get(rel)
        if rec is not None and rec[0] == size and rec[2] and (
                mtime in (rec[1], rec[3]) or _sha256_or_none(ds.root / rel) == rec[2]):
            mtime = rec[1]  # the bytes the last check read, touched or copied back or not
        h.update(f"{rel}\t{size}\t{mtime}\n".encode())
    return f"{len(files)} files, sha256 {h.hexdigest()}"


def _sha256_if_unchanged(item: tuple[str, int, int]) -> str | None:
    path, size, mtime = item
    try:
        digest = file_sha256(path)
        st = os.stat(path)
    except OSError:
        return None
    return digest if (st.st_size, st.st_mtime_ns) == (size, mtime) else None


def checked_record(root: str | Path, files: dict[str, list[int]], threads: int = 1,
                   previous: dict[str, list] | None = None) -> dict:
    """What a successful check read, for :func:`dataset_fingerprint`: ``{"files": {path relative to the root:
    [size, mtime_ns of the bytes, sha256, mtime_ns now]}}`` for the manifest's files (the SHA-256 None where a
    file changed while it was hashed).

    The first time is the file's time when the check first read these bytes: a file of ``previous`` (the record
    of the check before) with the same size and SHA-256 keeps its time there, so that the fingerprint of files
    touched or copied back with the same bytes stays the one the check ran with. The second is its time now,
    which spares the next fingerprint hashing it again.
    """
    items = [(str(Path(root) / rel), size, mtime) for rel, (size, mtime) in files.items()]
    digests = pool_map(_sha256_if_unchanged, items, threads, chunk_cap=256)
    previous = previous or {}
    out = {}
    for (rel, (size, mtime)), digest in zip(files.items(), digests):
        prev = previous.get(rel)
        same = prev is not None and digest is not None and prev[0] == size and prev[2] == digest
        out[rel] = [size, prev[1] if same else mtime, digest, mtime]
    return {"format": RECORD_FORMAT, "hash": "sha256", "files": out}


# ---------------------------------------------------------------------------------- the checks

_DS: WSSSDataset | None = None  # the split being checked, shared with forked workers
_KIND = "images"
_NEED_MASKS = False
_LABELS = True  # read each image's labels (not when the label file itself is broken: one error says so)


@dataclass
class ImageResult:
    """What the check found for one image."""

    errors: list[str] = dataclasses.field(default_factory=list)
    labels: np.ndarray | None = None       # images: the labels read
    encoding: str | None = None            # masks: how the mask was decoded (pnoc.io.MASK_ENCODINGS)
    in_mask_only: list[int] = dataclasses.field(default_factory=list)    # classes (1-based) the labels lack
    in_labels_only: list[int] = dataclasses.field(default_factory=list)  # classes the mask lacks


def _check_one(image_id: str) -> ImageResult:
    """Check one image of the split in ``_DS``."""
    ds, res = _DS, ImageResult()
    path = ds.image_path(image_id)
    if not path.is_file():
        res.errors.append(f"{path}: listed in {ds.split}.txt but the image does not exist; add it or remove the line "
                          f"{image_id!r}")
        return res  # its mask and labels missing too is the same fault
    if _KIND == "masks":
        mpath = ds.mask_path(image_id)
        if not mpath.is_file():
            if _NEED_MASKS:
                res.errors.append(
                    f"{mpath}: ground-truth mask of {image_id} not found; {ds.missing_mask_hint(image_id)}; split "
                    f"{ds.split!r} is evaluated (or trains the supervised DeepLab), so every image needs one - add "
                    f"it, or use another split in the config"
                )
            return res
        try:
            # checked against the image header's size; the images check decodes pixels
            m, res.encoding = ds.read_mask_encoded(image_id)
        except DataError as e:
            res.errors.append(str(e))
            return res
        if _LABELS:
            try:
                labels = ds.labels(image_id)  # its own errors are the images check's to report
            except DataError:
                return res
            present = present_classes(m, ds.n_classes)
            res.in_mask_only = (np.flatnonzero((present > 0) & (labels == 0)) + 1).tolist()
            res.in_labels_only = (np.flatnonzero((labels > 0) & (present == 0)) + 1).tolist()
        return res
    try:
        ds.read_image(image_id)
    except DataError as e:
        res.errors.append(str(e))
    if _LABELS:
        try:
            res.labels = ds.labels(image_id)
        except DataError as e:
            res.errors.append(str(e))
    return res


def _rel(ds: WSSSDataset, path: Path) -> str:
    """``os.path.relpath(path, ds.root)``, without its cost for the plain paths under the root."""
    s, r = str(path), str(ds.root)
    if s.startswith(r + os.sep) and r != "." and "/." not in s[len(r):]:
        return s[len(r) + 1:]
    return os.path.relpath(path, ds.root)


def label_mask_agreement(ds: WSSSDataset, ids: list[str], results: list[ImageResult], max_share: float) -> tuple[dict, list[str]]:
    """Count the images whose labels and mask disagree; an error when their share exceeds ``max_share``.

    Returns:
        (summary for the manifest, errors).
    """
    checked = [(i, r) for i, r in zip(ids, results) if r.encoding is not None and not r.errors]
    bad = [(i, r) for i, r in checked if r.in_mask_only or r.in_labels_only]

    def names(classes):
        return [ds.classes[c - 1] for c in classes]

    examples = [f"{i}: in the mask only {names(r.in_mask_only)}, in the labels only {names(r.in_labels_only)}"
                for i, r in bad[:MISMATCH_EXAMPLES]]
    share = len(bad) / max(len(checked), 1)
    summary = {"labels": ds.label_source, "images_compared": len(checked), "disagree": len(bad),
               "share": round(share, 6), "max_share": max_share, "examples": examples,
               "in_mask_only": sum(len(r.in_mask_only) for _, r in bad),
               "in_labels_only": sum(len(r.in_labels_only) for _, r in bad)}
    errors = []
    if checked and share > max_share:
        errors.append(
            f"{ds.label_path(ids[0]) if ds.label_file_path else ds.root / 'Annotations'}: the labels of {len(bad)} of "
            f"{len(checked)} images ({100 * share:.1f} %) disagree with their masks in {ds.mask_layout.pattern.split('/')[0]}/ "
            f"(more than dataset.max_label_mismatch = {100 * max_share:g} %); e.g. {'; '.join(examples[:3])}. A label "
            f"file of another dataset or class order? Check it against these images, or raise dataset.max_label_mismatch "
            f"if the disagreement is known")
    return summary, errors


def check_split(name: str, root: str | Path, split: str, kind: str = "images", need_masks: bool = False,
                threads: int = 1, max_label_mismatch: float = 0.05, **options) -> tuple[dict, list[str]]:
    """Check one kind (images | masks) of a split; return its manifest and every error (none: sound).

    Args:
        need_masks: with ``kind="masks"``, a missing mask is an error (the split is evaluated); without,
            the masks that exist are checked (stages use them for diagnostics where present).
        max_label_mismatch: with ``kind="masks"``, the largest share of images whose labels and mask may disagree.
        options: the dataset options of :class:`pnoc.data.datasets.WSSSDataset`.
    """
    global _DS, _KIND, _NEED_MASKS, _LABELS
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = Path(root)
    try:
        ds = WSSSDataset(name, root, split, **options)
        layout = ds.describe()
    except DataError as e:
        return {}, [str(e)]
    errors: list[str] = []
    lst = ds.list_path
    counts = Counter(ds.ids)
    for image_id, n in counts.items():
        if n > 1:
            lines = [k + 1 for k, i in enumerate(ds.ids) if i == image_id]
            errors.append(f"{lst}: image {image_id!r} is listed {n} times (lines {lines}); remove the duplicate lines")
    label_errors = []
    if kind == "images" or compares_labels(ds):
        try:
            ds.check_label_file()
        except DataError as e:
            label_errors.append(str(e))
    if kind == "images":
        errors += label_errors
    ids = list(counts)
    _DS, _KIND, _NEED_MASKS = ds, kind, need_masks
    _LABELS = not label_errors and (kind == "images" or compares_labels(ds))
    try:
        results = pool_map(_check_one, ids, threads)
    finally:
        _DS = None
    for r in results:
        errors += r.errors
    files = split_file_stats(ds, kind)
    manifest = {
        "dataset": name,
        "root": str(root.resolve()),
        "split": split,
        "kind": kind,
        "n_images": len(ids),
        "classes": ds.classes,
        "label_source": ds.label_source,
        "layout": layout,
        "need_masks": need_masks if kind == "masks" else None,
        "masks": sum(_rel(ds, ds.mask_path(i)) in files for i in ids),  # mask files among the manifest's
        "files": dict(sorted(files.items())),
    }
    if kind == "images":
        per_class = np.zeros(ds.n_classes, np.int64)
        for r in results:
            if r.labels is not None:
                per_class += r.labels.astype(bool)
        manifest["images_per_class"] = dict(zip(ds.classes, per_class.tolist()))
    else:
        manifest["mask_encodings"] = dict(Counter(r.encoding for r in results if r.encoding).most_common())
        if _LABELS:
            manifest["label_mask_agreement"], agreement_errors = label_mask_agreement(ds, ids, results,
                                                                                      max_label_mismatch)
            errors += agreement_errors
    return manifest, errors


def format_errors(errors: list[str], what: str) -> str:
    head = "\n".join(f"  - {e}" for e in errors[:MAX_LISTED])
    more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
    return f"{what}: {len(errors)} problem(s); nothing was written, fix them and rerun:\n{head}{more}"


def run(cfg: Config) -> dict:
    t0 = time.time()
    options = {"label_file": cfg.label_file, "list_dir": cfg.list_dir, "coco_mask_values": cfg.coco_mask_values,
               "drop_unlabelled": cfg.drop_unlabelled}
    manifest, errors = check_split(cfg.dataset, cfg.root, cfg.split, cfg.kind, cfg.need_masks, max(1, cfg.threads),
                                   cfg.max_label_mismatch, **options)
    if errors:
        raise DataError(format_errors(errors, f"dataset {cfg.root} split {cfg.split!r} ({cfg.kind})"))
    if cfg.record is not None:  # before the manifest: a manifest is never newer than its record
        record = checked_record(cfg.root, manifest["files"], max(1, cfg.threads), _load_record(cfg.record))
        write_text(cfg.record, json.dumps(record, separators=(",", ":")) + "\n")
    write_json(cfg.out, manifest)
    dt = time.time() - t0
    log.info("split %s of %s (%s): %d images, %d masks, %d classes, labels from %s; checked in %.1f s (%.0f images/s)",
             cfg.split, cfg.root, cfg.kind, manifest["n_images"], manifest["masks"], len(manifest["classes"]),
             manifest["label_source"], dt, manifest["n_images"] / max(dt, 1e-9))
    for what, how in manifest["layout"].items():
        if cfg.kind == "masks" or what != "masks":
            log.info("  %s: %s", what, how)
    for encoding, n in manifest.get("mask_encodings", {}).items():
        log.info("  %d mask(s) read as %s", n, MASK_ENCODINGS[encoding])
    agreement = manifest.get("label_mask_agreement")
    if agreement:
        log.info("  labels vs masks: %d of %d images disagree (%.1f %%, limit %g %%)%s", agreement["disagree"],
                 agreement["images_compared"], 100 * agreement["share"], 100 * agreement["max_share"],
                 "".join(f"\n    {e}" for e in agreement["examples"]))
    return manifest


if __name__ == "__main__":
    cli.main(run, Config)
