"""The multi-label classification epoch shared by rule train_classifier and rule pretrain_backbone."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pnoc.cam.losses import f1_scores, multilabel_soft_margin
from pnoc.training import autocast, optimizer_step


@dataclass
class EpochStats:
    """What one training epoch measured."""

    loss: float          # mean loss per image
    images: int          # images seen
    train_f1: float      # micro F1 at 0.5 of the training predictions
    seconds: float       # wall time of the epoch's steps

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def multilabel_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, sched,
                    scaler, device: torch.device, amp: bool, label_smoothing: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One multi-label soft margin step on a batch: to the device, forward (AMP on CUDA), loss, optimizer and
    scheduler step. Returns ``(loss, logits, labels on the device)``."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    with autocast(device, amp):
        logits, _ = model(x)
    loss = multilabel_soft_margin(logits, y, label_smoothing)
    optimizer_step(loss, opt, scaler, sched)
    return loss, logits, y


def train_multilabel_epoch(model: torch.nn.Module, loader, opt: torch.optim.Optimizer, sched, scaler,
                           device: torch.device, amp: bool, label_smoothing: float = 0.0,
                           desc: str = "") -> EpochStats:
    """One epoch of multi-label soft margin training (AMP on CUDA, one scheduler step per batch).

    Args:
        model: returns (logits (B, C), cams) for images (B, 3, H, W).
        loader: yields (images (B, 3, H, W), labels (B, C), ids).
        label_smoothing: alpha of the smoothed targets.
    """
    model.train()
    tot, n, probs, ys = 0.0, 0, [], []
    t0 = time.perf_counter()
    for x, y, _ in tqdm(loader, desc=desc, mininterval=10, leave=False):
        loss, logits, y = multilabel_step(model, x, y, opt, sched, scaler, device, amp, label_smoothing)
        tot += loss.item() * x.shape[0]
        n += x.shape[0]
        probs.append(torch.sigmoid(logits.detach().float()).cpu())
        ys.append(y.cpu())
    seconds = time.perf_counter() - t0
    train_f1 = f1_scores(torch.cat(probs), torch.cat(ys))["f1"] if probs else 0.0
    return EpochStats(loss=tot / max(1, n), images=n, train_f1=train_f1, seconds=seconds)
