"""One dataset interface for ``synthetic``, ``voc12``, ``coco14`` and ``custom``, reading the files as
researchers hold them: the label files, lists and mask folders that the peers' repositories ship.

Layouts:

``synthetic`` / ``voc12`` / ``custom`` (``root`` = the ``VOC2012`` folder or your own)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        VOC's palette masks (or SBD's merged in), and/or
    SegmentationClassAug/<id>.png     SBD's gray masks where most repositories keep them (no merge needed)
    ImageSets/Segmentation/<split>.txt   (train, val, train_aug, ...), or ``<list_dir>/<split>.txt``
    Annotations/<id>.xml              (image-level labels) or a label file (below)
    dataset.json                      (synthetic only: class names)
    classes.txt                       (custom only: one class name a line, background first or left out)

``coco14`` (``root`` = the ``coco14`` folder), each of these as it comes:

    images  train2014/COCO_train2014_<12d>.jpg (the official zips; val2014/... alike),
            JPEGImages/train2014/COCO_train2014_<12d>.jpg (ToCo), JPEGImages/<12d>.jpg (RIB, train and val merged)
    masks   coco_seg_anno/<12d>.png (RIB, PNOC: 0..80, PNOC's void 81), SegmentationClass/train2014/COCO_...png
            (ToCo: 0..80), mask/train2014/<id>.png (CLIMS: 0..80), class_labels/<id>.png (coco2voc: COCO's category
            ids 1..90, remapped through :data:`COCO_CATEGORY_IDS`)
    lists   <split>.txt or <list_dir>/<split>.txt (optional: otherwise every image of the split's folder)

Label files (``np.save(path, {key: vector})``): ``cls_labels.npy``, ``cls_labels_onehot.npy`` (ToCo) or, for
COCO, ``cls_labels_coco.npy`` first; or any file named by ``label_file``. Keys may be str ids
(``2007_000032``, ``COCO_train2014_<12d>``, ``<12d>``), ints or numpy integers (IRN's ``2007000032``, RIB's and
PNOC's COCO ids). Lists hold one id a line, or two columns (``/JPEGImages/x.jpg /SegmentationClassAug/x.png``:
the first column's file stem is the id); COCO lists hold ``COCO_train2014_<12d>`` ids or bare numbers.

``custom`` takes image-level labels from the first of a label file, ``Annotations/<id>.xml`` (VOC XML with the
names of classes.txt), or the classes present in the masks when only masks exist (:attr:`WSSSDataset.label_source`
says which).

Where a split's masks (or COCO images) may lie in several folders, the folder that holds most of the split's
files (in an evenly spread sample of its list) is the split's; :meth:`WSSSDataset.describe` says which, and the
dataset check logs and records it. Image ids are the file stems for VOC/synthetic/custom and
``COCO_<folder>_<12d>`` for COCO. Any inconsistency raises :class:`pnoc.io.DataError` naming the file and the
fix; no image is skipped silently.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import KW_ONLY, dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from pnoc.io import DataError, check_mask_size, decode_mask, load_label_dict, read_image

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

COCO_CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83), *range(84, 91),
)
"""COCO's category id of each class of :data:`COCO_CLASSES`, in that order (instances_*.json; 80 of 1..90)."""

COCO_VOID = 81
"""PNOC's void class of COCO masks (0..80 classes); read as 255 (ignore)."""

DATASETS = ("synthetic", "voc12", "coco14", "custom")

BACKGROUND_NAMES = ("background", "_background_", "__background__", "bg")
"""A first line of classes.txt with one of these names is the background (it is implied otherwise)."""

LABEL_FILES = {"coco14": ("cls_labels_coco.npy", "cls_labels.npy", "cls_labels_onehot.npy")}
"""Label files looked for in the dataset root, in order (``label_file`` names another); the default for every
other dataset is :data:`DEFAULT_LABEL_FILES`. RIB's ``coco14/cls_labels.npy`` is VOC's file: COCO's own name
comes first, and a 20-entry file in a COCO folder is refused with that diagnosis."""
DEFAULT_LABEL_FILES = ("cls_labels.npy", "cls_labels_onehot.npy")

COCO_MASK_VALUES = ("auto", "contiguous", "category_ids")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SAMPLE = 32
"""List entries probed (evenly spread) to find which of several folders holds a split's files."""


@dataclass(frozen=True)
class FileLayout:
    """Where one kind of file of a split lies: a path pattern under the dataset root.

    Attributes:
        pattern: relative path with ``{id}`` (the image id), and for COCO ``{folder}`` (train2014 | val2014),
            ``{num12}`` (the 12-digit number) and ``{num}`` (the number without zeros).
        values: masks only: ``indices`` (0..C, 255 ignore), ``contiguous`` (COCO 0..80, 255 and 81 void) or
            ``category_ids`` (COCO's 1..90, remapped).
        origin: who keeps the files this way (for the check's log).
    """

    pattern: str
    values: str = "indices"
    origin: str = ""

    def describe(self) -> str:
        return f"{self.pattern}" + (f" ({self.origin})" if self.origin else "")


VOC_MASK_LAYOUTS = (
    FileLayout("SegmentationClass/{id}.png", origin="VOC 2012, or with SBD merged in"),
    FileLayout("SegmentationClassAug/{id}.png", origin="SBD's masks beside VOC's"),
)
COCO_IMAGE_LAYOUTS = (
    FileLayout("{folder}/{id}.jpg", origin="the official zips"),
    FileLayout("JPEGImages/{folder}/{id}.jpg", origin="ToCo"),
    FileLayout("JPEGImages/{num12}.jpg", origin="RIB, train and val merged"),
    FileLayout("JPEGImages/{id}.jpg", origin="train and val merged, full names"),
)
COCO_MASK_LAYOUTS = (
    FileLayout("coco_seg_anno/{num12}.png", "contiguous", "RIB, PNOC"),
    FileLayout("SegmentationClass/{folder}/{id}.png", "contiguous", "ToCo"),
    FileLayout("mask/{folder}/{num}.png", "contiguous", "CLIMS"),
    FileLayout("class_labels/{num}.png", "category_ids", "coco2voc"),
)
VALUE_CONVENTIONS = {
    "indices": "class indices 0..C, 255 ignore",
    "contiguous": "COCO class indices 0..80, 255 (and PNOC's void 81) ignore",
    "category_ids": "COCO category ids 1..90 (coco2voc), remapped to 1..80; 255 ignore",
}

_COCO_ID = re.compile(r"^(?:COCO_(?P<folder>[a-z]+\d{4})_)?0*(?P<num>\d+)$")


@dataclass
class DataSource:
    """The dataset flags every stage takes (the ``dataset:`` keys of config.yaml; ``dataset_args()`` in common.smk).

    ``dataset`` and ``root`` come first, positionally; the rest only say where files that do not sit at their
    default place are, and are passed only when set.
    """

    dataset: str
    root: Path
    _: KW_ONLY
    label_file: Path | None = None      # image-level label file (relative to root, or absolute); None: the defaults
    list_dir: Path | None = None        # folder of the split lists <split>.txt; None: the layout's default place
    coco_mask_values: str = "auto"      # auto (by mask folder) | contiguous | category_ids
    drop_unlabelled: bool = False       # leave out listed images whose label-file row is all zeros (logged)

    def open_dataset(self, split: str) -> WSSSDataset:
        """The split ``split`` of this dataset."""
        return WSSSDataset(self.dataset, self.root, split, label_file=self.label_file, list_dir=self.list_dir,
                           coco_mask_values=self.coco_mask_values, drop_unlabelled=self.drop_unlabelled)


class WSSSDataset:
    """Images, image-level labels and (optionally) segmentation masks of one split.

    Attributes:
        name: ``synthetic``, ``voc12``, ``coco14`` or ``custom``.
        root: dataset root folder.
        split: split name.
        ids: image ids of the split, in list order.
        classes: the C object class names (background excluded).
        label_source: where the image-level labels come from: a label file (its path relative to the root, or
            absolute when it lies outside), ``Annotations``, ``masks`` or (synthetic) ``Annotations``.
    """

    def __init__(self, name: str, root: str | Path, split: str, *, label_file: str | Path | None = None,
                 list_dir: str | Path | None = None, coco_mask_values: str = "auto", drop_unlabelled: bool = False):
        if name not in DATASETS:
            raise DataError(f"dataset.name={name!r} is not one of {DATASETS}; fix config.yaml")
        if coco_mask_values not in COCO_MASK_VALUES:
            raise DataError(f"dataset.coco_mask_values={coco_mask_values!r} is not one of {COCO_MASK_VALUES}")
        self.name = name
        self.root = Path(root)
        self.split = split
        self._label_file = None if label_file in (None, "", "none", "null") else Path(label_file)
        self._list_dir = None if list_dir in (None, "", "none", "null") else Path(list_dir)
        self._coco_mask_values = coco_mask_values
        self.list_format = "one id a line"
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root not found; set dataset.root in config.yaml")
        self.classes = self._load_classes()
        self.ids = self._load_ids()
        self.dropped: list[str] = []  # listed images left out because their labels are all zeros (drop_unlabelled)
        if drop_unlabelled and self.label_file_path is not None:
            npy = self._npy_labels
            keep = [i for i in self.ids if not self._all_zero(npy, i)]
            self.dropped = [i for i in self.ids if i not in set(keep)]
            self.ids = keep
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
        # a bare COCO number belongs to the image folder its split names: train2014 / val2014
        return "val2014" if "val" in self.split else "train2014"

    def _under_root(self, path: Path) -> Path:
        return path if path.is_absolute() else self.root / path

    @property
    def list_path(self) -> Path | None:
        """The split's image list (None for a COCO split without one: every image of its folder)."""
        if self._list_dir is not None:
            return self._under_root(self._list_dir) / f"{self.split}.txt"
        if self.name == "coco14":
            lst = self.root / f"{self.split}.txt"
            return lst if lst.is_file() else None
        return self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"

    def _load_ids(self) -> list[str]:
        lst = self.list_path
        if lst is None:  # COCO without a list: the split's image folder
            for layout in COCO_IMAGE_LAYOUTS:
                if "{folder}" in layout.pattern:
                    folder = self.root / PurePosixPath(layout.pattern.format(folder=self._coco_folder(), id="x")).parent
                    if folder.is_dir():
                        self.list_format = f"every image of {folder.relative_to(self.root)}/ (no {self.split}.txt)"
                        return sorted(p.stem for p in folder.glob("COCO_*.jpg"))
            raise DataError(f"{self.root}: split {self.split!r} has no list ({self.split}.txt) and no image folder "
                            f"{self._coco_folder()}/; add the list (one image id a line), or set dataset.list_dir")
        if not lst.is_file():
            where = "dataset.list_dir" if self._list_dir is not None else f"{lst.parent}"
            raise DataError(
                f"{lst}: list of split {self.split!r} not found; create it (one image id a line), point "
                f"dataset.list_dir to the folder holding it, or set dataset.train_split / eval_split / val_split "
                f"in the config to a split that exists under {where}"
            )
        return self._parse_list(lst)

    def _parse_list(self, lst: Path) -> list[str]:
        """Image ids of a list: one id a line, or two columns (SEAM, MCTformer: ``/JPEGImages/x.jpg
        /SegmentationClassAug/x.png``) whose first column's file stem is the id; COCO numbers become full ids."""
        ids, two_columns, numbers = [], False, False
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            tokens = line.split()
            if not tokens:
                continue
            entry = tokens[0]
            two_columns |= len(tokens) > 1
            if "/" in entry or entry.lower().endswith(IMAGE_SUFFIXES):
                entry = PurePosixPath(entry).stem
            if self.name == "coco14":
                m = _COCO_ID.match(entry)
                if m is None:
                    raise DataError(f"{lst}: line {n} {line.strip()!r} is not a COCO image id; write "
                                    f"COCO_train2014_<12 digits> or the image's number, one a line")
                numbers |= m["folder"] is None
                entry = f"COCO_{m['folder'] or self._coco_folder()}_{int(m['num']):012d}"
            ids.append(entry)
        if two_columns:
            self.list_format = "two columns (image and mask paths): the id is the first column's file stem"
        if numbers:
            self.list_format += f"; bare numbers are COCO_{self._coco_folder()}_<12d> (the split's name)"
        return ids

    def _fill(self, layout: FileLayout, image_id: str) -> Path:
        if self.name != "coco14":
            return self.root / layout.pattern.format(id=image_id)
        m = _COCO_ID.match(image_id)
        if m is None or m["folder"] is None:
            raise DataError(f"{image_id!r} is not a COCO image id (COCO_<folder>_<12 digits>)")
        num = int(m["num"])
        return self.root / layout.pattern.format(id=image_id, folder=m["folder"], num12=f"{num:012d}", num=num)

    def _pick(self, layouts: Sequence[FileLayout]) -> FileLayout:
        """The layout holding most files of an evenly spread sample of the list (the first on a tie or none)."""
        if len(layouts) == 1:
            return layouts[0]
        sample = self.ids[:: max(1, len(self.ids) // SAMPLE)]
        hits = [sum(self._fill(layout, i).is_file() for i in sample) for layout in layouts]
        return layouts[max(range(len(layouts)), key=lambda k: (hits[k], -k))]

    @cached_property
    def image_layout(self) -> FileLayout:
        """Where the split's images lie (COCO: one of :data:`COCO_IMAGE_LAYOUTS`)."""
        if self.name == "coco14":
            return self._pick(COCO_IMAGE_LAYOUTS)
        return FileLayout("JPEGImages/{id}.jpg")

    @cached_property
    def mask_layout(self) -> FileLayout:
        """Where the split's ground-truth masks lie and which values they hold (``coco_mask_values`` overrides a
        COCO folder's convention)."""
        if self.name != "coco14":
            return self._pick(VOC_MASK_LAYOUTS)
        layout = self._pick(COCO_MASK_LAYOUTS)
        if self._coco_mask_values != "auto":
            layout = FileLayout(layout.pattern, self._coco_mask_values, f"{layout.origin}; dataset.coco_mask_values")
        return layout

    def mask_layouts(self) -> tuple[FileLayout, ...]:
        """Every folder where this kind of dataset may keep its masks (for the messages about a missing mask)."""
        return COCO_MASK_LAYOUTS if self.name == "coco14" else VOC_MASK_LAYOUTS

    def image_path(self, image_id: str) -> Path:
        return self._fill(self.image_layout, image_id)

    def mask_path(self, image_id: str) -> Path:
        return self._fill(self.mask_layout, image_id)

    def missing_mask_hint(self, image_id: str) -> str:
        """Where else a missing mask of ``image_id`` lies, as the fix of the error that reports it."""
        def folder(path: Path) -> str:
            return f"{path.parent.relative_to(self.root)}/"

        others = [self._fill(lay, image_id) for lay in self.mask_layouts() if lay.pattern != self.mask_layout.pattern]
        found = [p for p in others if p.is_file()]
        if found:
            return (f"it lies in {folder(found[0])} instead, while most of split {self.split!r} lies in "
                    f"{folder(self.mask_path(image_id))}: keep every mask of a split in one folder")
        looked = ", ".join(folder(p) for p in others) or "no other folder"
        return f"split {self.split!r} reads its masks from {folder(self.mask_path(image_id))} (looked in {looked} too)"

    def describe(self) -> dict[str, str]:
        """How this split is read: list, images, masks and labels, each with what was assumed where the files
        could mean more than one thing (recorded in the dataset check's manifest and log)."""
        out = {
            "list": f"{self.list_path or 'none'}: {self.list_format}",
            "images": self.image_layout.describe(),
            "masks": f"{self.mask_layout.describe()}: {VALUE_CONVENTIONS[self.mask_layout.values]}",
            "labels": self.label_source,
        }
        if self.label_file_path is not None:
            out["labels"] += f" ({self.label_key_format})"
        if self.dropped:
            out["dropped"] = (f"{len(self.dropped)} listed image(s) whose labels are all zeros left out "
                              f"(dataset.drop_unlabelled), e.g. {', '.join(self.dropped[:5])}")
        return out

    # ------------------------------------------------------------------ labels
    @cached_property
    def label_file_path(self) -> Path | None:
        """The image-level label file (``label_file``, else the first of the default names in the root), or None."""
        if self._label_file is not None:
            path = self._under_root(self._label_file)
            if not path.is_file():
                raise DataError(f"{path}: label file not found (dataset.label_file); fix the path, or set "
                                f"dataset.label_file: null to use {' / '.join(self._label_names())} in {self.root}")
            return path
        for fname in self._label_names():
            if (self.root / fname).is_file():
                return self.root / fname
        return None

    def _label_names(self) -> tuple[str, ...]:
        return LABEL_FILES.get(self.name, DEFAULT_LABEL_FILES)

    @cached_property
    def _label_dict(self) -> tuple[dict, Counter]:
        """The label file as {key: 0/1 float32 vector} with keys made comparable (COCO: the image number; else
        str), and the Python types of the keys as written."""
        path = self.label_file_path
        raw = load_label_dict(path)
        out, types = {}, Counter()
        for k, v in raw.items():
            types[type(k).__name__ if not isinstance(k, np.generic) else f"numpy.{type(k).__name__}"] += 1
            key = self._label_key(k)
            vec = (np.asarray(v).reshape(-1) > 0).astype(np.float32)
            if key in out and not np.array_equal(out[key], vec):
                raise DataError(f"{path}: two entries for image {key} ({k!r} and another spelling) with different "
                                f"labels; keep one")
            out[key] = vec
        return out, types

    @property
    def _npy_labels(self) -> dict | None:
        return None if self.label_file_path is None else self._label_dict[0]

    @cached_property
    def label_key_format(self) -> str:
        """How the label file's keys are written and read (what the check reports)."""
        types = ", ".join(f"{n} {t}" for t, n in self._label_dict[1].most_common())
        if self.name == "coco14":
            return f"keys: {types}; matched by COCO image number"
        ints = any(t == "int" or t.startswith("numpy.int") or t.startswith("numpy.uint") for t in self._label_dict[1])
        return f"keys: {types}" + ("; integer keys YYYYNNNNNN are ids YYYY_NNNNNN (IRN's format)" if ints else "")

    def _label_key(self, key) -> str | int:
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if isinstance(key, (int, np.integer)):
            key = str(int(key))
        key = str(key)
        if self.name == "coco14":
            m = _COCO_ID.match(PurePosixPath(key).stem)
            return int(m["num"]) if m else key
        return key

    def _all_zero(self, npy: dict, image_id: str) -> bool:
        vec = next((npy[k] for k in self._label_candidates(image_id) if k in npy), None)
        return vec is not None and not vec.any()

    def _label_candidates(self, image_id: str) -> list:
        if self.name == "coco14":
            return [int(_COCO_ID.match(image_id)["num"])]
        out = [image_id]
        digits = image_id.replace("_", "")
        if digits.isdigit():
            out += [digits, str(int(digits))]  # IRN: 2007_000032 -> 2007000032 (an int in the file)
        return list(dict.fromkeys(out))

    @cached_property
    def label_source(self) -> str:
        """The label file (relative to the root where it lies inside) | ``Annotations`` | ``masks`` (custom)."""
        path = self.label_file_path
        if path is not None:
            try:
                return str(path.relative_to(self.root))
            except ValueError:
                return str(path)
        if self.name == "coco14":
            return self._label_names()[0]  # missing: labels() names it
        if self.name != "custom" or (self.root / "Annotations").is_dir():
            return "Annotations"
        return "masks"

    def label_path(self, image_id: str) -> Path:
        """The file holding the labels of one image (what an error about its labels names)."""
        if self.label_file_path is not None or self.name == "coco14":
            return self.label_file_path or self.root / self.label_source
        if self.label_source == "masks":
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
                f"{self._classes_origin()} names {self.n_classes} classes; {self._class_count_fix(y.size)}"
            )
        if y.sum() == 0:
            raise DataError(
                f"{self.label_path(image_id)}: image {image_id} has no labels; WSSS needs at least one class per "
                f"image — remove it from {self.split}.txt, fix its annotation"
                + (", or set dataset.drop_unlabelled: true to leave such images out" if self.label_file_path else "")
            )
        return y

    def check_label_file(self) -> None:
        """Check the label file as a whole: it loads safely, and its vectors do not all have a length other than
        the class count. One error for the file instead of one per image.

        Raises:
            DataError: naming the label file and the fix.
        """
        if self.label_file_path is None:
            return
        sizes = Counter(int(v.size) for v in self._npy_labels.values())
        if sizes and self.n_classes not in sizes:
            (size, _), = sizes.most_common(1)
            raise DataError(f"{self.label_file_path}: label vectors have {size} entries but the dataset has "
                            f"{self.n_classes} classes ({self._classes_origin()}); {self._class_count_fix(size)}")

    def _class_count_fix(self, size: int) -> str:
        if self.name == "coco14" and size == len(VOC_CLASSES):
            return (f"this is PASCAL VOC's label file (RIB ships it as coco14/cls_labels.npy): COCO's is "
                    f"cls_labels_coco.npy (80 entries a vector) - put it in {self.root} or name it in dataset.label_file")
        if self.name == "voc12" and size == len(COCO_CLASSES):
            return "this is COCO's label file: VOC's has 20 entries a vector (IRN's voc12/cls_labels.npy)"
        if size == self.n_classes + 1:
            return ("its vectors have one entry more than the classes (a background entry?): pnoc's label vectors "
                    "hold the object classes only")
        if self.name in ("voc12", "coco14"):
            return "a dataset with other classes is dataset.name: custom with a classes.txt (README: Bring your own data)"
        return "make the class list and the labels agree"

    def _classes_origin(self) -> str:
        return {"voc12": "VOC 2012", "coco14": "COCO 2014", "custom": str(self.root / "classes.txt")}.get(
            self.name, str(self.root / "dataset.json"))

    def _labels_raw(self, image_id: str) -> np.ndarray:
        npy = self._npy_labels
        if npy is not None:
            candidates = self._label_candidates(image_id)
            for k in candidates:
                if k in npy:
                    return npy[k]
            raise DataError(f"{self.label_file_path}: no labels for image {image_id} (looked up as "
                            f"{' / '.join(map(repr, candidates))}); add its entry to this file or remove {image_id} "
                            f"from {self.split}.txt")
        if self.name == "coco14":
            raise DataError(f"{self.root}: no COCO label file ({' / '.join(self._label_names())}); put RIB's or "
                            f"PNOC's cls_labels_coco.npy there, or name yours in dataset.label_file")
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
                    f"{path}: mask not found; {self.root} has neither a label file nor Annotations/, so the "
                    f"image-level labels of {image_id} come from its mask — add the mask or a label file"
                )
            cache[image_id] = present_classes(self.read_mask(image_id), self.n_classes)
        return cache[image_id]

    # ------------------------------------------------------------------ pixels
    def read_image(self, image_id: str) -> np.ndarray:
        """Returns: uint8 (H, W, 3)."""
        return read_image(self.image_path(image_id))

    def read_mask(self, image_id: str, image_hw: tuple[int, int] | None = None) -> np.ndarray:
        """Ground-truth mask (H, W) uint8 of class indices 0..C and 255, checked against the image's size
        (``image_hw``, or read from the image's header), so a mask of another size is a named error, never an
        IndexError further on. COCO category ids and PNOC's void 81 are mapped here."""
        return self.read_mask_encoded(image_id, image_hw)[0]

    def read_mask_encoded(self, image_id: str, image_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
        """:meth:`read_mask` and the file's encoding (a key of :data:`pnoc.io.MASK_ENCODINGS`)."""
        if image_hw is None:
            image_hw = self.image_size(image_id)
        path = self.mask_path(image_id)
        m, encoding = decode_mask(path)
        check_mask_size(m, path, image_hw)
        return self._mask_values(m, path), encoding

    def _mask_values(self, m: np.ndarray, path: Path) -> np.ndarray:
        """Map a mask's stored values to 0..C / 255 by its folder's convention, or raise naming the convention."""
        values = self.mask_layout.values
        if values == "category_ids":
            lut = np.full(256, -1, np.int16)
            lut[0], lut[255] = 0, 255
            lut[list(COCO_CATEGORY_IDS)] = np.arange(1, len(COCO_CATEGORY_IDS) + 1)
            out = lut[m]
            if (out < 0).any():
                bad = sorted(np.unique(m[out < 0]).tolist())[:8]
                raise DataError(
                    f"{path}: values {bad} are not COCO category ids, which {self.mask_layout.describe()} masks hold "
                    f"({VALUE_CONVENTIONS[values]}; 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 are unused); if these "
                    f"masks hold class indices 0..80 set dataset.coco_mask_values: contiguous")
            return out.astype(np.uint8)
        if values == "contiguous":
            m = np.where(m == COCO_VOID, np.uint8(255), m)
        bad = (m > self.n_classes) & (m != 255)
        if bad.any():
            vals = sorted(np.unique(m[bad]).tolist())[:8]
            if values == "contiguous":
                raise DataError(
                    f"{path}: values {vals} exceed COCO's class indices, which {self.mask_layout.describe()} masks "
                    f"hold ({VALUE_CONVENTIONS[values]}); if these masks hold COCO category ids (1..90, as coco2voc "
                    f"writes them) set dataset.coco_mask_values: category_ids")
            raise DataError(
                f"{path}: values {vals} exceed the {self.n_classes} classes; masks hold 0 (background), 1..C or 255 "
                f"(ignore)"
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
                raise DataError(f"{self.mask_path(i)}: ground-truth mask missing for {i}; {self.missing_mask_hint(i)}")

    def identity_files(self) -> list[Path]:
        """The files that say which images, classes and labels this split is (for a training's resume guard):
        the split list, dataset.json / classes.txt and the label file; those missing are skipped by the guard."""
        return [p for p in [self.list_path, self.label_file_path] if p is not None] + [
            self.root / f for f in ("dataset.json", "classes.txt", *self._label_names())]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"WSSSDataset({self.name}, {self.root}, {self.split}, {len(self)} images, {self.n_classes} classes)"


def present_classes(mask: np.ndarray, n_classes: int) -> np.ndarray:
    """The classes a mask holds, as image-level labels: float32 (C,) 0/1 (0 and 255 excluded)."""
    y = np.zeros(n_classes, np.float32)
    present = np.unique(mask)
    present = present[(present > 0) & (present <= n_classes)]
    y[present.astype(np.int64) - 1] = 1.0
    return y


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


def open_dataset(name: str, root: str | Path, split: str, **options) -> WSSSDataset:
    """Open one split of a dataset (see module docstring for the layouts; ``options``: those of
    :class:`WSSSDataset`)."""
    return WSSSDataset(name, root, split, **options)


def dataset_root(name: str, root: str | Path) -> Path:
    """Folder holding the images/masks (what ``summary.json`` calls ``dataset_root``)."""
    return Path(root)
