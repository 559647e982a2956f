"""Tiny datasets in the real VOC 2012 and COCO 2014 layouts, written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pnoc.data.datasets import COCO_CLASSES, VOC_CLASSES
from pnoc.io import write_image, write_mask


def _image_and_mask(rng, h, w, classes):
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for i, c in enumerate(classes):
        y0 = 2 + 6 * i
        mask[y0:y0 + 5, 3:12] = c
    mask[0, :] = 255
    return img, mask


def make_voc(root: Path, splits=None, n=4, h=24, w=32, seed=0) -> Path:
    """VOC2012 folder with JPEGImages, SegmentationClass, Annotations (XML) and ImageSets."""
    rng = np.random.default_rng(seed)
    splits = splits or {"train": n, "val": n}
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, count in splits.items():
        ids = []
        for _ in range(count):
            image_id = f"2007_{k:06d}"
            k += 1
            classes = sorted({int(c) for c in rng.integers(1, 21, rng.integers(1, 3))})
            img, mask = _image_and_mask(rng, h, w, classes)
            write_image(root / "JPEGImages" / f"{image_id}.jpg", img)
            write_mask(root / "SegmentationClass" / f"{image_id}.png", mask)
            objs = "".join(f"<object><name>{VOC_CLASSES[c - 1]}</name><difficult>0</difficult></object>" for c in classes)
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename>{objs}</annotation>")
            ids.append(image_id)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def make_coco(root: Path, n=3, h=24, w=32, seed=0) -> Path:
    """coco14 folder with train2014/val2014, coco_seg_anno and cls_labels_coco.npy."""
    rng = np.random.default_rng(seed)
    labels = {}
    for split in ("train2014", "val2014"):
        for i in range(n):
            num = 1000 * (split == "val2014") + i + 1
            classes = sorted({int(c) for c in rng.integers(1, 81, rng.integers(1, 3))})
            img, mask = _image_and_mask(rng, h, w, classes)
            write_image(root / split / f"COCO_{split}_{num:012d}.jpg", img)
            write_mask(root / "coco_seg_anno" / f"{num:012d}.png", mask)
            y = np.zeros(len(COCO_CLASSES), np.float32)
            y[np.array(classes) - 1] = 1
            labels[num] = y
    np.save(root / "cls_labels_coco.npy", labels, allow_pickle=True)
    return root
