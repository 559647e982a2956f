"""Stage: pretrain a backbone on the generic corpus, the demo's stand-in for ImageNet weights.

The paper starts its networks from ImageNet features, which the demo cannot download. This stage
trains ``create_classifier(backbone, K, output_stride)`` on the in-memory multi-label corpus of
:mod:`pnoc.data.generic` (K = 22 shape, texture and hue categories, none of them a benchmark class)
with the multi-label soft margin loss, SGD with poly decay and horizontal flips, resumable every
epoch like the other training stages. It writes:

* ``--out backbone.pth``: the plain state dict of ``Backbone.net`` (tensors only, torchvision key
  format), which ``create_backbone(name, output_stride, weights=<path>)`` loads, so a stage whose
  config section says ``weights: generic`` starts from it (``workflow/rules/common.smk``);
* ``--metrics metrics.json``: the val precision / recall / F1 of the generic task (overall and per
  category group), the per-epoch history, images/s and wall time (``metrics.csv`` beside it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pnoc import cli
from pnoc.cam.classification import multilabel_step, train_multilabel_epoch
from pnoc.cam.losses import f1_scores
from pnoc.data.generic import CATEGORIES, GenericConfig, GenericSet
from pnoc.models.classifier import create_classifier
from pnoc.training import (EpochRunner, Runtime, Solver, make_scaler, param_groups, poly_scheduler, resume_key,
                           start_training)

log = logging.getLogger("pnoc.cam.pretrain_backbone")

# label-vector slices of the three category groups (scored separately: hue is far easier than shape)
GROUPS = {g: [i for i, c in enumerate(CATEGORIES) if c.startswith(f"{g}:")] for g in ("shape", "texture", "hue")}


@dataclass
class Config(Solver, Runtime):
    """Pretrain a backbone on the generic shape / texture / hue corpus (weights: generic)."""

    out: Path
    metrics: Path
    state_dir: Path
    backbone: str = "resnet18_w16"
    output_stride: int = 8
    n_train: int = 4000
    n_val: int = 500
    image_size: int = 112
    head_lr_mult: float = 1.0

    def corpus(self) -> GenericConfig:
        """The corpus these settings train on (``seed`` seeds the corpus and the training alike)."""
        return GenericConfig(seed=self.seed, n_train=self.n_train, n_val=self.n_val, image_size=self.image_size)


def _check(cfg: Config) -> None:
    """Refuse geometry that would cut labelled objects out of the training crop."""
    if cfg.crop < cfg.image_size:
        raise ValueError(f"crop={cfg.crop} < image_size={cfg.image_size}: a crop can cut out a labelled object "
                         "(set crop to image_size)")
    if cfg.resize_min > 0 and cfg.resize_max > cfg.crop:
        raise ValueError(f"resize_max={cfg.resize_max} > crop={cfg.crop}: the crop can cut out a labelled object")


@torch.no_grad()
def generic_scores(model: torch.nn.Module, val: GenericSet, device: torch.device, batch_size: int = 64,
                   num_workers: int = 0) -> dict[str, float]:
    """Micro precision/recall/F1 at 0.5 on a corpus split, overall and per category group.

    Args:
        model: a classifier with K = ``len(CATEGORIES)`` outputs; returns (logits (B, K), cams).
        val: the split, without augmentation (full images).

    Returns:
        {"precision", "recall", "f1", "f1_shape", "f1_texture", "f1_hue"}.
    """
    model.eval()
    loader = torch.utils.data.DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    probs, ys = [], []
    for x, y, _ in loader:
        logits, _ = model(x.to(device))
        probs.append(torch.sigmoid(logits.float()).cpu())
        ys.append(y)
    p, y = torch.cat(probs), torch.cat(ys)
    out = f1_scores(p, y)
    for name, cols in GROUPS.items():
        out[f"f1_{name}"] = f1_scores(p[:, cols], y[:, cols])["f1"]
    return out


def backbone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights artifact: ``Backbone.net``'s state dict, unprefixed (``conv1.weight``, ``layer1.0.bn1.running_mean``,
    ...), as detached CPU tensors, so ``torch.load(weights_only=True)`` and ``load_backbone_weights`` read it."""
    return {k: v.detach().cpu().clone() for k, v in model.backbone.net.state_dict().items()}


def run(cfg: Config) -> dict:
    t_start = time.perf_counter()
    _check(cfg)
    dist = start_training(cfg)
    device = dist.device
    corpus = cfg.corpus()
    # without workers the main process renders: cache the images so only the first epoch pays for it
    train_set = GenericSet(corpus, "train", cfg.augmenter("none"), cache=cfg.num_workers == 0)
    val_set = GenericSet(corpus, "val", None, cache=cfg.num_workers == 0)
    torch.manual_seed(cfg.seed)
    model = create_classifier(cfg.backbone, len(CATEGORIES), cfg.output_stride, "none").to(device)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    opt = cfg.make_optimizer(param_groups(model.backbone_parameters(), model.new_parameters(), cfg.lr,
                                          cfg.weight_decay, new_lr_mult=cfg.head_lr_mult))
    sched = poly_scheduler(opt, steps_per_epoch * cfg.epochs)
    scaler = make_scaler(device, cfg.amp)
    runner = EpochRunner(cfg.state_dir, resume_key(cfg), cfg.epochs, cfg.seed,
                         dist=dist, model=model, opt=opt, sched=sched, scaler=scaler)
    net = runner.wrap(model, cfg.sync_bn)
    runner.guard_memory(lambda b: multilabel_step(net, b[0], b[1], opt, sched, scaler, device, cfg.amp),
                        "pretrain", "pretrain_backbone", lower="pretrain.crop (with pretrain.image_size)")
    log.info("pretraining %s (output stride %d) on the generic corpus: %d train / %d val images of %d px, "
             "%d categories, %d steps/epoch, %d epochs, device %s", cfg.backbone, cfg.output_stride,
             len(train_set), len(val_set), cfg.image_size, len(CATEGORIES), steps_per_epoch, cfg.epochs, device)
    t_train, n_seen, val = 0.0, 0, None
    for epoch in runner:
        loader = runner.loader(train_set, cfg.batch_size, cfg.num_workers)
        st = train_multilabel_epoch(net, loader, opt, sched, scaler, device, cfg.amp,
                                    desc=f"epoch {epoch + 1}/{cfg.epochs}")
        t_train += st.seconds
        n_seen += st.images
        val = runner.evaluate(generic_scores, model, val_set, device, num_workers=cfg.num_workers)
        runner.log(epoch, {"loss": st.loss, "train_f1": st.train_f1, **{f"val_{k}": v for k, v in val.items()},
                           "lr": opt.param_groups[0]["lr"], "images_per_s": st.images_per_s},
                   shared=[f"val_{k}" for k in val])
    runner.save_weights(cfg.out, backbone_state(model))
    # scores of the weights written: the last epoch's, or fresh ones after a resume with no epoch left
    final = val if val is not None else runner.evaluate(generic_scores, model, val_set, device,
                                                        num_workers=cfg.num_workers)
    hist = runner.history
    metrics = {
        "stage": "pretrain_backbone",
        "backbone": cfg.backbone, "output_stride": cfg.output_stride,
        "corpus": dataclasses.asdict(corpus), "categories": list(CATEGORIES),
        "val": final,
        "epochs": hist, "final": hist[-1] if hist else {},
        "resumed_from_epoch": runner.start_epoch,
        "train_images_per_s": (n_seen / t_train) if t_train else None,
        "wall_s": time.perf_counter() - t_start,  # of this process: a resumed run counts its own epochs only
    }
    runner.write_metrics(cfg.metrics, metrics)
    log.info("wrote %s: val F1 %.3f (precision %.3f, recall %.3f; shape %.3f, texture %.3f, hue %.3f)",
             cfg.out, final["f1"], final["precision"], final["recall"], final["f1_shape"], final["f1_texture"],
             final["f1_hue"])
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
