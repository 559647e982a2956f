"""Benchmark: throughput (images/s, ms/iteration) and peak memory of every heavy stage, and the COCO disk budget.

Runs each stage on random tensors (no dataset), at the VOC settings of ``config/voc12.yaml`` laid
over ``config.yaml`` (what ``snakemake --configfile config/voc12.yaml`` runs): ResNeSt-269 (random
weights), 512 px, bf16 autocast on CUDA where the stage's config says ``amp: true``, and the
config's ``batch_size`` of each section as the batch of one device (``--batch`` overrides it, e.g. to
measure the per-rank batch ``batch_size / N`` of an N-GPU run). The stages and what one iteration is:

* ``cam``     one :meth:`pnoc.cam.train_cam.CamTrainer.step` of strategy ``cam`` (section ``cam``), built by
              :func:`pnoc.cam.train_cam.build` exactly as rule train_cam builds it (plain multi-label CAM).
* ``pnoc``    the same for strategy ``pnoc`` with the config's label smoothing (``pnoc_ls``): f on the
              batch, f on its 2×2 tiles (Puzzle), CSE through noc, and noc's hard-masked step.
              ``accumulate: 2`` at VOC: the optimizers step every second iteration, as in training.
* ``c2am_h``  one C²AM-H optimisation step (section ``saliency.ccam``, its crop 448 at VOC): the CCAM
              network of :func:`pnoc.saliency.train_ccam.build_model`, ``ccam_loss`` + λ_h·``hint_loss``
              on a CAM-like hint map, ``optimizer_step`` — the loop body of train_ccam.run.
* ``deeplab`` one DeepLab step (section ``segmentation``): ``arch_spec``/``build_segmenter`` of
              train_segmentation, cross-entropy (ignore 255, label smoothing) / valid pixels, SGD Nesterov.
* ``tta``     CAM inference as rule infer_cams does it: :func:`pnoc.cam.tta.tta_maps` over the
              ``inference`` scales × flip on a batch of ``inference.batch_size`` uint8 images, then
              per image the positive classes max-normalised and copied to the host. No autocast:
              infer_cams runs in float32. The ``.npz`` write is timed in the disk budget instead.
* ``walk``    one batch of ``affinity.rw.batch_size`` images through rule random_walk's path: the
              AffinityNet boundary (flip TTA, autocast when ``rw.amp``) on the full image and
              :func:`pnoc.affinity.propagate.propagate_batch` (radius, beta, exp_times of ``affinity.rw``)
              on the stride-4 grid, results copied to the host.

Each stage builds its networks and optimizers, runs ``--warmup`` untimed and ``--iters`` timed
iterations (``torch.cuda.synchronize`` around them on CUDA) and is freed before the next one.
Inputs are created on the device beforehand: data loading and host-to-device copies are not
timed. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset at the start of each stage,
so it includes the stage's weights, gradients and optimizer state); on CPU the peak RSS during the
stage minus the RSS at its start (see :class:`PeakMemory`; glibc's free pages are trimmed between
stages, but the figure stays indicative: it counts the process's memory, not torch's tensors alone).
A stage that runs out of device memory is reported as such and the run continues.

**Memory check** (``--no-memory-check`` skips it): before a stage runs, it is built and stepped at 1 and 4
images (C²AM-H and ResNeSt, whose BatchNorm cannot train on one image: 2 and 8), the growth projected to its
batch and compared with what the process may allocate (:mod:`pnoc.memory`: ``MemAvailable``, the cgroup limit,
SLURM's memory, ``torch.cuda.mem_get_info``; the environment variable ``PNOC_MEM_LIMIT_MB`` sets a limit of
its own). A stage that does not fit is reported as ``does not fit in memory`` with a message naming ``--batch`` /
the section's ``batch_size`` and ``--size``, and skipped: on the CPU the kernel's OOM killer would otherwise end
the whole run without a word (VOC's CAM step, batch 16 of ResNeSt-269 at 512 px in fp32, needs about 39 GiB of
host memory: 2.4 GiB per image on top of 0.9 GiB). During the timed iterations on the CPU a
:class:`pnoc.memory.MemoryWatch` stops a stage whose memory runs out anyway (``memory nearly exhausted``).

**FLOPs and fraction of peak**: after the warm-up, one more (untimed) iteration runs under
:class:`torch.utils.flop_counter.FlopCounterMode` (:func:`count_flops`): matmuls, convolutions and attention,
forward and, for the train steps, backward; element-wise work, norms, pooling, resampling and the optimizer
update count 0. The walk's sparse products are counted by their stored entries (the stock formula would count
the (n, n) operator as dense); building its transition matrix is not counted. Per stage: GFLOP per image, the
TFLOP/s reached at the mean iteration time, and their fraction of the device's peak: on a GPU the dense
datasheet peak of :data:`GPU_PEAKS` (bf16 where the stage runs under autocast, fp32 otherwise; an unknown GPU
gets none unless ``--peak-tflops`` gives it), on a CPU a timed fp32 matmul (:func:`cpu_peak`). The training
stages run with the config's ``speed`` group (``--speed KEY=true|false`` overrides a key), as the rules do.

**Disk budget**: real CAM artifacts written by :func:`pnoc.io.save_maps` (float16 ``.npz`` with
``maps`` (K, S, S), ``lr`` (K, S/4, S/4) and ``keys``, what infer_cams writes) for CAM-like maps
with K = 1, 2, 3 classes at ``--size`` px, extrapolated to VOC train_aug (10,582 images) and COCO
train2014 (82,783 images) at an assumed mean number of classes per image. How the maps are made:
see :func:`cam_like_maps` (smooth objects through a stand-in stride-16 network and the real
``tta_maps`` + ``max_normalize``); white-noise maps of the same shape are written too, as the
incompressible upper bound.

Usage::

    python benchmarks/stages.py                          # VOC settings on the GPU (device auto)
    python benchmarks/stages.py --stages pnoc,walk --iters 20 --out results.json
    python benchmarks/stages.py --config config/coco14.yaml --size 640   # COCO's sections and crop
    python benchmarks/stages.py --tiny --device cpu      # the CPU test's preset (a few seconds)

Prints markdown tables (device name, torch version, AMP; FLOPs and fraction of peak) and writes every figure
to ``--out``. ``benchmarks/speed_ab.py`` times the ``speed`` options against each other (interleaved A/B).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import torch.nn.functional as F
import yaml

STAGES = ("cam", "pnoc", "c2am_h", "deeplab", "tta", "walk")
IMAGES = {"voc12_train_aug": 10_582, "coco14_train": 82_783}
N_CLASSES = {"voc12": 20, "coco14": 80}
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
TINY = {"backbone": "resnet18_w8", "size": 64, "batch": 2, "warmup": 1, "iters": 2, "disk_images": 2}
# the config key of each stage's batch (what --batch overrides), named by the memory check's message
BATCH_KEYS = {"cam": ("cam", "batch_size"), "pnoc": ("cam", "batch_size"),
              "c2am_h": ("saliency", "ccam", "batch_size"), "deeplab": ("segmentation", "batch_size"),
              "tta": ("inference", "batch_size"), "walk": ("affinity", "rw", "batch_size")}
SMALLEST = {"c2am_h": 2}  # C2AM's contrastive loss pairs the images of a batch


# ---------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (``torch.cuda.synchronize`` on CUDA, nothing on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} (CPU, {torch.get_num_threads()} torch threads)"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory of a block.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start (also
    ``max_memory_reserved``, what the caching allocator held). CPU: the peak RSS during the block minus
    the RSS at its start, where the peak is ``ru_maxrss`` (exact) when the block raised the process's
    high-water mark, else the maximum of ``/proc/self/statm`` sampled every 2 ms (may miss shorter
    spikes). ``kind`` says which one was used.
    """

    INTERVAL_S = 0.002

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak = None
        self.reserved = None
        self.kind = "n/a"
        self._stop = threading.Event()
        self._sampled = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss_bytes())
            self._stop.wait(self.INTERVAL_S)

    def __enter__(self):
        if self.cuda:
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif Path("/proc/self/statm").is_file():
            self._base = _rss_bytes()
            self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            self._sampled = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.reserved = torch.cuda.max_memory_reserved(self.device)
            self.kind = "cuda max_memory_allocated"
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            if maxrss > self._maxrss0:
                self.peak, self.kind = maxrss - self._base, "cpu RSS delta (ru_maxrss)"
            else:
                self.peak, self.kind = self._sampled - self._base, "cpu RSS delta (sampled every 2 ms)"


def free_memory(device: torch.device) -> None:
    """Drop the previous stage's tensors: the CUDA cache, or on CPU glibc's free heap pages
    (``malloc_trim``), so that the next stage's RSS growth is its own and not hidden by reuse."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# ---------------------------------------------------------------------------- FLOPs and the device's peak
# Dense peak TFLOP/s of NVIDIA GPUs from the vendor datasheets. The datasheets print the tensor-core figures
# "with sparsity" (2:4 structured sparsity doubles them); these are the dense figures, half of those. Columns:
# bf16 = BF16 (FP16 on Volta) tensor core with FP32 accumulate, what autocast's convolutions and matmuls run;
# fp32 = the CUDA cores' FP32 rate; tf32 = the TF32 tensor-core rate (shown, not used: cuDNN runs fp32
# convolutions in TF32 by default on Ampere and later, torch.backends.cudnn.allow_tf32, so an fp32 stage there
# can pass a fraction of 1 of the fp32 peak). Sources:
#   V100    Tesla V100 datasheet (SXM2: 15.7 FP32, 125 tensor; PCIe: 14 / 112). Volta has no BF16 tensor cores:
#           its row uses the FP16 tensor figure, and bf16 autocast there runs far below it.
#   A100    A100 datasheet (SXM and PCIe alike): FP32 19.5, TF32 156 (312*), BF16 312 (624*).
#   H100    H100 datasheet: SXM FP32 67, TF32 494.7 (989*), BF16 989.4 (1,979*); PCIe 51, 378 (756*), 756 (1,513*);
#           NVL 60, 417.5 (835*), 835 (1,671*).
#   H200    H200 datasheet: SXM as the H100 SXM (FP32 67, BF16 1,979*); NVL FP32 60, BF16 1,671*.
#   L40S    L40S datasheet: FP32 91.6, TF32 183 (366*), BF16 362.05 (733*).
#   RTX 4090  Ada Lovelace architecture whitepaper (v1.03, table 2): FP32 82.6, TF32 82.6 (165.2*),
#           BF16/FP16 with FP32 accumulate 165.2 (330.4*); GeForce runs FP32-accumulate at half the FP16-accumulate rate.
# (* = the datasheet's "with sparsity" figure.) Rows are tried in order; the first whose every word occurs in
# torch.cuda.get_device_name() (case-insensitive) is used, so the more specific rows come first.
GPU_PEAKS = (
    # (words of the device name, row name, bf16, fp32, tf32)
    (("h200", "nvl"), "H200 NVL", 835.0, 60.0, 417.5),
    (("h200",), "H200 (SXM)", 989.4, 67.0, 494.7),
    (("h100", "pcie"), "H100 PCIe", 756.0, 51.0, 378.0),
    (("h100", "nvl"), "H100 NVL", 835.0, 60.0, 417.5),
    (("h100",), "H100 (SXM)", 989.4, 67.0, 494.7),
    (("a100",), "A100", 312.0, 19.5, 156.0),
    (("v100", "pcie"), "V100 PCIe", 112.0, 14.0, None),
    (("v100",), "V100 (SXM2)", 125.0, 15.7, None),
    (("l40s",), "L40S", 362.05, 91.6, 183.0),
    (("4090",), "RTX 4090", 165.2, 82.6, 82.6),
)
CPU_PEAK_SIZE = 2048  # side of the fp32 matmul that stands for a CPU's peak


def gpu_peak(name: str) -> dict | None:
    """The :data:`GPU_PEAKS` row of a CUDA device name: ``{"row", "bf16", "fp32", "tf32"}`` in TFLOP/s, or None."""
    low = name.lower()
    for words, row, bf16, fp32, tf32 in GPU_PEAKS:
        if all(w in low for w in words):
            return {"row": row, "bf16": bf16, "fp32": fp32, "tf32": tf32,
                    "source": "vendor datasheet, dense (see GPU_PEAKS)"}
    return None


def cpu_peak(size: int = CPU_PEAK_SIZE, repeats: int = 3) -> dict:
    """A CPU's "peak": the best of ``repeats`` timed fp32 ``size``² matmuls (one untimed first) at the current
    torch thread count, i.e. what the BLAS reaches on the densest kernel there is. On a shared machine it is
    what was free at that moment; the stages are set against the same machine state.

    Returns:
        ``{"row", "bf16", "fp32", "tf32", "source"}``: fp32 in TFLOP/s; bf16 the same figure (pnoc's autocast is a
        no-op on the CPU, every stage runs fp32); tf32 None.
    """
    g = torch.Generator().manual_seed(7)
    a = torch.randn(size, size, generator=g)
    b = torch.randn(size, size, generator=g)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    tflops = 2 * size**3 / best / 1e12
    return {"row": f"measured: fp32 matmul {size}x{size}, {torch.get_num_threads()} threads, best of {repeats}",
            "bf16": tflops, "fp32": tflops, "tf32": None, "source": "measured"}


def device_peak(device: torch.device, override_tflops: float | None = None) -> dict | None:
    """The peak a stage's TFLOP/s are set against: ``--peak-tflops`` when given, the datasheet row of a known
    GPU, None for an unknown GPU, or the measured matmul rate of the CPU (:func:`cpu_peak`)."""
    if override_tflops:
        return {"row": "--peak-tflops", "bf16": override_tflops, "fp32": override_tflops, "tf32": None,
                "source": "given"}
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    return cpu_peak()


def _sparse_aware(dense: Callable) -> Callable:
    """A FlopCounterMode formula for ``aten.mm`` / ``aten.addmm`` that counts a sparse operand by its stored
    entries (2·nnz·columns of the dense one): the stock formula takes the shapes only and would count
    the walk's sparse (n, n) operator as a dense matrix, 2·n²·K per step."""

    def formula(*args, out_val=None, **kwargs):
        mats = [a for a in args if isinstance(a, torch.Tensor)][-2:]  # addmm: (self, a, b) -> a, b
        if len(mats) == 2 and any(m.layout != torch.strided for m in mats):
            a, b = mats
            if a.layout != torch.strided:
                return 2 * a._nnz() * b.shape[-1]
            return 2 * b._nnz() * a.shape[0]
        return dense(*args, out_val=out_val, **kwargs)  # torch's registered formula (it takes the shapes itself)

    formula._get_raw = True  # FlopCounterMode hands it the tensors, not their shapes
    return formula


def count_flops(step: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of ``step`` as :class:`torch.utils.flop_counter.FlopCounterMode` counts them.

    The counter counts matmuls, convolutions and attention (forward, and backward when ``step`` runs it) from
    their shapes; element-wise ops, norms, pooling, interpolation and optimizer updates count 0. Sparse
    matmuls are counted by their stored entries (:func:`_sparse_aware`).

    Returns:
        (total FLOPs, {aten op: FLOPs}).
    """
    from torch.utils.flop_counter import FlopCounterMode, addmm_flop, mm_flop

    aten = torch.ops.aten
    with FlopCounterMode(display=False, custom_mapping={aten.mm: _sparse_aware(mm_flop),
                                                        aten.addmm: _sparse_aware(addmm_flop)}) as fc:
        step()
    by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), by_op


# ---------------------------------------------------------------------------- configuration
def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(path: Path) -> dict:
    """``config.yaml`` with ``path`` laid over it (Snakemake's ``--configfile``)."""
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    return _merge(base, yaml.safe_load(Path(path).read_text()) or {})


def make_cfg(cls, section: dict, **given):
    """A stage's Config dataclass from a config section: the keys it knows, then ``given``; the
    required paths (dataset root, outputs) get placeholders, as nothing is read or written."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in section.items() if k in names}
    kw.update(given)
    for f in fields(cls):
        if f.name not in kw and f.default is MISSING and f.default_factory is MISSING:  # required
            kw[f.name] = Path("unused") if f.name != "dataset" else "voc12"
    return cls(**kw)


# ---------------------------------------------------------------------------- inputs
def multi_hot(batch: int, n_classes: int, k: int, device, generator=None) -> torch.Tensor:
    """(batch, n_classes) labels with ``k`` distinct positive classes per image."""
    order = torch.rand(batch, n_classes, generator=generator).argsort(1)[:, :k]
    y = torch.zeros(batch, n_classes)
    y.scatter_(1, order, 1.0)
    return y.to(device)


def object_images(n: int, k: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 (n, 3, size, size) images whose channel c (< k) draws the object of class c.

    Each object: one or two elliptical Gaussian blobs (random centre, axes 8–30 % of the side) times a
    low-frequency texture (noise on an 8×8 grid, bilinearly upsampled); the other channels are 0.
    """
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.zeros(n, 3, size, size)
    for i in range(n):
        for c in range(k):
            obj = torch.zeros(size, size)
            for _ in range(int(torch.randint(1, 3, (1,), generator=generator))):
                cy, cx = torch.rand(2, generator=generator) * 0.6 + 0.2
                ay, ax = torch.rand(2, generator=generator) * 0.22 + 0.08
                obj = torch.maximum(obj, torch.exp(-0.5 * (((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)))
            tex = F.interpolate(torch.rand(1, 1, 8, 8, generator=generator), size=(size, size), mode="bilinear",
                                align_corners=False)[0, 0]
            img[i, c] = obj * (0.6 + 0.4 * tex)
    return (img * 255).round().to(torch.uint8)


def fake_cam_network(generator: torch.Generator, stride: int = 16) -> Callable[[torch.Tensor], torch.Tensor]:
    """A stand-in for f's CAM output: the object channels of a normalised batch average-pooled to the
    stride-``stride`` grid (what a CAM network's 1×1 head sees), offset so that the background is
    negative (ReLU'd to 0 by ``tta_maps``), plus Gaussian noise on that grid (std 0.1)."""
    from pnoc.data.transforms import denormalize

    def forward(x: torch.Tensor) -> torch.Tensor:
        v = F.avg_pool2d(denormalize(x), stride, ceil_mode=True)  # (N, 3, h/16, w/16) in [0, 1]
        return 2.0 * (v - 0.15) + 0.1 * torch.randn(v.shape, generator=generator)

    return forward


def cam_like_maps(k: int, size: int, scales, flip: bool, generator: torch.Generator):
    """CAM-like ``(maps (k, S, S), lr (k, S/4, S/4))`` in [0, 1] of one image, made as infer_cams makes
    CAMs: :func:`object_images` through :func:`fake_cam_network` at every TTA scale and flip, merged by
    the real :func:`pnoc.cam.tta.tta_maps` (ReLU, flip-merge, bilinear upsampling, sum over scales) and
    divided per class by its max (:func:`pnoc.cam.tta.max_normalize`). Real CAMs are smooth and zero on
    much of the background, so they compress far better than white noise."""
    from pnoc.cam.tta import max_normalize, tta_maps

    imgs = object_images(1, k, size, generator)
    hr, lr = tta_maps(fake_cam_network(generator), imgs, scales, flip, reduce="sum")
    return max_normalize(hr[0, :k]).numpy(), max_normalize(lr[0, :k]).numpy()


# ---------------------------------------------------------------------------- stages

SPEED_KEYS = ("channels_last", "fused_optimizer", "compile", "cudnn_benchmark")


def _speed_setting(text: str) -> tuple[str, bool]:
    """``KEY=true|false`` of ``--speed``."""
    key, sep, value = text.partition("=")
    if not sep or key not in SPEED_KEYS or value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: use KEY=true|false with KEY one of {', '.join(SPEED_KEYS)}")
    return key, value.lower() == "true"


class Stage:
    """What a stage needs for timing: ``step()`` runs one iteration of ``batch`` images."""

    def __init__(self, step: Callable[[], dict | None], batch: int, size: int, amp: bool, what: str, **info):
        self.step, self.batch, self.size, self.amp, self.what, self.info = step, batch, size, amp, what, info


def _amp_on(device: torch.device, flag: bool) -> bool:
    return bool(flag) and device.type == "cuda"  # pnoc.training.autocast is a no-op on CPU


def stage_cam_trainer(strategy: str, ctx) -> Stage:
    """cam / pnoc: the real CamTrainer from train_cam.build (f from the backbone, noc from an artifact)."""
    from pnoc.cam.train_cam import Config, build
    from pnoc.training import Speed, set_backend_speed

    sec, dev = ctx.config["cam"], ctx.device
    batch = ctx.batch or sec["batch_size"]
    cfg = make_cfg(Config, sec, strategy=strategy, classifier=ctx.classifier_artifact(),
                   label_smoothing=sec.get("label_smoothing", 0.0) if strategy == "pnoc" else 0.0,
                   init="backbone", backbone=ctx.backbone, output_stride=ctx.config["classifier"]["output_stride"],
                   weights="none", batch_size=batch, crop=ctx.size, device=str(dev), **ctx.speed)
    total = max(1, ctx.train_images // batch) * int(sec["epochs"])
    tr = build(cfg, ctx.n_classes, dev, total)
    tr.f.train()
    speed = Speed.of(cfg)  # what EpochRunner.wrap does to f and noc in rule train_cam
    set_backend_speed(cfg, dev)
    tr.f_train = speed.compiled(speed.prepare(tr.f))
    if tr.noc is not None:
        tr.noc_train = speed.compiled(speed.prepare(tr.noc))
    tr.iteration = total // 2  # mid-schedule λ's (the work per step does not depend on them)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, ctx.size, ctx.size, generator=g).to(dev)
    y = multi_hot(batch, ctx.n_classes, ctx.labels, dev, g)
    what = "train step: f" if strategy == "cam" else "train step: f + tiles + CSE(noc) + noc hard-masked"

    def step():
        return {"loss": tr.step(x, y)["loss"]}

    return Stage(step, batch, ctx.size, _amp_on(dev, cfg.amp), what, accumulate=cfg.accumulate,
                 strategy=strategy, label_smoothing=cfg.label_smoothing, _keep=tr)


def stage_c2am_h(ctx) -> Stage:
    """C²AM-H: train_ccam's model, losses and optimizer step (the loop body of train_ccam.run)."""
    from pnoc.saliency.train_ccam import Config, build_model, ccam_objective
    from pnoc.training import (Speed, autocast, make_scaler, optimizer_step, param_groups, poly_scheduler,
                               set_backend_speed)

    sec, dev = ctx.config["saliency"]["ccam"], ctx.device
    fg_thr = ctx.config["saliency"].get("fg_threshold", sec.get("fg_threshold", 0.4))
    batch = ctx.batch or sec["batch_size"]
    size = sec["crop"] if ctx.ccam_crop is None else (ctx.ccam_crop or ctx.size)
    cfg = make_cfg(Config, sec, method="c2amh", init="backbone", backbone=ctx.backbone, weights="none",
                   fg_threshold=fg_thr, bg_threshold=ctx.config["saliency"].get("bg_threshold", 0.1),
                   batch_size=batch, crop=size, device=str(dev), **ctx.speed)
    model, _ = build_model(cfg)
    model = model.to(dev).train()
    speed = Speed.of(cfg)  # as EpochRunner.wrap in rule train_ccam
    set_backend_speed(cfg, dev)
    net = speed.compiled(speed.prepare(model))
    opt = cfg.make_optimizer(param_groups(model.backbone_parameters(), model.new_parameters(), cfg.lr,
                                          cfg.weight_decay, new_lr_mult=cfg.head_lr_mult))
    sched = poly_scheduler(opt, max(1, ctx.train_images // batch) * int(cfg.epochs))
    scaler = make_scaler(dev, cfg.amp)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, size, size, generator=g).to(dev)
    # hints: the max over classes of CAM-like maps (rule extract_hints), at the crop size
    hint = torch.stack([torch.from_numpy(cam_like_maps(min(3, ctx.labels), size, (1.0,), False, g)[0]).amax(0)
                        for _ in range(batch)])[:, None].to(dev)

    def step():
        with autocast(dev, cfg.amp):
            z, v_fg, v_bg = net(x)
        loss, _ = ccam_objective(cfg, z, v_fg, v_bg, hint)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"c2am_h: non-finite loss {loss.item()}")
        optimizer_step(loss, opt, scaler, sched)
        return {"loss": loss.item()}

    return Stage(step, batch, size, _amp_on(dev, cfg.amp), "train step: CCAM + SimMax/SimMin + hint",
                 _keep=(model, opt))


def stage_deeplab(ctx) -> Stage:
    """DeepLab: train_segmentation's network (arch_spec / build_segmenter), loss and optimizer step."""
    from pnoc.models.deeplab import build_segmenter
    from pnoc.segmentation.train_segmentation import Config, arch_spec, segmentation_loss
    from pnoc.training import (Speed, autocast, make_scaler, optimizer_step, param_groups, poly_scheduler,
                               set_backend_speed)

    sec, dev = ctx.config["segmentation"], ctx.device
    batch = ctx.batch or sec["batch_size"]
    cfg = make_cfg(Config, sec, backbone=ctx.backbone, weights="none", batch_size=batch, crop=ctx.size,
                   device=str(dev), **ctx.speed)
    n_out = ctx.n_classes + 1
    model = build_segmenter(arch_spec(cfg, n_out), "none").to(dev).train()
    speed = Speed.of(cfg)  # as EpochRunner.wrap in rule train_segmentation
    set_backend_speed(cfg, dev)
    net = speed.compiled(speed.prepare(model))
    named = list(model.named_parameters())
    opt = cfg.make_optimizer(param_groups([(k, p) for k, p in named if k.startswith("backbone.")],
                                          [(k, p) for k, p in named if not k.startswith("backbone.")],
                                          cfg.lr, cfg.weight_decay, new_lr_mult=cfg.head_lr_mult))
    sched = poly_scheduler(opt, max(1, ctx.train_images // batch) * int(cfg.epochs))
    scaler = make_scaler(dev, cfg.amp)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, ctx.size, ctx.size, generator=g).to(dev)
    target = torch.randint(0, n_out, (batch, ctx.size, ctx.size), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.05] = 255  # an ignore share, as in pseudo masks
    target = target.to(dev)

    def step():
        with autocast(dev, cfg.amp):
            logits = net(x)
        loss = segmentation_loss(logits, target, cfg.label_smoothing)
        optimizer_step(loss, opt, scaler, sched)
        return {"loss": loss.item()}

    return Stage(step, batch, ctx.size, _amp_on(dev, cfg.amp), f"train step: {cfg.arch} + CE",
                 arch=cfg.arch, _keep=(model, opt))


def stage_tta(ctx) -> Stage:
    """CAM inference as infer_cams: tta_maps over scales × flip, positive classes max-normalised to the host."""
    from pnoc.cam.tta import max_normalize, tta_maps
    from pnoc.models.classifier import create_classifier

    sec, dev = ctx.config["inference"], ctx.device
    batch = ctx.batch or sec["batch_size"]
    model = create_classifier(ctx.backbone, ctx.n_classes, ctx.config["classifier"]["output_stride"],
                              "none").to(dev).eval()

    def forward(x):  # infer_cams' forward
        return model(x.to(dev))[1]

    g = torch.Generator().manual_seed(4)
    imgs = torch.randint(0, 256, (batch, 3, ctx.size, ctx.size), generator=g, dtype=torch.uint8).to(dev)
    cls = [torch.randperm(ctx.n_classes, generator=g)[:ctx.labels].sort().values for _ in range(batch)]
    scales = [float(s) for s in sec["scales"]]

    def step():
        hr, lr = tta_maps(forward, imgs, scales, sec["flip"], reduce="sum")
        for b in range(batch):
            max_normalize(hr[b, cls[b]]).cpu().numpy()
            max_normalize(lr[b, cls[b]]).cpu().numpy()

    what = f"inference: {len(scales)} scales x {'flip' if sec['flip'] else 'no flip'}"
    return Stage(step, batch, ctx.size, False, what,
                 scales=scales, flip=bool(sec["flip"]), _keep=model)


def stage_walk(ctx) -> Stage:
    """Random walk as rule random_walk: AffinityNet boundary (flip) + propagate_batch, results to the host."""
    from pnoc.affinity.propagate import propagate_batch
    from pnoc.data.transforms import normalize
    from pnoc.models.affinitynet import AffinityNet
    from pnoc.models.backbones import create_backbone
    from pnoc.training import autocast

    aff, dev = ctx.config["affinity"], ctx.device
    rw, tr = aff["rw"], aff["train"]
    batch = ctx.batch or rw["batch_size"]
    model = AffinityNet(create_backbone(ctx.backbone, tr["output_stride"], "none"), tr["branch_channels"])
    model = model.to(dev).eval()
    g = torch.Generator().manual_seed(5)
    s = ctx.size
    x = normalize(torch.randint(0, 256, (batch, 3, s, s), generator=g, dtype=torch.uint8)).to(dev)
    lh = lw = math.ceil(s / 4)
    cams = [torch.rand(ctx.labels, lh, lw, generator=g).to(dev) for _ in range(batch)]
    amp = bool(rw.get("amp", True))

    @torch.no_grad()
    def step():
        t0 = time.perf_counter()
        with autocast(dev, amp):
            bnd = model.boundary(x, flip=rw["flip"])
        bnd = bnd.float()[:, 0, :lh, :lw]
        sync(dev)
        t1 = time.perf_counter()
        out = propagate_batch(cams, list(bnd), [(s, s)] * batch, rw["radius"], rw["beta"], rw["exp_times"])
        for o in out:
            o.cpu().numpy()
        t2 = time.perf_counter()
        return {"boundary_ms": 1000 * (t1 - t0), "walk_ms": 1000 * (t2 - t1)}

    return Stage(step, batch, s, _amp_on(dev, amp), f"AffinityNet boundary{' (flip TTA)' if rw['flip'] else ''} "
                 f"+ walk of 2^{rw['exp_times']} steps", radius=rw["radius"], beta=rw["beta"],
                 exp_times=rw["exp_times"], grid=[lh, lw], seed_classes=ctx.labels, _keep=model,
                 flops_note="boundary convolutions + the walk's sparse products (2 FLOPs per stored entry per seed "
                            "map and step); building the transition matrix (exp, pow, index work) is not counted")


BUILDERS = {
    "cam": lambda ctx: stage_cam_trainer("cam", ctx),
    "pnoc": lambda ctx: stage_cam_trainer("pnoc", ctx),
    "c2am_h": stage_c2am_h,
    "deeplab": stage_deeplab,
    "tta": stage_tta,
    "walk": stage_walk,
}


class Context:
    """Run-wide settings and the temporary ordinary-classifier artifact that train_cam.build loads."""

    def __init__(self, args, config: dict, device: torch.device, tmp: Path):
        self.args, self.config, self.device, self.tmp = args, config, device, tmp
        self.backbone, self.size, self.batch = args.backbone, args.size, args.batch
        self.ccam_crop = args.ccam_crop  # None: the config's crop; 0: --size
        self.labels = args.labels
        name = config["dataset"]["name"]
        self.n_classes = N_CLASSES.get(name, 20)
        self.train_images = IMAGES["coco14_train"] if name == "coco14" else IMAGES["voc12_train_aug"]
        self.peak: dict | None = None  # TFLOP/s the stages are set against (device_peak)
        # the config's speed group with --speed overrides, given to the training stages' configs
        self.speed = {**config.get("speed", {}), **dict(getattr(args, "speed", None) or [])}
        self._artifact = None

    def classifier_artifact(self) -> Path:
        """An ordinary-classifier artifact (random weights) for noc; written once, on the host."""
        if self._artifact is None:
            from pnoc.models.classifier import create_classifier
            from pnoc.training import save_weights

            os_ = self.config["classifier"]["output_stride"]
            m = create_classifier(self.backbone, self.n_classes, os_, "none")
            self._artifact = self.tmp / "classifier.pt"
            save_weights(self._artifact, {"arch": {"backbone": self.backbone, "n_classes": self.n_classes,
                                                   "output_stride": os_}, "model": m.state_dict()})
        return self._artifact


def flop_fields(flops: int, by_op: dict[str, int], st: Stage, seconds: float, peak: dict | None) -> dict:
    """The FLOP figures of a stage's row: FLOPs of one iteration and per image, the TFLOP/s reached at the mean
    iteration time, and their fraction of the device's peak at the stage's precision (bf16 under autocast, fp32
    otherwise; None when the peak is unknown)."""
    precision = "bf16" if st.amp else "fp32"
    achieved = flops / seconds / 1e12
    peak_tflops = peak[precision] if peak else None
    out = {"flops_per_iteration": flops, "gflop_per_image": flops / st.batch / 1e9, "flops_by_op": by_op,
           "achieved_tflops": achieved, "peak_precision": precision, "peak_tflops": peak_tflops,
           "fraction_of_peak": achieved / peak_tflops if peak_tflops else None}
    return out


def stage_batch(name: str, ctx: Context) -> tuple[int, str]:
    """(batch, the key that sets it): ``--batch``, else the stage's config section's ``batch_size``."""
    if ctx.batch:
        return ctx.batch, "--batch"
    sec = ctx.config
    for k in BATCH_KEYS[name]:
        sec = sec[k]
    return int(sec), ".".join(BATCH_KEYS[name])


def check_memory(name: str, ctx: Context) -> dict:
    """The memory a stage's iteration at its batch needs, before it runs (the training stages' check,
    :meth:`pnoc.training.EpochRunner.guard_memory`, for the benchmark's stand-ins).

    The stage is built and stepped once at 1 image unmeasured, then at 1 and 4 (C2AM-H, and networks whose
    BatchNorm cannot train on one image such as ResNeSt: 2 and 8), measured by :func:`pnoc.memory.measure_steps`
    from the state before the build (the weights, optimizer state and activations of the stage), projected to its
    batch (:func:`pnoc.memory.project`) and compared with what the process may allocate
    (:func:`pnoc.memory.memory_budget`; ``PNOC_MEM_LIMIT_MB`` overrides).

    Returns:
        the row fields ``memory_projected_bytes``, ``memory_available_bytes``, ``memory_source``, and, when the
        iteration does not fit, ``error`` / ``detail`` (the message naming the key to lower).
    """
    from pnoc import memory

    dev = ctx.device
    batch, key = stage_batch(name, ctx)
    free_memory(dev)
    budget = memory.memory_budget(dev)
    lower = "--size" if ctx.batch else "--size (or give a smaller --batch)"
    message = memory.no_room(name, [budget], key, batch, lower, step="one iteration")
    if message is not None:  # measuring would only run the process out of memory
        return {"error": "does not fit in memory", "detail": message, "memory_available_bytes": 0,
                "memory_source": budget.source}

    def build_and_step(b: int) -> None:
        sub = copy.copy(ctx)
        sub.batch = b
        torch.manual_seed(0)
        BUILDERS[name](sub).step()
        sync(dev)

    try:
        with memory.MemoryWatch(f"lower --size or {key}") if dev.type == "cpu" else contextlib.nullcontext():
            points = memory.measure_steps(dev, build_and_step, batch, SMALLEST.get(name, 1),
                                          after=lambda: free_memory(dev),
                                          room=lambda: memory.memory_budget(dev).headroom - budget.reserve)
    except memory.MemoryLimitError as e:  # the watch: a measuring iteration itself ran the host out of memory
        free_memory(dev)
        return {"error": "does not fit in memory", "detail": f"{name}: {e}"}
    except OUT_OF_MEMORY as e:
        free_memory(dev)
        return {"error": "does not fit in memory",
                "detail": f"{name}: even the measuring iterations of a few images do not fit in {dev} memory "
                          f"({str(e).splitlines()[0]}); lower --size or {key}"}
    projection = memory.project(points, batch)
    verdict = memory.judge([projection], [budget])
    out = {"memory_projected_bytes": int(projection.growth), "memory_available_bytes": int(max(0, verdict.room)),
           "memory_source": budget.source}
    if not verdict.fits:
        out.update(error="does not fit in memory",
                   detail=memory.too_big(name, verdict, projection, key, batch, 1, lower,
                                         step="one iteration (build + step)"))
    return out


def time_stage(name: str, ctx: Context) -> dict:
    dev = ctx.device
    free_memory(dev)
    torch.manual_seed(0)
    mem = PeakMemory(dev)
    row: dict = {"stage": name}
    if name in ("cam", "pnoc"):
        ctx.classifier_artifact()  # the host-side artifact of oc/noc is written outside the timing
    if ctx.args.memory_check:
        # a stage that does not fit is reported, not run: on the CPU the kernel would kill the whole benchmark
        row.update(check_memory(name, ctx))
        if row.get("error"):
            print(row["detail"], file=sys.stderr)
            row.update(images_per_s=None, ms_per_iteration=None, peak_memory_bytes=None, peak_memory_kind="n/a")
            return row
    from pnoc.memory import MemoryLimitError, MemoryWatch

    watch = MemoryWatch(f"lower --size or {stage_batch(name, ctx)[1]}") if dev.type == "cpu" else None
    t_build = time.perf_counter()
    try:
        with mem, (watch or contextlib.nullcontext()):
            st = BUILDERS[name](ctx)
            row["build_s"] = time.perf_counter() - t_build
            for _ in range(ctx.args.warmup):
                st.step()
            sync(dev)
            # one more iteration, untimed, under the FLOP counter (its dispatch hook slows every op down)
            flops, flops_by_op = count_flops(st.step)
            sync(dev)
            times, extras = [], {}
            for _ in range(ctx.args.iters):
                t0 = time.perf_counter()
                out = st.step()
                sync(dev)
                times.append(time.perf_counter() - t0)
                for k, v in (out or {}).items():
                    extras.setdefault(k, []).append(float(v))
    except OUT_OF_MEMORY as e:
        row.update(error="out of memory", detail=str(e).splitlines()[0], images_per_s=None, ms_per_iteration=None,
                   peak_memory_bytes=mem.peak, peak_memory_kind=mem.kind)
        st = None
        free_memory(dev)
        return row
    except MemoryLimitError as e:  # the watch: host memory nearly exhausted during the run
        row.update(error="memory nearly exhausted", detail=str(e), images_per_s=None, ms_per_iteration=None,
                   peak_memory_bytes=mem.peak, peak_memory_kind=mem.kind)
        st = None
        free_memory(dev)
        return row
    total = sum(times)
    row.update(what=st.what, batch=st.batch, size=st.size, amp_bf16=st.amp, warmup=ctx.args.warmup,
               iters=len(times), ms_per_iteration=1000 * total / len(times), ms_per_iteration_min=1000 * min(times),
               images_per_s=st.batch * len(times) / total, peak_memory_bytes=mem.peak, peak_memory_kind=mem.kind)
    if mem.reserved is not None:
        row["peak_reserved_bytes"] = mem.reserved
    row.update(flop_fields(flops, flops_by_op, st, total / len(times), ctx.peak))
    for k, v in extras.items():
        row[k if k.endswith("_ms") else f"last_{k}"] = sum(v) / len(v) if k.endswith("_ms") else v[-1]
    row.update({k: v for k, v in st.info.items() if not k.startswith("_")})
    del st
    free_memory(dev)
    return row


# ---------------------------------------------------------------------------- disk budget
def disk_budget(args, config: dict, tmp: Path) -> dict:
    """Bytes per image of real CAM artifacts (save_maps) at ``args.size`` px, extrapolated to VOC and COCO."""
    from pnoc.io import save_maps

    g = torch.Generator().manual_seed(6)
    n_classes = N_CLASSES.get(config["dataset"]["name"], 20)
    scales = [float(s) for s in config["inference"]["scales"]]
    flip = bool(config["inference"]["flip"])
    out_dir = tmp / "cams"
    out_dir.mkdir()
    per_k, noise_k, write_s, n_written = {}, {}, 0.0, 0
    for k in (1, 2, 3):
        sizes, nsizes, zeros = [], [], []
        for i in range(args.disk_images):
            maps, lr = cam_like_maps(k, args.size, scales, flip, g)
            keys = np.sort(torch.randperm(n_classes, generator=g)[:k].numpy()) + 1
            p = out_dir / f"k{k}_{i}.npz"
            t0 = time.perf_counter()
            save_maps(p, maps, keys, lr=lr)
            write_s += time.perf_counter() - t0
            n_written += 1
            sizes.append(p.stat().st_size)
            zeros.append(float((maps == 0).mean()))
            q = out_dir / f"noise_k{k}_{i}.npz"
            noise, noise_lr = torch.rand(maps.shape, generator=g).numpy(), torch.rand(lr.shape, generator=g).numpy()
            save_maps(q, noise, keys, lr=noise_lr)
            nsizes.append(q.stat().st_size)
        per_k[str(k)] = {"bytes_mean": float(np.mean(sizes)), "bytes_min": int(min(sizes)),
                         "bytes_max": int(max(sizes)), "zero_fraction": float(np.mean(zeros)), "images": len(sizes)}
        noise_k[str(k)] = {"bytes_mean": float(np.mean(nsizes)), "images": len(nsizes)}
    ks = np.array([1.0, 2.0, 3.0])
    slope, intercept = np.polyfit(ks, [per_k[str(int(k))]["bytes_mean"] for k in ks], 1)
    noise_fit = np.polyfit(ks, [noise_k[str(int(k))]["bytes_mean"] for k in ks], 1)
    datasets = {}
    for name, n_img in IMAGES.items():
        mean_k = args.voc_classes if name.startswith("voc") else args.coco_classes
        b = float(intercept + slope * mean_k)
        datasets[name] = {"images": n_img, "assumed_mean_classes": mean_k, "bytes_per_image": b,
                          "total_gib": b * n_img / 2**30,
                          "total_gib_all_k1": per_k["1"]["bytes_mean"] * n_img / 2**30,
                          "total_gib_all_k3": per_k["3"]["bytes_mean"] * n_img / 2**30,
                          "total_gib_white_noise": float(np.polyval(noise_fit, mean_k)) * n_img / 2**30}
    return {
        "size": args.size, "writer": "pnoc.io.save_maps (float16 npz_compressed: maps (K,S,S), lr (K,S/4,S/4), keys)",
        "maps": "CAM-like: smooth objects (Gaussian blobs x low-frequency texture) through a stand-in stride-16 "
                "CAM network, merged by pnoc.cam.tta.tta_maps over the inference scales x flip, max_normalize",
        "scales": scales, "flip": flip, "per_classes": per_k, "white_noise_per_classes": noise_k,
        "uncompressed_float16_bytes_per_class": 2 * (args.size ** 2 + math.ceil(args.size / 4) ** 2),
        "fit_bytes": {"intercept": float(intercept), "per_class": float(slope)},
        "write_ms_per_image": 1000 * write_s / max(1, n_written), "datasets": datasets,
    }


# ---------------------------------------------------------------------------- output
def _mem(b) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _num(v, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


def flops_markdown(result: dict) -> list[str]:
    """The FLOP table: GFLOP per image, achieved TFLOP/s and the fraction of the device's peak of every stage."""
    peak = result["meta"].get("peak_tflops")
    if peak is None:
        head = "peak: unknown for this device (not in GPU_PEAKS; give --peak-tflops): no fraction"
    elif peak["source"] == "measured":
        head = f"peak ({peak['row']}): {peak['fp32']:.3g} TFLOP/s, the CPU's stand-in for both precisions"
    else:
        head = (f"peak ({peak['row']}, {peak['source']}): bf16 {peak['bf16']:g}, fp32 {peak['fp32']:g} TFLOP/s"
                + (f" (TF32 {peak['tf32']:g}: fp32 convolutions may run in TF32)" if peak.get("tf32") else ""))
    lines = ["", "### FLOPs (torch.utils.flop_counter, one iteration) and fraction of peak", "", head, "",
             "| stage | GFLOP/image | GFLOP/iteration | achieved TFLOP/s | peak TFLOP/s (precision) | fraction of peak |",
             "|---|---|---|---|---|---|"]
    notes = []
    for name, r in result["stages"].items():
        if r.get("error"):
            continue
        lines.append(f"| {name} | {r['gflop_per_image']:.3g} | {r['flops_per_iteration'] / 1e9:.3g} "
                     f"| {r['achieved_tflops']:.3g} | {_num(r['peak_tflops'])} ({r['peak_precision']}) "
                     f"| {_num(r['fraction_of_peak'])} |")
        if r.get("flops_note"):
            notes.append(f"{name}: {r['flops_note']}")
    lines += ["", "FLOPs: matmuls, convolutions and attention (forward + backward for train steps); element-wise "
                  "ops, norms, pooling, resampling and optimizer updates count 0. " + " ".join(notes)]
    return lines


def markdown(result: dict) -> str:
    m = result["meta"]
    amp = ("on where the stage's config says amp: true" if m["amp_available"]
           else "off (CPU: pnoc's autocast is a no-op)")
    lines = [
        f"## pnoc stage throughput ({m['config']}, {m['dataset']}, {m['n_classes']} classes)",
        "",
        (f"device: **{m['device_name']}** ({m['device']}); torch {m['torch']}; AMP (bf16 autocast): {amp}; "
         f"backbone {m['backbone']} (random weights); {m['warmup']} warm-up + {m['iters']} timed iterations per stage"),
        "",
        "| stage | one iteration | batch | px | AMP | ms/iteration | images/s | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    kinds, errors = set(), []
    for name, r in result["stages"].items():
        if r.get("error"):
            lines.append(f"| {name} | {r['error']} | | | | | | {_mem(r.get('peak_memory_bytes'))} |")
            detail = r.get("detail", "")
            errors.append(f"- {detail}" if detail.startswith(f"{name}:") else f"- {name}: {detail}")
            continue
        kinds.add(r["peak_memory_kind"])
        extra = f" (boundary {r['boundary_ms']:.0f} ms + walk {r['walk_ms']:.0f} ms)" if "walk_ms" in r else ""
        if r.get("accumulate", 1) > 1:
            extra += f" (optimizer step every {r['accumulate']})"
        precision = "bf16" if r["amp_bf16"] else "fp32"
        lines.append(f"| {name} | {r['what']}{extra} | {r['batch']} | {r['size']} | {precision} "
                     f"| {r['ms_per_iteration']:.1f} | {r['images_per_s']:.2f} | {_mem(r['peak_memory_bytes'])} |")
    lines += ["", f"peak memory: {'; '.join(sorted(kinds)) or 'n/a'}"]
    if errors:
        lines += ["", "stages not measured:", *errors]
    lines += flops_markdown(result)
    d = result.get("disk_budget")
    if d:
        lines += ["", f"### CAM artifacts at {d['size']} px ({d['writer']})", "",
                  "| classes per image | bytes/image (CAM-like) | zero share | bytes/image (white noise) |",
                  "|---|---|---|---|"]
        for k, v in d["per_classes"].items():
            lines.append(f"| {k} | {v['bytes_mean']:.0f} | {v['zero_fraction']:.2f} | "
                         f"{d['white_noise_per_classes'][k]['bytes_mean']:.0f} |")
        lines += ["",
                  "| train set | images | assumed classes/image | bytes/image | total GiB | all K=1 .. all K=3 GiB |",
                  "|---|---|---|---|---|---|"]
        for name, v in d["datasets"].items():
            lines.append(f"| {name} | {v['images']} | {v['assumed_mean_classes']} | {v['bytes_per_image']:.0f} | "
                         f"{v['total_gib']:.2f} | {v['total_gib_all_k1']:.2f} .. {v['total_gib_all_k3']:.2f} |")
        lines += ["", f"save_maps: {d['write_ms_per_image']:.1f} ms per image on the host (zlib); maps: {d['maps']}"]
    return "\n".join(lines)


def _shown(path: Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "voc12.yaml",
                    help="overlay on config.yaml whose sections give batch sizes, scales, walk settings")
    ap.add_argument("--size", type=int, default=None, help="image / crop side in px (default 512)")
    ap.add_argument("--ccam-crop", type=int, default=None,
                    help="C2AM-H crop (default: saliency.ccam.crop of the config, 448 at VOC; 0 = --size)")
    ap.add_argument("--backbone", default=None, help="default resnest269")
    ap.add_argument("--batch", type=int, default=None, help="batch of every stage (default: each section's batch_size)")
    ap.add_argument("--labels", type=int, default=2,
                    help="positive classes per image: training labels, TTA maps kept, walk seed maps")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations per stage (default 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per stage (default 10)")
    ap.add_argument("--disk-images", type=int, default=None, help="artifacts written per class count (default 8)")
    ap.add_argument("--voc-classes", type=float, default=1.5, help="assumed mean classes per VOC train_aug image")
    ap.add_argument("--coco-classes", type=float, default=2.9, help="assumed mean classes per COCO train image")
    ap.add_argument("--no-disk", action="store_true", help="skip the disk budget")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                    help="skip the memory check before each stage (a stage that needs more memory than the process "
                         "may use is reported and skipped: see check_memory; PNOC_MEM_LIMIT_MB sets that limit)")
    ap.add_argument("--speed", type=_speed_setting, action="append", default=[], metavar="KEY=true|false",
                    help=f"override a key of the config's speed group for the training stages ({', '.join(SPEED_KEYS)}); "
                         "repeatable")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for the fraction of peak (default: the datasheet row of a known "
                         "GPU, a timed fp32 matmul on the CPU)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--tiny", action="store_true",
                    help=f"CPU-test preset: {TINY} (explicit flags still win); C2AM-H at --size")
    args = ap.parse_args(argv)

    preset = TINY if args.tiny else {"backbone": "resnest269", "size": 512, "batch": None, "warmup": 2, "iters": 10,
                                     "disk_images": 8}
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.tiny and args.ccam_crop is None:
        args.ccam_crop = 0
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"--stages: unknown {bad}; choose from {','.join(STAGES)}")
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    if args.size % 2:
        ap.error("--size must be even (Puzzle tiles the image 2x2)")

    from pnoc.training import resolve_device, set_threads

    set_threads(args.threads)
    device = resolve_device(args.device)
    config = load_config(args.config)
    result = {"meta": {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
                       "cuda": torch.version.cuda, "amp_available": device.type == "cuda",
                       "config": _shown(args.config),
                       "dataset": config["dataset"]["name"], "backbone": args.backbone, "size": args.size,
                       "warmup": args.warmup, "iters": args.iters, "labels_per_image": args.labels,
                       "tiny": bool(args.tiny), "threads": torch.get_num_threads()},
              "stages": {}}
    with tempfile.TemporaryDirectory(prefix="pnoc-bench-") as d:
        ctx = Context(args, config, device, Path(d))
        result["meta"]["n_classes"] = ctx.n_classes
        ctx.peak = device_peak(device, args.peak_tflops)
        result["meta"]["peak_tflops"] = ctx.peak
        result["meta"]["speed"] = ctx.speed
        for name in stages:
            result["stages"][name] = time_stage(name, ctx)
        if not args.no_disk:
            result["disk_budget"] = disk_budget(args, config, Path(d))
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


if __name__ == "__main__":
    main()
