"""Stage: pseudo semantic-segmentation masks from the random-walk maps (spec §9, pseudo masks).

Per image: a background plane of ``bg_threshold`` (0.30) in front of the RW maps, argmax
(ties go to the background), channel → class id through the file's ``keys``, then an
optional label dCRF (reference runner: t = 1, gt_prob 0.9). With ``saliency_threshold`` set (a pnoc
extension, off in the reference), pixels whose saliency is at most the threshold are made
background before the dCRF: the paper uses the saliency only for the affinity labels, but when
the prior also fires on background context (the demo's Puzzle priors: CAM > 0.4 is 28 % precise)
the walk keeps those seeds, and only the saliency can remove them. The masks are palette PNGs
whose indices are the class ids (0 background, 1..C; no 255), readable both as index maps
and as VOC-coloured images. An image without classes gets an all-background mask. The
folder is written atomically; a missing RW map raises :class:`DataError` naming the image. With
``shard: kofK`` only the k-th of K slices of the split is processed (:mod:`pnoc.shards`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pnoc import cli
from pnoc.crf import crf_label
from pnoc.data.datasets import DataSource
from pnoc.io import DataError, atomic_dir, load_maps, write_mask
from pnoc.parallel import map_images
from pnoc.saliency.maps import read_saliency
from pnoc.shards import shard_ids

log = logging.getLogger("pnoc.affinity.make_pseudo_masks")


@dataclass
class Config(DataSource):
    """Pseudo masks from random-walk maps."""

    split: str
    rw_dir: Path
    out_dir: Path
    bg_threshold: float = 0.30
    crf: bool = True
    crf_t: int = 1
    crf_gt_prob: float = 0.9
    saliency_dir: Path | None = None
    saliency_threshold: float | None = None
    threads: int = 1
    shard: str = "1of1"


def pseudo_mask(maps: np.ndarray, keys: np.ndarray, bg_threshold: float, img: np.ndarray | None = None,
                crf: dict | None = None, saliency: np.ndarray | None = None,
                saliency_threshold: float | None = None) -> np.ndarray:
    """Class-index mask of one image.

    Args:
        maps: (K, H, W) RW maps in [0, 1].
        keys: (K,) class ids (1..C).
        bg_threshold: value of the background plane; a class must exceed it to win.
        img: uint8 (H, W, 3) RGB image (needed with ``crf``).
        crf: keyword arguments of :func:`pnoc.crf.crf_label` (``t``, ``gt_prob``) or None.
        saliency: float (H, W) saliency in [0, 1] (needed with ``saliency_threshold``).
        saliency_threshold: pixels with ``saliency <= saliency_threshold`` become background
            (before the CRF); None keeps the reference rule.

    Returns:
        uint8 (H, W): 0 background, class ids elsewhere.
    """
    maps = np.asarray(maps, np.float32)
    keys = np.asarray(keys, np.int64).reshape(-1)
    if maps.ndim != 3 or maps.shape[0] != keys.shape[0]:
        raise ValueError(f"maps {maps.shape} do not match keys {keys.shape}")
    k, h, w = maps.shape
    if k == 0:
        return np.zeros((h, w), np.uint8)
    stack = np.concatenate([np.full((1, h, w), bg_threshold, np.float32), maps])
    idx = np.argmax(stack, axis=0)
    if saliency_threshold is not None:
        if saliency is None:
            raise ValueError("saliency_threshold needs the saliency map")
        saliency = np.asarray(saliency)
        if saliency.shape != (h, w):
            raise ValueError(f"saliency is {saliency.shape} but the maps are {(h, w)}")
        idx[saliency <= saliency_threshold] = 0
    if crf is not None:
        if img is None:
            raise ValueError("the CRF needs the image")
        idx = crf_label(img, idx, k + 1, **crf)
    lut = np.concatenate([[0], keys]).astype(np.uint8)
    return lut[idx]


_W: dict = {}


def _init_worker(cfg: Config, out: Path) -> None:
    _W["cfg"], _W["out"] = cfg, out
    _W["ds"] = cfg.open_dataset(cfg.split)


def _work(image_id: str) -> np.ndarray:
    cfg, ds, out = _W["cfg"], _W["ds"], _W["out"]
    path = Path(cfg.rw_dir) / f"{image_id}.npz"
    if not path.is_file():
        raise DataError(f"{path}: random-walk maps missing for image {image_id}; rerun rule propagate for this split")
    z = load_maps(path)
    hw = ds.image_size(image_id)
    if z["maps"].shape[1:] != hw:
        raise DataError(f"{path}: maps are {z['maps'].shape[1:]} but image {image_id} is {hw}; rerun rule propagate")
    # writable copy: pydensecrf refuses read-only (PIL-backed) buffers
    img = np.array(ds.read_image(image_id)) if cfg.crf else None
    crf = {"t": cfg.crf_t, "gt_prob": cfg.crf_gt_prob} if cfg.crf else None
    sal = None
    if cfg.saliency_threshold is not None:
        sal = read_saliency(cfg.saliency_dir, image_id, hw, fmt="png")
    mask = pseudo_mask(z["maps"], z["keys"], cfg.bg_threshold, img, crf, sal, cfg.saliency_threshold)
    write_mask(out / f"{image_id}.png", mask)
    return np.bincount(mask.reshape(-1), minlength=256)


def run(cfg: Config) -> dict:
    if cfg.saliency_threshold is not None and cfg.saliency_dir is None:
        raise DataError("--saliency-threshold needs --saliency-dir (the PoolNet saliency maps of the split)")
    ds = cfg.open_dataset(cfg.split)
    ids = shard_ids(ds.ids, cfg.shard)
    hist = np.zeros(256, np.int64)
    with atomic_dir(cfg.out_dir) as tmp:
        for c in map_images(ids, _work, _init_worker, (cfg, tmp), cfg.threads, f"pseudo masks {cfg.split}"):
            hist += c
    info = {"stage": "make_pseudo_masks", "split": cfg.split, "images": len(ids), "bg_threshold": cfg.bg_threshold,
            "crf": {"t": cfg.crf_t, "gt_prob": cfg.crf_gt_prob} if cfg.crf else None,
            "saliency_threshold": cfg.saliency_threshold,
            "saliency": str(cfg.saliency_dir) if cfg.saliency_threshold is not None else None,
            "fraction_bg": float(hist[0] / max(1, hist.sum()))}
    log.info("%d pseudo masks (bg threshold %.2f, crf %s): background fraction %.3f", len(ids), cfg.bg_threshold,
             info["crf"], info["fraction_bg"])
    return info


if __name__ == "__main__":
    cli.main(run, Config)
