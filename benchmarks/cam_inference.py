"""Benchmark: CAM inference with TTA vs plain forward passes, and CAM artifact size.

Prints (1) TTA inference time per image divided by the time of the same number of plain
single-image forward passes at the same scales (the naive loop: one pass per scale and
flip, batch 1), measured in one run — below 1.0 means batching the flips/images pays off;
(2) bytes per image of our compressed float16 ``.npz`` vs a float32 array of the same maps.

    python benchmarks/cam_inference.py [--images 32] [--size 128] [--backbone resnet18_w24]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pnoc.cam.tta import max_normalize, tta_maps
from pnoc.data.transforms import normalize, resize_image
from pnoc.io import save_maps
from pnoc.models.classifier import create_classifier


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--present", type=int, default=2, help="positive classes stored per image")
    ap.add_argument("--backbone", default="resnet18_w24")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = create_classifier(a.backbone, a.classes, 8).eval()
    imgs = torch.randint(0, 255, (a.images, 3, a.size, a.size), dtype=torch.uint8)
    scales = [0.5, 1.0, 1.5, 2.0]
    fwd = lambda x: model(x)[1]  # noqa: E731
    with torch.no_grad():
        fwd(normalize(imgs[:2]))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, a.images, a.batch):
            hr, _ = tta_maps(fwd, imgs[i:i + a.batch], scales, True)
        t_tta = time.perf_counter() - t0
        t0 = time.perf_counter()
        for im in imgs:
            for s in scales:
                x = normalize(resize_image(im, s))[None]
                for flip in (False, True):
                    m = fwd(x.flip(-1) if flip else x)
                    F.interpolate(F.relu(m), size=(a.size, a.size), mode="bilinear", align_corners=False)
        t_plain = time.perf_counter() - t0
    passes = len(scales) * 2
    print(f"images: {a.images} at {a.size}px, backbone {a.backbone}, {passes} passes per image")
    print(f"TTA (batched): {1000 * t_tta / a.images:.1f} ms/image ({a.images / t_tta:.1f} images/s)")
    print(f"plain forward passes (same count, batch 1): {1000 * t_plain / a.images:.1f} ms/image")
    print(f"ratio TTA / plain: {t_tta / t_plain:.3f}  (bound 1.0)")
    maps = max_normalize(hr[0, : a.present]).numpy()
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.npz"
        save_maps(p, maps, np.arange(1, a.present + 1), lr=maps[:, ::4, ::4])
        ours = p.stat().st_size
    buf = io.BytesIO()
    np.save(buf, maps.astype(np.float32))
    f32 = buf.getbuffer().nbytes
    print(f"bytes/image: ours {ours} vs float32 {f32} -> {f32 / ours:.2f}x smaller")


if __name__ == "__main__":
    main()
