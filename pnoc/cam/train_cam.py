"""Stage: train the CAM generator f with a strategy — cam, puzzle, occse, poc or pnoc (± label smoothing).

* cam     L_cls
* puzzle  L_cls + L_re-cls + λ_re·L_re                      (λ_re 0→4 over the first half)
* occse   L_cls + λ_cse·L_cse with the frozen ordinary classifier oc   (λ_cse 0.3→1)
* poc     puzzle + CSE (Eq. 8)
* pnoc    poc where the classifier of the CSE term is noc, itself trained every
          ``noc_interval`` steps on hard-masked images against the full label set with
          λ_noc 0→1 (Algorithm 1).

The reference code differs from the paper in three places; each is a named option with
the paper's behaviour as default (see workflow/schemas/config.schema.yaml):
``cse_mask_norm`` (image | batch), ``noc_mask_rule`` (paper | reference) and
``noc_cse_leak`` (false | true: noc also receives λ_cse·L_cse gradients). ``accumulate_loss``
(mean | sum) says how the losses of ``accumulate`` iterations form one step: mean divides each by
``accumulate`` (one large batch); sum is the authors' (twice the effective LR at accumulate 2), and
config/voc12.yaml and coco14.yaml set it. noc's hard mask is always normalised per sample.

f and oc/noc start from the ordinary classifier's weights (``init: classifier``; the
synthetic stand-in for ImageNet weights) or from the backbone weights
(``init: backbone``, the paper's setting on VOC/COCO).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pnoc import cli
from pnoc.cam.losses import multilabel_soft_margin
from pnoc.cam.strategies import (STRATEGIES, erased_targets, hard_erase, merge, psi, puzzle_losses, sample_classes,
                                 soft_erase, tile, uses_cse, uses_puzzle)
from pnoc.data.datasets import DataSource
from pnoc.data.loaders import ClassificationSet
from pnoc.data.transforms import normalize, to_tensor_image
from pnoc.evaluation import ThresholdSweep
from pnoc.io import DataError
from pnoc.models.classifier import classifier_from_artifact, create_classifier
from pnoc.training import (EpochRunner, Runtime, Solver, autocast, linear_ramp, load_weights, make_scaler, param_groups,
                           poly_scheduler, resume_key, start_training)

log = logging.getLogger("pnoc.cam.train_cam")

ACCUMULATE_LOSS = ("mean", "sum")


@dataclass
class Config(Solver, Runtime, DataSource):
    """Train a CAM generator with a strategy."""

    classifier: Path
    out: Path
    metrics: Path
    state_dir: Path
    strategy: str = "pnoc"
    label_smoothing: float = 0.0
    split: str = "train"
    eval_split: str = "train"
    init: str = "classifier"
    backbone: str = "resnet18_w24"
    output_stride: int = 8
    weights: str = "none"
    accumulate: int = 1
    accumulate_loss: str = "mean"
    head_lr_mult: float = 1.0
    augment: str = "colorjitter"
    re_max: float = 4.0
    re_fraction: float = 0.5
    cse_min: float = 0.3
    cse_max: float = 1.0
    cse_mask_norm: str = "image"
    noc_max: float = 1.0
    noc_delta: float = 0.2
    noc_interval: int = 1
    noc_lr_mult: float = 1.0
    noc_mask_rule: str = "paper"
    noc_cse_leak: bool = False
    epoch_eval_images: int = 200


@torch.no_grad()
def quick_prior_miou(model, ds, device, n_images: int, batch_size: int = 32) -> float:
    """Prior mIoU without TTA (single scale, no flip) on the first ``n_images`` of ``ds``: Table 2's per-epoch column."""
    import torch.nn.functional as F

    model.eval()
    ids = ds.ids[:n_images] if n_images > 0 else ds.ids
    sweep = ThresholdSweep(ds.n_classes + 1, [round(0.05 * i, 2) for i in range(1, 17)])
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        imgs = [ds.read_image(j) for j in chunk]
        if len({im.shape for im in imgs}) > 1:
            for j, im in zip(chunk, imgs):
                _update(sweep, model, ds, j, im, device, F)
            continue
        x = torch.stack([normalize(to_tensor_image(im)) for im in imgs]).to(device)
        _, cam = model(x)
        cam = F.interpolate(F.relu(cam.float()), size=imgs[0].shape[:2], mode="bilinear", align_corners=False)
        for b, j in enumerate(chunk):
            _sweep_one(sweep, ds, j, cam[b])
    model.train()
    return max(r["miou"] for r in sweep.results())


def _update(sweep, model, ds, image_id, im, device, F):
    _, cam = model(normalize(to_tensor_image(im))[None].to(device))
    cam = F.interpolate(F.relu(cam.float()), size=im.shape[:2], mode="bilinear", align_corners=False)
    _sweep_one(sweep, ds, image_id, cam[0])


def _sweep_one(sweep, ds, image_id, cam):
    cls = np.flatnonzero(ds.labels(image_id))
    m = cam[cls]
    m = (m / (m.flatten(1).amax(1)[:, None, None] + 1e-5)).cpu().numpy()
    sweep.update(m, cls + 1, ds.read_mask(image_id))


class CamTrainer:
    """One optimisation step of every strategy (separated from the epoch loop so tests can drive it)."""

    def __init__(self, cfg: Config, f, oc, noc, opt, sched, scaler, noc_opt, noc_sched, device, total_iters: int):
        self.cfg, self.f, self.oc, self.noc = cfg, f, oc, noc
        self.opt, self.sched, self.scaler = opt, sched, scaler
        self.noc_opt, self.noc_sched = noc_opt, noc_sched
        self.device, self.total = device, total_iters
        self.iteration = 0
        # what the step trains through: the models themselves, or their DDP wrappers (see wrap)
        self.f_train, self.noc_train = f, noc
        self.rand = lambda b, c: torch.rand(b, c)  # draws of the sampled classes (see wrap)
        # parameters noc may train (its frozen BN affine parameters stay frozen)
        self.noc_params = [p for p in noc.parameters() if p.requires_grad] if noc is not None else []

    def wrap(self, runner: EpochRunner, sync_bn: bool = False) -> None:
        """Train f and noc through ``runner``'s data-parallel wrappers, and draw the sampled classes from
        draws that do not depend on the process count. The adversary's CSE forward uses the bare noc:
        its parameters take no gradient there (unless ``noc_cse_leak``, whose gradients DDP then averages
        with noc's own in the noc step's backward)."""
        self.f_train = runner.wrap(self.f, sync_bn)
        if self.noc is not None:
            self.noc_train = runner.wrap(self.noc, sync_bn)
        self.rand = runner.shared_rand

    def _noc_trainable(self, on: bool) -> None:
        for p in self.noc_params:
            p.requires_grad_(on)

    def coefficients(self, it: int) -> dict[str, float]:
        c = self.cfg
        return {
            "re": linear_ramp(0.0, c.re_max, it, self.total, c.re_fraction),
            "cse": linear_ramp(c.cse_min, c.cse_max, it, self.total, 1.0),
            "noc": linear_ramp(0.0, c.noc_max, it, self.total, 1.0),
        }

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        c, dev = self.cfg, self.device
        it = self.iteration
        lam = self.coefficients(it)
        a = c.label_smoothing
        parts: dict[str, float] = {}
        adversary = self.noc if c.strategy == "pnoc" else self.oc
        if c.strategy == "pnoc" and not c.noc_cse_leak:
            # paper: the CSE term trains f only, noc receives no gradient from it
            # (the reference leaks λ_cse·L_cse gradients into noc: noc_cse_leak=true)
            self._noc_trainable(False)
        with autocast(dev, c.amp):
            logits, cam = self.f_train(x)
            loss = multilabel_soft_margin(logits, y, a)
            parts["cls"] = loss.item()
            if uses_puzzle(c.strategy):
                _, cam_t = self.f_train(tile(x))
                l_recls, l_re = puzzle_losses(logits, cam.float(), merge(cam_t).float(), y, a)
                loss = loss + l_recls + lam["re"] * l_re
                parts["re_cls"], parts["re"] = l_recls.item(), l_re.item()
            if uses_cse(c.strategy):
                r = sample_classes(y, u=self.rand(y.shape[0], y.shape[1]))
                cam_r = cam[torch.arange(len(r), device=cam.device), r].float()
                mask = psi(cam_r, x.shape[-2:], c.cse_mask_norm)
                oc_logits, _ = adversary(soft_erase(x, mask))
                l_cse = multilabel_soft_margin(oc_logits, erased_targets(y, r), a)
                loss = loss + lam["cse"] * l_cse
                parts["cse"] = l_cse.item()
        # mean: loss / accumulate (the step equals one large batch); sum (authors): the losses of the
        # accumulated iterations add up, i.e. accumulate x the effective learning rate
        share = 1.0 / c.accumulate if c.accumulate_loss == "mean" else 1.0
        self.scaler.scale(loss * share).backward()
        parts["loss"] = loss.item()
        stepping = (it + 1) % c.accumulate == 0
        if stepping:
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
        if c.strategy == "pnoc":
            self._noc_trainable(True)
            if it % c.noc_interval == 0:
                with autocast(dev, c.amp):
                    # the authors' hard_mask_images normalises each sample by its own max, whatever
                    # cse_mask_norm says (a batch-normalised mask would leave most images unerased)
                    hard_mask = psi(cam_r.detach(), x.shape[-2:], "image")
                    hard = hard_erase(x, hard_mask, c.noc_delta, c.noc_mask_rule)
                    noc_logits, _ = self.noc_train(hard)
                    l_noc = multilabel_soft_margin(noc_logits, y, a)
                (lam["noc"] * l_noc * share).backward()
                parts["noc"] = l_noc.item()
            if stepping:
                self.noc_opt.step()
                self.noc_opt.zero_grad(set_to_none=True)
                self.noc_sched.step()
        for k, v in lam.items():
            parts["lambda_" + k] = v
        self.iteration += 1
        return parts


def build(cfg: Config, n_classes: int, device: torch.device, total_iters: int):
    """Create f, oc/noc, optimizers, schedulers and scaler for a strategy."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"strategy {cfg.strategy!r}: use one of {STRATEGIES}")
    ordinary = classifier_from_artifact(load_weights(cfg.classifier))
    if cfg.init == "classifier":
        f = copy.deepcopy(ordinary)
    elif cfg.init == "backbone":
        f = create_classifier(cfg.backbone, n_classes, cfg.output_stride, cfg.weights)
    else:
        raise ValueError(f"init {cfg.init!r}: use classifier | backbone")
    f = f.to(device)
    oc = noc = noc_opt = noc_sched = None
    steps = max(1, total_iters // cfg.accumulate)
    if cfg.strategy in ("occse", "poc"):
        oc = ordinary.to(device).eval()
        oc.requires_grad_(False)
    elif cfg.strategy == "pnoc":
        noc = ordinary.to(device).fix_bn()
        noc.train()
        noc_opt = cfg.make_optimizer(param_groups(noc.backbone_parameters(), noc.new_parameters(),
                                                  cfg.lr * cfg.noc_lr_mult, cfg.weight_decay,
                                                  new_lr_mult=cfg.head_lr_mult))
        noc_sched = poly_scheduler(noc_opt, steps)
    opt = cfg.make_optimizer(param_groups(f.backbone_parameters(), f.new_parameters(), cfg.lr, cfg.weight_decay,
                                          new_lr_mult=cfg.head_lr_mult))
    sched = poly_scheduler(opt, steps)
    scaler = make_scaler(device, cfg.amp)
    return CamTrainer(cfg, f, oc, noc, opt, sched, scaler, noc_opt, noc_sched, device, total_iters)


def run(cfg: Config) -> dict:
    if cfg.accumulate_loss not in ACCUMULATE_LOSS:
        raise DataError(f"accumulate_loss={cfg.accumulate_loss!r}: use one of {ACCUMULATE_LOSS}")
    dist = start_training(cfg)
    device = dist.device
    if dist.enabled and cfg.cse_mask_norm == "batch" and uses_cse(cfg.strategy):
        raise DataError("cam.cse_mask_norm=batch divides by the maximum over the global batch, which spans the "
                        f"{dist.world} processes of resources.gpus_per_job; use cse_mask_norm: image or one process")
    if dist.enabled and cfg.noc_cse_leak and cfg.noc_interval > 1:
        raise DataError("cam.noc_cse_leak=true with noc_interval > 1 would step noc on gradients that no process "
                        "averaged; set noc_interval: 1 or resources.gpus_per_job: 1")
    ds = cfg.open_dataset(cfg.split)
    ev = cfg.open_dataset(cfg.eval_split)
    train_set = ClassificationSet(ds, cfg.augmenter(cfg.augment))
    iters_per_epoch = max(1, len(train_set) // cfg.batch_size)
    torch.manual_seed(cfg.seed)
    tr = build(cfg, ds.n_classes, device, iters_per_epoch * cfg.epochs)
    objects = {"f": tr.f, "opt": tr.opt, "sched": tr.sched, "scaler": tr.scaler}
    if tr.noc is not None:
        objects.update(noc=tr.noc, noc_opt=tr.noc_opt, noc_sched=tr.noc_sched)
    conf = resume_key(cfg)
    runner = EpochRunner(cfg.state_dir, conf, cfg.epochs, cfg.seed,
                         inputs=(cfg.classifier, *ds.identity_files()), dist=dist, **objects)
    tr.wrap(runner, cfg.sync_bn)

    def first_update(batch) -> None:
        # the iterations of one optimizer step from iteration 0: noc's step comes at iteration 0, f's optimizer
        # step at the last of `accumulate` (its state allocated); the epoch loop sets tr.iteration itself
        saved = tr.iteration
        try:
            for it in range(cfg.accumulate):
                tr.iteration = it
                tr.step(batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))
        finally:
            tr.iteration = saved

    runner.guard_memory(first_update, "cam", "train_cam")
    log.info("strategy %s (ls=%.2f): %d images, %d iterations/epoch, %d epochs on %s", cfg.strategy,
             cfg.label_smoothing, len(train_set), iters_per_epoch, cfg.epochs, device)
    t_total, n_iters = 0.0, 0
    for epoch in runner:
        tr.iteration = epoch * iters_per_epoch
        tr.f.train()
        loader = runner.loader(train_set, cfg.batch_size, cfg.num_workers)
        sums: dict[str, float] = {}
        n = 0
        t0 = time.perf_counter()
        for x, y, _ in tqdm(loader, desc=f"{cfg.strategy} epoch {epoch + 1}/{cfg.epochs}", mininterval=10, leave=False):
            parts = tr.step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        dt = time.perf_counter() - t0
        t_total += dt
        n_iters += n
        row = {k: v / max(1, n) for k, v in sums.items()}
        row["seconds_per_iteration"] = dt / max(1, n)
        row["prior_miou_no_tta"] = runner.evaluate(quick_prior_miou, tr.f, ev, device, cfg.epoch_eval_images)
        runner.log(epoch, row, shared=("prior_miou_no_tta",))
    arch = {"backbone": cfg.backbone if cfg.init == "backbone" else None, "n_classes": ds.n_classes,
            "output_stride": cfg.output_stride}
    base = load_weights(cfg.classifier)["arch"] if cfg.init == "classifier" else arch
    runner.save_weights(cfg.out, {"arch": base, "model": tr.f.state_dict(), "classes": ds.classes,
                                  "strategy": cfg.strategy})
    if tr.noc is not None:
        runner.save_weights(Path(cfg.out).with_name("noc.pt"), {"arch": base, "model": tr.noc.state_dict()})
    hist = runner.history
    metrics = {"stage": "train_cam", "strategy": cfg.strategy, "label_smoothing": cfg.label_smoothing, "epochs": hist,
               "final": hist[-1] if hist else {}, "resumed_from_epoch": runner.start_epoch,
               "seconds_per_iteration": t_total / max(1, n_iters) if n_iters else None,
               "options": {"cse_mask_norm": cfg.cse_mask_norm, "noc_mask_rule": cfg.noc_mask_rule,
                           "noc_cse_leak": cfg.noc_cse_leak}}
    runner.write_metrics(cfg.metrics, metrics)
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
