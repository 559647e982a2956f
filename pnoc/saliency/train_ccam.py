"""Stage: train C²AM (``--method c2am``) or C²AM-H (``--method c2amh``) — paper §2.4.4 and §4.

The CCAM network (:mod:`pnoc.models.ccam`: backbone layer3 ⊕ layer4 → 3×3 conv → BN(1) → logit
map z) is trained on the images of a split with

* ``c2am``:  L = SimMax(v_fg) + SimMin(v_bg, v_fg) + SimMax(v_bg)  (:func:`pnoc.saliency.losses.ccam_loss`);
* ``c2amh``: L + λ_h·L_hint, L_hint the mean BCE-with-logits of z on the pixels whose hint
  (max over classes of the chain's CAMs, rule extract_hints) is ≥ δ_fg, target 1 − ε/2
  (:func:`pnoc.saliency.losses.hint_loss`; a batch without hint pixels contributes 0, not NaN).
  Optional extension (``bg_hint_weight`` > 0; 0 = paper and reference): + λ_bg·L_bg, the same
  BCE towards ε/2 on the pixels whose hint is ≤ δ_bg — the background hints of the paper's
  Fig. 4, present only as commented-out code in the reference. The fg-only loss leaves the
  side of z away from the hints unconstrained; where the CAMs are weak (the synthetic demo)
  the background hints are the more precise ones.

Image and hint map are augmented jointly (random long-side resize, flip, crop; no colour
augmentation, as in the reference). SGD with poly decay and the four parameter groups, bf16
AMP on CUDA, resumable every epoch (undeclared state folder).

The backbone starts from the ordinary classifier's backbone (``init: classifier``; the
synthetic benchmark's stand-in for ImageNet weights) or from ``weights`` (``init: backbone``).

**Partition direction.** Which side of z is foreground is arbitrary for plain C²AM. After
training, :func:`pnoc.saliency.losses.decide_direction` looks at the inference map ReLU(z)/max of
the first ``direction_images`` training images: the sign of its correlation with the hints (the
CAM foreground maps — an evaluation-free artifact) when hints are given, else the border prior.
The decision and its evidence are STORED in the model artifact (``direction``) and in
``metrics.json``; inference applies it (z → −z). C²AM-H is anchored by its hints and is never
flipped (``method: hint-anchored``); the same statistic is still recorded as a check.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pnoc import cli
from pnoc.data.datasets import DataSource
from pnoc.data.loaders import PairedSet
from pnoc.data.transforms import normalize, to_tensor_image
from pnoc.evaluation import ThresholdSweep
from pnoc.io import DataError
from pnoc.models.ccam import create_ccam
from pnoc.models.classifier import classifier_backbone_state, load_backbone_state
from pnoc.saliency.losses import ccam_loss, decide_direction, hint_loss
from pnoc.saliency.maps import binary_gt, read_hint, thresholds
from pnoc.training import (EpochRunner, Runtime, Solver, autocast, make_scaler, optimizer_step, param_groups,
                           poly_scheduler, resume_key, start_training)

log = logging.getLogger("pnoc.saliency.train_ccam")

METHODS = ("c2am", "c2amh")
DIRECTION_GRID = 32  # maps and hints are resized to this square grid before the direction test


@dataclass
class Config(Solver, Runtime, DataSource):
    """Train C²AM / C²AM-H."""

    out: Path
    metrics: Path
    state_dir: Path
    method: str = "c2amh"
    hints: Path | None = None
    classifier: Path | None = None
    split: str = "train"
    init: str = "classifier"
    backbone: str = "resnet18_w24"
    output_stride: int = 8
    weights: str = "none"
    head_lr_mult: float = 10.0
    alpha: float = 0.25
    exclude_diagonal: bool = True
    hint_weight: float = 1.0
    fg_threshold: float = 0.4
    bg_hint_weight: float = 0.0
    bg_threshold: float = 0.1
    hint_smoothing: float = 0.1
    direction_images: int = 200
    border: float = 0.1
    epoch_eval_images: int = 100


def build_model(cfg: Config):
    """The CCAM network and its architecture record (backbone from the classifier or from ``weights``)."""
    if cfg.init == "classifier":
        if cfg.classifier is None:
            raise DataError("init=classifier needs --classifier results/classifier/seed<k>/model.pt")
        arch, sd = classifier_backbone_state(cfg.classifier)
        name = arch["backbone"]
        model = create_ccam(name, cfg.output_stride, "none")
        load_backbone_state(model.backbone, sd, cfg.classifier)
    elif cfg.init == "backbone":
        name = cfg.backbone
        model = create_ccam(name, cfg.output_stride, cfg.weights)
    else:
        raise ValueError(f"init {cfg.init!r}: use classifier | backbone")
    return model, {"backbone": name, "output_stride": cfg.output_stride}


def _by_size(ds, ids):
    groups = defaultdict(list)
    for i in ids:
        groups[ds.image_size(i)].append(i)
    return groups


def background_hint_loss(z: torch.Tensor, hint: torch.Tensor, bg_thr: float = 0.1,
                         smoothing: float = 0.1) -> tuple[torch.Tensor, int]:
    """Mean BCE-with-logits of z towards ε/2 on the pixels whose hint is ≤ δ_bg (optional extension).

    Implemented as :func:`pnoc.saliency.losses.hint_loss` on (−z, 1 − hint) with threshold 1 − δ_bg:
    BCE(−z, 1 − ε/2) = BCE(z, ε/2), and resizing commutes with 1 − ·. Empty batches give 0.

    Args:
        z: (B, 1, h, w) logits. hint: (B, 1, H, W) or (B, H, W) hints in [0, 1].

    Returns:
        (loss, number of background-hint pixels).
    """
    return hint_loss(-z, 1.0 - hint, 1.0 - bg_thr, smoothing)


def saliency_map(z: torch.Tensor) -> torch.Tensor:
    """The inference map of a logit map: ReLU(z) divided by its per-image max.

    Args:
        z: (B, h, w) logits.

    Returns:
        (B, h, w) in [0, 1]. Ranking-based, so a drift of the BN bias (which shifts σ(z) as a
        whole, and which the fg-only hint loss encourages) does not change it much.
    """
    r = F.relu(z)
    return r / (r.flatten(1).amax(1)[:, None, None] + 1e-5)


@torch.no_grad()
def predict_small(model, ds, ids, device, batch_size: int = 32):
    """Logit maps z at the network's resolution for ``ids`` (single scale, no flip).

    Yields ``(image_id, z (h, w) float tensor on CPU)``.
    """
    was_training = model.training
    model.eval()
    for _, chunk_ids in _by_size(ds, ids).items():
        for i in range(0, len(chunk_ids), batch_size):
            chunk = chunk_ids[i:i + batch_size]
            x = torch.stack([normalize(to_tensor_image(ds.read_image(j))) for j in chunk]).to(device)
            z = model(x)[0].float()[:, 0].cpu()
            yield from zip(chunk, z)
    model.train(was_training)


def direction_evidence(model, ds, ids, device, hints_dir: Path | None, border: float) -> dict:
    """Run :func:`decide_direction` on the inference maps ReLU(z)/max of ``ids`` (and their hints when given).

    Maps and hints are resized to a common square grid so that images of any size pool together.
    """
    sal, hints = [], []
    grid = (DIRECTION_GRID, DIRECTION_GRID)
    for image_id, z in predict_small(model, ds, ids, device):
        m = saliency_map(z[None])
        sal.append(F.interpolate(m[None], size=grid, mode="bilinear", align_corners=False)[0, 0])
        if hints_dir is not None:
            h = torch.from_numpy(read_hint(hints_dir, image_id, ds.image_size(image_id)))
            hints.append(F.interpolate(h[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0])
    return decide_direction(torch.stack(sal), torch.stack(hints) if hints else None, border=border)


@torch.no_grad()
def quick_binary_miou(model, ds, ids, device) -> tuple[float, float]:
    """Diagnostic: best binary fg mIoU (thresholds 0.05…0.95) of ReLU(z)/max and of ReLU(−z)/max, no TTA.

    The reference validates C²AM the same way each epoch. Only images with a ground-truth mask
    count. Returns ``(miou, miou_flipped)``.
    """
    ths = thresholds(0.05, 0.95, 0.05)
    sw, sw_flip = ThresholdSweep(2, ths), ThresholdSweep(2, ths)
    ids = [i for i in ids if ds.mask_path(i).is_file()]
    if not ids:
        return float("nan"), float("nan")
    keys = np.array([1])
    for image_id, z in predict_small(model, ds, ids, device):
        hw = ds.image_size(image_id)
        zz = F.interpolate(z[None, None], size=hw, mode="bilinear", align_corners=False)[0]
        gt = binary_gt(ds.read_mask(image_id, hw))
        sw.update(saliency_map(zz).numpy(), keys, gt)
        sw_flip.update(saliency_map(-zz).numpy(), keys, gt)
    best = lambda s: max(r["miou"] for r in s.results())  # noqa: E731
    return best(sw), best(sw_flip)


def ccam_objective(cfg: Config, z: torch.Tensor, v_fg: torch.Tensor, v_bg: torch.Tensor,
                   hint: torch.Tensor | None = None, gather=lambda t: t) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one C²AM / C²AM-H step and its logged parts.

    Args:
        z: (B, 1, h, w) logits; v_fg, v_bg: (B, d) partition vectors of this process's images.
        hint: (B, 1, H, W) hint maps (``method: c2amh``), else None.
        gather: the global batch of a per-process tensor (``EpochRunner.gather_batch``): the contrast couples
            every pair of images of the batch, so it sees the vectors of all processes.

    Returns:
        the loss and ``sim_max_fg``, ``sim_min``, ``sim_max_bg`` (+ ``hint``, ``hint_fraction``, and
        ``bg_hint``, ``bg_hint_fraction`` with ``bg_hint_weight`` > 0) as floats.
    """
    loss, parts = ccam_loss(gather(v_fg), gather(v_bg), cfg.alpha, cfg.exclude_diagonal)
    out = {k: v.item() for k, v in parts.items()}
    if hint is not None:
        l_hint, n_px = hint_loss(z, hint, cfg.fg_threshold, cfg.hint_smoothing)
        loss = loss + cfg.hint_weight * l_hint
        out["hint"], out["hint_fraction"] = l_hint.item(), n_px / z[:, 0].numel()
        if cfg.bg_hint_weight > 0:
            l_bg, n_bg = background_hint_loss(z, hint, cfg.bg_threshold, cfg.hint_smoothing)
            loss = loss + cfg.bg_hint_weight * l_bg
            out["bg_hint"], out["bg_hint_fraction"] = l_bg.item(), n_bg / z[:, 0].numel()
    return loss, out


def run(cfg: Config) -> dict:
    if cfg.method not in METHODS:
        raise ValueError(f"method {cfg.method!r}: use one of {METHODS}")
    if cfg.method == "c2amh" and cfg.hints is None:
        raise DataError("method c2amh needs --hints <folder written by rule extract_hints>")
    dist = start_training(cfg)
    device = dist.device
    ds = cfg.open_dataset(cfg.split)
    hints_dir = Path(cfg.hints) if cfg.hints is not None else None
    if hints_dir is not None and not hints_dir.is_dir():
        raise DataError(f"{hints_dir}: hints folder not found; run rule extract_hints for split {cfg.split}")

    def load_aux(image_id: str, hw: tuple[int, int]) -> list[np.ndarray]:
        # the hint map travels with the image through resize/flip/crop (bilinear, pad 0)
        if cfg.method != "c2amh":
            return []
        return [read_hint(hints_dir, image_id, hw)[None]]

    aug = cfg.augmenter()
    train_set = PairedSet(ds, aug, load_aux, need_labels=False)
    torch.manual_seed(cfg.seed)
    model, arch = build_model(cfg)
    model = model.to(device)
    steps_per_epoch = max(1, len(train_set) // cfg.batch_size)
    opt = cfg.make_optimizer(param_groups(model.backbone_parameters(), model.new_parameters(), cfg.lr,
                                          cfg.weight_decay, new_lr_mult=cfg.head_lr_mult))
    sched = poly_scheduler(opt, steps_per_epoch * cfg.epochs)
    scaler = make_scaler(device, cfg.amp)
    conf = resume_key(cfg)
    for diagnostic in ("direction_images", "border", "epoch_eval_images"):
        del conf[diagnostic]
    if cfg.init == "classifier":  # backbone/weights are unused then: changing them must not block a resume
        conf["backbone"] = conf["weights"] = "from classifier"
    runner = EpochRunner(cfg.state_dir, conf, cfg.epochs, cfg.seed,
                         inputs=(cfg.hints, cfg.classifier, *ds.identity_files()),
                         dist=dist, model=model, opt=opt, sched=sched, scaler=scaler)
    net = runner.wrap(model, cfg.sync_bn)

    def step(batch, where: str = "the memory check") -> tuple[torch.Tensor, dict[str, float]]:
        x = batch[0].to(device, non_blocking=True)
        with autocast(device, cfg.amp):
            z, v_fg, v_bg = net(x)
        hint = batch[1].to(device, non_blocking=True) if cfg.method == "c2amh" else None
        loss, parts = ccam_objective(cfg, z, v_fg, v_bg, hint, runner.gather_batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at {where}: {loss.item()}")
        optimizer_step(loss, opt, scaler, sched)
        return loss, parts

    # two images at least: the contrastive loss pairs the images of a batch
    runner.guard_memory(step, "saliency.ccam", "train_ccam", smallest=2)
    eval_ids = ds.ids[:cfg.epoch_eval_images] if cfg.epoch_eval_images > 0 else list(ds.ids)
    log.info("%s on %s/%s: %d images, %d steps/epoch, %d epochs, backbone %s (init %s), device %s", cfg.method,
             cfg.dataset, cfg.split, len(train_set), steps_per_epoch, cfg.epochs, arch["backbone"], cfg.init, device)
    t_train, n_steps = 0.0, 0
    for epoch in runner:
        model.train()
        loader = runner.loader(train_set, cfg.batch_size, cfg.num_workers)
        sums: dict[str, float] = defaultdict(float)
        n = 0
        t0 = time.perf_counter()
        for batch in tqdm(loader, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", mininterval=10, leave=False):
            loss, parts = step(batch, f"epoch {epoch + 1}, step {n}")
            for k, v in parts.items():
                sums[k] += v
            sums["loss"] += loss.item()
            n += 1
        dt = time.perf_counter() - t0
        t_train += dt
        n_steps += n
        row = {k: v / max(1, n) for k, v in sums.items()}
        row["seconds_per_iteration"] = dt / max(1, n)
        row["lr"] = opt.param_groups[0]["lr"]
        if cfg.epoch_eval_images >= 0:
            m, mf = runner.evaluate(quick_binary_miou, model, ds, eval_ids, device)
            row["binary_miou_no_tta"], row["binary_miou_no_tta_flipped"] = m, mf
        runner.log(epoch, row, shared=("binary_miou_no_tta", "binary_miou_no_tta_flipped"))

    ids = ds.ids[:cfg.direction_images] if cfg.direction_images > 0 else list(ds.ids)
    evidence = runner.evaluate(direction_evidence, model, ds, ids, device, hints_dir, cfg.border)
    if cfg.method == "c2amh":
        direction = {"flip": False, "method": "hint-anchored", "check": evidence}
        if evidence["method"] == "hints" and evidence["correlation"] < 0:
            log.warning("C2AM-H map anti-correlates with its own hints (r=%.3f): training failed to anchor",
                        evidence["correlation"])
    else:
        direction = dict(evidence)
    log.info("direction: flip=%s (%s; correlation %s, border-on %.3f over %d images)", direction["flip"],
             direction["method"], evidence["correlation"], evidence["border_on_fraction"], evidence["n_images"])
    runner.save_weights(cfg.out, {"arch": arch, "model": model.state_dict(), "method": cfg.method,
                                  "direction": direction, "init": cfg.init})
    hist = runner.history
    metrics = {"stage": "train_ccam", "method": cfg.method, "epochs": hist, "final": hist[-1] if hist else {},
               "resumed_from_epoch": runner.start_epoch, "direction": direction, "arch": arch,
               "seconds_per_iteration": t_train / n_steps if n_steps else None, "train_seconds": t_train}
    runner.write_metrics(cfg.metrics, metrics)
    return metrics


if __name__ == "__main__":
    cli.main(run, Config)
