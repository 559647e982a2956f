"""Segmentation inference helpers: multi-scale + flip merging and mask writers.

Reference spec §10 (inference): for every scale the image is resized, the network runs
on the image and its horizontal mirror, the logits are resized back to H×W, the two
flips are *summed*, the scales *averaged*, then a softmax over classes gives the
probabilities fed to the optional dCRF and the argmax.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pnoc.io import write_mask

DEFAULT_SCALES = (0.5, 1.0, 1.5, 2.0)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # align_corners=True like the DeepLab output upsampling; it also reproduces maps
    # that are linear in the pixel coordinates exactly, so down- then up-sampling a
    # smooth map loses nothing at the borders (align_corners=False clamps there).
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


@torch.no_grad()
def multiscale_logits(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                      scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True) -> torch.Tensor:
    """Multi-scale (and flip) class probabilities for one image.

    The caller puts ``model`` in eval mode and on ``image``'s device.

    Args:
        model: maps (B, 3, h, w) to logits (B, C, h', w') (any h', w').
        image: (1, 3, H, W) normalised image.
        scales: resize factors; each gives an (round(s·H), round(s·W)) input.
        flip: also run the horizontally mirrored image and add its un-mirrored logits.
            As in the reference the flips are summed (not averaged), so the logits
            entering the softmax are doubled; the argmax is unaffected.

    Returns:
        float32 probabilities (C, H, W), summing to 1 over C.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, 3, H, W), got {tuple(image.shape)}")
    if not scales:
        raise ValueError("scales must not be empty")
    h, w = image.shape[2:]
    total = None
    for s in scales:
        size = (max(1, round(h * s)), max(1, round(w * s)))
        x = _resize(image, size)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)  # one batch of 2: a single forward pass
        y = _resize(model(x).float(), (h, w))
        y = y[0] + y[1].flip(-1) if flip else y[0]  # (C, H, W), second map un-mirrored
        total = y if total is None else total + y
    return torch.softmax(total / len(scales), dim=0)


def _as_index_array(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype.kind not in "iub":
        raise ValueError(f"mask must hold integer class indices, got dtype {mask.dtype}")
    return mask


def to_voc_submission(mask, path: str | os.PathLike) -> None:
    """Write a predicted mask as a VOC palette PNG (test-server format).

    The pixel values of a palette PNG are the class indices themselves, so the server
    (and :func:`pnoc.io.read_mask`) read back exactly ``mask``; the palette only makes
    the file viewable in colour.

    Args:
        mask: (H, W) integer class indices in 0..255 (numpy array or tensor).
        path: destination ``.png`` (written atomically).
    """
    write_mask(path, _as_index_array(mask), palette=True)


def write_index_png(mask, path: str | os.PathLike) -> None:
    """Write a mask as a raw 8-bit grayscale PNG of class indices (no palette).

    Args:
        mask: (H, W) integer class indices in 0..255 (numpy array or tensor).
        path: destination ``.png`` (written atomically).
    """
    write_mask(path, _as_index_array(mask), palette=False)
