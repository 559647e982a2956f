"""Stage: final saliency maps from the trained PoolNet, for every image of a split.

One forward pass per image at its own size (the reference's procedure; ``flip: true`` also
averages the mirrored pass's probability), σ(logit) written as an 8-bit gray PNG 0..255
(``<id>.png``) into a folder written atomically. These are the maps the affinity-label stage
consumes (δ_bg / δ_fg thresholds on value/255). With ``shard: kofK`` only the k-th of K slices of the
split is processed (:mod:`pnoc.shards`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pnoc import cli
from pnoc.data.datasets import DataSource
from pnoc.data.transforms import normalize, to_tensor_image
from pnoc.io import atomic_dir, write_gray, write_json
from pnoc.models.poolnet import poolnet_from_artifact
from pnoc.shards import shard_ids
from pnoc.training import load_weights, memory_guard, peak_memory, resolve_device, set_threads

log = logging.getLogger("pnoc.saliency.infer_poolnet")


@dataclass
class Config(DataSource):
    """PoolNet saliency inference."""

    split: str
    model: Path
    out_dir: Path
    batch_size: int = 16
    flip: bool = False
    device: str = "auto"
    threads: int = 0
    shard: str = "1of1"


@torch.no_grad()
def predict(model: torch.nn.Module, images_u8: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """Saliency probabilities.

    Args:
        images_u8: uint8 (B, 3, H, W).
        flip: average with the horizontally mirrored pass.

    Returns:
        float32 (B, H, W) in [0, 1].
    """
    x = normalize(images_u8)
    p = torch.sigmoid(model(x).float())[:, 0]
    if flip:
        p = 0.5 * (p + torch.sigmoid(model(x.flip(-1)).float())[:, 0].flip(-1))
    return p


def run(cfg: Config) -> dict:
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ds = cfg.open_dataset(cfg.split)
    ids = shard_ids(ds.ids, cfg.shard)
    ds.validate(need_labels=False, ids=ids)
    model = poolnet_from_artifact(load_weights(cfg.model)).to(device).eval()
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    for image_id in ids:
        by_size[ds.image_size(image_id)].append(image_id)
    t0 = time.perf_counter()
    mean_sal = 0.0
    with atomic_dir(cfg.out_dir) as tmp, tqdm(total=len(ids), desc=f"poolnet {cfg.split}", mininterval=10) as bar:
        for size, group in by_size.items():
            for i in range(0, len(group), cfg.batch_size):
                chunk = group[i:i + cfg.batch_size]
                imgs = torch.stack([to_tensor_image(ds.read_image(j)) for j in chunk]).to(device)
                with memory_guard(device, chunk, size, "lower saliency.inference.batch_size (images of one size "
                                  "run together)"):
                    p = predict(model, imgs, cfg.flip).cpu().numpy()
                for b, image_id in enumerate(chunk):
                    write_gray(tmp / f"{image_id}.png", p[b])
                    mean_sal += float(p[b].mean())
                bar.update(len(chunk))
        dt = time.perf_counter() - t0
        info = {"stage": "infer_poolnet", "split": cfg.split, "images": len(ids), "model": str(cfg.model),
                "flip": cfg.flip, "mean_saliency": mean_sal / max(1, len(ids)), "seconds": dt,
                "images_per_s": len(ids) / max(dt, 1e-9), **peak_memory(device)}
        write_json(tmp / "_info.json", info)
    log.info("%d images in %.1fs (%.1f img/s)", len(ids), dt, info["images_per_s"])
    return info


if __name__ == "__main__":
    cli.main(run, Config)
