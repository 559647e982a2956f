"""Test-time augmentation (multi-scale × horizontal flip) for map-producing networks."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pnoc.data.transforms import normalize, resize_image


@torch.no_grad()
def tta_maps(forward: Callable[[torch.Tensor], torch.Tensor], images_u8: torch.Tensor,
             scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0), flip: bool = True,
             reduce: str = "sum", lowres_stride: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a network's maps over scales and flips.

    For each scale the batch is resized (bicubic) and run together with its mirror
    (one batch of 2B); ReLU is applied and the un-mirrored map of the mirror is added
    to the map of the original. Maps of every scale are resized bilinearly to the full
    size and to the stride-``lowres_stride`` size and reduced over scales.

    Args:
        forward: maps a normalised batch (N, 3, h, w) to raw maps (N, K, h', w').
        images_u8: uint8 (B, 3, H, W), all the same size.
        scales: image scale factors.
        flip: add the horizontally mirrored pass.
        reduce: ``sum`` (CAM stage) or ``mean`` (C²AM stage) over scales.

    Returns:
        (full-resolution maps (B, K, H, W), low-resolution maps (B, K, ⌈H/s⌉, ⌈W/s⌉)), float32, ≥ 0.
    """
    B, _, H, W = images_u8.shape
    lh, lw = math.ceil(H / lowres_stride), math.ceil(W / lowres_stride)
    hr = lr = None
    for s in scales:
        imgs = torch.stack([resize_image(im, s) for im in images_u8]) if s != 1.0 else images_u8
        x = normalize(imgs)
        if flip:
            x = torch.cat([x, x.flip(-1)], 0)
        m = F.relu(forward(x).float())
        if flip:
            m = m[:B] + m[B:].flip(-1)
        up = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
        down = F.interpolate(m, size=(lh, lw), mode="bilinear", align_corners=False)
        hr = up if hr is None else hr + up
        lr = down if lr is None else lr + down
    if reduce == "mean":
        hr, lr = hr / len(scales), lr / len(scales)
    return hr, lr


def max_normalize(maps: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Divide each channel by its own spatial max (+eps). maps: (..., H, W) ≥ 0."""
    return maps / (maps.flatten(-2).amax(-1)[..., None, None] + eps)
