"""Stage: check one split of a dataset up front and write its manifest.

    python -m pnoc.data.check_dataset --dataset custom --root data/my_set --split val --kind masks \\
        --out results/dataset/manifest/val/masks.json --threads 4

A split has two manifests, one per kind of reader:

* ``images``: every listed image is decoded (gray, CMYK, palette and PNG bytes in a .jpg are accepted:
  stages read RGB), the labels of every image are read from the dataset's label source (count, not
  empty, every image covered), and the list is checked for duplicates. Training and inference read this.
* ``masks``: every ground-truth mask decodes, has its image's size and holds 0..C or 255 only; with
  ``--need-masks`` (an evaluated split) every listed image has one. Evaluations read this, and so do the
  stages that score their output against the masks where present (CAM epochs, hints, affinity labels).

Every problem is collected - the first 20 are printed with the file and the fix, then a count - and the
stage fails without writing anything. Images are checked in parallel (``--threads`` worker processes).

On success the manifest ``--out`` lists every file of the kind with its size and modification time (ns).
It is the DAG input of every rule that reads that kind of that split, and the rule that writes it takes
those same files as its inputs (:func:`dataset_files`, called by the Snakefile), so a changed, added or
removed file reruns the check and exactly the stages that read it: a corrected val mask reruns the val
evaluations, not the training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pnoc import cli
from pnoc.data.datasets import WSSSDataset
from pnoc.io import DataError, write_json

log = logging.getLogger("pnoc.data.check_dataset")

MAX_LISTED = 20
"""Errors printed in full; the rest are counted."""


@dataclass
class Config:
    """Check a dataset split (images, masks, labels, list) and write its manifest."""

    dataset: str = dataclasses.field(metadata={"help": "synthetic | voc12 | coco14 | custom"})
    root: Path = dataclasses.field(metadata={"help": "dataset root folder"})
    split: str = dataclasses.field(metadata={"help": "split to check"})
    out: Path = dataclasses.field(metadata={"help": "manifest (JSON) to write"})
    kind: str = dataclasses.field(default="images", metadata={"help": "images (+ labels) | masks"})
    need_masks: bool = dataclasses.field(
        default=False, metadata={"help": "masks: every image needs one (the split is evaluated); else where present"})
    threads: int = dataclasses.field(default=1, metadata={"help": "worker processes"})


# ---------------------------------------------------------------------------------- file lists


KINDS = ("images", "masks")


def split_files(ds: WSSSDataset, kind: str) -> list[Path]:
    """Every existing file of one kind of a split: what its check reads and its manifest lists.

    ``images``: the split list, the class and label files, each listed image and annotation (and each
    mask when the labels come from the masks). ``masks``: the list, the class file, each listed mask
    and image (its size). A listed file that is missing is left out (the check itself reports it).
    """
    root = ds.root
    files = [p for p in [ds.list_path] if p is not None] + [root / "classes.txt", root / "dataset.json"]
    per_image = [ds.image_path]
    if kind == "masks" or ds.label_source == "masks":
        per_image.append(ds.mask_path)
    if kind == "images":
        files += [root / f for f in ("cls_labels.npy", "cls_labels_coco.npy")]
        if ds.label_source == "Annotations":
            per_image.append(ds.label_path)
    files += [f(i) for i in dict.fromkeys(ds.ids) for f in per_image]
    return [p for p in files if p.is_file()]


def dataset_files(name: str, root: str | Path, split: str, kind: str = "images") -> list[str]:
    """The check's DAG inputs: :func:`split_files` of the split, so adding a missing file later changes this
    set and reruns the check. The synthetic benchmark is a rule output: its marker ``dataset.json`` stands
    for all its files.

    Raises:
        DataError: the split list is missing (the dry run fails with the path and the fix).
    """
    if name == "synthetic":
        return [str(Path(root) / "dataset.json")]
    return [str(p) for p in split_files(WSSSDataset(name, root, split), kind)]


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


# ---------------------------------------------------------------------------------- the checks

_DS: WSSSDataset | None = None  # the split being checked, shared with forked workers
_KIND = "images"
_NEED_MASKS = False
_LABELS = True  # read each image's labels (not when the label file itself is broken: one error says so)


def _check_one(image_id: str) -> tuple[list[str], np.ndarray | None]:
    """Check one image: (errors, labels or None)."""
    ds, errors = _DS, []
    path = ds.image_path(image_id)
    if not path.is_file():
        errors.append(f"{path}: listed in {ds.split}.txt but the image does not exist; add it or remove the line "
                      f"{image_id!r}")
        return errors, None  # its mask and labels missing too is the same fault
    if _KIND == "masks":
        mpath = ds.mask_path(image_id)
        if not mpath.is_file():
            if _NEED_MASKS:
                errors.append(
                    f"{mpath}: ground-truth mask of {image_id} not found; split {ds.split!r} is evaluated (or trains "
                    f"the supervised DeepLab), so every image needs one - add it, or use another split in the config"
                )
            return errors, None
        try:
            ds.read_mask(image_id)  # checked against the image header's size; the images check decodes pixels
        except DataError as e:
            errors.append(str(e))
        return errors, None
    labels = None
    try:
        ds.read_image(image_id)
    except DataError as e:
        errors.append(str(e))
    if _LABELS:
        try:
            labels = ds.labels(image_id)
        except DataError as e:
            errors.append(str(e))
    return errors, labels


def _rel(ds: WSSSDataset, path: Path) -> str:
    return os.path.relpath(path, ds.root)


def check_split(name: str, root: str | Path, split: str, kind: str = "images", need_masks: bool = False,
                threads: int = 1) -> tuple[dict, list[str]]:
    """Check one kind (images | masks) of a split; return its manifest and every error (none: sound).

    Args:
        need_masks: with ``kind="masks"``, a missing mask is an error (the split is evaluated); without,
            the masks that exist are checked (stages use them for diagnostics where present).
    """
    global _DS, _KIND, _NEED_MASKS, _LABELS
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = Path(root)
    try:
        ds = WSSSDataset(name, root, split)
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
    if kind == "images":
        try:
            ds.check_label_file()
        except DataError as e:
            label_errors.append(str(e))
    errors += label_errors
    ids = list(counts)
    _DS, _KIND, _NEED_MASKS, _LABELS = ds, kind, need_masks, not label_errors
    try:
        if threads > 1 and len(ids) > 64:
            import multiprocessing as mp

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            with mp.get_context(method).Pool(threads) as pool:
                results = pool.map(_check_one, ids, chunksize=max(1, min(64, len(ids) // (4 * threads))))
        else:
            results = [_check_one(i) for i in ids]
    finally:
        _DS = None
    per_class = np.zeros(ds.n_classes, np.int64)
    for errs, labels in results:
        errors += errs
        if labels is not None:
            per_class += labels.astype(bool)
    files = {_rel(ds, p): _stat(p) for p in split_files(ds, kind)}
    manifest = {
        "dataset": name,
        "root": str(root.resolve()),
        "split": split,
        "kind": kind,
        "n_images": len(ids),
        "classes": ds.classes,
        "label_source": ds.label_source,
        "need_masks": need_masks if kind == "masks" else None,
        "masks": sum(1 for f in files if f.startswith(("SegmentationClass", "coco_seg_anno"))),
        "files": dict(sorted(files.items())),
    }
    if kind == "images":
        manifest["images_per_class"] = dict(zip(ds.classes, per_class.tolist()))
    return manifest, errors


def format_errors(errors: list[str], what: str) -> str:
    head = "\n".join(f"  - {e}" for e in errors[:MAX_LISTED])
    more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
    return f"{what}: {len(errors)} problem(s); nothing was written, fix them and rerun:\n{head}{more}"


def run(cfg: Config) -> dict:
    t0 = time.time()
    manifest, errors = check_split(cfg.dataset, cfg.root, cfg.split, cfg.kind, cfg.need_masks, max(1, cfg.threads))
    if errors:
        raise DataError(format_errors(errors, f"dataset {cfg.root} split {cfg.split!r} ({cfg.kind})"))
    write_json(cfg.out, manifest)
    dt = time.time() - t0
    log.info("split %s of %s (%s): %d images, %d masks, %d classes, labels from %s; checked in %.1f s (%.0f images/s)",
             cfg.split, cfg.root, cfg.kind, manifest["n_images"], manifest["masks"], len(manifest["classes"]),
             manifest["label_source"], dt, manifest["n_images"] / max(dt, 1e-9))
    return manifest


if __name__ == "__main__":
    cli.main(run, Config)
