"""Benchmark: the ordinary classifier's training with 1 process vs N processes (DDP, gloo on CPU / NCCL on GPU).

Runs the real entry point ``pnoc.cam.train_classifier`` on the demo's synthetic benchmark (generated into
``--root`` once when absent) at the same global batch, alternately with one process and with
``torchrun --standalone --nproc_per_node N``, ``--rounds`` times each, and reports the training throughput
the stage measures (images/s of the training steps, summed over ranks; validation and start-up excluded),
the wall time of the whole command, and the ratio N/1 of each, plus the largest weight difference between
the two final models (BatchNorm trains in both, so on the CPU, where SyncBatchNorm is unavailable, the
weights differ by the per-process BN statistics; see tests/test_distributed.py for the frozen-BN equality).

On a CPU machine both settings share the same cores: one process gets ``--threads`` intra-op threads, each
of the N processes ``threads // N``. The ratio then measures data-parallel overhead against intra-op
threading, not a speed-up from more hardware; on GPUs each process has its own device.

    python benchmarks/ddp_scaling.py --root /tmp/ddp_bench/synthetic [--procs 2] [--threads 2] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def classifier_flags(epochs: int) -> list[str]:
    """The demo's classifier settings (config.yaml), as flags; weights from scratch (no pretrain artifact)."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())["classifier"]
    cfg = {**cfg, "epochs": epochs, "weights": "none"}
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            continue
        out.append("--" + k.replace("_", "-"))
        out += [str(x) for x in v] if isinstance(v, list) else [str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def run_once(root: Path, work: Path, procs: int, threads: int, epochs: int) -> dict:
    out = work / f"p{procs}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["-m", "pnoc.cam.train_classifier", "--dataset", "synthetic", "--root", str(root), "--out",
            str(out / "model.pt"), "--metrics", str(out / "metrics.json"), "--state-dir", str(out / "state"),
            "--threads", str(threads), *classifier_flags(epochs)]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(procs), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"wall_s": wall, "train_images_per_s": m["train_images_per_s"], "model": out / "model.pt",
            "final_loss": m["final"]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="synthetic dataset folder (generated when absent)")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of the job (shared by its processes)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if not (a.root / "dataset.json").exists():
        subprocess.run([sys.executable, "-m", "pnoc.data.make_dataset", "--out", str(a.root)], check=True)
    from pnoc.training import safe_load

    work = Path(tempfile.mkdtemp(prefix="ddp_bench_"))
    rows = {1: [], a.procs: []}
    for _ in range(a.rounds):  # alternate, so a change in machine load hits both settings
        for procs in rows:
            rows[procs].append(run_once(a.root, work, procs, a.threads, a.epochs))
    best = {p: max(r, key=lambda x: x["train_images_per_s"]) for p, r in rows.items()}
    w1, wn = safe_load(best[1]["model"])["model"], safe_load(best[a.procs]["model"])["model"]
    diff = max((w1[k].double() - wn[k].double()).abs().max().item() for k in w1 if w1[k].is_floating_point())
    print(f"train_classifier, demo settings, {a.epochs} epochs, job threads {a.threads}, best of {a.rounds}:")
    print("| processes | train images/s | wall s | final loss |")
    print("|---|---|---|---|")
    for p in rows:
        b = best[p]
        print(f"| {p} | {b['train_images_per_s']:.1f} | {min(r['wall_s'] for r in rows[p]):.1f} | {b['final_loss']:.4f} |")
    print(f"ratio {a.procs}/1: train images/s {best[a.procs]['train_images_per_s'] / best[1]['train_images_per_s']:.2f}, "
          f"wall {min(r['wall_s'] for r in rows[a.procs]) / min(r['wall_s'] for r in rows[1]):.2f}; "
          f"max |w1 - w{a.procs}| = {diff:.3g} (BN statistics per process)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
