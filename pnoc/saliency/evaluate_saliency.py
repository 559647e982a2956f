"""Stage: evaluate saliency maps (raw C²AM/C²AM-H "P." or PoolNet-refined "R.", paper Table 6).

Three protocols, each with a threshold sweep (a pixel is salient when its map value is
``> t``; thresholds ``th_min … th_max``; the best t is reported, chosen on the evaluated split
as in the reference):

a. **Binary** (the reference's ``ccam/evaluate.py`` saliency mode): foreground mIoU — the
   mean of the background IoU and the foreground IoU against the ground-truth foreground
   (class > 0; 255 ignored). This is ``miou`` / ``threshold`` / ``per_class_iou``, and the
   binary masks (index PNGs 0/1) at the best threshold are written to ``masks_dir``.
b. **Saliency + CAM priors** (``cam_combined``, the paper's §6.2 evaluation): background where
   the pixel is not salient, else the argmax of the CAMs of the image's present classes;
   mIoU over all C + 1 classes.
c. **GT priors** (``gt_priors``, Table 6's last rows): as (b) with the ground-truth class map
   as the prior, so only the saliency is measured. Every pixel takes the class of the nearest
   ground-truth object pixel; a salient pixel on true background is therefore a false positive
   of a neighbouring present class (the reference draws a random class), a non-salient object
   pixel a false negative.

The raw maps are scored without the reference's CRF post-processing (the pseudo masks that
PoolNet learns from do get it). Maps are read from ``npz`` (raw C²AM maps) or gray ``png``
files (PoolNet maps); a missing map, CAM or mask raises :class:`pnoc.io.DataError`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from pnoc import cli
from pnoc.data.datasets import DataSource
from pnoc.evaluation import ThresholdSweep, markdown_table
from pnoc.io import DataError, atomic_dir, load_maps, write_json, write_mask, write_text
from pnoc.saliency.maps import MAP_FORMATS, binary_gt, read_saliency, thresholds

log = logging.getLogger("pnoc.saliency.evaluate_saliency")


@dataclass
class Config(DataSource):
    """Evaluate saliency maps (binary, with CAM priors, with GT priors)."""

    split: str
    maps_dir: Path
    out: Path
    masks_dir: Path
    variant: str = "c2amh"
    maps_format: str = "png"
    cams_dir: Path | None = None
    cam_variant: str = ""
    th_min: float = 0.05
    th_max: float = 0.80
    th_step: float = 0.05


def class_onehot(class_map: np.ndarray, sal: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Maps whose background-plane argmax is ``class_map`` where ``sal > t`` and background elsewhere.

    Channel k holds ``sal`` where ``class_map == keys[k]`` and 0 elsewhere, so that
    :class:`ThresholdSweep` (max value vs threshold, argmax for the class) scores
    "background unless salient, then the prior's class" at every threshold in one pass.

    Args:
        class_map: int (H, W) prior class per pixel (values among ``keys``).
        sal: float (H, W) saliency in [0, 1].
        keys: (K,) class ids.

    Returns:
        float32 (K, H, W).
    """
    keys = np.asarray(keys)
    return (class_map[None] == keys[:, None, None]).astype(np.float32) * sal[None].astype(np.float32)


def cam_class_map(maps: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Argmax of the present classes' CAMs: int (H, W) of class ids (maps (K ≥ 1, H, W))."""
    return np.asarray(keys)[maps.argmax(0)]


def gt_class_map(gt: np.ndarray, fallback: int) -> np.ndarray:
    """Every pixel takes the class of its nearest ground-truth object pixel (``fallback`` without any).

    Args:
        gt: (H, W) index mask, 0 background, 1..C, 255 ignore.
        fallback: class used when the mask holds no object pixel.

    Returns:
        int64 (H, W) class ids ≥ 1.
    """
    obj = (gt > 0) & (gt != 255)
    if not obj.any():
        return np.full(gt.shape, fallback, np.int64)
    _, (iy, ix) = ndimage.distance_transform_edt(~obj, return_indices=True)
    return gt[iy, ix].astype(np.int64)


def _fallback_class(ds, image_id: str) -> int:
    """Class given to salient pixels of an image whose mask has no object: its first image label (else 1)."""
    try:
        return int(np.flatnonzero(ds.labels(image_id))[0]) + 1
    except DataError:
        return 1


def best_of(sweep: ThresholdSweep, names: list[str]) -> dict:
    res = sweep.results()
    best = max(res, key=lambda r: r["miou"])
    return {"miou": best["miou"], "threshold": best["threshold"], "fp": best["fp"], "fn": best["fn"],
            "per_class_iou": {n: float(v) for n, v in zip(names, best["iou"])},
            "sweep": [{"threshold": r["threshold"], "miou": r["miou"]} for r in res]}


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    if cfg.maps_format not in MAP_FORMATS:
        raise ValueError(f"maps_format {cfg.maps_format!r}: use one of {MAP_FORMATS}")
    ds = cfg.open_dataset(cfg.split)
    ths = thresholds(cfg.th_min, cfg.th_max, cfg.th_step)
    n = ds.n_classes + 1
    sw_bin, sw_cam, sw_gt = ThresholdSweep(2, ths), ThresholdSweep(n, ths), ThresholdSweep(n, ths)
    one = np.array([1])
    for image_id in tqdm(ds.ids, desc=f"saliency {cfg.variant} {cfg.split}", mininterval=10):
        hw = ds.image_size(image_id)
        sal = read_saliency(cfg.maps_dir, image_id, hw, cfg.maps_format)
        gt = ds.read_mask(image_id, hw)
        sw_bin.update(sal[None], one, binary_gt(gt))
        if cfg.cams_dir is not None:
            path = Path(cfg.cams_dir) / f"{image_id}.npz"
            if not path.is_file():
                raise DataError(f"{path}: no CAMs for image {image_id}; rerun rule infer_cams for split {cfg.split}")
            z = load_maps(path)
            maps, keys = z["maps"], z["keys"].astype(np.int64)
            if maps.shape[1:] != hw:
                raise DataError(f"{path}: maps are {maps.shape[1:]} but image {image_id} is {hw}; rerun infer_cams")
            if maps.shape[0]:
                sw_cam.update(class_onehot(cam_class_map(maps, keys), sal, keys), keys, gt)
            else:
                sw_cam.update(maps, keys, gt)
        cmap = gt_class_map(gt, _fallback_class(ds, image_id) if not ((gt > 0) & (gt != 255)).any() else 1)
        gkeys = np.unique(cmap)
        sw_gt.update(class_onehot(cmap, sal, gkeys), gkeys, gt)
    names = ["background"] + list(ds.classes)
    binary = best_of(sw_bin, ["background", "foreground"])
    t_best = binary["threshold"]
    with atomic_dir(cfg.masks_dir) as tmp:
        for image_id in tqdm(ds.ids, desc="masks", mininterval=10):
            sal = read_saliency(cfg.maps_dir, image_id, ds.image_size(image_id), cfg.maps_format)
            write_mask(tmp / f"{image_id}.png", (sal > t_best).astype(np.uint8))
    metrics = {"stage": "saliency", "variant": cfg.variant, "split": cfg.split, **binary,
               "masks": str(cfg.masks_dir), "maps": str(cfg.maps_dir), "maps_format": cfg.maps_format,
               "images": len(ds)}
    if cfg.cams_dir is not None:
        metrics["cam_combined"] = {"prior": cfg.cam_variant or str(cfg.cams_dir), **best_of(sw_cam, names)}
    metrics["gt_priors"] = best_of(sw_gt, names)
    rows = [{"protocol": "binary (fg mIoU)", "miou": binary["miou"], "threshold": binary["threshold"]}]
    if "cam_combined" in metrics:
        rows.append({"protocol": f"saliency + CAM priors ({metrics['cam_combined']['prior']})",
                     "miou": metrics["cam_combined"]["miou"], "threshold": metrics["cam_combined"]["threshold"]})
    rows.append({"protocol": "saliency + GT priors", "miou": metrics["gt_priors"]["miou"],
                 "threshold": metrics["gt_priors"]["threshold"]})
    md = (f"# Saliency `{cfg.variant}` on {cfg.dataset}/{cfg.split}\n\n" + markdown_table(rows)
          + "\n## Binary threshold sweep\n\n" + markdown_table(binary["sweep"]))
    write_text(Path(cfg.out).with_suffix(".md"), md)
    metrics["seconds"] = time.perf_counter() - t0  # the whole evaluation (benchmarks/rehearsal.py)
    write_json(cfg.out, metrics)
    log.info("saliency %s/%s: binary mIoU %.4f at t=%.2f; CAM-combined %s; GT priors %.4f", cfg.variant, cfg.split,
             binary["miou"], t_best,
             f"{metrics['cam_combined']['miou']:.4f}" if "cam_combined" in metrics else "n/a",
             metrics["gt_priors"]["miou"])
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
