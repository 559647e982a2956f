"""Benchmark: rule check_dataset on a VOC-sized dataset (10,582 images of 500x375, VOC's train_aug size).

Writes a custom dataset of ``--images`` JPEGs (500x375, quality 90, VOC's typical size) with palette
masks and cls_labels.npy into ``--root`` (once; reused when present), then times the two checks of the
split (images + labels, masks) with 1 and ``--threads`` worker processes, and the DAG-input listing
(``dataset_files``) the Snakefile does for every run. Prints seconds and images/s per setting.

    python benchmarks/check_dataset.py --root /tmp/voc_sized [--images 10582] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pnoc.data.check_dataset import check_split, dataset_files
from pnoc.io import voc_palette

CLASSES = [f"class{k:02d}" for k in range(20)]


def write_dataset(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    pal = voc_palette().reshape(-1).tolist()
    yy, xx = np.mgrid[:375, :500]
    base = (np.stack([xx * 0.4, yy * 0.5, (xx + yy) * 0.2], -1) % 255).astype(np.uint8)
    labels, ids = {}, []
    for k in range(n):
        i = f"img_{k:06d}"
        img = base.copy()
        mask = np.zeros((375, 500), np.uint8)
        y = np.zeros(len(CLASSES), np.float32)
        for c in rng.choice(len(CLASSES), size=rng.integers(1, 4), replace=False):
            r = int(rng.integers(30, 90))
            cy, cx = int(rng.integers(r, 375 - r)), int(rng.integers(r, 500 - r))
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[disc] = rng.integers(0, 255, 3)
            mask[disc] = c + 1
            y[c] = 1
        img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "JPEGImages" / f"{i}.jpg", quality=90)
        m = Image.fromarray(mask, mode="P")
        m.putpalette(pal)
        m.save(root / "SegmentationClass" / f"{i}.png")
        labels[i] = y
        ids.append(i)
    np.save(root / "cls_labels.npy", labels)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("".join(f"{i}\n" for i in ids))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--images", type=int, default=10582)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    lst = a.root / "ImageSets" / "Segmentation" / "train_aug.txt"
    if not lst.is_file() or len(lst.read_text().split()) != a.images:
        t0 = time.perf_counter()
        write_dataset(a.root, a.images)
        print(f"wrote {a.images} images + masks in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    files = dataset_files("custom", a.root, "train_aug", "images") + dataset_files("custom", a.root, "train_aug", "masks")
    print(f"DAG inputs (both kinds): {len(files)} files listed in {time.perf_counter() - t0:.2f} s")
    for kind in ("images", "masks"):
        for threads in sorted({1, a.threads}):
            t0 = time.perf_counter()
            manifest, errors = check_split("custom", a.root, "train_aug", kind, need_masks=True, threads=threads)
            dt = time.perf_counter() - t0
            assert not errors, errors[:3]
            print(f"check {kind:6s} threads={threads}: {dt:6.1f} s  {manifest['n_images'] / dt:6.0f} images/s")


if __name__ == "__main__":
    main()
