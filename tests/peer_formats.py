"""Datasets in the exact structures the peers' repositories ship, written by the tests at tiny size.

Nothing here is downloaded: each builder writes the folder layout, file formats and key spellings of one
peer (surveyed in issue 24), with small synthetic images:

* ``make_irn_voc``: VOC2012 with SBD's gray masks left in ``SegmentationClassAug/`` beside VOC's palette
  ``SegmentationClass/`` (no merge), no ``Annotations/``, and IRN's ``cls_labels.npy``: a dict with
  ``numpy.int32`` keys such as ``2007000032``, pickled with protocol 2 by numpy 1.x (``numpy.core.multiarray``
  globals, array bytes through ``_codecs.encode``), the same bytes AMN and CLIMS ship.
* ``make_coco``: COCO 2014 in one of the layouts people hold (``COCO_LAYOUTS``): RIB's, PNOC's, ToCo's,
  CLIMS' and coco2voc's image folders, mask folders, mask value conventions, label files and lists.

Every image holds discs of class-specific colours, so a network has something to learn; the labels of each
image are the classes its mask holds (as the peers derived them), so labels and masks agree.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pnoc.data.datasets import COCO_CATEGORY_IDS, COCO_CLASSES, VOC_CLASSES
from pnoc.io import voc_palette

SIZES = [(60, 80), (64, 64), (72, 56), (56, 76)]  # (H, W): VOC-like landscape and portrait, not all equal
USED = 6
"""Classes the tiny sets draw from (the first of the 20 / 80): enough images per class to learn something."""


def save_protocol2(path: Path, obj, numpy1_names: bool = True) -> None:
    """``np.save(path, obj)`` as numpy 1.x wrote it for IRN: pickle protocol 2 (numpy 2 writes protocol 4), and
    ``numpy.core.multiarray`` where numpy 2 writes ``numpy._core.multiarray``."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    body = pickle.dumps(arr, protocol=2)
    if numpy1_names:  # protocol 2 names globals as text lines: "numpy._core.multiarray\n_reconstruct\n"
        body = body.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    path.write_bytes(buf.getvalue() + body)


def scene(rng: np.random.Generator, hw: tuple[int, int], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image (H, W, 3) uint8 with one or two discs of class colours, and its mask (H, W) of 1-based classes
    with a 255 band on the disc borders, as VOC has."""
    h, w = hw
    img = rng.integers(90, 160, (h, w, 3)).astype(np.float32)
    mask = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    pal = voc_palette()
    for c in rng.choice(min(USED, n_classes), size=rng.integers(1, 3), replace=False):
        r = int(rng.integers(9, 15))
        cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disc] = pal[c + 1].astype(np.float32) * 0.8 + 30 + rng.normal(0, 10, (int(disc.sum()), 3))
        mask[disc] = c + 1
    edge = (mask != np.roll(mask, 1, 0)) | (mask != np.roll(mask, 1, 1))
    mask[edge] = 255
    return np.clip(img, 0, 255).astype(np.uint8), mask


def labels_of(mask: np.ndarray, n_classes: int) -> np.ndarray:
    y = np.zeros(n_classes, np.float32)
    present = [int(v) for v in np.unique(mask) if 0 < v <= n_classes]
    y[np.array(present, np.int64) - 1] = 1
    return y


def palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask, mode="P")
    im.putpalette(voc_palette().reshape(-1).tolist())
    im.save(path)


def gray_png(path: Path, values: np.ndarray, mode: str = "L") -> None:
    """A mask as a gray PNG (SBD, RIB, PNOC, CLIMS, coco2voc), or as ``RGB``/``RGBA`` with equal channels (ToCo)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(values, mode="L").save(path)
        return
    planes = [values] * 3 + ([np.full_like(values, 255)] if mode == "RGBA" else [])
    Image.fromarray(np.stack(planes, -1), mode=mode).save(path)


def jpeg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)


# ------------------------------------------------------------------------------------------------ VOC


def make_irn_voc(root: Path, n_train_aug: int = 24, n_train: int = 8, n_val: int = 8, seed: int = 0,
                 two_column_lists: Path | None = None) -> dict:
    """VOC2012 as IRN's users hold it: SBD's masks in ``SegmentationClassAug/`` (gray), VOC's in
    ``SegmentationClass/`` (palette, for VOC's own train and val only), IRN's ``cls_labels.npy`` and no XML.

    ``train`` is the first ``n_train`` ids of ``train_aug`` (as VOC's train is inside SBD's train_aug); SBD
    covers train_aug and val, VOC's folder train and val. With ``two_column_lists`` a folder, the lists are also
    written there in SEAM's two-column form (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``).

    Returns:
        {"root": root, "masks": {id: ground-truth mask}, "labels": {id: vector}}
    """
    rng = np.random.default_rng(seed)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    ids = {"train_aug": [f"2008_{k:06d}" for k in range(n_train_aug)],
           "val": [f"2007_{k:06d}" for k in range(n_val)]}
    ids["train"] = ids["train_aug"][:n_train]
    masks, labels = {}, {}
    for k, image_id in enumerate(ids["train_aug"] + ids["val"]):
        img, mask = scene(rng, SIZES[k % len(SIZES)], len(VOC_CLASSES))
        jpeg(root / "JPEGImages" / f"{image_id}.jpg", img)
        gray_png(root / "SegmentationClassAug" / f"{image_id}.png", mask)
        if image_id in ids["train"] or image_id in ids["val"]:
            palette_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        masks[image_id], labels[image_id] = mask, labels_of(mask, len(VOC_CLASSES))
    for split, lst in ids.items():
        (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in lst))
        if two_column_lists is not None:
            two_column_lists.mkdir(parents=True, exist_ok=True)
            (two_column_lists / f"{split}.txt").write_text(
                "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in lst))
    # IRN's voc12/cls_labels.npy: {np.int32(2007000032): float32 vector}, protocol 2, numpy 1.x names
    save_protocol2(root / "cls_labels.npy", {np.int32(int(i.replace("_", ""))): v for i, v in labels.items()})
    return {"root": root, "masks": masks, "labels": labels, "ids": ids, "lists": two_column_lists}


# ------------------------------------------------------------------------------------------------ COCO


@dataclass(frozen=True)
class CocoLayout:
    """One way people hold COCO 2014 (paths relative to the root; ``{folder}`` train2014/val2014)."""

    images: str          # "{folder}/COCO_{folder}_{num12}.jpg", "JPEGImages/{num12}.jpg", ...
    masks: str           # "coco_seg_anno/{num12}.png", ...
    values: str          # what the mask files hold: contiguous | category_ids
    mask_mode: str       # L | RGBA
    label_file: str      # its name in the root
    label_key: str       # int | numpy | num12 | full
    list_entry: str      # num12 | int | full
    list_names: tuple[str, str] = ("train2014", "val2014")  # the lists' split names (train, val)
    void_81: bool = False  # PNOC's void class 81 in some pixels


COCO_LAYOUTS = {
    # RIB: merged JPEGImages/<12d>.jpg, coco_seg_anno 0..80, cls_labels_coco.npy with int keys, lists of 12-digit ids;
    # RIB's coco14/cls_labels.npy is VOC's file (20 entries), written beside it as the trap it is
    "rib": CocoLayout("JPEGImages/{num12}.jpg", "coco_seg_anno/{num12}.png", "contiguous", "L",
                      "cls_labels_coco.npy", "int", "num12"),
    # PNOC: the official image folders, coco_seg_anno with its void 81, numpy-int keys, lists of bare numbers
    "pnoc": CocoLayout("{folder}/COCO_{folder}_{num12}.jpg", "coco_seg_anno/{num12}.png", "contiguous", "L",
                       "cls_labels_coco.npy", "numpy", "int", void_81=True),
    # ToCo: JPEGImages/<split>/ and SegmentationClass/<split>/ with full names, 4-channel masks, str keys
    "toco": CocoLayout("JPEGImages/{folder}/COCO_{folder}_{num12}.jpg", "SegmentationClass/{folder}/COCO_{folder}_{num12}.png",
                       "contiguous", "RGBA", "cls_labels_onehot.npy", "full", "full", ("train", "val")),
    # CLIMS: mask/<split>/<int>.png
    "clims": CocoLayout("{folder}/COCO_{folder}_{num12}.jpg", "mask/{folder}/{num}.png", "contiguous", "L",
                        "cls_labels_coco.npy", "num12", "full"),
    # coco2voc: class_labels/<int>.png holding COCO's category ids 1..90
    "coco2voc": CocoLayout("{folder}/COCO_{folder}_{num12}.jpg", "class_labels/{num}.png", "category_ids", "L",
                           "cls_labels_coco.npy", "int", "num12"),
}


def make_coco(root: Path, layout: str, n_train: int = 24, n_val: int = 8, seed: int = 0) -> dict:
    """COCO 2014 in one of :data:`COCO_LAYOUTS` (numbers: train 1.., val 500000..).

    Returns:
        {"root": root, "masks": {full id: ground truth 0..80/255}, "labels": {full id: vector}, "splits": {name: ids}}
    """
    lay = COCO_LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    cat_of = np.zeros(256, np.uint8)
    cat_of[255] = 255
    cat_of[1:81] = COCO_CATEGORY_IDS
    masks, labels, keyed, splits = {}, {}, {}, {}
    for folder, n, base, name in (("train2014", n_train, 9, lay.list_names[0]),
                                  ("val2014", n_val, 500000, lay.list_names[1])):
        entries, ids = [], []
        for k in range(n):
            num = base + 7 * k
            full = f"COCO_{folder}_{num:012d}"
            img, mask = scene(rng, SIZES[k % len(SIZES)], len(COCO_CLASSES))
            fill = dict(folder=folder, num12=f"{num:012d}", num=num)
            jpeg(root / lay.images.format(**fill), img)
            stored = cat_of[mask] if lay.values == "category_ids" else mask.copy()
            if lay.void_81:
                stored[stored == 255] = 81  # PNOC's void index
            gray_png(root / lay.masks.format(**fill), stored, lay.mask_mode)
            masks[full], labels[full] = mask, labels_of(mask, len(COCO_CLASSES))
            key = {"int": num, "numpy": np.int64(num), "num12": f"{num:012d}", "full": full}[lay.label_key]
            keyed[key] = labels[full]
            entries.append({"num12": f"{num:012d}", "int": str(num), "full": full}[lay.list_entry])
            ids.append(full)
        (root / f"{name}.txt").write_text("".join(f"{e}\n" for e in entries))
        splits[name] = ids
    np.save(root / lay.label_file, keyed, allow_pickle=True)
    if layout == "rib":
        # the trap: RIB's coco14/cls_labels.npy holds VOC's 20-entry labels
        save_protocol2(root / "cls_labels.npy", {np.int32(2007000032): np.zeros(20, np.float32)})
    return {"root": root, "masks": masks, "labels": labels, "splits": splits}
