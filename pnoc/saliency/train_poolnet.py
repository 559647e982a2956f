"""Stage: train PoolNet on the pseudo-saliency masks of C²AM / C²AM-H (spec §7).

PoolNet (:mod:`pnoc.models.poolnet`) on a factory backbone learns to reproduce the 0/255
pseudo-saliency masks (rule infer_saliency) from the images alone — the refinement step "R."
of the paper's Table 6. Loss: BCE-with-logits against mask/255, averaged over the valid pixels
of the batch (crop padding is ignored); the reference sums over pixels and divides by its
``iter_size`` of 10 with batch 1, which only rescales the Adam step. Adam (reference: lr 5e-5,
wd 5e-4, no schedule), BN of the backbone frozen (``fixed_bn``, as the reference keeps the net
in ``eval()``), optional bf16 AMP on CUDA (the reference uses none), resumable every epoch.

The backbone starts from the ordinary classifier's backbone (``init: classifier``; synthetic
stand-in for ImageNet) or from ``weights`` (``init: backbone``; the paper uses a Caffe ResNet-50).
Training images: random long-side resize in [resize_min, resize_max] (``resize_min: 0`` keeps
the size, as the reference does), horizontal flip, crop (padding ignored in the loss).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pnoc import cli
from pnoc.data.datasets import DataSource
from pnoc.data.loaders import PairedSet
from pnoc.io import DataError, read_mask
from pnoc.models.classifier import classifier_backbone_state, load_backbone_state
from pnoc.models.poolnet import create_poolnet
from pnoc.training import (EpochRunner, Runtime, Solver, autocast, make_scaler, optimizer_step, param_groups,
                           resume_key, start_training)

log = logging.getLogger("pnoc.saliency.train_poolnet")


@dataclass
class Config(Solver, Runtime, DataSource):
    """Train PoolNet on pseudo-saliency masks."""

    masks: Path
    out: Path
    metrics: Path
    state_dir: Path
    classifier: Path | None = None
    split: str = "train"
    init: str = "classifier"
    backbone: str = "resnet18_w24"
    output_stride: int = 32
    weights: str = "none"
    width: int = 32
    fixed_bn: bool = True
    optimizer: str = field(default="adam", kw_only=True)  # the reference PoolNet solver


def read_pseudo(masks_dir: str | Path, image_id: str, hw: tuple[int, int]) -> np.ndarray:
    """A 0/255 pseudo-saliency PNG as a uint8 (H, W) 0/1 label map (so crop padding becomes 255 = ignore)."""
    path = Path(masks_dir) / f"{image_id}.png"
    if not path.is_file():
        raise DataError(f"{path}: pseudo-saliency mask missing for image {image_id}; rerun rule infer_saliency")
    m = read_mask(path, hw)
    bad = (m != 0) & (m != 255)
    if bad.any():
        raise DataError(f"{path}: pseudo-saliency masks hold only 0 and 255, found {sorted(np.unique(m[bad]))[:5]}")
    return (m > 0).astype(np.uint8)


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over pixels whose target is 0 or 1 (255 = ignore).

    Args:
        logits: (B, 1, H, W). target: (B, H, W) long in {0, 1, 255}.

    Returns:
        Scalar; 0 (attached to the graph) when no pixel is valid.
    """
    valid = target != 255
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[:, 0].float()[valid], target[valid].float())


def build_model(cfg: Config):
    if cfg.init == "classifier":
        if cfg.classifier is None:
            raise DataError("init=classifier needs --classifier results/classifier/seed<k>/model.pt")
        arch, sd = classifier_backbone_state(cfg.classifier)
        name = arch["backbone"]
        model = create_poolnet(name, cfg.output_stride, "none", cfg.width, cfg.fixed_bn)
        load_backbone_state(model.backbone, sd, cfg.classifier)
    elif cfg.init == "backbone":
        name = cfg.backbone
        model = create_poolnet(name, cfg.output_stride, cfg.weights, cfg.width, cfg.fixed_bn)
    else:
        raise ValueError(f"init {cfg.init!r}: use classifier | backbone")
    return model, {"backbone": name, "output_stride": cfg.output_stride, "width": cfg.width, "fixed_bn": cfg.fixed_bn}


def run(cfg: Config) -> dict:
    dist = start_training(cfg)
    device = dist.device
    ds = cfg.open_dataset(cfg.split)
    if not Path(cfg.masks).is_dir():
        raise DataError(f"{cfg.masks}: pseudo-saliency folder not found; run rule infer_saliency for split {cfg.split}")
    aug = cfg.augmenter()
    train_set = PairedSet(ds, aug, lambda i, hw: [read_pseudo(cfg.masks, i, hw)], need_labels=False)
    torch.manual_seed(cfg.seed)
    model, arch = build_model(cfg)
    model = model.to(device)
    groups = param_groups(model.backbone_parameters(), model.new_parameters(), cfg.lr, cfg.weight_decay,
                          new_lr_mult=1.0, bias_lr_mult=1.0)
    opt = cfg.make_optimizer(groups)
    scaler = make_scaler(device, cfg.amp)
    conf = resume_key(cfg)
    if cfg.init == "classifier":  # backbone/weights are unused then: changing them must not block a resume
        conf["backbone"] = conf["weights"] = "from classifier"
    runner = EpochRunner(cfg.state_dir, conf, cfg.epochs, cfg.seed,
                         inputs=(cfg.masks, cfg.classifier, *ds.identity_files()),
                         dist=dist, model=model, opt=opt, scaler=scaler)
    net = runner.wrap(model, cfg.sync_bn)

    def step(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            logits = net(x)
        loss = masked_bce(logits, target)
        optimizer_step(loss, opt, scaler)
        return loss, logits, target

    runner.guard_memory(step, "saliency.poolnet", "train_poolnet")
    log.info("PoolNet (%s, width %d) on %s/%s with masks %s: %d images, %d epochs, device %s", arch["backbone"],
             cfg.width, cfg.dataset, cfg.split, cfg.masks, len(train_set), cfg.epochs, device)
    t_train, n_steps = 0.0, 0
    for epoch in runner:
        model.train()
        loader = runner.loader(train_set, cfg.batch_size, cfg.num_workers)
        tot, agree, valid_px, n = 0.0, 0, 0, 0
        t0 = time.perf_counter()
        for batch in tqdm(loader, desc=f"poolnet epoch {epoch + 1}/{cfg.epochs}", mininterval=10, leave=False):
            loss, logits, target = step(batch)
            tot += loss.item()
            v = target != 255
            agree += int(((logits[:, 0].detach() > 0) == (target == 1))[v].sum())
            valid_px += int(v.sum())
            n += 1
        dt = time.perf_counter() - t0
        t_train += dt
        n_steps += n
        runner.log(epoch, {"loss": tot / max(1, n), "pixel_agreement": agree / max(1, valid_px),
                           "seconds_per_iteration": dt / max(1, n)})
    runner.save_weights(cfg.out, {"arch": arch, "model": model.state_dict(), "masks": str(cfg.masks)})
    hist = runner.history
    metrics = {"stage": "train_poolnet", "masks": str(cfg.masks), "epochs": hist, "final": hist[-1] if hist else {},
               "resumed_from_epoch": runner.start_epoch, "arch": arch,
               "seconds_per_iteration": t_train / n_steps if n_steps else None, "train_seconds": t_train}
    runner.write_metrics(cfg.metrics, metrics)
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
