"""Stage: train AffinityNet (IRN's inter-pixel boundary network) on affinity labels (spec §9).

The backbone is frozen; only the five side branches and the fusion conv learn. Each step:
image + affinity-label PNG go through the same random resize / flip / crop (pad 255), the
labels are resized (nearest, pixel centres) to the network's stride-4 grid, the pairs of
radius ``radius`` (10) get bg-positive / fg-positive / negative labels
(:func:`pnoc.affinity.labels.pair_labels`), and the IRN affinity loss is applied to
``1 − max boundary along the path``.

The backbone comes from a trained network artifact (``init: classifier`` — the ordinary
classifier, the synthetic stand-in for ImageNet weights —, or ``init: cam`` — the prior's
CAM network) or from ``backbone`` + ``weights`` (``init: backbone``, the paper's setting with
ImageNet weights). Plain SGD with poly decay (reference: lr 0.1, momentum 0, wd 1e-4),
bf16 AMP on CUDA, resumable every epoch through :class:`pnoc.training.EpochRunner`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pnoc import cli
from pnoc.affinity.labels import affinity_from_boundary, affinity_loss, pair_labels, path_index
from pnoc.data.datasets import DataSource
from pnoc.data.loaders import PairedSet, mask_loader
from pnoc.io import DataError
from pnoc.models.affinitynet import AffinityNet
from pnoc.models.backbones import create_backbone
from pnoc.models.classifier import classifier_backbone_state, load_backbone_state
from pnoc.training import (EpochRunner, Runtime, Solver, autocast, make_scaler, optimizer_step, poly_scheduler,
                           resume_key, start_training)

log = logging.getLogger("pnoc.affinity.train_affinity")

INITS = ("classifier", "cam", "backbone")


@dataclass
class Config(Solver, Runtime, DataSource):
    """Train AffinityNet on affinity labels."""

    labels: Path
    out: Path
    metrics: Path
    state_dir: Path
    split: str = "train"
    init: str = "classifier"
    source_model: Path | None = None
    backbone: str = "resnet18_w24"
    weights: str = "none"
    output_stride: int = 16
    branch_channels: int = 32
    radius: float = 10


def build_model(init: str, source_model: Path | None, backbone: str, weights: str, output_stride: int,
                branch_channels: int) -> tuple[AffinityNet, dict]:
    """AffinityNet over a backbone initialised as ``init`` says; returns ``(model, arch)``."""
    if init in ("classifier", "cam"):
        if source_model is None:
            raise DataError(f"init={init} needs --source-model (results/{init}/.../model.pt)")
        arch, sd = classifier_backbone_state(source_model)
        name = arch["backbone"]
        bb = create_backbone(name, output_stride, "none")
        load_backbone_state(bb, sd, source_model)
    elif init == "backbone":
        name = backbone
        bb = create_backbone(name, output_stride, weights)
    else:
        raise ValueError(f"init {init!r}: use one of {INITS}")
    model = AffinityNet(bb, branch_channels)
    return model, {"backbone": name, "output_stride": output_stride, "branch_channels": branch_channels}


def labels_to_grid(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of (B, H, W) label maps to the stride-4 grid, sampling pixel centres."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    out = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[:, 0]
    return out.round().long()


def run(cfg: Config) -> dict:
    dist = start_training(cfg)
    device = dist.device
    ds = cfg.open_dataset(cfg.split)
    labels_dir = Path(cfg.labels)
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir}: affinity-label folder not found; run rule make_affinity_labels")
    aug = cfg.augmenter()
    train_set = PairedSet(ds, aug, mask_loader(labels_dir, ds))
    # every label PNG must exist before the first epoch, not be discovered missing mid-training
    for image_id in ds.ids:
        if not (labels_dir / f"{image_id}.png").is_file():
            raise DataError(f"{labels_dir / (image_id + '.png')}: affinity label missing for image {image_id}; "
                            "rerun rule make_affinity_labels")
    torch.manual_seed(cfg.seed)
    model, arch = build_model(cfg.init, cfg.source_model, cfg.backbone, cfg.weights, cfg.output_stride,
                              cfg.branch_channels)
    model = model.to(device)
    pi = path_index(cfg.radius)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = cfg.make_optimizer([{"params": model.trainable_parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay}])
    sched = poly_scheduler(opt, total)
    scaler = make_scaler(device, cfg.amp)
    conf = resume_key(cfg)
    # only the trainable head is checkpointed per epoch (the backbone is frozen and rebuilt)
    head = torch.nn.ModuleDict({"branches": model.branches, "fuse": model.fuse})
    runner = EpochRunner(cfg.state_dir, conf, cfg.epochs, cfg.seed,
                         inputs=(cfg.labels, cfg.source_model, *ds.identity_files()),
                         dist=dist, head=head, opt=opt, sched=sched, scaler=scaler)
    net = runner.wrap(model, cfg.sync_bn)

    def step(batch):
        x = batch[0].to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            logits = net(x)
        boundary = torch.sigmoid(logits.float())
        grid = labels_to_grid(batch[1].to(device), tuple(boundary.shape[-2:]))
        bg_pos, fg_pos, neg = pair_labels(grid, pi, ds.n_classes)
        aff = affinity_from_boundary(boundary, pi)
        loss, parts = affinity_loss(aff, bg_pos, fg_pos, neg)
        optimizer_step(loss, opt, scaler, sched)
        return loss, parts, (bg_pos, fg_pos, neg)

    runner.guard_memory(step, "affinity.train", "train_affinity")
    log.info("AffinityNet (%s, OS%d, init %s) on %s/%s with labels %s: %d images, %d steps/epoch, %d epochs, "
             "radius %g (%d directions), device %s", arch["backbone"], cfg.output_stride, cfg.init, cfg.dataset,
             cfg.split, labels_dir, len(train_set), steps_per_epoch, cfg.epochs, cfg.radius, pi.n_directions, device)
    t_train, n_seen = 0.0, 0
    for epoch in runner:
        model.train()
        loader = runner.loader(train_set, cfg.batch_size, cfg.num_workers)
        sums = {"loss": 0.0, "bg_pos": 0.0, "fg_pos": 0.0, "neg": 0.0}
        pairs = {"bg_pos": 0, "fg_pos": 0, "neg": 0}
        n_steps, n = 0, 0
        t0 = time.perf_counter()
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", mininterval=10, leave=False):
            loss, parts, (bg_pos, fg_pos, neg) = step(batch)
            sums["loss"] += loss.item()
            for k in parts:
                sums[k] += float(parts[k])
            for k, m in (("bg_pos", bg_pos), ("fg_pos", fg_pos), ("neg", neg)):
                pairs[k] += int(m.sum())
            n_steps += 1
            n += batch[0].shape[0]
        dt = time.perf_counter() - t0
        t_train += dt
        n_seen += n
        row = {k: v / max(1, n_steps) for k, v in sums.items()}
        row.update({f"pairs_{k}_per_image": v / max(1, n) for k, v in pairs.items()})
        row.update({"lr": opt.param_groups[0]["lr"], "images_per_s": n / max(dt, 1e-9)})
        runner.log(epoch, row)
    runner.save_weights(cfg.out, {"arch": arch, "model": model.state_dict(), "classes": ds.classes,
                                  "init": cfg.init, "source_model": str(cfg.source_model) if cfg.source_model else None})
    hist = runner.history
    metrics = {"stage": "train_affinity", "labels": str(labels_dir), "init": cfg.init, "arch": arch,
               "epochs": hist, "final": hist[-1] if hist else {}, "resumed_from_epoch": runner.start_epoch,
               "train_images_per_s": (n_seen / t_train) if t_train else None}
    runner.write_metrics(cfg.metrics, metrics)
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
