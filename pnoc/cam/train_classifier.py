"""Stage: train the ordinary (vanilla) multi-label classifier — the future oc and initial noc.

Multi-label soft margin loss on (optionally smoothed) image labels, SGD with poly decay
and the four parameter groups, RandAugment, bf16 AMP on CUDA, resumable every epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pnoc import cli
from pnoc.cam.classification import multilabel_step, train_multilabel_epoch
from pnoc.cam.losses import f1_scores
from pnoc.data.datasets import DataSource
from pnoc.data.loaders import ClassificationSet
from pnoc.models.classifier import create_classifier
from pnoc.training import (EpochRunner, Runtime, Solver, make_scaler, param_groups, poly_scheduler, resume_key,
                           start_training)

log = logging.getLogger("pnoc.cam.train_classifier")


@dataclass
class Config(Solver, Runtime, DataSource):
    """Train the ordinary classifier."""

    out: Path
    metrics: Path
    state_dir: Path
    split: str = "train"
    val_split: str = "val"
    backbone: str = "resnet18_w16"
    output_stride: int = 8
    weights: str = "none"
    head_lr_mult: float = 10.0
    label_smoothing: float = 0.0
    augment: str = "randaugment"


@torch.no_grad()
def classification_scores(model, ds, device, batch_size: int = 32, image_size: int | None = None) -> dict:
    """Precision/recall/F1 of ``model`` on a split (images resized to a square of ``image_size``)."""
    import torch.nn.functional as F

    from pnoc.data.transforms import normalize, to_tensor_image

    model.eval()
    probs, ys = [], []
    for i in range(0, len(ds), batch_size):
        xs = []
        for image_id in ds.ids[i:i + batch_size]:
            x = normalize(to_tensor_image(ds.read_image(image_id)))
            if image_size is not None:
                x = F.interpolate(x[None], size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
            xs.append(x)
            ys.append(torch.from_numpy(ds.labels(image_id)))
        logits, _ = model(torch.stack(xs).to(device))
        probs.append(torch.sigmoid(logits.float()).cpu())
    return f1_scores(torch.cat(probs), torch.stack(ys))


def run(cfg: Config) -> dict:
    dist = start_training(cfg)
    device = dist.device
    ds = cfg.open_dataset(cfg.split)
    val = cfg.open_dataset(cfg.val_split)
    train_set = ClassificationSet(ds, cfg.augmenter(cfg.augment))
    val.validate(need_labels=True)
    torch.manual_seed(cfg.seed)
    model = create_classifier(cfg.backbone, ds.n_classes, cfg.output_stride, cfg.weights).to(device)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = cfg.make_optimizer(param_groups(model.backbone_parameters(), model.new_parameters(), cfg.lr,
                                          cfg.weight_decay, new_lr_mult=cfg.head_lr_mult))
    sched = poly_scheduler(opt, total)
    scaler = make_scaler(device, cfg.amp)
    conf = resume_key(cfg)
    runner = EpochRunner(cfg.state_dir, conf, cfg.epochs, cfg.seed, inputs=(*ds.identity_files(),), dist=dist,
                         model=model, opt=opt, sched=sched, scaler=scaler)
    net = runner.wrap(model, cfg.sync_bn)
    runner.guard_memory(lambda b: multilabel_step(net, b[0], b[1], opt, sched, scaler, device, cfg.amp,
                                                  cfg.label_smoothing), "classifier", "train_classifier")
    log.info("training %s on %s/%s: %d images, %d steps/epoch, %d epochs, device %s",
             cfg.backbone, cfg.dataset, cfg.split, len(train_set), steps_per_epoch, cfg.epochs, device)
    t_train, n_seen = 0.0, 0
    for epoch in runner:
        loader = runner.loader(train_set, cfg.batch_size, cfg.num_workers)
        st = train_multilabel_epoch(net, loader, opt, sched, scaler, device, cfg.amp, cfg.label_smoothing,
                                    desc=f"epoch {epoch + 1}/{cfg.epochs}")
        t_train += st.seconds
        n_seen += st.images
        val_scores = runner.evaluate(classification_scores, model, val, device, image_size=cfg.crop)
        runner.log(epoch, {"loss": st.loss, "train_f1": st.train_f1, "val_f1": val_scores["f1"],
                           "val_precision": val_scores["precision"], "val_recall": val_scores["recall"],
                           "lr": opt.param_groups[0]["lr"], "images_per_s": st.images_per_s},
                   shared=("val_f1", "val_precision", "val_recall"))
    arch = {"backbone": cfg.backbone, "n_classes": ds.n_classes, "output_stride": cfg.output_stride}
    runner.save_weights(cfg.out, {"arch": arch, "model": model.state_dict(), "classes": ds.classes})
    hist = runner.history
    metrics = {"stage": "train_classifier", "epochs": hist, "final": hist[-1] if hist else {},
               "resumed_from_epoch": runner.start_epoch,
               "train_images_per_s": (n_seen / t_train * dist.world) if t_train else None}
    runner.write_metrics(cfg.metrics, metrics)
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
