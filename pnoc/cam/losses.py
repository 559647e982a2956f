"""Classification and CAM-strategy losses (paper Eq. 1–10, reference spec §2–3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_labels(y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Binary label smoothing towards 0.5: ``(1 − α)·y + α/2``.

    Args:
        y: (B, C) 0/1 targets.
        alpha: smoothing factor (0 disables).
    """
    return y * (1.0 - alpha) + alpha / 2.0 if alpha > 0 else y


def multilabel_soft_margin(logits: torch.Tensor, y: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """``MultiLabelSoftMarginLoss`` (mean over classes of BCE-with-logits, mean over batch) on smoothed targets.

    Args:
        logits: (B, C).
        y: (B, C) 0/1 targets.
    """
    return F.multilabel_soft_margin_loss(logits.float(), smooth_labels(y.float(), alpha))


def f1_scores(probs: torch.Tensor, y: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Micro precision/recall/F1 of multi-label predictions ``probs ≥ threshold``."""
    pred = probs >= threshold
    tp = (pred & (y > 0.5)).sum().item()
    fp = (pred & (y <= 0.5)).sum().item()
    fn = (~pred & (y > 0.5)).sum().item()
    p = tp / max(1, tp + fp)
    r = tp / max(1, tp + fn)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(1e-12, p + r)}
