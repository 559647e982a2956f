"""Training/inference transforms shared by every stage (torchvision v2 based).

Geometry is applied jointly to the image and its auxiliary maps (masks with
nearest interpolation and pad 255, float maps with bilinear interpolation and pad 0),
so segmentation, saliency and affinity stages share one code path.

All randomness comes from torch's global RNG; data-loader workers are seeded from
the loader's generator, which is what makes resumed epochs reproduce exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Training augmentation.

    Attributes:
        crop: square crop size (pixels); smaller images are zero-padded at a random offset.
        resize_long: (min, max) of the random long side (uniform integer), ``None`` = no resize.
        hflip: random horizontal flip with p = 0.5.
        augment: ``none`` | ``colorjitter`` | ``randaugment`` | ``randaugment+colorjitter``.
    """

    crop: int = 128
    resize_long: tuple[int, int] | None = (96, 160)
    hflip: bool = True
    augment: str = "none"


def to_tensor_image(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 tensor (3, H, W)."""
    arr = np.ascontiguousarray(img)
    if not arr.flags.writeable:  # PIL-backed arrays are read-only; torch wants writable memory
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def normalize(img_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (…, 3, H, W) -> float ImageNet-normalised."""
    x = img_u8.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` -> float in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


class Augmenter:
    """Joint random geometry + photometric augmentation.

    Call with an image ``uint8 (3, H, W)`` and a list of aux maps, each either a
    ``uint8 (H, W)`` label map (nearest, pad 255) or a ``float (C, H, W)`` map
    (bilinear, pad 0). Returns ``(normalised image (3, crop, crop), [aux...])``.
    """

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        aug = cfg.augment
        if aug not in ("none", "colorjitter", "randaugment", "randaugment+colorjitter"):
            raise ValueError(f"augment={aug!r}: use none | colorjitter | randaugment | randaugment+colorjitter")
        self.photometric = []
        if "randaugment" in aug:
            # torchvision's RandAugment (n=2 ops, magnitude 9 of 31 bins) + a 16 px cutout
            # as in the FixMatch-style variant the reference uses.
            self.photometric.append(T.RandAugment(num_ops=2, magnitude=9))
        if "colorjitter" in aug:
            self.photometric.append(T.ColorJitter(0.3, 0.3, 0.3, 0.1))
        self.cutout = "randaugment" in aug

    def __call__(self, img: torch.Tensor, aux: list[torch.Tensor] | None = None):
        aux = list(aux or [])
        cfg = self.cfg
        _, h, w = img.shape
        if cfg.resize_long is not None:
            lo, hi = cfg.resize_long
            long_side = int(torch.randint(lo, hi + 1, (1,)).item())
            s = long_side / max(h, w)
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            img = TF.resize(img, [nh, nw], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
            aux = [_resize_aux(a, nh, nw) for a in aux]
        if cfg.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
            aux = [a.flip(-1) for a in aux]
        for t in self.photometric:
            img = t(img)
        if self.cutout:
            img = _cutout(img, 16)
        x = normalize(img)
        x, aux = random_crop(x, aux, cfg.crop)
        return x, aux


def _resize_aux(a: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if a.dtype == torch.uint8 or a.dtype == torch.long:
        return F.interpolate(a[None, None].float(), size=(h, w), mode="nearest")[0, 0].to(a.dtype)
    return F.interpolate(a[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]


def _cutout(img: torch.Tensor, size: int) -> torch.Tensor:
    _, h, w = img.shape
    cy, cx = int(torch.randint(0, h, (1,))), int(torch.randint(0, w, (1,)))
    img = img.clone()
    img[:, max(0, cy - size // 2): cy + size // 2, max(0, cx - size // 2): cx + size // 2] = 0
    return img


def random_crop(x: torch.Tensor, aux: list[torch.Tensor], size: int):
    """Random ``size``×``size`` crop; smaller inputs are placed at a random offset on a padded canvas.

    Args:
        x: float (3, H, W) normalised image (pad 0 = the mean colour).
        aux: label maps (H, W) padded with 255 and float maps (C, H, W) padded with 0.
    """
    _, h, w = x.shape
    ch, cw = max(size, h), max(size, w)
    oy = int(torch.randint(0, ch - h + 1, (1,)))
    ox = int(torch.randint(0, cw - w + 1, (1,)))
    if (ch, cw) != (h, w):
        canvas = x.new_zeros(3, ch, cw)
        canvas[:, oy:oy + h, ox:ox + w] = x
        x = canvas
        new_aux = []
        for a in aux:
            if a.ndim == 2:
                c = a.new_full((ch, cw), 255)
                c[oy:oy + h, ox:ox + w] = a
            else:
                c = a.new_zeros(a.shape[0], ch, cw)
                c[:, oy:oy + h, ox:ox + w] = a
            new_aux.append(c)
        aux = new_aux
    y0 = int(torch.randint(0, ch - size + 1, (1,)))
    x0 = int(torch.randint(0, cw - size + 1, (1,)))
    x = x[:, y0:y0 + size, x0:x0 + size]
    aux = [a[..., y0:y0 + size, x0:x0 + size] for a in aux]
    return x, aux


def resize_image(img_u8: torch.Tensor, scale: float) -> torch.Tensor:
    """Rescale a uint8 (3, H, W) image by ``scale`` (bicubic) for test-time augmentation."""
    _, h, w = img_u8.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return img_u8
    return TF.resize(img_u8, [nh, nw], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
