"""Stage: train a DeepLab segmentation network on pseudo masks (or on ground truth).

DeepLabV3+ (or DeepLabV2 via ``arch``) from :func:`pnoc.models.deeplab.create_segmenter`,
trained on the index PNGs of ``--masks-dir`` (``gt`` = the dataset's ground truth, the
fully supervised upper bound). Cross-entropy with ``ignore_index`` 255 and optional label
smoothing, SGD with momentum 0.9 and Nesterov, poly decay, ×10 LR on the layers trained
from scratch (×2 on biases), bf16 AMP on CUDA, resumable every epoch (:class:`EpochRunner`).

Model selection: the **last epoch** is kept. The reference saves the epoch with the best
mIoU on val *pseudo* masks (derived with val image labels) — a selection on the evaluated
split; here no mask of the evaluated split is ever read during training. What is logged
per epoch is the training loss and, with ``agreement_images > 0``, the agreement (pixel
accuracy, mIoU) of the model with the *training* masks it learns from, on the first
``agreement_images`` training images at full size.

Backbone initialisation: ``--classifier`` (a ``train_classifier`` artifact; on the
synthetic benchmark it stands in for ImageNet weights) copies that network's backbone;
otherwise ``--weights`` (``none`` | ``imagenet`` | a ``.pth`` file) is used.
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
from pnoc.data.loaders import PairedSet, mask_loader
from pnoc.data.transforms import normalize, to_tensor_image
from pnoc.evaluation import confusion, scores
from pnoc.io import DataError
from pnoc.models.deeplab import ARCHS, build_segmenter
from pnoc.training import (OPTIMIZERS, EpochRunner, Runtime, Solver, autocast, load_weights, make_scaler,
                           optimizer_step, param_groups, poly_scheduler, resume_key, start_training)

log = logging.getLogger("pnoc.segmentation.train_segmentation")



MODEL_SELECTION = ("last epoch; no mask of the evaluated split is read during training "
                   "(the reference selects on val pseudo masks)")


@dataclass
class Config(Solver, Runtime, DataSource):
    """Train a DeepLab segmentation network on pseudo masks."""

    masks_dir: str
    out: Path
    metrics: Path
    state_dir: Path
    split: str = "train"
    variant: str = "deeplabv3plus"
    arch: str = "deeplabv3plus"
    backbone: str = "resnet18_w24"
    output_stride: int = 8
    weights: str = "none"
    classifier: str = "none"
    aspp_channels: int = 64
    aspp_rates: list[int] = field(default_factory=list)
    decoder_low_channels: int = 16
    decoder_channels: int = 64
    norm: str = "gn"
    dropout: float = 0.5
    head_lr_mult: float = 10.0
    label_smoothing: float = 0.1
    augment: str = "colorjitter"
    agreement_images: int = 100


def arch_spec(cfg: Config, n_classes: int) -> dict:
    """What :func:`pnoc.models.deeplab.segmenter_from_artifact` needs to rebuild the network."""
    widths = {}
    if cfg.arch == "deeplabv3plus":
        widths = {"aspp_channels": cfg.aspp_channels,
                  # empty: the reference rates (6, 12, 18) scaled to the output stride
                  "aspp_rates": tuple(cfg.aspp_rates) if cfg.aspp_rates else None,
                  "decoder_low_channels": cfg.decoder_low_channels,
                  "decoder_channels": cfg.decoder_channels, "norm": cfg.norm, "dropout": cfg.dropout}
    return {"arch": cfg.arch, "backbone": cfg.backbone, "n_classes": n_classes,
            "output_stride": cfg.output_stride, "widths": widths}


def init_from_classifier(model, path: str | Path, backbone: str) -> None:
    """Copy the backbone of a ``train_classifier`` artifact into ``model.backbone``."""
    state = load_weights(path)
    arch = state.get("arch", {})
    if arch.get("backbone") != backbone:
        raise DataError(
            f"{path}: the classifier's backbone is {arch.get('backbone')!r} but segmentation.backbone is "
            f"{backbone!r}; set them equal or use segmentation.init: weights")
    prefix = "backbone."
    sd = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    missing, unexpected = model.backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DataError(f"{path}: backbone keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")


@torch.no_grad()
def agreement(model, ds, masks_dir: str | None, device, n_images: int, amp: bool) -> dict:
    """Pixel accuracy and mIoU of full-size single-scale predictions vs the training masks."""
    load = mask_loader(masks_dir, ds)
    n = ds.n_classes + 1
    conf = np.zeros((n, n), np.int64)
    model.eval()
    for image_id in ds.ids[:n_images]:
        img = ds.read_image(image_id)
        target = load(image_id, img.shape[:2])[0]
        x = normalize(to_tensor_image(img))[None].to(device)
        with autocast(device, amp):
            logits = model(x)
        pred = logits[0].float().argmax(0).cpu().numpy()
        conf += confusion(np.minimum(pred, n - 1), np.where(target < n, target, 255), n)
    s = scores(conf)
    return {"agreement_pixel_accuracy": s["pixel_accuracy"], "agreement_miou": s["miou"]}


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the labelled pixels: logits (B, C, H, W), target (B, H, W) with 255 = ignore.

    The sum divided by the number of valid pixels (at least 1), so a crop that is all padding gives 0, not NaN.
    """
    valid = (target != 255).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), target, ignore_index=255, reduction="sum",
                           label_smoothing=label_smoothing) / valid


def run(cfg: Config) -> dict:
    if cfg.arch not in ARCHS:
        raise DataError(f"arch={cfg.arch!r}: use one of {list(ARCHS)}")
    if cfg.optimizer not in OPTIMIZERS:
        raise DataError(f"optimizer={cfg.optimizer!r}: use one of {OPTIMIZERS}")
    dist = start_training(cfg)
    device = dist.device
    ds = cfg.open_dataset(cfg.split)
    masks_dir = None if str(cfg.masks_dir).lower() == "gt" else str(cfg.masks_dir)
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise DataError(f"{masks_dir}: mask folder not found; run the rule that writes the pseudo masks first")
    augmenter = cfg.augmenter(cfg.augment)
    train_set = PairedSet(ds, augmenter, mask_loader(masks_dir, ds), need_labels=False)
    # a missing mask should stop the job now, not in the middle of epoch 3
    for image_id in ds.ids:
        p = ds.mask_path(image_id) if masks_dir is None else Path(masks_dir) / f"{image_id}.png"
        if not p.is_file():
            raise DataError(f"{p}: training mask missing for image {image_id}")
    torch.manual_seed(cfg.seed)
    spec = arch_spec(cfg, ds.n_classes + 1)
    use_classifier = str(cfg.classifier).lower() not in ("", "none")
    model = build_segmenter(spec, "none" if use_classifier else cfg.weights)
    if use_classifier:
        init_from_classifier(model, cfg.classifier, cfg.backbone)
    model = model.to(device)
    named = list(model.named_parameters())
    groups = param_groups([(k, p) for k, p in named if k.startswith("backbone.")],
                          [(k, p) for k, p in named if not k.startswith("backbone.")],
                          cfg.lr, cfg.weight_decay, new_lr_mult=cfg.head_lr_mult)
    opt = cfg.make_optimizer(groups)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    sched = poly_scheduler(opt, steps_per_epoch * cfg.epochs)
    scaler = make_scaler(device, cfg.amp)
    conf = resume_key(cfg)
    runner = EpochRunner(cfg.state_dir, conf, cfg.epochs, cfg.seed,
                         inputs=(masks_dir, cfg.classifier, *ds.identity_files()),
                         dist=dist, model=model, opt=opt, sched=sched, scaler=scaler)
    net = runner.wrap(model, cfg.sync_bn)

    def step(batch) -> torch.Tensor:
        x, target = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            logits = net(x)
        loss = segmentation_loss(logits, target, cfg.label_smoothing)
        optimizer_step(loss, opt, scaler, sched)
        return loss

    runner.guard_memory(step, "segmentation", "train_segmentation")
    log.info("training %s/%s on %s/%s with masks %s: %d images, %d steps/epoch, %d epochs, device %s",
             cfg.arch, cfg.backbone, cfg.dataset, cfg.split, cfg.masks_dir, len(train_set), steps_per_epoch,
             cfg.epochs, device)
    t_train, n_seen = 0.0, 0
    for epoch in runner:
        model.train()
        loader = runner.loader(train_set, cfg.batch_size, cfg.num_workers)
        tot, n = 0.0, 0
        t0 = time.perf_counter()
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", mininterval=10, leave=False):
            loss = step(batch)
            tot += loss.item() * batch[0].shape[0]
            n += batch[0].shape[0]
        dt = time.perf_counter() - t0
        t_train += dt
        n_seen += n
        row = {"loss": tot / max(1, n), "lr": opt.param_groups[0]["lr"], "images_per_s": n / max(dt, 1e-9)}
        shared = ()
        if cfg.agreement_images > 0:
            agree = runner.evaluate(agreement, model, ds, masks_dir, device, cfg.agreement_images, cfg.amp)
            row.update(agree)
            shared = tuple(agree)
        runner.log(epoch, row, shared=shared)
    runner.save_weights(cfg.out, {"arch": spec, "model": model.state_dict(), "classes": ds.classes,
                                  "masks_dir": str(cfg.masks_dir), "variant": cfg.variant})
    hist = runner.history
    metrics = {"stage": "train_segmentation", "variant": cfg.variant, "arch": cfg.arch, "backbone": cfg.backbone,
               "split": cfg.split, "masks": str(cfg.masks_dir), "init": cfg.classifier if use_classifier else cfg.weights,
               "model_selection": MODEL_SELECTION, "epochs": hist, "final": hist[-1] if hist else {},
               "resumed_from_epoch": runner.start_epoch,
               "train_images_per_s": (n_seen / t_train) if t_train else None}
    runner.write_metrics(cfg.metrics, metrics)
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
