"""Helpers shared by the saliency stages (hints, C²AM/C²AM-H, PoolNet, evaluation).

Saliency artifacts:

* hints: ``<hints_dir>/<id>.png`` 8-bit gray, value/255 = max over classes of the CAMs;
* raw C²AM maps: ``<raw_dir>/<id>.npz`` (:func:`pnoc.io.save_maps`, ``maps`` (1, H, W) in
  [0, 1], ``keys`` = [1], ``lr`` the stride-4 copy);
* pseudo-saliency masks: ``<pseudo_dir>/<id>.png`` 8-bit gray with values 0 / 255;
* PoolNet maps: ``<poolnet_dir>/<id>.png`` 8-bit gray 0..255 (σ(logit)·255).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pnoc.io import DataError, load_maps, read_gray

MAP_FORMATS = ("npz", "png")


def read_hint(hints_dir: str | Path, image_id: str, hw: tuple[int, int]) -> np.ndarray:
    """Hint of one image as float32 (H, W) in [0, 1]; DataError naming the file if absent."""
    path = Path(hints_dir) / f"{image_id}.png"
    if not path.is_file():
        raise DataError(f"{path}: hint missing for image {image_id}; rerun rule extract_hints for this split")
    return read_gray(path, hw)


def read_saliency(maps_dir: str | Path, image_id: str, hw: tuple[int, int], fmt: str = "npz") -> np.ndarray:
    """A saliency map as float32 (H, W) in [0, 1].

    Args:
        maps_dir: folder of raw C²AM maps (``npz``) or of gray PNGs (``png``: PoolNet maps,
            pseudo masks).
        hw: the image's (H, W); a size mismatch raises.
        fmt: ``npz`` or ``png``.
    """
    if fmt not in MAP_FORMATS:
        raise ValueError(f"maps format {fmt!r}: use one of {MAP_FORMATS}")
    if fmt == "png":
        path = Path(maps_dir) / f"{image_id}.png"
        if not path.is_file():
            raise DataError(f"{path}: saliency map missing for image {image_id}; rerun the rule that writes {maps_dir}")
        return read_gray(path, hw)
    path = Path(maps_dir) / f"{image_id}.npz"
    if not path.is_file():
        raise DataError(f"{path}: saliency map missing for image {image_id}; rerun rule infer_saliency")
    maps = load_maps(path)["maps"]
    if maps.shape[0] != 1 or maps.shape[1:] != tuple(hw):
        raise DataError(f"{path}: expected maps of shape (1, {hw[0]}, {hw[1]}), got {maps.shape}; rerun infer_saliency")
    return maps[0]


def binary_gt(gt: np.ndarray) -> np.ndarray:
    """Ground-truth foreground: 1 where the class is 1..C, 0 on background, 255 kept as ignore."""
    gt = np.asarray(gt)
    return np.where(gt == 255, 255, (gt > 0).astype(np.uint8)).astype(np.uint8)


def thresholds(lo: float, hi: float, step: float) -> list[float]:
    """``lo, lo+step, …, hi`` (rounded to 6 decimals)."""
    n = int(round((hi - lo) / step)) + 1
    return [round(lo + i * step, 6) for i in range(n)]
