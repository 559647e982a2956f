"""Benchmark: cost of one training iteration of every CAM strategy, relative to vanilla CAM, in one run.

    python benchmarks/strategies.py [--backbone resnet18_w16] [--size 96] [--batch 32] [--iters 6]
                                    [--threads 2] [--device auto]

Every strategy trains the same randomly initialised classifier on the same random batch, so
the ratios measure the work each strategy adds (tile pass, CSE pass through oc/noc, the noc
update), not data loading. The strategies are timed round-robin (one iteration of each in turn,
repeated), so a change of machine load during the run affects all of them alike. Prints one line
per strategy and, last, ``pnoc/cam: <ratio>``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pnoc.cam.train_cam import Config, build
from pnoc.models.classifier import create_classifier
from pnoc.training import resolve_device, save_weights, set_threads

STRATEGIES = ["cam", "puzzle", "occse", "poc", "pnoc"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="resnet18_w16")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--iters", type=int, default=6, help="timed iterations per strategy (after 2 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    set_threads(a.threads)
    device = resolve_device(a.device)
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    y = torch.zeros(a.batch, a.classes, device=device)
    y[torch.arange(a.batch), torch.randint(0, a.classes, (a.batch,))] = 1
    with tempfile.TemporaryDirectory() as d:
        clf = Path(d) / "classifier.pt"
        model = create_classifier(a.backbone, a.classes, 8)
        save_weights(clf, {"arch": {"backbone": a.backbone, "n_classes": a.classes, "output_stride": 8},
                           "model": model.state_dict()})
        trainers = {}
        for s in STRATEGIES:
            cfg = Config(dataset="synthetic", root=Path(d), classifier=clf, out=Path(d) / "f.pt",
                         metrics=Path(d) / "m.json", state_dir=Path(d), strategy=s, label_smoothing=0.1,
                         backbone=a.backbone, batch_size=a.batch, crop=a.size)
            trainers[s] = build(cfg, a.classes, device, total_iters=10 * (a.iters + 2))
            trainers[s].f.train()
        times = {s: 0.0 for s in STRATEGIES}
        for i in range(a.iters + 2):
            for s, tr in trainers.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                tr.step(x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= 2:
                    times[s] += time.perf_counter() - t0
    base = times["cam"] / a.iters
    print(f"device {device}, {a.backbone}, batch {a.batch} x {a.size}px, {a.iters} timed iterations each")
    for s in STRATEGIES:
        per = times[s] / a.iters
        print(f"{s:7s} {per:.3f} s/iteration  {per / base:.2f}x cam")
    print(f"pnoc/cam: {times['pnoc'] / times['cam']:.2f}")


if __name__ == "__main__":
    main()
