"""Benchmark: one-pass threshold sweep vs evaluating each threshold separately (same files, same run).

    python benchmarks/evaluate.py [--images 200] [--size 128] [--classes 9]

Prints both timings and the speedup, and asserts the confusion matrices are equal.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pnoc.evaluation import ThresholdSweep, confusion, prior_prediction
from pnoc.io import load_maps, save_maps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=9, help="including background")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    ths = [round(0.05 * i, 2) for i in range(1, 17)]
    with tempfile.TemporaryDirectory() as d:
        files, gts = [], []
        for i in range(a.images):
            k = int(rng.integers(1, 4))
            keys = np.sort(rng.choice(np.arange(1, a.classes), size=k, replace=False))
            maps = rng.random((k, a.size, a.size)).astype(np.float32)
            p = Path(d) / f"{i}.npz"
            save_maps(p, maps, keys)
            files.append(p)
            gts.append(rng.integers(0, a.classes, (a.size, a.size)))
        t0 = time.perf_counter()
        sweep = ThresholdSweep(a.classes, ths)
        for p, gt in zip(files, gts):
            z = load_maps(p)
            sweep.update(z["maps"], z["keys"], gt)
        one_pass = sweep.confusions()
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        separate = []
        for t in ths:
            conf = np.zeros((a.classes, a.classes), np.int64)
            for p, gt in zip(files, gts):
                z = load_maps(p)
                conf += confusion(prior_prediction(z["maps"], z["keys"], t), gt, a.classes)
            separate.append(conf)
        t_sep = time.perf_counter() - t0
    assert all((x == y).all() for x, y in zip(one_pass, separate)), "one-pass sweep differs"
    print(f"{a.images} images, {len(ths)} thresholds: one pass {t_one:.2f}s, per threshold {t_sep:.2f}s")
    print("confusion matrices equal: True")
    print(f"speedup: {t_sep / t_one:.1f}x")


if __name__ == "__main__":
    main()
