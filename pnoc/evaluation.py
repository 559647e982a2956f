"""Segmentation metrics: confusion matrices, mIoU, one-pass background-threshold sweep, class groups.

mIoU is the mean over *all* classes including background (absent classes score 0 and
still count, as in the reference); pixels whose ground truth is 255 are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def confusion(pred: np.ndarray, gt: np.ndarray, n: int, ignore: int = 255) -> np.ndarray:
    """Confusion matrix ``conf[gt, pred]`` of two index maps.

    Args:
        pred, gt: integer arrays of the same shape; ``gt == ignore`` pixels are skipped.
        n: number of classes (background included).

    Returns:
        int64 (n, n).
    """
    gt = np.asarray(gt).reshape(-1)
    pred = np.asarray(pred).reshape(-1)
    if gt.shape != pred.shape:
        raise ValueError(f"prediction has {pred.size} pixels, ground truth {gt.size}")
    keep = gt != ignore
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    if g.size and (g.max() >= n or p.max() >= n or p.min() < 0):
        raise ValueError(f"labels outside 0..{n - 1} (gt max {g.max()}, pred max {p.max()})")
    return np.bincount(g * n + p, minlength=n * n).reshape(n, n)


def scores(conf: np.ndarray) -> dict:
    """IoU per class, mIoU, and the mean false-positive / false-negative ratios.

    FP ratio of class c = FP / (TP + FP + FN) and FN ratio likewise (IoU + FP + FN = 1),
    as the reference's ``evaluate.py`` reports them.
    """
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt_tot = conf.sum(1)
    pred_tot = conf.sum(0)
    union = gt_tot + pred_tot - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, 0.0)
        fp = np.where(union > 0, (pred_tot - tp) / union, 0.0)
        fn = np.where(union > 0, (gt_tot - tp) / union, 0.0)
    return {
        "miou": float(iou.mean()),
        "iou": iou,
        "miou_fg": float(iou[1:].mean()) if len(iou) > 1 else float("nan"),
        "fp": float(fp.mean()),
        "fn": float(fn.mean()),
        "fp_per_class": fp,
        "fn_per_class": fn,
        "pixel_accuracy": float(tp.sum() / max(1.0, conf.sum())),
    }


def prior_prediction(maps: np.ndarray, keys: np.ndarray, threshold: float) -> np.ndarray:
    """Background-plane argmax: a pixel is background unless some class map exceeds ``threshold``.

    Args:
        maps: (K, H, W) normalised CAMs of the present classes.
        keys: (K,) 1-based class ids.

    Returns:
        int (H, W) class indices (0 = background).
    """
    if maps.shape[0] == 0:
        return np.zeros(maps.shape[1:], np.int64)
    best = maps.argmax(0)
    val = maps.max(0)
    # ties at exactly the threshold go to background, like argmax over [t, maps...]
    return np.where(val > threshold, np.asarray(keys)[best], 0).astype(np.int64)


@dataclass
class ThresholdSweep:
    """Confusion matrices for every background threshold from ONE pass over the files.

    Each pixel contributes its ground truth g, its best class k (argmax of the maps) and
    the bin of its max activation among the sorted thresholds; a single bincount over
    (g, k, bin) gives, by a cumulative sum over bins, the confusion at every threshold.
    """

    n_classes: int
    thresholds: Sequence[float]
    ignore: int = 255
    _hist: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.thresholds = np.asarray(sorted(self.thresholds), dtype=np.float64)
        self._hist = np.zeros((self.n_classes, self.n_classes, len(self.thresholds) + 1), np.int64)

    def update(self, maps: np.ndarray, keys: np.ndarray, gt: np.ndarray) -> None:
        """Add one image. maps (K, H, W), keys (K,), gt (H, W)."""
        n, T = self.n_classes, len(self.thresholds) + 1
        g = gt.reshape(-1).astype(np.int64)
        keep = g != self.ignore
        g = g[keep]
        if maps.shape[0] == 0:
            k = np.zeros_like(g)
            b = np.zeros_like(g)
        else:
            flat = maps.reshape(maps.shape[0], -1)[:, keep]
            k = np.asarray(keys, np.int64)[flat.argmax(0)]
            v = flat.max(0).astype(np.float64)
            # bin b = number of thresholds strictly below v: the pixel is foreground for
            # exactly the first b thresholds (t < v)
            b = np.searchsorted(self.thresholds, v, side="left")
        self._hist += np.bincount((g * n + k) * T + b, minlength=n * n * T).reshape(n, n, T)

    def confusions(self) -> np.ndarray:
        """(n_thresholds, n, n) confusion matrices, in threshold order."""
        n, T = self.n_classes, len(self.thresholds)
        out = np.zeros((T, n, n), np.int64)
        # foreground at threshold i: pixels whose bin > i
        rev = np.cumsum(self._hist[:, :, ::-1], axis=2)[:, :, ::-1]  # rev[..., j] = sum over bins ≥ j
        total = self._hist.sum(2)  # (g, k)
        for i in range(T):
            fg = rev[:, :, i + 1]
            out[i] = fg
            # the rest is predicted background (k ≥ 1 for every foreground prediction)
            out[i][:, 0] += (total - fg).sum(1)
        return out

    def results(self) -> list[dict]:
        return [{"threshold": float(t), **scores(c)} for t, c in zip(self.thresholds, self.confusions())]


def class_statistics(masks: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-class data properties of the paper's Table 1.

    Args:
        masks: ground-truth index maps.
        labels: (C,) 0/1 image labels of the same images.

    Returns:
        ``occurrence`` (images containing the class), ``size`` (mean fraction of image
        pixels when present), ``cooccurrence`` (fraction of its images that hold another
        class), ``cardinality`` (mean label-set size of its images); each (C,).
    """
    C = len(labels[0])
    occ = np.zeros(C)
    size = np.zeros(C)
    co = np.zeros(C)
    card = np.zeros(C)
    for m, y in zip(masks, labels):
        valid = max(1, (m != 255).sum())
        present = np.flatnonzero(y)
        for c in present:
            occ[c] += 1
            size[c] += (m == c + 1).sum() / valid
            co[c] += len(present) > 1
            card[c] += len(present)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"occurrence": occ, "size": np.where(occ > 0, size / occ, 0), "cooccurrence": np.where(occ > 0, co / occ, 0),
                "cardinality": np.where(occ > 0, card / occ, 0)}


def class_groups(stats: dict[str, np.ndarray], class_names: list[str]) -> dict[str, list[str]]:
    """Split classes into tertile groups by occurrence, relative size and co-occurrence rate."""
    groups = {}
    spec = [("occurrence", ("low freq.", "mid freq.", "high freq.")),
            ("size", ("small", "mid size", "large")),
            ("cooccurrence", ("low co-occ.", "mid co-occ.", "high co-occ."))]
    for key, names in spec:
        order = np.argsort(stats[key], kind="stable")
        for gi, part in enumerate(np.array_split(order, 3)):
            groups[f"{key}: {names[gi]}"] = [class_names[i] for i in part]
    return groups


def group_table(iou: np.ndarray, class_names: list[str], groups: dict[str, list[str]],
                stats: dict[str, np.ndarray]) -> list[dict]:
    """Rows (group, classes, mean IoU, mean properties) + correlations of IoU with each property.

    ``iou`` has the background first (len C + 1); class_names has the C object classes.
    """
    rows = [{"group": "overall", "classes": "all", "miou": float(iou.mean())},
            {"group": "background", "classes": "-", "miou": float(iou[0])}]
    idx = {n: i for i, n in enumerate(class_names)}
    for g, names in groups.items():
        ii = [idx[n] for n in names]
        if not ii:
            continue
        row = {"group": g, "classes": " ".join(names), "miou": float(iou[1:][ii].mean())}
        for k, v in stats.items():
            row[k] = float(np.mean(v[ii]))
        rows.append(row)
    for k, v in stats.items():
        fg = iou[1:]
        rho = float(np.corrcoef(v, fg)[0, 1]) if np.std(v) > 0 and np.std(fg) > 0 else float("nan")
        rows.append({"group": f"correlation ρ(IoU, {k})", "classes": "-", "miou": rho})
    return rows


def percent_mean_std(values) -> str:
    """Scores in [0, 1] as ``"mean ± std"`` in % over seeds (std with ddof 1; the mean alone for one value).

    ``None`` entries (a stage that did not report the score) are left out; no value at all gives ``""``.
    """
    v = 100 * np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return ""
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def mean_of_present(values) -> float | None:
    """Mean of the entries that are not ``None``; ``None`` when there are none."""
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.3f}") -> str:
    """Render rows as a GitHub markdown table."""
    if not rows:
        return ""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(floatfmt.format(v) if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def evaluate_mask_folder(ds, folder, pred_ignore_as: int | None = 0, ignore: int = 255) -> dict:
    """Score a folder of predicted index PNGs (``<folder>/<id>.png``) against a split's ground truth.

    Used by every stage whose output is a mask per image (segmentation predictions, pseudo
    masks). A prediction whose size differs from its ground truth is resized to it with
    nearest neighbour (like the reference's ``evaluate.py --mode png``).

    Args:
        ds: a :class:`pnoc.data.WSSSDataset` (the split to score; every image needs a GT mask).
        folder: the prediction folder; palette or grayscale PNGs of class indices.
        pred_ignore_as: class that predicted ``ignore`` (255, "unsure" pixels of pseudo
            masks) counts as; 0 = background, as IRN/P-NOC score pseudo masks. ``None``
            refuses such predictions instead.
        ignore: the void value (ground-truth pixels with it are not scored).

    Returns:
        :func:`scores` of the summed confusion matrix plus ``confusion`` (n, n),
        ``per_class_iou`` / ``per_class_fp`` / ``per_class_fn`` (class name -> value,
        background first), ``images`` and ``pred_ignored_pixels`` (predicted-ignore pixels
        remapped by ``pred_ignore_as``).

    Raises:
        pnoc.io.DataError: a prediction is missing, unreadable or holds a class index > C.
    """
    from pathlib import Path

    from PIL import Image

    from pnoc.io import DataError, read_mask

    folder = Path(folder)
    n = ds.n_classes + 1
    conf = np.zeros((n, n), np.int64)
    remapped = 0
    for image_id in ds.ids:
        path = folder / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"{path}: prediction missing for image {image_id} of split {ds.split}; "
                            f"rerun the rule that writes {folder}")
        gt = ds.read_mask(image_id)
        pred = read_mask(path)
        if pred.shape != gt.shape:
            pred = np.asarray(Image.fromarray(pred).resize((gt.shape[1], gt.shape[0]), Image.NEAREST))
        unsure = pred == ignore
        if unsure.any():
            if pred_ignore_as is None:
                raise DataError(f"{path}: holds ignore ({ignore}) pixels; predictions must assign a class")
            remapped += int(unsure.sum())
            pred = np.where(unsure, pred_ignore_as, pred)
        if pred.max(initial=0) >= n:
            raise DataError(f"{path}: class index {int(pred.max())} exceeds the {ds.n_classes} classes of {ds.name}")
        conf += confusion(pred, gt, n, ignore)
    out = scores(conf)
    names = ["background"] + list(ds.classes)
    out.update({
        "confusion": conf,
        "per_class_iou": {k: float(v) for k, v in zip(names, out["iou"])},
        "per_class_fp": {k: float(v) for k, v in zip(names, out["fp_per_class"])},
        "per_class_fn": {k: float(v) for k, v in zip(names, out["fn_per_class"])},
        "images": len(ds.ids),
        "pred_ignored_pixels": remapped,
    })
    return out
