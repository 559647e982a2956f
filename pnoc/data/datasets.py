"""One dataset interface for ``synthetic``, ``voc12`` and ``coco14``.

Layouts:

``synthetic`` / ``voc12`` (``root`` = the ``VOC2012`` folder)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        (SBD's SegmentationClassAug merged in for voc12)
    ImageSets/Segmentation/<split>.txt   (train, val, train_aug, ...)
    Annotations/<id>.xml              (image-level labels) or cls_labels.npy
    dataset.json                      (synthetic only: class names)

``coco14`` (``root`` = the ``coco14`` folder)::

    train2014/COCO_train2014_<012d id>.jpg, val2014/COCO_val2014_<012d id>.jpg
    coco_seg_anno/<012d id>.png
    cls_labels_coco.npy               (dict: int id -> 80-dim 0/1 vector)
    <split>.txt (optional)            (ids; otherwise every image of the split folder)

Image ids are the file stems for VOC/synthetic and the full ``COCO_<split>_<id>``
stems for COCO. Any inconsistency raises :class:`pnoc.io.DataError` naming the file
and the fix; no image is skipped silently.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from functools import cached_property
from pathlib import Path

import numpy as np

from pnoc.io import DataError, read_image, read_lines, read_mask

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]

DATASETS = ("synthetic", "voc12", "coco14")


class WSSSDataset:
    """Images, image-level labels and (optionally) segmentation masks of one split.

    Attributes:
        name: ``synthetic``, ``voc12`` or ``coco14``.
        root: dataset root folder.
        split: split name.
        ids: image ids of the split, in list order.
        classes: the C object class names (background excluded).
    """

    def __init__(self, name: str, root: str | Path, split: str):
        if name not in DATASETS:
            raise DataError(f"dataset.name={name!r} is not one of {DATASETS}; fix config.yaml")
        self.name = name
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root not found; set dataset.root in config.yaml")
        self.classes = self._load_classes()
        self.ids = self._load_ids()
        if not self.ids:
            raise DataError(f"{self.root}: split {split!r} has no images; check its image list")

    # ------------------------------------------------------------------ layout
    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def _load_classes(self) -> list[str]:
        if self.name == "voc12":
            return list(VOC_CLASSES)
        if self.name == "coco14":
            return list(COCO_CLASSES)
        meta = self.root / "dataset.json"
        if not meta.is_file():
            raise DataError(f"{meta}: missing; the synthetic dataset is incomplete, rerun rule make_dataset")
        return list(json.loads(meta.read_text())["classes"])

    def _coco_folder(self) -> str:
        # COCO splits map onto image folders: train2014 / val2014
        return "val2014" if "val" in self.split else "train2014"

    def _load_ids(self) -> list[str]:
        if self.name == "coco14":
            lst = self.root / f"{self.split}.txt"
            if lst.is_file():
                ids = read_lines(lst)
            else:
                folder = self.root / self._coco_folder()
                if not folder.is_dir():
                    raise DataError(f"{folder}: image folder not found; check dataset.root")
                ids = sorted(p.stem for p in folder.glob("*.jpg"))
            return [i if i.startswith("COCO_") else f"COCO_{self._coco_folder()}_{int(i):012d}" for i in ids]
        lst = self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        return read_lines(lst)

    def image_path(self, image_id: str) -> Path:
        if self.name == "coco14":
            return self.root / image_id.split("_")[1] / f"{image_id}.jpg"
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        if self.name == "coco14":
            return self.root / "coco_seg_anno" / f"{image_id.split('_')[-1]}.png"
        return self.root / "SegmentationClass" / f"{image_id}.png"

    # ------------------------------------------------------------------ labels
    @cached_property
    def _npy_labels(self) -> dict | None:
        fname = "cls_labels_coco.npy" if self.name == "coco14" else "cls_labels.npy"
        path = self.root / fname
        if not path.is_file():
            return None
        try:
            d = np.load(path, allow_pickle=True).item()
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise DataError(f"{path}: unreadable label file ({e}); regenerate it") from e
        return {str(k): np.asarray(v, dtype=np.float32) for k, v in d.items()}

    def labels(self, image_id: str) -> np.ndarray:
        """Image-level labels.

        Returns:
            float32 (C,) 0/1 vector.

        Raises:
            DataError: no labels for the image, or an image with an empty label set.
        """
        y = self._labels_raw(image_id)
        if y.shape != (self.n_classes,):
            raise DataError(f"labels of {image_id} have {y.shape[0]} entries, expected {self.n_classes}")
        if y.sum() == 0:
            raise DataError(
                f"{image_id}: image has no labels; WSSS needs at least one class per training image — "
                f"remove it from {self.split}.txt or fix its annotation"
            )
        return y

    def _labels_raw(self, image_id: str) -> np.ndarray:
        npy = self._npy_labels
        if npy is not None:
            key = image_id.split("_")[-1] if self.name == "coco14" else image_id
            for k in (key, str(int(key)) if key.isdigit() else key):
                if k in npy:
                    return npy[k]
            fname = "cls_labels_coco.npy" if self.name == "coco14" else "cls_labels.npy"
            raise DataError(f"{self.root / fname}: no labels for image {image_id}; the label list does not match the images")
        if self.name == "coco14":
            raise DataError(f"{self.root / 'cls_labels_coco.npy'}: missing; COCO image labels come from this file")
        xml = self.root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise DataError(f"{xml}: annotation not found for image {image_id}; add it or provide cls_labels.npy")
        try:
            tree = ET.parse(xml)
        except ET.ParseError as e:
            raise DataError(f"{xml}: malformed XML ({e}); fix or replace the annotation") from e
        y = np.zeros(self.n_classes, np.float32)
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in self.classes:
                raise DataError(f"{xml}: unknown class {name!r}; expected one of {self.classes}")
            y[self.classes.index(name)] = 1.0
        return y

    # ------------------------------------------------------------------ pixels
    def read_image(self, image_id: str) -> np.ndarray:
        """Returns: uint8 (H, W, 3)."""
        return read_image(self.image_path(image_id))

    def read_mask(self, image_id: str, image_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Ground-truth mask (H, W) uint8, checked against the image size when given."""
        m = read_mask(self.mask_path(image_id), image_hw)
        bad = (m > self.n_classes) & (m != 255)
        if bad.any():
            raise DataError(
                f"{self.mask_path(image_id)}: values {sorted(np.unique(m[bad]).tolist())[:5]} exceed the "
                f"{self.n_classes} classes; masks hold 0 (background), 1..C or 255 (ignore)"
            )
        return m

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) without decoding the pixels."""
        from PIL import Image

        path = self.image_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: image not found; it is listed in {self.split} but missing")
        try:
            with Image.open(path) as im:
                return im.size[1], im.size[0]
        except OSError as e:
            raise DataError(f"{path}: corrupt image ({e}); replace it or drop it from the list") from e

    def validate(self, need_labels: bool = True, need_masks: bool = False) -> None:
        """Check every listed image exists (and has labels/masks); raise on the first problem."""
        for i in self.ids:
            p = self.image_path(i)
            if not p.is_file():
                raise DataError(f"{p}: listed in split {self.split!r} but the image does not exist; fix the list")
            if need_labels:
                self.labels(i)
            if need_masks and not self.mask_path(i).is_file():
                raise DataError(f"{self.mask_path(i)}: ground-truth mask missing for {i}")

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"WSSSDataset({self.name}, {self.root}, {self.split}, {len(self)} images, {self.n_classes} classes)"


def open_dataset(name: str, root: str | Path, split: str) -> WSSSDataset:
    """Open one split of a dataset (see module docstring for the layouts)."""
    return WSSSDataset(name, root, split)


def dataset_root(name: str, root: str | Path) -> Path:
    """Folder holding the images/masks (what ``summary.json`` calls ``dataset_root``)."""
    return Path(root)
