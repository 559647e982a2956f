"""Benchmark: sparse random walk (pnoc.affinity.random_walk) vs the reference's dense T^(2^8).

Two grids (stride 4): a VOC-sized 500×375 image (125×94, n = 11 750) and the demo's
128×128 image (32×32, n = 1 024). Every measurement runs in its own subprocess so that its
peak memory is its own: peak RSS growth on CPU (``ru_maxrss`` minus the RSS before the
walk; torch allocations are invisible to tracemalloc), ``torch.cuda.max_memory_allocated``
on CUDA.

The dense walk at the VOC size costs 8 squarings of an 11 750² matrix (~26 TFLOP). Unless
``--dense-full`` is given (or the device is CUDA, or the grid is small), it is timed with
ONE squaring and the total extrapolated as build + 8 × squaring + final product; the
output says so.

Usage::

    python benchmarks/random_walk.py [--device cpu|cuda] [--classes 3] [--dense-full]

The last line printed is ``speedup: <dense time / sparse time>`` at the VOC size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {"voc 500x375": (94, 125), "demo 128x128": (32, 32)}
EXP_TIMES = 8


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(h: int, w: int, k: int, device: str):
    import torch

    g = torch.Generator().manual_seed(0)
    boundary = (torch.rand(h, w, generator=g) ** 3).to(device)
    cams = torch.rand(k, h, w, generator=g).to(device)
    return cams * (1.0 - boundary)[None], boundary


def _worker(args) -> dict:
    """One measurement; returns seconds and peak memory growth in bytes."""
    import torch

    from pnoc.affinity.random_walk import dense_transition, random_walk

    dev = args.device
    cuda = dev.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # warm-up on a tiny grid: library initialisation is not what we time
    s0, b0 = _inputs(8, 8, args.classes, dev)
    random_walk(s0, b0, exp_times=1)
    (dense_transition(b0, dtype=torch.float32) @ dense_transition(b0, dtype=torch.float32)).sum().item()

    seeds, boundary = _inputs(args.h, args.w, args.classes, dev)
    sync()
    base = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    out = {"mode": args.worker}
    if args.worker == "sparse":
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            rw = random_walk(seeds, boundary, exp_times=EXP_TIMES)
            sync()
            times.append(time.perf_counter() - t0)
        out["seconds"] = min(times)
        out["result"] = (rw / rw.max()).double().cpu().flatten().tolist() if args.h * args.w <= 4096 else None
    else:
        sync()
        t0 = time.perf_counter()
        t = dense_transition(boundary, dtype=torch.float32)
        sync()
        t_build = time.perf_counter() - t0
        n_sq = EXP_TIMES if args.dense_full else 1
        t0 = time.perf_counter()
        for _ in range(n_sq):
            t = t @ t
        sync()
        t_sq = (time.perf_counter() - t0) / n_sq
        t0 = time.perf_counter()
        rw = (seeds.reshape(seeds.shape[0], -1) @ t).reshape(seeds.shape)
        sync()
        t_prod = time.perf_counter() - t0
        out.update(build=t_build, squaring=t_sq, product=t_prod, measured_squarings=n_sq,
                   seconds=t_build + EXP_TIMES * t_sq + t_prod)
        out["result"] = (rw / rw.max()).double().cpu().flatten().tolist() if n_sq == EXP_TIMES and args.h * args.w <= 4096 else None
    sync()
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
        out["peak_kind"] = "cuda max_memory_allocated"
    else:
        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        out["peak_kind"] = "RSS growth"
    return out


def _spawn(mode: str, h: int, w: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--h", str(h), "--w", str(w),
           "--classes", str(args.classes), "--device", args.device, "--threads", str(args.threads)]
    if args.dense_full or h * w <= 4096:  # small grids: the full dense walk is cheap
        cmd.append("--dense-full")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {mode} {h}x{w} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--classes", type=int, default=3, help="K seed maps per image")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--dense-full", action="store_true", help="run all 8 dense squarings even when slow")
    p.add_argument("--worker", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--h", type=int, help=argparse.SUPPRESS)
    p.add_argument("--w", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    if args.device.startswith("cuda"):
        args.dense_full = True  # a GPU does 8 squarings in seconds
    dev_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {dev_name}; torch {torch.__version__}; K = {args.classes} classes; "
          f"exp_times = {EXP_TIMES} (2^{EXP_TIMES} = {2 ** EXP_TIMES} steps); sparse = float32, dense = float32")
    speedups = {}
    for name, (h, w) in CASES.items():
        n = h * w
        sp = _spawn("sparse", h, w, args)
        de = _spawn("dense", h, w, args)
        print(f"[{name}] grid {h}x{w}, n = {n}, dense matrix = {n * n * 4 / 2**30:.2f} GiB")
        print(f"  sparse: {sp['seconds']:.3f} s (best of 3), peak {sp['peak_kind']} {sp['peak_bytes'] / 2**20:.1f} MiB")
        how = ("all 8 squarings measured" if de["measured_squarings"] == EXP_TIMES
               else "ONE squaring measured, total EXTRAPOLATED as build + 8 x squaring + product")
        print(f"  dense:  {de['seconds']:.3f} s ({how}: build {de['build']:.3f} s, squaring {de['squaring']:.3f} s, "
              f"product {de['product']:.3f} s), peak {de['peak_kind']} {de['peak_bytes'] / 2**20:.1f} MiB")
        if sp.get("result") and de.get("result"):
            diff = max(abs(a - b) for a, b in zip(sp["result"], de["result"]))
            print(f"  max |sparse - dense| after global-max normalisation: {diff:.2e}")
        speedups[name] = de["seconds"] / sp["seconds"]
        print(f"  speedup ({name}): {speedups[name]:.1f}x")
    print(f"speedup: {speedups['voc 500x375']:.1f}")


if __name__ == "__main__":
    main()
