"""Loss pieces of the CAM-network strategies: Puzzle-CAM, OC-CSE, P-OC and P-NOC (paper Eq. 3–10).

Notation: f = CAM generator, oc = ordinary classifier (frozen), noc = not-so-ordinary
classifier (trained adversarially), A = raw CAMs (B, C, h, w), ψ(A) = ReLU(A) / max ReLU(A).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pnoc.cam.losses import multilabel_soft_margin

STRATEGIES = ("cam", "puzzle", "occse", "poc", "pnoc")


def uses_puzzle(strategy: str) -> bool:
    return strategy in ("puzzle", "poc", "pnoc")


def uses_cse(strategy: str) -> bool:
    return strategy in ("occse", "poc", "pnoc")


def tile(x: torch.Tensor) -> torch.Tensor:
    """Split images into 2×2 quadrants stacked on the batch axis.

    Args:
        x: (B, C, H, W) with even H and W.

    Returns:
        (4B, C, H/2, W/2) ordered [top-left (B), top-right (B), bottom-left (B), bottom-right (B)].
    """
    _, _, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"puzzle tiling needs even sizes, got {h}x{w}; use an even crop")
    hh, hw = h // 2, w // 2
    return torch.cat([x[..., :hh, :hw], x[..., :hh, hw:], x[..., hh:, :hw], x[..., hh:, hw:]], 0)


def merge(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tile`: (4B, C, h, w) -> (B, C, 2h, 2w)."""
    tl, tr, bl, br = t.chunk(4, 0)
    return torch.cat([torch.cat([tl, tr], -1), torch.cat([bl, br], -1)], -2)


def puzzle_losses(logits_full: torch.Tensor, cam: torch.Tensor, cam_re: torch.Tensor, y: torch.Tensor,
                  alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Puzzle-CAM terms (Eq. 3): re-classification of the merged tile CAMs and the reconstruction L1.

    Args:
        cam: raw CAMs of the full image (B, C, h, w).
        cam_re: merged raw CAMs of the tiles (B, C, h, w).
        y: (B, C) labels.

    Returns:
        (L_re-cls, L_re). L_re is the mean over B·C·h·w of |A − A_re|·y_c (raw, pre-ReLU,
        class-masked; masked-out entries still count in the denominator, as in the reference).
    """
    del logits_full
    if cam_re.shape[-2:] != cam.shape[-2:]:
        cam_re = F.interpolate(cam_re, size=cam.shape[-2:], mode="bilinear", align_corners=False)
    l_recls = multilabel_soft_margin(cam_re.mean((2, 3)), y, alpha)
    l_re = ((cam - cam_re).abs() * y[:, :, None, None]).mean()
    return l_recls, l_re


def sample_classes(y: torch.Tensor, generator: torch.Generator | None = None,
                   u: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one present class per image uniformly. y: (B, C) -> (B,) long.

    Args:
        u: (B, C) uniform draws to use instead of ``generator``: the class is the positive one with the
            largest draw (uniform over the positives). Multi-process training passes draws that do not
            depend on the process count (``EpochRunner.shared_rand``).
    """
    if (y.sum(1) == 0).any():
        raise ValueError("an image has no positive class; erasing needs at least one")
    positive = y > 0.5
    if u is not None:
        return torch.where(positive, u.to(y.device) + 1.0, torch.zeros_like(y)).argmax(1)
    return torch.multinomial(positive.float(), 1, generator=generator).squeeze(1)


def psi(cam_r: torch.Tensor, size: tuple[int, int], norm: str = "image", eps: float = 1e-5) -> torch.Tensor:
    """ψ: ReLU, bilinear resize to ``size``, max normalisation.

    Args:
        cam_r: (B, h, w) raw CAM of the sampled class of each image.
        norm: ``image`` (paper: each map by its own max) or ``batch`` (reference
            OC-CSE ``mask_gn``: all maps by the max over the whole batch).

    Returns:
        (B, 1, H, W) in [0, 1].
    """
    m = F.interpolate(F.relu(cam_r)[:, None], size=size, mode="bilinear", align_corners=False)
    if norm == "image":
        return m / (m.flatten(1).amax(1)[:, None, None, None] + eps)
    if norm == "batch":
        return m / (m.max() + eps)
    raise ValueError(f"mask normalisation {norm!r}: use image | batch")


def soft_erase(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x ∘ (1 − ψ) (Eq. 5); gradients flow through the mask into f."""
    return x * (1.0 - mask)


def hard_erase(x: torch.Tensor, mask: torch.Tensor, delta: float = 0.2, rule: str = "paper") -> torch.Tensor:
    """NOC input: keep only weakly activated pixels of class r (mask is detached).

    Args:
        mask: ψ(A^r) (B, 1, H, W).
        rule: ``paper`` keeps pixels where 1 − ψ > δ (ψ < 1 − δ); ``reference`` keeps
            ψ ≤ δ, which erases much more (the official code).
    """
    mask = mask.detach()
    keep = (mask < 1.0 - delta) if rule == "paper" else (mask <= delta)
    if rule not in ("paper", "reference"):
        raise ValueError(f"noc mask rule {rule!r}: use paper | reference")
    return x * keep.to(x.dtype)


def erased_targets(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """y ∖ {r}: the labels with the erased class removed. y (B, C), r (B,)."""
    out = y.clone()
    out[torch.arange(len(r)), r] = 0
    return out
