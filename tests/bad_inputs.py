"""A small custom dataset that pnoc never saw, and the bad-input corpus built on it.

``make_custom_dataset`` writes a VOC-layout folder with three fruit classes (``classes.txt`` with the
background first), images of three sizes, palette masks and, by choice, ``cls_labels.npy`` or no
label file at all (labels then come from the masks). Each class is a disc of its own colour on a
noisy background, so the chain has something to learn.

``FAULTS`` is the corpus: each entry breaks one file of such a dataset the way users' data breaks
(truncated or empty JPEG, a mask of the wrong size, a duplicated list line, a malicious label
pickle, ...) and knows how to fix it again; ``accepted`` entries are unusual but valid inputs
(gray, CMYK, PNG bytes in a .jpg) that the check must let through.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pnoc.io import voc_palette

CUSTOM_CLASSES = ["apple", "pear", "plum"]
COLOURS = [(220, 40, 40), (60, 200, 60), (120, 40, 160)]
SIZES = [(56, 72), (64, 64), (72, 56)]  # (H, W): non-square, and not all equal


def _sample(rng: np.random.Generator, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = hw
    img = rng.integers(90, 160, (h, w, 3)).astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for c in rng.choice(len(CUSTOM_CLASSES), size=rng.integers(1, 3), replace=False):
        r = rng.integers(9, 15)
        cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disc] = np.asarray(COLOURS[c]) + rng.normal(0, 12, (int(disc.sum()), 3))
        mask[disc] = c + 1
    # a thin ignore band on the border of each disc, as VOC has
    edge = (mask != np.roll(mask, 1, 0)) | (mask != np.roll(mask, 1, 1))
    mask[edge] = 255
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_palette_mask(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask, mode="P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(path)


def make_custom_dataset(root: Path, n_train: int = 24, n_val: int = 8, labels: str = "npy", seed: int = 0) -> Path:
    """Write the dataset under ``root``.

    Args:
        labels: ``npy`` (cls_labels.npy), ``xml`` (Annotations/) or ``masks`` (no label file).
    """
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\n" + "\n".join(CUSTOM_CLASSES) + "\n")
    table = {}
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{k:04d}" for k in range(n)]
        for k, i in enumerate(ids):
            img, mask = _sample(rng, SIZES[k % len(SIZES)])
            Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=92)
            write_palette_mask(root / "SegmentationClass" / f"{i}.png", mask)
            y = np.zeros(len(CUSTOM_CLASSES), np.float32)
            present = np.unique(mask)
            y[present[(present > 0) & (present < 255)].astype(int) - 1] = 1
            table[i] = y
            if labels == "xml":
                (root / "Annotations").mkdir(exist_ok=True)
                objs = "".join(f"<object><name>{CUSTOM_CLASSES[c]}</name></object>" for c in np.flatnonzero(y))
                (root / "Annotations" / f"{i}.xml").write_text(f"<annotation>{objs}</annotation>")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    if labels == "npy":
        np.save(root / "cls_labels.npy", table)
    return root


# ------------------------------------------------------------------------------------- the corpus


class Evil:
    """Unpickling this runs code: it creates the file ``sentinel`` (what a malicious file would do worse)."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.makedirs, (self.sentinel,))


@dataclass
class Fault:
    name: str
    split: str                      # the split whose check it breaks
    kind: str                       # the check that flags it: images (+ labels) | masks
    culprit: str                    # path (relative to the root) that the error message must name
    apply: Callable[[Path], None]
    fix: Callable[[Path], None]
    reruns: set[str]                # manifests ("<split>/<kind>") rebuilt after the fix, and only these
    accepted: bool = False          # a valid if unusual input: the check passes
    at_plan: bool = False           # detected when the DAG is built (snakemake -n fails)


def _img(root: Path, i: str) -> Path:
    return root / "JPEGImages" / f"{i}.jpg"


def _mask(root: Path, i: str) -> Path:
    return root / "SegmentationClass" / f"{i}.png"


def _backup(path: Path) -> Callable[[Path], None]:
    """A fault's fix: put back the original bytes of ``path`` (saved when the fault is applied)."""
    return lambda root: shutil.copyfile(root / f".orig.{path.name}", root / path)


def _break_file(rel: str, breaker: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        shutil.copyfile(root / rel, root / f".orig.{Path(rel).name}")
        breaker(root / rel)
    return apply


def _rewrite_image(mode: str, fmt: str = "JPEG") -> Callable[[Path], None]:
    def breaker(path: Path) -> None:
        with Image.open(path) as im:
            im.convert(mode).save(path, format=fmt)
    return breaker


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _resize_mask(path: Path) -> None:
    with Image.open(path) as im:
        im.resize((im.width + 8, im.height), Image.NEAREST).save(path)


def _bad_value(path: Path) -> None:
    with Image.open(path) as im:
        a = np.array(im)
        pal = im.getpalette()
    a[0, 0] = 7  # 3 classes: 7 is neither a class nor 255
    out = Image.fromarray(a, mode="P")
    out.putpalette(pal)
    out.save(path)


def _edit_list(split: str, edit: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    rel = f"ImageSets/Segmentation/{split}.txt"

    def breaker(path: Path) -> None:
        path.write_text("".join(f"{i}\n" for i in edit(path.read_text().split())))
    return _break_file(rel, breaker)


def _edit_labels(edit: Callable[[dict], dict]) -> Callable[[Path], None]:
    def breaker(path: Path) -> None:
        table = np.load(path, allow_pickle=True).item()  # the test's own file
        np.save(path, edit(table))
    return _break_file("cls_labels.npy", breaker)


def _malicious_labels(path: Path) -> None:
    table = np.load(path, allow_pickle=True).item()
    table["train_0001"] = Evil(str(path.parent / "PWNED"))
    np.save(path, np.array(table, dtype=object), allow_pickle=True)


def _remove(rel: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        shutil.copyfile(root / rel, root / f".orig.{Path(rel).name}")
        (root / rel).unlink()
    return apply


def _corpus() -> list[Fault]:
    lst_t, lst_v = "ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt"
    img, msk, lab = "JPEGImages/train_0003.jpg", "SegmentationClass/val_0002.png", "cls_labels.npy"
    train_both, val_both = {"train/images", "train/masks"}, {"val/images", "val/masks"}
    # cls_labels.npy serves both splits, and both checks of each: the masks check compares the masks with the labels
    labels = {"train/images", "val/images", "train/masks", "val/masks"}
    return [
        Fault("truncated_jpeg", "train", "images", img, _break_file(img, _truncate), _backup(Path(img)), train_both),
        Fault("zero_byte_jpeg", "train", "images", img, _break_file(img, lambda p: p.write_bytes(b"")),
              _backup(Path(img)), train_both),
        Fault("gray_jpeg", "train", "images", img, _break_file(img, _rewrite_image("L")), _backup(Path(img)),
              train_both, accepted=True),
        Fault("cmyk_jpeg", "train", "images", img, _break_file(img, _rewrite_image("CMYK")), _backup(Path(img)),
              train_both, accepted=True),
        Fault("png_as_jpeg", "train", "images", img, _break_file(img, _rewrite_image("RGB", "PNG")),
              _backup(Path(img)), train_both, accepted=True),
        Fault("wrong_size_mask", "val", "masks", msk, _break_file(msk, _resize_mask), _backup(Path(msk)),
              {"val/masks"}),
        Fault("mask_value_out_of_range", "val", "masks", msk, _break_file(msk, _bad_value), _backup(Path(msk)),
              {"val/masks"}),
        Fault("missing_mask", "val", "masks", msk, _remove(msk), _backup(Path(msk)), {"val/masks"}),
        Fault("list_entry_without_image", "val", "images", "JPEGImages/val_9999.jpg",
              _edit_list("val", lambda ids: ids + ["val_9999"]), _backup(Path(lst_v)), val_both),
        Fault("duplicate_list_entry", "train", "images", lst_t, _edit_list("train", lambda ids: ids + [ids[2]]),
              _backup(Path(lst_t)), train_both),
        Fault("image_without_labels", "train", "images", lab,
              _edit_labels(lambda t: {**t, "train_0005": np.zeros(3, np.float32)}), _backup(Path(lab)), labels),
        Fault("labels_missing_an_image", "val", "images", lab,
              _edit_labels(lambda t: {k: v for k, v in t.items() if k != "val_0004"}), _backup(Path(lab)), labels),
        Fault("wrong_class_count", "train", "images", lab,
              _edit_labels(lambda t: {k: np.concatenate([v, np.zeros(17, np.float32)]) for k, v in t.items()}),
              _backup(Path(lab)), labels),
        Fault("malicious_label_pickle", "train", "images", lab, _break_file(lab, _malicious_labels),
              _backup(Path(lab)), labels),
        Fault("missing_split_file", "val", "images", lst_v, _remove(lst_v), _backup(Path(lst_v)), val_both,
              at_plan=True),
    ]


FAULTS = {f.name: f for f in _corpus()}
