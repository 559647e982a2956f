"""Stage: measure the premises of the paper's mechanisms on the synthetic benchmark (its spec sheet).

P-NOC's parts rest on properties that real photos have. This stage measures them with the
ordinary classifier on a split that it did not train on, using the part maps the generator
writes (``SegmentationPart/<id>.png``: head, body, context band, clutter):

* **Erasing** (OC-CSE, NOC): recall of a class with its heads erased, with the top of its CAM
  erased (NOC's hard mask, ψ ≥ 1 − δ) and with the whole object erased (what the context alone
  gives). Erasing can push CAMs onto the body only if the body carries clearly more of what is
  left than the context does.
* **Incomplete CAMs**: the share of head and body pixels above a CAM threshold.
* **Context leakage**: the share of CAM mass on context bands, beside the bands' share of the image.
* **Puzzle**: the share of 2×2 tiles holding a part of a class that the classifier still labels
  with that class when it sees the tile alone (heads, and body-only parts, apart).
* **The random walk's room**: the share of object pixels within one stride-4 cell (4 px, Euclidean)
  of the edge of their class's region (:func:`class_regions`, the adjacent void band included). The walk fills objects cell by cell; where much
  of an object is edge band, the walk depends on the boundary between those cells, and the
  reference's seed mask (CAMs x (1 - boundary)) empties them (VOC's objects are tens of cells wide).
  ``rule walk_share`` measures the walk's ceiling at this grid over ground-truth affinities.

Erased pixels are set to 0 in normalised space (the mean colour), as ``x * (1 - mask)`` does in
the CAM strategies. A class counts as recognised when its sigmoid score is ≥ 0.5.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from tqdm import tqdm

from pnoc import cli
from pnoc.cam.strategies import psi as cam_psi
from pnoc.data import open_dataset
from pnoc.data.synthetic import PART_VALUES
from pnoc.data.transforms import normalize, to_tensor_image
from pnoc.evaluation import markdown_table
from pnoc.io import DataError, read_mask, write_json, write_text
from pnoc.models.classifier import classifier_from_artifact
from pnoc.training import Runtime, load_weights, resolve_device, set_threads

log = logging.getLogger("pnoc.cam.diagnose")

HEAD, BODY, CONTEXT = PART_VALUES["head"], PART_VALUES["body"], PART_VALUES["context"]
# the random walk's cell: AffinityNet and the walk work on the stride-4 grid of the CAMs
WALK_CELL = 4


@dataclass
class Config(Runtime):
    """Measure the benchmark's premises with the ordinary classifier."""

    dataset: str = "synthetic"
    root: Path = Path(".")
    split: str = "val"
    classifier: Path = Path("model.pt")
    out: Path = Path("benchmark.json")
    table: Path = Path("benchmark.md")
    cam_threshold: float = 0.4
    noc_delta: float = 0.2
    tile_min_part: float = 0.02
    max_images: int = 0


class _Tally:
    """Hits over trials, as a share (None when there was no trial)."""

    def __init__(self):
        self.hits, self.n = 0.0, 0

    def add(self, hit, n: int = 1) -> None:
        self.hits += float(hit)
        self.n += n

    @property
    def value(self) -> float | None:
        return self.hits / self.n if self.n else None


def class_regions(mask: np.ndarray, c: int, ignore_width: int = 2) -> np.ndarray:
    """Pixels of class ``c`` (1-based) including the 255 ignore band around them.

    Args:
        mask: uint8 (H, W) ground truth (0, 1..C, 255).

    Returns:
        bool (H, W).
    """
    own = mask == c
    k = np.ones((2 * ignore_width + 1, 2 * ignore_width + 1), np.uint8)
    near = cv2.dilate(own.astype(np.uint8), k) > 0
    return own | (near & (mask == 255))


def _scores(model, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, cams = model(xs)
    return torch.sigmoid(logits.float()), cams.float()


@torch.no_grad()
def run(cfg: Config) -> dict:
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ds = open_dataset(cfg.dataset, cfg.root, cfg.split)
    model = classifier_from_artifact(load_weights(cfg.classifier)).to(device).eval()
    part_dir = Path(cfg.root) / "SegmentationPart"
    if not part_dir.is_dir():
        raise DataError(f"{part_dir}: no part maps; diagnose needs the synthetic generator's part maps "
                        "(dataset.synthetic.write_parts: true, then rerun rule make_dataset)")
    ids = ds.ids[: cfg.max_images] if cfg.max_images > 0 else ds.ids
    recall = {k: _Tally() for k in ("intact", "head_erased", "cam_top_erased", "object_erased")}
    head_hit, body_hit, head_psi, body_psi = _Tally(), _Tally(), _Tally(), _Tally()
    mass_context, mass_object, mass_total, context_area, area = 0.0, 0.0, 0.0, 0, 0
    tiles = {k: _Tally() for k in ("any", "head", "body_only")}
    edge_band = _Tally()
    for image_id in tqdm(ids, desc="diagnose", mininterval=10):
        img = ds.read_image(image_id)
        h, w = img.shape[:2]
        gt = ds.read_mask(image_id, (h, w))
        parts = read_mask(part_dir / f"{image_id}.png", (h, w))
        y = ds.labels(image_id)
        x = normalize(to_tensor_image(img)).to(device)
        probs, cams = _scores(model, x[None])
        # ψ of every class, as the CAM strategies compute it (ReLU, resize, per-map max normalisation)
        psi = cam_psi(cams[0], (h, w)).squeeze(1).cpu().numpy()
        variants, keys = [], []
        for ci in np.flatnonzero(y > 0.5):
            c = int(ci) + 1
            region = class_regions(gt, c)
            edge_band.add(int((region & (distance_transform_edt(region) <= WALK_CELL)).sum()), int(region.sum()))
            head = region & (parts == HEAD)
            body = region & (parts == BODY)
            recall["intact"].add(probs[0, ci] >= 0.5)
            # incomplete CAMs: pooled over the pixels of the class's heads / bodies
            head_hit.add((psi[ci][head] >= cfg.cam_threshold).sum(), int(head.sum()))
            body_hit.add((psi[ci][body] >= cfg.cam_threshold).sum(), int(body.sum()))
            head_psi.add(psi[ci][head].sum(), int(head.sum()))
            body_psi.add(psi[ci][body].sum(), int(body.sum()))
            mass_total += float(psi[ci].sum())
            mass_context += float(psi[ci][parts == CONTEXT].sum())
            mass_object += float(psi[ci][region].sum())
            context_area += int((parts == CONTEXT).sum())
            area += h * w
            erase = {"cam_top_erased": psi[ci] >= 1.0 - cfg.noc_delta, "object_erased": region}
            if head.any():
                erase["head_erased"] = head
            for name, m in erase.items():
                keep = torch.from_numpy(~m).to(device=device, dtype=x.dtype)
                variants.append(x * keep)
                keys.append((name, int(ci)))
        if variants:
            p, _ = _scores(model, torch.stack(variants))
            for (name, ci), pi in zip(keys, p):
                recall[name].add(pi[ci] >= 0.5)
        # Puzzle: each quadrant alone, as the tile branch sees it
        hh, hw = h // 2, w // 2
        boxes = [(0, 0), (0, hw), (hh, 0), (hh, hw)]
        tp, _ = _scores(model, torch.stack([x[:, r:r + hh, q:q + hw] for r, q in boxes]))
        for t, (r, q) in enumerate(boxes):
            g, pt = gt[r:r + hh, q:q + hw], parts[r:r + hh, q:q + hw]
            for ci in np.flatnonzero(y > 0.5):
                own = g == ci + 1
                if own.sum() < cfg.tile_min_part * hh * hw:
                    continue
                hit = tp[t, ci] >= 0.5
                tiles["any"].add(hit)
                tiles["head" if (own & (pt == HEAD)).any() else "body_only"].add(hit)
    r = {k: v.value for k, v in recall.items()}
    left_by_body = (r["head_erased"] - r["object_erased"]) if None not in (r["head_erased"], r["object_erased"]) else None
    out = {
        "stage": "diagnose", "split": cfg.split, "images": len(ids), "positives": recall["intact"].n,
        "classifier": str(cfg.classifier),
        "recall": r, "recall_trials": {k: v.n for k, v in recall.items()},
        "body_minus_context": left_by_body,
        "cam": {"threshold": cfg.cam_threshold, "head_recall": head_hit.value, "body_recall": body_hit.value,
                "head_mean": head_psi.value, "body_mean": body_psi.value},
        "cam_mass": {"context": mass_context / mass_total if mass_total else None,
                     "object": mass_object / mass_total if mass_total else None,
                     "context_area": context_area / area if area else None},
        "tiles": {k: v.value for k, v in tiles.items()}, "tile_trials": {k: v.n for k, v in tiles.items()},
        "object_pixels_near_edge": edge_band.value,
    }
    write_json(cfg.out, out)
    write_text(cfg.table, benchmark_markdown(out, cfg))
    log.info("premises: %s", json.dumps(out, indent=1))
    return out


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def benchmark_markdown(d: dict, cfg: Config) -> str:
    """The premises table (what each figure says about which mechanism)."""
    r, cam, mass, tiles = d["recall"], d["cam"], d["cam_mass"], d["tiles"]
    rows = [
        {"figure": "classifier recall, intact", "value": _fmt(r["intact"]), "premise": "the classifier works"},
        {"figure": "… heads erased (ground-truth part maps)", "value": _fmt(r["head_erased"]),
         "premise": "erasing: evidence left on the object"},
        {"figure": f"… top of its CAM erased (ψ ≥ {1 - cfg.noc_delta:.1f}, NOC's hard mask)",
         "value": _fmt(r["cam_top_erased"]), "premise": "erasing: what NOC's oc still sees"},
        {"figure": "… whole object erased (context only)", "value": _fmt(r["object_erased"]),
         "premise": "erasing must not reward context"},
        {"figure": "heads erased − object erased (the body's share)", "value": _fmt(d["body_minus_context"]),
         "premise": "> 0: the body carries more than the context"},
        {"figure": f"CAM ≥ {cam['threshold']} on head pixels", "value": _fmt(cam["head_recall"]),
         "premise": "CAMs find the most discriminative part"},
        {"figure": f"CAM ≥ {cam['threshold']} on body pixels", "value": _fmt(cam["body_recall"]),
         "premise": "CAMs are incomplete (room for erasing / Puzzle)"},
        {"figure": "share of CAM mass on context bands", "value": _fmt(mass["context"]),
         "premise": f"context leakage (bands cover {_fmt(mass['context_area'])} of the image)"},
        {"figure": "share of CAM mass on the class's objects", "value": _fmt(mass["object"]), "premise": "–"},
        {"figure": "2×2 tiles with a part of a class: class recognised", "value": _fmt(tiles["any"]),
         "premise": "Puzzle: tiles hold classifiable parts"},
        {"figure": "… tiles holding a head", "value": _fmt(tiles["head"]), "premise": "–"},
        {"figure": "… tiles holding body only", "value": _fmt(tiles["body_only"]),
         "premise": "Puzzle can extend CAMs onto bodies"},
        {"figure": f"object pixels within {WALK_CELL} px (one stride-4 cell) of their object's edge",
         "value": _fmt(d.get("object_pixels_near_edge")),
         "premise": "small: the stride-4 random walk has object interiors to fill"},
    ]
    head = (f"# Benchmark premises ({d['split']} split, {d['images']} images, {d['positives']} positive classes)\n\n"
            f"Measured with the ordinary classifier `{d['classifier']}` by `rule diagnose`; a class is recognised "
            "when its score is ≥ 0.5, erased pixels take the mean colour.\n\n")
    return head + markdown_table(rows, ["figure", "value", "premise"]) + "\n"


if __name__ == "__main__":
    cli.main(run, Config)
