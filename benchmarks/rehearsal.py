"""Whole-chain rehearsal: every rule of the VOC chain through Snakemake, timed, and extrapolated to VOC and COCO.

Writes a VOC-shaped dataset into ``<work>/VOC2012`` (VOC layout: ``JPEGImages/``, palette masks in
``SegmentationClass/`` with a 255 band along object edges, VOC XML labels in ``Annotations/``,
``ImageSets/Segmentation/{train_aug,train,val}.txt`` in VOC's proportions, train a subset of train_aug; the 20 VOC
classes as simple shapes of class-specific colour and stripes on textured backgrounds; image sizes like VOC's,
mostly 500 px on the long side), then runs the default target of ``config/voc12.yaml`` (``dataset.name: voc12``:
ResNeSt-269, 512 px crops, bf16 autocast on the GPU, TTA, the walk at VOC size) with two departures, written as a
config overlay (``<work>/rehearsal.yaml``): **one epoch** per training stage and **random weights** (``weights:
none``; ImageNet weights are not reachable). Jobs run one at a time (``--default-resources serial=1 --resources
serial=1``), so each job's wall time is its own.

Per job it measures, from outside the rules (nothing is added to them):

* **wall time**: Snakemake's job records (``<work>/.snakemake/metadata``): start = when Snakemake marked the job's
  outputs incomplete, right before starting it; end = the last write of an output or of the job's log;
* **loop time** and **images/s**: the stage's own timer (training: ``epoch_seconds`` of its metrics.json, written by
  ``pnoc.training.EpochRunner``; per-image stages: ``seconds`` of the folder's ``_info.json`` / ``summary.json``),
  else the wall time less the interpreter start-up (``python -c "import torch, pnoc.training"``, timed once);
* **peak GPU memory**: ``peak_gpu_allocated_mib`` of the stage's metrics (``pnoc.training.peak_memory``:
  ``torch.cuda.max_memory_allocated``; the GPU stages write it, the CPU-only ones have none);
* **peak host memory**: the largest sum of the proportional set sizes (``/proc/<pid>/smaps_rollup`` Pss) of the
  job's processes (the stage and its forked workers), sampled every 0.5 s;
* the job's **declared runtime limit** (minutes), from a dry run of the same command.

**Extrapolation** to the full chains of ``config/voc12.yaml`` and ``config/coco14.yaml`` (each over config.yaml):
a job's time = overhead + loop × (images × passes of the full job) / (images × passes here) × size ratio, where the
overhead (wall − loop) is start-up, model loading and saving, not scaled; passes are the section's epochs for the
training rules (the epoch time, evaluation and checkpoint included, scales with the images: an overestimate where an
evaluation reads a fixed number of images) and 1 otherwise; the size ratio is (full crop / crop here)² for training
and (full mean megapixels / mean here) for the per-image rules. Full splits: VOC train_aug 10,582, train 1,464, val
1,449; COCO train2014 82,783, val2014 40,504, mapped by role (train_split / eval_split / val_split; COCO evaluates on
val2014, so VOC's jobs on train and on val are one COCO job). Mean image size assumed: VOC 0.18, COCO 0.28
megapixels. COCO's 80 classes (more per image: larger CAM files, CRFs over more labels) are not modelled.

**One GPU**: the jobs one after another (their sum; jobs that could overlap are not overlapped). **A 4-GPU node**
(``config/gpus4.yaml``): a training job = overhead + scaled loop / (processes × ``--ddp-efficiency``, assumed 0.9,
not measured), with 4 processes (train_poolnet 2); a per-image stage of ``resources.shards`` (8) shards on the 4
GPUs = ⌈8 / 4⌉ × overhead + scaled loop / 4; the gather jobs (hard links) are left out; other jobs unchanged. The
table shows each job's extrapolated time beside the limit the workflow declares for the full job (⚠ where it does
not fit). Per per-image rule, the measured seconds per megapixel are listed beside ``resources.cost_s_per_mpx``.

Usage::

    python benchmarks/rehearsal.py                       # the GPU rehearsal (device auto), 80 VOC-sized images
    python benchmarks/rehearsal.py --device cuda --images 80 --out rehearsal.json
    python benchmarks/rehearsal.py --tiny --device cpu   # the suite's preset: 24 small images, resnet18_w8
    python benchmarks/rehearsal.py --device cpu --images 30 --configfile config/cpu.yaml   # the CPU regime's costs

Prints the tables as markdown and writes every figure to ``--out`` (JSON). docs/rehearsal.md explains the table.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from pnoc.data.datasets import VOC_CLASSES
from pnoc.io import voc_palette

VOC_SPLITS = {"train_aug": 10_582, "train": 1_464, "val": 1_449}
COCO_SPLITS = {"train2014": 82_783, "val2014": 40_504}
MEAN_MPX = {"voc12": 0.18, "coco14": 0.28}  # assumed mean image size of the real datasets (megapixels)
# training rule -> its config section (the keys of the section's epochs and crop)
TRAIN_SECTIONS = {
    "pretrain_backbone": ("pretrain",),
    "train_classifier": ("classifier",),
    "train_cam": ("cam",),
    "train_ccam": ("saliency", "ccam"),
    "train_poolnet": ("saliency", "poolnet"),
    "train_affinity": ("affinity", "train"),
    "train_segmentation": ("segmentation",),
}
WEIGHT_SECTIONS = (("classifier",), ("saliency", "ccam"), ("saliency", "poolnet"), ("affinity", "train"),
                   ("segmentation",))
# per-image rules that run as resources.shards jobs (workflow/rules/common.smk SHARDED_RULES)
SHARDED_RULES = ("infer_cams", "infer_saliency", "infer_poolnet", "make_affinity_labels", "propagate",
                 "make_pseudo_masks", "infer_segmentation")
SPLIT_FLAGS = ("--split", "--select-split", "--eval-split")
# train_aug 70 (C²AM-H trains on batches of 64, the last partial one dropped), train 10, val 10: about 7 min on one
# H200, two thirds of it the 46 jobs' start-up (docs/rehearsal.md)
DEFAULT_IMAGES = 80
TINY_IMAGES = 24
POLL_S = 0.5


# ---------------------------------------------------------------------------------------------- configuration
def merge(base: dict, over: dict) -> dict:
    """``over`` laid over ``base`` as Snakemake lays a ``--configfile`` over config.yaml (dicts merge, lists
    replace)."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(*files) -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    for f in files:
        cfg = merge(cfg, f if isinstance(f, dict) else yaml.safe_load(Path(f).read_text()))
    return cfg


def section(cfg: dict, path: tuple) -> dict:
    for k in path:
        cfg = cfg[k]
    return cfg


def nested(path: tuple, value: dict) -> dict:
    for k in reversed(path):
        value = {k: value}
    return value


def overlay(work: Path, device: str, tiny: bool) -> dict:
    """The rehearsal's departures from config/voc12.yaml: one epoch, random weights, its own folders (and, tiny,
    the small sizes and the narrow backbone that 2 CPU cores can run)."""
    over = {"results": str(work / "results"), "device": device,
            "dataset": {"name": "voc12", "root": str(work / "VOC2012")}}
    if device == "cpu":
        over["resources"] = {"gpu": 0}  # no GPU to declare
    for path in TRAIN_SECTIONS.values():
        if path != ("pretrain",):
            over = merge(over, nested(path, {"epochs": 1}))
    for path in WEIGHT_SECTIONS:
        over = merge(over, nested(path, {"weights": "none"}))
    if tiny:
        small = {"crop": 64, "resize_min": 48, "resize_max": 96}
        narrow = {"backbone": "resnet18_w8"}
        over = merge(over, {
            "workers": 0,
            "classifier": {**narrow, **small, "batch_size": 4},
            "cam": {**small, "batch_size": 4, "epoch_eval_images": 4},
            "inference": {"batch_size": 4},
            "saliency": {"ccam": {**narrow, "crop": 64, "resize_min": 72, "resize_max": 72, "batch_size": 8,
                                  "epoch_eval_images": 4, "direction_images": 8},
                         "poolnet": {**narrow, "width": 16, "crop": 64, "batch_size": 2},
                         "inference": {"batch_size": 4}},
            "affinity": {"train": {**narrow, **small, "batch_size": 4}},
            "segmentation": {**narrow, **small, "batch_size": 4, "aspp_channels": 16, "decoder_low_channels": 8,
                             "decoder_channels": 16, "agreement_images": 4},
            "report": {"images": 2, "cell": 64},
            "resources": {"threads": 1},  # two one-thread jobs at a time on 2 cores (--concurrent)
        })
    return over


# ---------------------------------------------------------------------------------------------- the dataset
def split_counts(n_images: int) -> dict[str, int]:
    """train_aug / train / val image counts in VOC's proportions (train is a subset of train_aug)."""
    n_val = max(2, round(n_images * VOC_SPLITS["val"] / (VOC_SPLITS["train_aug"] + VOC_SPLITS["val"])))
    n_aug = n_images - n_val
    n_train = max(2, round(n_aug * VOC_SPLITS["train"] / VOC_SPLITS["train_aug"]))
    return {"train_aug": n_aug, "train": n_train, "val": n_val}


def _class_look(c: int) -> dict:
    """A class's appearance: hue, shape, stripe period and angle (fixed per class)."""
    import colorsys

    rgb = np.array(colorsys.hsv_to_rgb((c * 7 % 20) / 20, 0.75, 0.9)) * 255
    return {"rgb": rgb, "shape": c % 4, "period": 5 + (c * 3) % 9, "angle": np.deg2rad((c * 37) % 180)}


def _shape_mask(kind: int, yy, xx, cy, cx, ry, rx, rot) -> np.ndarray:
    y, x = yy - cy, xx - cx
    u = (x * np.cos(rot) + y * np.sin(rot)) / rx
    v = (-x * np.sin(rot) + y * np.cos(rot)) / ry
    if kind == 0:  # ellipse
        return u * u + v * v <= 1
    if kind == 1:  # rectangle
        return (np.abs(u) <= 1) & (np.abs(v) <= 0.7)
    if kind == 2:  # triangle
        return (v <= 0.8) & (v >= 2 * np.abs(u) - 1.2)
    return np.abs(u) + np.abs(v) <= 1  # diamond


def render(rng: np.random.Generator, h: int, w: int, band: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One image (h, w, 3) uint8, its mask (0 background, 1..20, 255 along object edges) and its classes."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    c0, c1 = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / max(h, w)
    img = c0 + (c1 - c0) * ((t - t.min()) / max(np.ptp(t), 1e-6))[..., None]
    blobs = ndimage.gaussian_filter(rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3)), 1.5)
    img += 40 * np.kron(blobs, np.ones((8, 8, 1)))[:h, :w]
    mask = np.zeros((h, w), np.uint8)
    n_obj = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    short = min(h, w)
    for c in rng.choice(len(VOC_CLASSES), n_obj, replace=False):
        look = _class_look(int(c))
        ry = rng.uniform(0.15, 0.35) * short
        rx = ry * rng.uniform(0.7, 1.4)
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        m = _shape_mask(look["shape"], yy, xx, cy, cx, ry, rx, rng.uniform(0, np.pi))
        stripes = np.sin((xx * np.cos(look["angle"]) + yy * np.sin(look["angle"])) * 2 * np.pi / look["period"])
        shade = 0.75 + 0.25 * stripes[..., None]
        img[m] = (look["rgb"] * shade[m]).astype(np.float32)
        mask[m] = c + 1
    img += rng.normal(0, 8, img.shape)
    if band:  # VOC's void band along every object edge
        size = 2 * band + 1
        edge = (ndimage.maximum_filter(mask, size) != ndimage.minimum_filter(mask, size))
        mask[edge] = 255
    present = sorted(int(v) - 1 for v in np.unique(mask) if 0 < v < 255)
    return np.clip(img, 0, 255).astype(np.uint8), mask, present


def annotation_xml(image_id: str, h: int, w: int, mask: np.ndarray, classes: list[int]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for k, v in (("width", w), ("height", h), ("depth", 3)):
        ET.SubElement(size, k).text = str(v)
    ET.SubElement(root, "segmented").text = "1"
    for c in classes:
        ys, xs = np.nonzero(mask == c + 1)
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = VOC_CLASSES[c]
        for k, v in (("pose", "Unspecified"), ("truncated", 0), ("difficult", 0)):
            ET.SubElement(obj, k).text = str(v)
        box = ET.SubElement(obj, "bndbox")
        for k, v in (("xmin", xs.min() + 1), ("ymin", ys.min() + 1), ("xmax", xs.max() + 1), ("ymax", ys.max() + 1)):
            ET.SubElement(box, k).text = str(int(v))
    return ET.tostring(root)


def image_size(rng: np.random.Generator, tiny: bool) -> tuple[int, int]:
    """(h, w) like VOC's: mostly 500 px on the long side, 375 or 333 on the short one, some others; 3 in 4
    landscape. Tiny: a long side of 128 px."""
    if tiny:
        long, short = 128, int(rng.integers(80, 129))
    else:
        long = 500 if rng.random() < 0.85 else int(rng.integers(330, 500))
        short = int(rng.choice([375, 333, int(rng.integers(280, 500))], p=[0.5, 0.2, 0.3]))
        short = min(short, long)
    return (short, long) if rng.random() < 0.75 else (long, short)


def write_voc(root: Path, n_images: int, tiny: bool, seed: int = 0) -> dict:
    """The VOC-shaped dataset; returns its split lists and mean megapixels per split."""
    counts = split_counts(n_images)
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pal = voc_palette().reshape(-1).tolist()
    rng = np.random.default_rng(seed)
    aug = [f"2012_{k:06d}" for k in range(counts["train_aug"])]
    val = [f"2012_{k:06d}" for k in range(counts["train_aug"], n_images)]
    step = len(aug) / counts["train"]
    splits = {"train_aug": aug, "train": [aug[int(i * step)] for i in range(counts["train"])], "val": val}
    mpx = {}
    for image_id in aug + val:
        h, w = image_size(rng, tiny)
        img, mask, classes = render(rng, h, w, band=1 if tiny else 2)
        Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        m = Image.fromarray(mask, mode="P")
        m.putpalette(pal)
        m.save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "Annotations" / f"{image_id}.xml").write_bytes(annotation_xml(image_id, h, w, mask, classes))
        mpx[image_id] = h * w / 1e6
    for name, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return {"splits": {k: len(v) for k, v in splits.items()},
            "mean_mpx": {k: float(np.mean([mpx[i] for i in v])) for k, v in splits.items()}}


# ---------------------------------------------------------------------------------------------- running
def venv_env(mark: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PNOC_REHEARSAL"] = mark
    env.setdefault("PYTHONUNBUFFERED", "1")
    if shutil.which("scontrol") and not any(p.read_text().strip() == "slurmctld"
                                            for p in Path("/proc").glob("[0-9]*/comm") if _readable(p)):
        env["SLURM_CONF"] = os.devnull  # the SLURM plugin's `scontrol show config` would wait ~10 s per call
    return env


def _readable(p: Path) -> bool:
    try:
        p.read_text()
        return True
    except OSError:
        return False


def snakemake_cmd(work: Path, configfiles: list[Path], cores: int, concurrent: int) -> list[str]:
    exe = Path(sys.executable).parent / "snakemake"
    head = [str(exe)] if exe.is_file() else [sys.executable, "-m", "snakemake"]
    return [*head, "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
            "--configfile", *map(str, configfiles), "--cores", str(cores),
            # `concurrent` jobs at a time (1: each job's wall time and memory are its own), one GPU job at a time
            "--default-resources", "serial=1", "--resources", f"serial={concurrent}", "gpu=1"]


def declared_resources(dry_run: str) -> dict[str, dict]:
    """Log path -> {"rule", "runtime", "mem_mb"} of every job of a dry run's output."""
    out, cur = {}, None
    for ln in dry_run.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", ln)
        if m:
            cur = {"rule": m.group(1)}
            continue
        if cur is None:
            continue
        if not ln.strip():
            cur = None
            continue
        key, _, val = ln.strip().partition(": ")
        if key == "log":
            cur["log"] = val.split(", ")[0]
            out[cur["log"]] = cur
        elif key == "resources":
            for item in val.split(", "):
                k, _, v = item.partition("=")
                if k in ("runtime", "mem_mb") and re.fullmatch(r"[0-9.]+", v):
                    cur[k] = float(v)
    return out


class MemoryPoller:
    """Largest sum of the proportional set sizes of each pnoc stage process and its forked children, sampled."""

    def __init__(self, mark: str):
        self.mark = f"PNOC_REHEARSAL={mark}".encode()
        self.peaks: dict[int, dict] = {}  # main pid -> {"cmdline", "start" (epoch s), "pss_mib"}
        self.boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                         if ln.startswith("btime"))
        self.tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.sample()
            except Exception:  # a process ended mid-read: next round
                pass

    def sample(self) -> None:
        procs = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if self.mark not in (d / "environ").read_bytes().split(b"\0"):
                    continue
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                ppid, start = int(stat[1]), self.boot + int(stat[19]) / self.tick
                pss = 0
                for line in (d / "smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
                        break
            except (OSError, ValueError, IndexError):
                continue
            procs[int(d.name)] = (ppid, cmd, pss, start)
        totals: dict[int, int] = {}
        for pid, (ppid, cmd, pss, _) in procs.items():
            main, seen = None, set()
            p = pid
            while p in procs and p not in seen:  # the outermost pnoc stage process above this one
                seen.add(p)
                if " -m pnoc." in procs[p][1]:
                    main = p
                p = procs[p][0]
            if main is not None:
                totals[main] = totals.get(main, 0) + pss
        for main, total in totals.items():
            rec = self.peaks.setdefault(main, {"cmdline": procs[main][1], "start": procs[main][3], "pss_mib": 0.0})
            rec["pss_mib"] = max(rec["pss_mib"], total / 2**20)


def startup_seconds(env: dict) -> float:
    """Wall time of a bare stage start: the interpreter importing torch and pnoc (second of two runs)."""
    cmd = [sys.executable, "-c", "import torch, pnoc.training"]
    subprocess.run(cmd, env=env, check=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t0


def _decode_key(rel: Path) -> str:
    b64 = "".join(p[1:] if p.startswith("@") else p for p in rel.parts)
    return base64.urlsafe_b64decode(b64.encode()).decode()


def snakemake_jobs(work: Path) -> list[dict]:
    """Every job of the run from Snakemake's records: rule, outputs, log, shell command, start and end (epoch s)."""
    meta = work / ".snakemake" / "metadata"
    jobs: dict[tuple, dict] = {}
    for f in sorted(meta.rglob("*")):
        if not f.is_file():
            continue
        rec = json.loads(f.read_text())
        if not rec.get("rule") or rec.get("starttime") is None:
            continue
        out = _decode_key(f.relative_to(meta))
        log = tuple(rec.get("log") or ())
        j = jobs.setdefault((rec["rule"], log or (out,)), {
            "rule": rec["rule"], "log": list(log), "outputs": [], "shellcmd": rec.get("shellcmd") or "",
            "start": math.inf, "end": 0.0})
        j["outputs"].append(out)
        j["start"] = min(j["start"], rec["starttime"])
        j["end"] = max(j["end"], rec["endtime"] or 0.0)
    for j in jobs.values():
        for lg in j["log"]:
            p = Path(lg) if Path(lg).is_absolute() else work / lg
            if p.is_file():
                j["end"] = max(j["end"], p.stat().st_mtime)
        j["wall_s"] = j["end"] - j["start"]
    return sorted(jobs.values(), key=lambda j: j["start"])


# ---------------------------------------------------------------------------------------------- measurements
def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stage_record(job: dict, work: Path) -> dict:
    """The stage's own figures: metrics.json of a training / evaluation job, else the folder's summary."""
    for out in job["outputs"]:
        p = Path(out) if Path(out).is_absolute() else work / out
        if p.is_dir():
            for name in ("_info.json", "summary.json"):
                if (p / name).is_file():
                    return _json(p / name)
        elif p.name == "metrics.json":
            return _json(p)
    return {}


def job_splits(job: dict) -> list[str]:
    """Splits whose images the job reads (training: its training split; walk_share: selection and evaluation)."""
    try:
        tokens = shlex.split(job["shellcmd"])
    except ValueError:
        tokens = job["shellcmd"].split()
    flags = ("--split",) if job["rule"] in TRAIN_SECTIONS else SPLIT_FLAGS
    return list(dict.fromkeys(tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in flags))


def job_label(job: dict, results: str) -> str:
    """A short name of the job: the folder of its outputs (their common path) relative to the results folder."""
    outs = [os.path.relpath(o, results) if os.path.isabs(o) else o for o in job["outputs"]]
    if len(outs) == 1:
        return outs[0]
    return os.path.commonpath(outs) or outs[0]


def measure(jobs: list[dict], work: Path, run_cfg: dict, data: dict, startup: float, declared: dict,
            memory: dict[int, dict]) -> None:
    """Fill each job with its images × passes, loop seconds, images/s, peak memory and declared limit."""
    for j in jobs:
        rec = stage_record(j, work)
        j["splits"] = job_splits(j)
        j["passes"] = section(run_cfg, TRAIN_SECTIONS[j["rule"]])["epochs"] if j["rule"] in TRAIN_SECTIONS else 1
        j["images"] = sum(data["splits"].get(s, 0) for s in j["splits"])
        j["megapixels"] = sum(data["splits"].get(s, 0) * data["mean_mpx"].get(s, 0) for s in j["splits"])
        if j["rule"] in TRAIN_SECTIONS and rec.get("epoch_seconds"):
            j["loop_s"], j["loop_source"] = float(sum(rec["epoch_seconds"])), "epoch_seconds"
        elif isinstance(rec.get("seconds"), (int, float)):
            j["loop_s"], j["loop_source"] = float(rec["seconds"]), "seconds"
        else:
            j["loop_s"], j["loop_source"] = max(0.0, j["wall_s"] - startup), "wall - start-up"
        j["loop_s"] = min(j["loop_s"], j["wall_s"])
        j["overhead_s"] = j["wall_s"] - j["loop_s"]
        units = j["images"] * j["passes"]
        j["images_per_s"] = units / j["loop_s"] if units and j["loop_s"] > 0 else None
        j["peak_gpu_mib"] = rec.get("peak_gpu_allocated_mib")
        j["peak_gpu_reserved_mib"] = rec.get("peak_gpu_reserved_mib")
        # the job's processes: started while it ran, with one of its outputs on their command line
        pss = [m["pss_mib"] for m in memory.values() if j["start"] - 1 <= m["start"] <= j["end"]
               and any(o in m["cmdline"] for o in j["outputs"])]
        j["peak_host_mib"] = max(pss) if pss else None
        d = next((declared[lg] for lg in j["log"] if lg in declared), {})
        j["declared_runtime_min"] = d.get("runtime")
        j["declared_mem_mb"] = d.get("mem_mb")


# ---------------------------------------------------------------------------------------------- extrapolation
def target_spec(name: str, cfg: dict, run_cfg: dict, gpus4: dict) -> dict:
    ds = cfg["dataset"]
    counts = VOC_SPLITS if cfg["dataset"]["name"] == "voc12" else COCO_SPLITS
    run_ds = run_cfg["dataset"]
    roles = {}
    # a split the run reads in two roles maps to the first (train_split before eval_split before val_split)
    for k in ("val_split", "eval_split", "train_split"):
        roles[run_ds[k]] = ds[k]
    return {"name": name, "cfg": cfg, "counts": counts, "roles": roles, "mean_mpx": MEAN_MPX[ds["name"]],
            "gpus_per_job": gpus4["resources"]["gpus_per_job"], "gpus_per_rule": gpus4["resources"]["gpus_per_rule"],
            "shards": gpus4["resources"]["shards"]}


def per_image_runtime(res: dict, rule: str, megapixels: float, attempt: int = 1) -> int:
    """The limit workflow/rules/common.smk (per_image_runtime) declares for a per-image job reading ``megapixels``."""
    scaled = res["runtime_margin"] * res["cost_s_per_mpx"][rule] * megapixels / 60
    return attempt * math.ceil(round(res["infer_runtime_min"] + scaled, 6))


def extrapolate(job: dict, spec: dict, run_cfg: dict, ddp_efficiency: float, results: str) -> dict | None:
    """The job in the full chain of ``spec``: its key there, seconds on one GPU and on a 4-GPU node, declared limits."""
    cfg, rule = spec["cfg"], job["rule"]
    splits = list(dict.fromkeys(spec["roles"].get(s, s) for s in job["splits"]))
    parts = []
    for comp in Path(job_label(job, results)).parts:  # the job's identity in the target chain
        parts.append(spec["roles"].get(comp, comp))
    key = (rule, *parts)
    n_full = [spec["counts"].get(s, 0) for s in splits]
    if rule in TRAIN_SECTIONS:
        sec_run, sec_full = section(run_cfg, TRAIN_SECTIONS[rule]), section(cfg, TRAIN_SECTIONS[rule])
        units = sum(n_full) * sec_full["epochs"]
        size = (sec_full["crop"] / sec_run["crop"]) ** 2 if sec_run.get("crop") and sec_full.get("crop") else 1.0
    else:
        units = sum(n_full)
        size = spec["mean_mpx"] / (job["megapixels"] / job["images"]) if job["images"] else 1.0
    run_units = job["images"] * job["passes"]
    per_image = rule in TRAIN_SECTIONS or rule in run_cfg["resources"].get("cost_s_per_mpx", {})
    if not per_image or not run_units:  # summary, report tables, gallery: the same work whatever the data size
        scaled = job["loop_s"]
    else:
        scaled = job["loop_s"] * units / run_units * size
    one = job["overhead_s"] + scaled
    res = cfg["resources"]
    if rule in TRAIN_SECTIONS:
        procs = spec["gpus_per_rule"].get(rule, spec["gpus_per_job"])
        node = job["overhead_s"] + scaled / (procs * ddp_efficiency)
        limit = limit4 = res["train_runtime_min"]
    elif rule in res["cost_s_per_mpx"]:
        mpx = sum(n_full) * spec["mean_mpx"]
        limit = per_image_runtime(res, rule, mpx)
        if rule in SHARDED_RULES:
            k = spec["shards"]
            lanes = min(k, spec["gpus_per_job"])
            node = math.ceil(k / lanes) * job["overhead_s"] + scaled / lanes
            limit4 = per_image_runtime(res, rule, sum(-(-n // k) for n in n_full) * spec["mean_mpx"])
        else:
            node, limit4 = one, limit
    else:
        node = one
        limit = limit4 = job["declared_runtime_min"]
    return {"key": list(key), "images": sum(n_full), "passes": units // max(1, sum(n_full)) if n_full else 1,
            "one_gpu_s": one, "node4_s": node, "limit_min": limit, "limit4_min": limit4}


def extrapolate_all(jobs: list[dict], spec: dict, run_cfg: dict, ddp_efficiency: float, results: str) -> dict:
    seen, total1, total4 = set(), 0.0, 0.0
    for j in jobs:
        e = extrapolate(j, spec, run_cfg, ddp_efficiency, results)
        dup = tuple(e["key"]) in seen
        seen.add(tuple(e["key"]))
        e["duplicate"] = dup  # the same job of the target chain as an earlier one (COCO: eval split = val split)
        j[spec["name"]] = e
        if not dup:
            total1 += e["one_gpu_s"]
            total4 += e["node4_s"]
    return {"one_gpu_s": total1, "node4_s": total4}


# ---------------------------------------------------------------------------------------------- report
def fmt_s(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def fmt_limit(seconds: float | None, limit_min: float | None) -> str:
    if limit_min is None:
        return "–"
    flag = " ⚠" if seconds is not None and seconds > 60 * limit_min else ""
    return f"{limit_min:.0f} min{flag}"


def markdown(result: dict) -> str:
    meta, jobs = result["meta"], result["jobs"]
    lines = [
        f"Rehearsal on {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
        f"{meta['images']} images ({', '.join(f'{k} {v}' for k, v in meta['splits'].items())}), mean "
        f"{meta['mean_mpx']:.3f} Mpx, {'tiny preset' if meta['tiny'] else 'config/voc12.yaml'}, one epoch, "
        f"weights: none; {meta['cores']} cores, {meta['concurrent']} job(s) at a time; snakemake elapsed "
        f"{fmt_s(meta['elapsed_s'])}, "
        f"start-up of a stage {meta['startup_s']:.1f} s.",
        "",
        "| rule | job | images × passes | wall | limit | img/s | peak GPU | peak host | VOC, 1 GPU | VOC limit | "
        "COCO, 1 GPU | COCO limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for j in jobs:
        voc, coco = j["voc12"], j["coco14"]
        gib = lambda v: f"{v / 1024:.2f} GiB" if v is not None else "–"  # noqa: E731
        ips = f"{j['images_per_s']:.1f}" if j["images_per_s"] else "–"
        lines.append(
            f"| {j['rule']} | {j['label']} | {j['images']} × {j['passes']} | {fmt_s(j['wall_s'])} | "
            f"{fmt_limit(j['wall_s'], j['declared_runtime_min'])} | {ips} | {gib(j['peak_gpu_mib'])} | "
            f"{gib(j['peak_host_mib'])} | {fmt_s(voc['one_gpu_s'])} | "
            f"{fmt_limit(voc['one_gpu_s'], voc['limit_min'])} | "
            + ("(= above) | |" if coco["duplicate"] else
               f"{fmt_s(coco['one_gpu_s'])} | {fmt_limit(coco['one_gpu_s'], coco['limit_min'])} |"))
    t = result["totals"]
    lines += [
        "",
        "| time to result | this rehearsal | full VOC (voc12.yaml) | full COCO (coco14.yaml) |",
        "|---|---|---|---|",
        f"| one GPU, jobs one after another | {fmt_s(t['rehearsal_s'])} (elapsed {fmt_s(meta['elapsed_s'])}) | "
        f"{fmt_s(t['voc12']['one_gpu_s'])} | {fmt_s(t['coco14']['one_gpu_s'])} |",
        f"| a 4-GPU node (gpus4.yaml: DDP ×4 at {meta['ddp_efficiency']:.0%} efficiency, 8 shards) | | "
        f"{fmt_s(t['voc12']['node4_s'])} | {fmt_s(t['coco14']['node4_s'])} |",
        "",
        "| per-image rule | jobs | megapixels read | loop | s / Mpx measured | resources.cost_s_per_mpx (run config) |",
        "|---|---|---|---|---|---|",
    ]
    for rule, c in result["costs"].items():
        lines.append(f"| {rule} | {c['jobs']} | {c['megapixels']:.2f} | {fmt_s(c['loop_s'])} | "
                     f"{c['s_per_mpx']:.2f} | {c['configured']} |")
    return "\n".join(lines) + "\n"


def costs(jobs: list[dict], run_cfg: dict) -> dict:
    out = {}
    configured = run_cfg["resources"].get("cost_s_per_mpx", {})
    for j in jobs:
        if j["rule"] not in configured or not j["megapixels"]:
            continue
        c = out.setdefault(j["rule"], {"jobs": 0, "megapixels": 0.0, "loop_s": 0.0})
        c["jobs"] += 1
        c["megapixels"] += j["megapixels"]
        c["loop_s"] += j["loop_s"]
    for rule, c in out.items():
        c["s_per_mpx"] = c["loop_s"] / c["megapixels"]
        c["configured"] = configured[rule]
    return out


def device_info(device: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return device, torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "CPU"
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return device, model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (the config's device)")
    ap.add_argument("--tiny", action="store_true", help="small images, resnet18_w8, small batches (the CPU test)")
    ap.add_argument("--images", type=int, default=None,
                    help=f"images in all (default {DEFAULT_IMAGES}; tiny {TINY_IMAGES}), split as VOC's")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default results-rehearsal[-tiny]/); "
                    "its dataset, results and .snakemake are made anew")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="snakemake --cores")
    ap.add_argument("--concurrent", type=int, default=None,
                    help="jobs at a time (default 1: each job's time is its own; tiny 2, with 1 thread a job)")
    ap.add_argument("--configfile", type=Path, nargs="*", default=[],
                    help="more overlays between config/voc12.yaml and the rehearsal's (e.g. config/cpu.yaml)")
    ap.add_argument("--ddp-efficiency", type=float, default=0.9, help="assumed speedup per process of DDP (4-GPU node)")
    ap.add_argument("--out", type=Path, default=None, help="JSON of every figure (default <work>/rehearsal.json)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    device, device_name = device_info(a.device)
    n_images = a.images or (TINY_IMAGES if a.tiny else DEFAULT_IMAGES)
    work = (a.work or ROOT / ("results-rehearsal-tiny" if a.tiny else "results-rehearsal")).resolve()
    out = a.out or work / "rehearsal.json"
    if work.exists():
        for sub in ("VOC2012", "results", ".snakemake"):
            shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    data = write_voc(work / "VOC2012", n_images, a.tiny, a.seed)
    print(f"[rehearsal] wrote {n_images} VOC-shaped images ({data['splits']}) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    over = overlay(work, device, a.tiny)
    over_path = work / "rehearsal.yaml"
    over_path.write_text("# written by benchmarks/rehearsal.py: its departures from config/voc12.yaml\n"
                         + yaml.safe_dump(over, sort_keys=False))
    configfiles = [ROOT / "config" / "voc12.yaml", *[Path(c).resolve() for c in a.configfile], over_path]
    run_cfg = load_config(*configfiles)

    mark = uuid.uuid4().hex
    env = venv_env(mark)
    concurrent = a.concurrent or (2 if a.tiny else 1)
    cmd = snakemake_cmd(work, configfiles, a.cores, concurrent)
    dry = subprocess.run([*cmd, "-n"], env=env, capture_output=True, text=True)
    if dry.returncode:
        sys.exit(f"[rehearsal] the dry run failed:\n{dry.stdout[-4000:]}\n{dry.stderr[-4000:]}")
    declared = declared_resources(dry.stdout + dry.stderr)
    startup = startup_seconds(env)
    print(f"[rehearsal] {len(declared)} jobs planned; stage start-up {startup:.1f} s; running: {shlex.join(cmd)}",
          flush=True)
    log_path = work / "snakemake.log"
    t0 = time.perf_counter()
    with MemoryPoller(mark) as poller, open(log_path, "w") as log:
        run = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - t0
    if run.returncode:
        sys.exit(f"[rehearsal] snakemake failed ({run.returncode}); {log_path}:\n"
                 + "".join(log_path.read_text().splitlines(keepends=True)[-60:]))

    jobs = snakemake_jobs(work)
    results = run_cfg["results"]
    for j in jobs:
        j["label"] = job_label(j, results)
    measure(jobs, work, run_cfg, data, startup, declared, poller.peaks)
    gpus4 = yaml.safe_load((ROOT / "config" / "gpus4.yaml").read_text())
    totals = {"rehearsal_s": sum(j["wall_s"] for j in jobs)}
    for name in ("voc12", "coco14"):
        spec = target_spec(name, load_config(ROOT / "config" / f"{name}.yaml"), run_cfg, gpus4)
        totals[name] = extrapolate_all(jobs, spec, run_cfg, a.ddp_efficiency, results)
    import torch

    mean_mpx = (sum(data["mean_mpx"][s] * data["splits"][s] for s in ("train_aug", "val"))
                / (data["splits"]["train_aug"] + data["splits"]["val"]))
    result = {
        "meta": {"device": device, "device_name": device_name, "torch": torch.__version__, "tiny": a.tiny,
                 "images": n_images, "splits": data["splits"], "mean_mpx": mean_mpx, "cores": a.cores,
                 "concurrent": concurrent, "configfiles": [str(c) for c in configfiles], "elapsed_s": elapsed,
                 "startup_s": startup,
                 "ddp_efficiency": a.ddp_efficiency, "assumed_mean_mpx": MEAN_MPX, "work": str(work),
                 "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version()},
        "jobs": [{k: v for k, v in j.items() if k not in ("shellcmd",)} for j in jobs],
        "totals": totals,
        "costs": costs(jobs, run_cfg),
    }
    md = markdown(result)
    result["markdown"] = md
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(md)
    print(f"[rehearsal] figures in {out}")
    return result


if __name__ == "__main__":
    main()
