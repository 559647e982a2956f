"""One dataset interface for ``synthetic``, ``voc12``, ``coco14`` and ``custom``.

Layouts:

``synthetic`` / ``voc12`` / ``custom`` (``root`` = the ``VOC2012`` folder or your own)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        (SBD's SegmentationClassAug merged in for voc12)
    ImageSets/Segmentation/<split>.txt   (train, val, train_aug, ...)
    Annotations/<id>.xml              (image-level labels) or cls_labels.npy
    dataset.json                      (synthetic only: class names)
    classes.txt                       (custom only: one class name a line, background first or left out)

``custom`` takes image-level labels from the first of ``cls_labels.npy`` (dict id -> C-vector),
``Annotations/<id>.xml`` (VOC XML with the names of classes.txt), or the classes present in
``SegmentationClass/<id>.png`` when only masks exist (:attr:`WSSSDataset.label_source` says which).

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
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np

from pnoc.io import DataError, load_label_dict, read_image, read_lines, read_mask

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

DATASETS = ("synthetic", "voc12", "coco14", "custom")

BACKGROUND_NAMES = ("background", "_background_", "__background__", "bg")
"""A first line of classes.txt with one of these names is the background (it is implied otherwise)."""

LABEL_SOURCES = ("cls_labels.npy", "cls_labels_coco.npy", "Annotations", "masks", "dataset.json")


class WSSSDataset:
    """Images, image-level labels and (optionally) segmentation masks of one split.

    Attributes:
        name: ``synthetic``, ``voc12``, ``coco14`` or ``custom``.
        root: dataset root folder.
        split: split name.
        ids: image ids of the split, in list order.
        classes: the C object class names (background excluded).
        label_source: where the image-level labels come from (one of :data:`LABEL_SOURCES`).
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
        if self.name == "custom":
            return read_classes(self.root / "classes.txt")
        meta = self.root / "dataset.json"
        if not meta.is_file():
            raise DataError(f"{meta}: missing; the synthetic dataset is incomplete, rerun rule make_dataset")
        return list(json.loads(meta.read_text())["classes"])

    def _coco_folder(self) -> str:
        # COCO splits map onto image folders: train2014 / val2014
        return "val2014" if "val" in self.split else "train2014"

    @property
    def list_path(self) -> Path | None:
        """The split's image list (None for a COCO split without one: every image of its folder)."""
        if self.name == "coco14":
            lst = self.root / f"{self.split}.txt"
            return lst if lst.is_file() else None
        return self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"

    def _load_ids(self) -> list[str]:
        lst = self.list_path
        if self.name == "coco14":
            if lst is not None:
                ids = read_lines(lst)
            else:
                folder = self.root / self._coco_folder()
                if not folder.is_dir():
                    raise DataError(f"{folder}: image folder not found; check dataset.root")
                ids = sorted(p.stem for p in folder.glob("*.jpg"))
            return [i if i.startswith("COCO_") else f"COCO_{self._coco_folder()}_{int(i):012d}" for i in ids]
        if not lst.is_file():
            raise DataError(
                f"{lst}: list of split {self.split!r} not found; create it (one image id a line) or set "
                f"dataset.train_split / eval_split / val_split in the config to a split that exists under {lst.parent}"
            )
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
        d = load_label_dict(path)
        return {str(k): np.asarray(v, dtype=np.float32) for k, v in d.items()}

    @cached_property
    def label_source(self) -> str:
        """``cls_labels.npy`` | ``cls_labels_coco.npy`` | ``Annotations`` | ``masks`` (custom only)."""
        if self.name == "coco14":
            return "cls_labels_coco.npy"
        if (self.root / "cls_labels.npy").is_file():
            return "cls_labels.npy"
        if self.name != "custom" or (self.root / "Annotations").is_dir():
            return "Annotations"
        return "masks"

    def label_path(self, image_id: str) -> Path:
        """The file holding the labels of one image (what an error about its labels names)."""
        src = self.label_source
        if src.startswith("cls_labels"):
            return self.root / src
        if src == "masks":
            return self.mask_path(image_id)
        return self.root / "Annotations" / f"{image_id}.xml"

    def labels(self, image_id: str) -> np.ndarray:
        """Image-level labels.

        Returns:
            float32 (C,) 0/1 vector.

        Raises:
            DataError: no labels for the image, or an image with an empty label set.
        """
        y = self._labels_raw(image_id)
        if y.shape != (self.n_classes,):
            raise DataError(
                f"{self.label_path(image_id)}: the labels of {image_id} have {y.reshape(-1).shape[0]} entries, but "
                f"{self._classes_origin()} names {self.n_classes} classes; {self._class_count_fix()}"
            )
        if y.sum() == 0:
            raise DataError(
                f"{self.label_path(image_id)}: image {image_id} has no labels; WSSS needs at least one class per "
                f"image — remove it from {self.split}.txt or fix its annotation"
            )
        return y

    def check_label_file(self) -> None:
        """Check the label file as a whole (cls_labels*.npy): it loads safely, and its vectors do not all have a
        length other than the class count. One error for the file instead of one per image.

        Raises:
            DataError: naming the label file and the fix.
        """
        if not self.label_source.startswith("cls_labels"):
            return
        sizes = Counter(int(np.asarray(v).size) for v in self._npy_labels.values())
        if sizes and self.n_classes not in sizes:
            (size, _), = sizes.most_common(1)
            raise DataError(f"{self.root / self.label_source}: label vectors have {size} entries but the dataset has "
                            f"{self.n_classes} classes ({self._classes_origin()}); {self._class_count_fix()}")

    def _class_count_fix(self) -> str:
        if self.name in ("voc12", "coco14"):
            return "a dataset with other classes is dataset.name: custom with a classes.txt (README: Bring your own data)"
        return "make the class list and the labels agree"

    def _classes_origin(self) -> str:
        return {"voc12": "VOC 2012", "coco14": "COCO 2014", "custom": str(self.root / "classes.txt")}.get(
            self.name, str(self.root / "dataset.json"))

    def _labels_raw(self, image_id: str) -> np.ndarray:
        npy = self._npy_labels
        if npy is not None:
            key = image_id.split("_")[-1] if self.name == "coco14" else image_id
            for k in (key, str(int(key)) if key.isdigit() else key):
                if k in npy:
                    return npy[k]
            fname = "cls_labels_coco.npy" if self.name == "coco14" else "cls_labels.npy"
            raise DataError(f"{self.root / fname}: no labels for image {image_id}; add its entry to this file or "
                           f"remove {image_id} from {self.split}.txt")
        if self.name == "coco14":
            raise DataError(f"{self.root / 'cls_labels_coco.npy'}: missing; COCO image labels come from this file")
        if self.label_source == "masks":
            return self._mask_labels(image_id)
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

    def _mask_labels(self, image_id: str) -> np.ndarray:
        """Labels derived from the mask: the classes present (0 and 255 excluded); cached per image."""
        cache = self.__dict__.setdefault("_mask_label_cache", {})
        if image_id not in cache:
            path = self.mask_path(image_id)
            if not path.is_file():
                raise DataError(
                    f"{path}: mask not found; {self.root} has neither cls_labels.npy nor Annotations/, so the "
                    f"image-level labels of {image_id} come from its mask — add the mask or a label file"
                )
            m = self.read_mask(image_id)
            y = np.zeros(self.n_classes, np.float32)
            present = np.unique(m)
            present = present[(present > 0) & (present <= self.n_classes)]
            y[present.astype(np.int64) - 1] = 1.0
            cache[image_id] = y
        return cache[image_id]

    # ------------------------------------------------------------------ pixels
    def read_image(self, image_id: str) -> np.ndarray:
        """Returns: uint8 (H, W, 3)."""
        return read_image(self.image_path(image_id))

    def read_mask(self, image_id: str, image_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Ground-truth mask (H, W) uint8, checked against the image's size (``image_hw``, or read from the
        image's header), so a mask of another size is a named error, never an IndexError further on."""
        if image_hw is None:
            image_hw = self.image_size(image_id)
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

    def validate(self, need_labels: bool = True, need_masks: bool = False, ids: Sequence[str] | None = None) -> None:
        """Check every listed image (or those of ``ids``, e.g. a shard's) exists (and has labels/masks); raise on
        the first problem."""
        for i in self.ids if ids is None else ids:
            p = self.image_path(i)
            if not p.is_file():
                raise DataError(f"{p}: listed in split {self.split!r} but the image does not exist; fix the list")
            if need_labels:
                self.labels(i)
            if need_masks and not self.mask_path(i).is_file():
                raise DataError(f"{self.mask_path(i)}: ground-truth mask missing for {i}")

    def identity_files(self) -> list[Path]:
        """The files that say which images, classes and labels this split is (for a training's resume guard):
        the split list, dataset.json / classes.txt and the label file; those missing are skipped by the guard."""
        return [p for p in [self.list_path] if p is not None] + [
            self.root / f for f in ("dataset.json", "classes.txt", "cls_labels.npy", "cls_labels_coco.npy")]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"WSSSDataset({self.name}, {self.root}, {self.split}, {len(self)} images, {self.n_classes} classes)"


def read_classes(path: Path) -> list[str]:
    """Class names of a custom dataset: one a line; a first line naming the background is dropped.

    Raises:
        DataError: missing file, no class, a duplicated or blank-inside name.
    """
    if not path.is_file():
        raise DataError(
            f"{path}: missing; a custom dataset lists its class names there, one a line, in label order "
            f"(mask value 1 = first line; a first line 'background' is allowed and skipped)"
        )
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if names and names[0].lower() in BACKGROUND_NAMES:
        names = names[1:]
    if not names:
        raise DataError(f"{path}: no class names; write one object class a line")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: class names {dup} appear more than once; each class needs its own line")
    if len(names) > 254:
        raise DataError(f"{path}: {len(names)} classes; masks are 8-bit with 255 = ignore, so at most 254")
    return names


def open_dataset(name: str, root: str | Path, split: str) -> WSSSDataset:
    """Open one split of a dataset (see module docstring for the layouts)."""
    return WSSSDataset(name, root, split)


def dataset_root(name: str, root: str | Path) -> Path:
    """Folder holding the images/masks (what ``summary.json`` calls ``dataset_root``)."""
    return Path(root)
