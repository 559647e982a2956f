"""The embedded synthetic WSSS benchmark: a small Pascal-VOC-layout dataset generated on the fly.

It is built so the failure modes P-NOC addresses are measurable on a CPU, without VOC and
without pretrained weights. ``rule diagnose`` (:mod:`pnoc.cam.diagnose`) measures the premises
below with the ordinary classifier, using the part maps written beside the masks:

* **Incomplete activation, graded evidence (v2).** Every object is a *body* plus an optional small
  *head*. The head (~15-25 % of the object) carries a class-specific saturated colour pair and
  pattern: the easiest cue, so a plain CAM lights up mostly the head. The body has a
  class-specific *shape* (ellipse, triangle, ring, ...) and, with ``body_cue > 0``, a muted
  class colour mixed into a shared pool colour and a low-contrast class texture (stripes,
  spots, scales, ... at a class period, in the object's frame): weaker but real evidence, as
  every part of a real dog is doggish, only less so than its face. Erasing the head then leaves
  class evidence on the object (what OC-CSE and NOC need), and a 2×2 Puzzle tile holding only
  body is still recognisable. ``body_cue: 0`` is the v1 benchmark: bodies share their
  appearance across classes, and what is left after erasing the head is mostly context.
  A fraction of all objects is *headless*, so the body is a learnable secondary cue.
* **Context co-occurrence.** The first ``context_classes`` classes are tied to a background
  texture band (water, sky, grass, ...): a context-class object sits on its band with
  probability ``context_prob``; the band also appears in images without that class with
  probability ``context_alone_prob``. Band pixels are background. The first two context classes
  share the same head and context-class objects are more often headless, so the classifier has
  to use context to tell them apart, and leaks activation onto it.
* **VOC-like labels.** 1-3 objects per image (about half the images hold several classes),
  later objects occlude earlier ones, a 255 ignore band ~``ignore_width`` px wide along every
  label border, background clutter (headless blobs in the shared body colours) on a noisy
  textured background.

Generation is deterministic with one random stream per image seeded by ``(seed, split, index)``,
so a smaller dataset is a prefix of a larger one.

Layout written by :func:`generate` under ``root``::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png         palette PNG: 0 background, 1..C classes, 255 ignore
    SegmentationPart/<id>.png          part map: 0 bg, 1 head, 2 body, 3 context band, 4 clutter (write_parts)
    Annotations/<id>.xml               VOC XML, one <object> per visible instance
    ImageSets/Segmentation/{train,val}.txt
    dataset.json                       {"name", "classes", "config", "stats", "class_info"}; written last

Ids are ``syn_train_000001``, ``syn_val_000001``, ... (1-based).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import cv2
import numpy as np

from pnoc.io import write_image, write_json, write_mask, write_text

log = logging.getLogger("pnoc.synthetic")

SPLITS = ("train", "val")
"""Split names; their position is the split id in the per-image seed."""

MAX_CLASSES = 12

CLASS_NAMES = ["boat", "kite", "frog", "lamp", "bell", "cup", "key", "hat", "sock", "drum", "vase", "fan"]
"""Names of the object classes, in label order (class ``i`` has mask value ``i + 1``)."""

CLASS_SHAPES = ["ellipse", "triangle", "ring", "rectangle", "star", "cross", "crescent", "L", "T", "arrow",
                "bowtie", "U"]
"""Body shape of each class."""

CONTEXT_TEXTURES = ["water", "sky", "grass", "sand", "brick"]
"""Background band of context class ``i`` (``i < context_classes``)."""

_ALTITUDE = {"sky": 0, "brick": 1, "grass": 2, "sand": 2, "water": 3}  # band stacking order, top to bottom

_C = {  # saturated head colours (RGB)
    "red": (230, 30, 30), "yellow": (250, 220, 20), "blue": (30, 60, 230), "green": (30, 200, 60),
    "magenta": (220, 40, 200), "cyan": (30, 210, 220), "white": (250, 250, 250), "black": (15, 15, 15),
    "orange": (250, 130, 10), "purple": (120, 30, 170),
}

CLASS_HEADS = [  # (colour a, colour b, pattern); classes 0 and 1 share a head (see shared_context_head)
    ("red", "yellow", "hstripes"),
    ("blue", "white", "checker"),    # used by class 1 only when shared_context_head is false
    ("magenta", "green", "dots"),
    ("cyan", "black", "diag"),
    ("orange", "purple", "vstripes"),
    ("yellow", "black", "checker"),
    ("green", "white", "rings"),
    ("blue", "orange", "dots"),
    ("white", "red", "vstripes"),
    ("black", "magenta", "hstripes"),
    ("cyan", "yellow", "checker"),
    ("purple", "white", "diag"),
]

BODY_POOL = np.array([  # body / clutter colours shared by all classes (RGB)
    (150, 110, 70), (120, 120, 125), (190, 165, 120), (110, 120, 60), (80, 95, 140), (130, 60, 65),
    (70, 120, 115), (200, 190, 170), (60, 60, 65), (200, 140, 150), (190, 160, 50), (95, 75, 120),
], np.float32)

BODY_TEXTURES = ("flat", "mottled", "gradient", "speckle")

CLASS_BODIES = [  # (muted body colour RGB, texture kind, period in px at 128 px); v2 class-specific body cues
    ((150, 95, 80), "stripes", 4.0), ((95, 115, 150), "stripes", 8.0), ((120, 140, 85), "spots", 5.0),
    ((160, 135, 95), "spots", 9.0), ((130, 100, 140), "scales", 5.0), ((90, 135, 125), "scales", 9.0),
    ((165, 120, 120), "rings", 5.0), ((120, 120, 95), "rings", 9.0), ((105, 90, 120), "bands", 4.0),
    ((140, 150, 130), "bands", 8.0), ((170, 145, 115), "mottle", 6.0), ((100, 110, 110), "mottle", 11.0),
]
"""Body appearance of each class in generator v2 (``body_cue > 0``).

Real object parts are all class-indicative, some far more than others: a dog's face is the easiest
cue, but its fur is doggish too. The body colour is a muted class colour mixed with a colour of the
shared pool, and a low-contrast luminance texture (kind and period per class) runs in the object's
own frame. Both are weaker than the saturated head pair, so CAMs still favour the head, but an
erased head leaves real evidence on the body (what OC-CSE and NOC rely on)."""

PART_VALUES = {"background": 0, "head": 1, "body": 2, "context": 3, "clutter": 4}
"""Values of the part maps (``SegmentationPart/<id>.png``) that ``diagnose`` reads."""


def _f(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic benchmark (every probability is per image unless stated)."""

    seed: int = _f(0, "generator seed; image i of split s uses the stream default_rng([seed, s, i])")
    image_size: int = _f(128, "side of the square images (px)")
    n_train: int = _f(1000, "images in the train split")
    n_val: int = _f(200, "images in the val split")
    n_classes: int = _f(8, f"object classes C, background excluded (1..{MAX_CLASSES})")
    min_objects: int = _f(1, "fewest objects drawn per image (>= 1)")
    max_objects: int = _f(3, "most objects drawn per image")
    same_class_prob: float = _f(0.3, "probability that an extra object repeats a class already in the image")
    object_area_min: float = _f(0.05, "smallest object area (body + head) as a fraction of the image (log-uniform)")
    object_area_max: float = _f(0.22, "largest object area as a fraction of the image")
    aspect_max: float = _f(1.35, "objects are stretched by a factor in [1/aspect_max, aspect_max] before rotation")
    head_frac_min: float = _f(0.15, "smallest head area as a fraction of the object area")
    head_frac_max: float = _f(0.25, "largest head area as a fraction of the object area")
    headless_prob: float = _f(0.2, "per object: probability that a non-context-class object has no head")
    body_cue: float = _f(0.6, "strength (0..1) of the class-specific body colour and texture (v2); 0 = the v1 "
                              "benchmark, whose bodies share one appearance pool across classes")
    body_cue_jitter: float = _f(0.25, "per object: the body cue strength varies by up to this fraction")
    write_parts: bool = _f(True, "also write SegmentationPart/<id>.png (0 bg, 1 head, 2 body, 3 context band, "
                                 "4 clutter) for the premise measurements of rule diagnose")
    context_classes: int = _f(3, "classes 1..K tied to a background texture band (0..5, <= n_classes)")
    context_prob: float = _f(0.9, "probability that a context class in the image comes with its band (object on it)")
    context_alone_prob: float = _f(0.08, "per band: probability that it appears in an image without its class")
    context_headless_prob: float = _f(0.3, "per object: probability that a context-class object has no head")
    shared_context_head: bool = _f(True, "give the first two context classes the same head (forces context use)")
    band_height_min: float = _f(0.3, "smallest band height as a fraction of the image side")
    band_height_max: float = _f(0.5, "largest band height as a fraction of the image side")
    clutter_prob: float = _f(0.7, "probability of background clutter (headless blobs, bars, polygons)")
    max_clutter: int = _f(3, "most clutter items in an image with clutter")
    clutter_area_min: float = _f(0.005, "smallest clutter item area as a fraction of the image")
    clutter_area_max: float = _f(0.06, "largest clutter item area as a fraction of the image")
    split_background_prob: float = _f(0.3, "probability that the background has two muted halves (wall/floor)")
    min_visible: float = _f(0.015, "each object keeps at least this fraction of the image visible after occlusion")
    min_visible_ratio: float = _f(0.5, "each object keeps at least this fraction of its own pixels (and head) visible")
    ignore_width: int = _f(2, "total width (px) of the 255 ignore band along every label border; 0 = none")
    jpeg_quality: int = _f(92, "JPEG quality of the images")
    jpeg_chroma_full: bool = _f(True, "store chroma at full resolution (4:4:4); heads are a few px wide and "
                                      "4:2:0 subsampling blends their colour pair into a muddy average")
    workers: int = _f(1, "processes used to render images (1 = in-process; at most 2 on shared machines)")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"SyntheticConfig: {msg}")

        need(self.image_size >= 32, f"image_size={self.image_size} must be >= 32")
        need(self.n_train >= 0 and self.n_val >= 0, "n_train and n_val must be >= 0")
        need(1 <= self.n_classes <= MAX_CLASSES, f"n_classes={self.n_classes} must lie in 1..{MAX_CLASSES}")
        need(1 <= self.min_objects <= self.max_objects, "need 1 <= min_objects <= max_objects")
        need(self.max_objects <= 8, "max_objects must be <= 8")
        need(0 < self.object_area_min <= self.object_area_max <= 0.5, "need 0 < object_area_min <= object_area_max <= 0.5")
        need(self.min_visible < self.object_area_min, "min_visible must be smaller than object_area_min")
        need(0 < self.head_frac_min <= self.head_frac_max < 0.5, "need 0 < head_frac_min <= head_frac_max < 0.5")
        need(0 <= self.context_classes <= min(len(CONTEXT_TEXTURES), self.n_classes),
             f"context_classes={self.context_classes} must lie in 0..min({len(CONTEXT_TEXTURES)}, n_classes)")
        need(0 < self.band_height_min <= self.band_height_max <= 0.9, "need 0 < band_height_min <= band_height_max <= 0.9")
        need(self.aspect_max >= 1.0, "aspect_max must be >= 1")
        need(self.ignore_width >= 0, "ignore_width must be >= 0")
        need(self.workers >= 1, "workers must be >= 1")
        need(0.0 <= self.body_cue <= 1.0, f"body_cue={self.body_cue} must lie in [0, 1]")
        need(0.0 <= self.body_cue_jitter < 1.0, f"body_cue_jitter={self.body_cue_jitter} must lie in [0, 1)")
        for name in ("same_class_prob", "headless_prob", "context_prob", "context_alone_prob",
                     "context_headless_prob", "clutter_prob", "split_background_prob", "min_visible_ratio"):
            v = getattr(self, name)
            need(0.0 <= v <= 1.0, f"{name}={v} must lie in [0, 1]")

    @property
    def classes(self) -> list[str]:
        return CLASS_NAMES[: self.n_classes]

    def head_of(self, c: int) -> tuple[str, str, str]:
        """(colour a, colour b, pattern) of class index ``c`` (0-based)."""
        if c == 1 and self.shared_context_head and self.context_classes >= 2:
            return CLASS_HEADS[0]
        return CLASS_HEADS[c]


def class_info(cfg: SyntheticConfig) -> list[dict[str, Any]]:
    """How each class is drawn (for dataset.json and reports)."""
    out = []
    for c, name in enumerate(cfg.classes):
        a, b, pat = cfg.head_of(c)
        out.append({
            "index": c + 1, "name": name, "shape": CLASS_SHAPES[c], "head": {"colors": [a, b], "pattern": pat},
            "context": CONTEXT_TEXTURES[c] if c < cfg.context_classes else None,
            "headless_prob": cfg.context_headless_prob if c < cfg.context_classes else cfg.headless_prob,
            "body": ({"color": list(CLASS_BODIES[c][0]), "texture": CLASS_BODIES[c][1], "period": CLASS_BODIES[c][2]}
                     if cfg.body_cue > 0 else None),
        })
    return out


# ---------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------


def _circle(r: float, cx: float = 0.0, cy: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _star(n: int = 5, r_out: float = 1.0, r_in: float = 0.45) -> np.ndarray:
    t = -np.pi / 2 + np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _shape(name: str) -> tuple[list[tuple[np.ndarray, int]], tuple[float, float]]:
    """Polygons of a body shape in local unit coordinates ([-1, 1]^2, y down).

    Returns:
        (ops, anchor): ops are (polygon (N, 2), value) drawn in order (value 1 fills, 0 cuts a hole);
        anchor is the local point where the head sits.
    """
    P = lambda pts: np.asarray(pts, np.float64)  # noqa: E731
    if name == "ellipse":
        e = _circle(1.0)
        e[:, 1] *= 0.6
        return [(e, 1)], (1.0, 0.0)
    if name == "triangle":
        return [(P([(0, -1), (0.9, 0.8), (-0.9, 0.8)]), 1)], (0.0, -1.0)
    if name == "ring":
        return [(_circle(1.0), 1), (_circle(0.55), 0)], (0.0, -1.0)
    if name == "rectangle":
        return [(P([(-1, -0.6), (1, -0.6), (1, 0.6), (-1, 0.6)]), 1)], (0.0, -0.6)
    if name == "star":
        return [(_star(), 1)], (0.0, -1.0)
    if name == "cross":
        a = 0.2
        return [(P([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                    (-1, -a), (-a, -a)]), 1)], (0.0, -1.0)
    if name == "crescent":
        return [(_circle(1.0), 1), (_circle(0.85, 0.5, -0.05), 0)], (-1.0, 0.0)
    if name == "L":
        return [(P([(-0.8, -1), (-0.3, -1), (-0.3, 0.5), (0.8, 0.5), (0.8, 1), (-0.8, 1)]), 1)], (-0.55, -1.0)
    if name == "T":
        return [(P([(-1, -1), (1, -1), (1, -0.55), (0.23, -0.55), (0.23, 1), (-0.23, 1), (-0.23, -0.55),
                    (-1, -0.55)]), 1)], (0.0, 1.0)
    if name == "arrow":
        return [(P([(-1, -0.22), (0.15, -0.22), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.22), (-1, 0.22)]), 1)], \
            (-1.0, 0.0)
    if name == "bowtie":
        return [(P([(-1, -0.8), (0, -0.15), (1, -0.8), (1, 0.8), (0, 0.15), (-1, 0.8)]), 1)], (-1.0, 0.0)
    if name == "U":
        return [(P([(-1, -1), (-0.52, -1), (-0.52, 0.45), (0.52, 0.45), (0.52, -1), (1, -1), (1, 1), (-1, 1)]), 1)], \
            (-0.76, -1.0)
    raise KeyError(name)


_SHAPES = {name: _shape(name) for name in CLASS_SHAPES}
_SUB = 4  # sub-pixel bits of cv2.fillPoly
_SUBF = float(1 << _SUB)


def _raster(ops, S: int, cx: float, cy: float, scale: float, aspect: float, angle: float) -> np.ndarray:
    """Rasterise local polygons placed at (cx, cy), radius ``scale`` px, stretched and rotated."""
    ca, sa = math.cos(angle), math.sin(angle)
    m = np.zeros((S, S), np.uint8)
    for poly, val in ops:
        x = poly[:, 0] * scale * aspect
        y = poly[:, 1] * scale / aspect
        px = cx + ca * x - sa * y
        py = cy + sa * x + ca * y
        pts = np.round(np.stack([px, py], 1) * _SUBF).astype(np.int32)
        cv2.fillPoly(m, [pts], int(val), lineType=cv2.LINE_8, shift=_SUB)
    return m.astype(bool)


def _local_to_image(pt, cx, cy, scale, aspect, angle):
    ca, sa = math.cos(angle), math.sin(angle)
    x, y = pt[0] * scale * aspect, pt[1] * scale / aspect
    return cx + ca * x - sa * y, cy + sa * x + ca * y


def _disc(S: int, cx: float, cy: float, r: float) -> np.ndarray:
    m = np.zeros((S, S), np.uint8)
    cv2.circle(m, (int(round(cx * _SUBF)), int(round(cy * _SUBF))), max(1, int(round(r * _SUBF))), 1, -1,
               lineType=cv2.LINE_8, shift=_SUB)
    return m.astype(bool)


def _blob(rng, S: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Irregular smooth blob (clutter)."""
    n = 40
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in (2, 3, 5):
        rad += rng.uniform(0.05, 0.25) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rad = np.clip(rad, 0.3, None)
    return _raster([(np.stack([rad * np.cos(t), rad * np.sin(t)], 1), 1)], S, cx, cy, r, 1.0, 0.0)


# ---------------------------------------------------------------------------
# textures
# ---------------------------------------------------------------------------


def _smooth_noise(rng, S: int, cells: int) -> np.ndarray:
    """Zero-mean unit-std low-frequency noise (S, S)."""
    g = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    n = cv2.resize(g, (S, S), interpolation=cv2.INTER_CUBIC)
    return (n - n.mean()) / (n.std() + 1e-6)


def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    return yy, xx


def _background(rng, S: int, yy: np.ndarray, split: bool) -> np.ndarray:
    def muted():
        hsv = np.array([[[rng.uniform(0, 180), rng.uniform(15, 80), rng.uniform(80, 205)]]], np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)

    img = np.empty((S, S, 3), np.float32)
    img[:] = muted()
    if split:  # wall / floor: a neutral horizontal division (no context meaning)
        y = int(rng.uniform(0.35, 0.7) * S)
        img[y:] = muted()
    shade = 1.0 + 0.12 * _smooth_noise(rng, S, int(rng.integers(2, 6)))
    img *= shade[..., None]
    img += rng.normal(0, rng.uniform(3, 9), (S, S, 3)).astype(np.float32)
    return img


def _band_texture(rng, kind: str, S: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    tex = np.empty((S, S, 3), np.float32)
    jitter = rng.uniform(-12, 12, 3).astype(np.float32)
    if kind == "water":
        tex[:] = np.array((35, 85, 165), np.float32) + jitter
        period = rng.uniform(4.0, 7.0) * S / 128
        phase = 2 * np.pi * (yy / period + 0.35 * _smooth_noise(rng, S, 4))
        wave = np.sin(phase)
        tex *= (1.0 + 0.15 * wave)[..., None]
        crest = np.clip((wave - 0.75) / 0.25, 0, 1)[..., None]
        tex = tex * (1 - 0.6 * crest) + np.array((185, 215, 245), np.float32) * 0.6 * crest
    elif kind == "sky":
        top = np.array((95, 150, 225), np.float32) + jitter
        bottom = np.array((175, 205, 240), np.float32) + jitter
        t = (yy / S)[..., None]
        tex[:] = top * (1 - t) + bottom * t
        cloud = np.clip((_smooth_noise(rng, S, int(rng.integers(4, 8))) - 0.5) * 1.5, 0, 1)[..., None]
        tex = tex * (1 - 0.85 * cloud) + 250.0 * 0.85 * cloud
    elif kind == "grass":
        tex[:] = np.array((55, 135, 45), np.float32) + jitter
        k = max(3, int(round(7 * S / 128)))
        streak = cv2.blur(rng.standard_normal((S, S)).astype(np.float32), (1, k)) * math.sqrt(k)
        tex *= (1.0 + 0.22 * np.clip(streak, -2.5, 2.5) + 0.08 * _smooth_noise(rng, S, 4))[..., None]
    elif kind == "sand":
        tex[:] = np.array((215, 185, 125), np.float32) + jitter
        tex *= (1.0 + 0.07 * _smooth_noise(rng, S, 6))[..., None]
        dots = rng.random((S, S)) < 0.06
        tex[dots] *= 0.65
    elif kind == "brick":
        tex[:] = np.array((165, 70, 50), np.float32) + jitter
        h = max(4, int(round(8 * S / 128)))
        w = 2 * h
        row = (yy // h).astype(np.int32)
        mortar = (yy % h < 1.2) | (((xx + (row % 2) * (w / 2)) % w) < 1.2)
        tex *= (1.0 + 0.06 * _smooth_noise(rng, S, 8))[..., None]
        tex[mortar] = (190, 185, 175)
    else:
        raise KeyError(kind)
    tex += rng.normal(0, 4, (S, S, 3)).astype(np.float32)
    return tex


def _body_texture(rng, color: np.ndarray, S: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    kind = BODY_TEXTURES[int(rng.integers(len(BODY_TEXTURES)))]
    tex = np.empty((S, S, 3), np.float32)
    tex[:] = color
    if kind == "mottled":
        tex *= (1.0 + 0.18 * _smooth_noise(rng, S, int(rng.integers(6, 12))))[..., None]
    elif kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(a) * xx + np.sin(a) * yy) / S
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
        tex *= (0.7 + 0.6 * ramp)[..., None]
    elif kind == "speckle":
        dots = rng.random((S, S)) < 0.08
        tex[dots] *= rng.uniform(0.6, 1.3)
    tex += rng.normal(0, 5, (S, S, 3)).astype(np.float32)
    return tex


def _class_body_texture(rng, c: int, strength: float, base: np.ndarray, S: int, yy: np.ndarray, xx: np.ndarray,
                        cx: float, cy: float, angle: float) -> np.ndarray:
    """Class ``c``'s body texture (v2): ``base`` (a pool texture in the mixed colour) modulated by the class pattern.

    The pattern runs in the object's frame (centre (cx, cy), rotation ``angle``), like stripes on a
    zebra, at a luminance contrast of ``0.35 * strength``.

    Returns:
        float32 (S, S, 3).
    """
    _, kind, period = CLASS_BODIES[c]
    p = max(3.0, period * S / 128)
    ca, sa = math.cos(angle), math.sin(angle)
    u = ca * (xx - cx) + sa * (yy - cy)
    v = -sa * (xx - cx) + ca * (yy - cy)
    ph = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        t = np.sin(2 * np.pi * u / p + ph)
    elif kind == "bands":
        t = np.sin(2 * np.pi * v / p + ph)
    elif kind == "rings":
        t = np.sin(2 * np.pi * np.sqrt(u * u + v * v) / p + ph)
    elif kind == "spots":
        du, dv = (u % p) - p / 2, (v % p) - p / 2
        t = np.where(du * du + dv * dv < (0.3 * p) ** 2, 1.0, -0.4)
    elif kind == "scales":
        t = np.sign(np.sin(2 * np.pi * u / p + ph) * np.sin(2 * np.pi * v / p))
    elif kind == "mottle":
        t = np.clip(_smooth_noise(rng, S, max(2, int(round(S / p)))), -1.5, 1.5) / 1.5
    else:
        raise KeyError(kind)
    return base * (1.0 + 0.35 * strength * t.astype(np.float32))[..., None]


def _head_texture(cfg_head, r: float, cx: float, cy: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    a_name, b_name, pattern = cfg_head
    ca, cb = np.array(_C[a_name], np.float32), np.array(_C[b_name], np.float32)
    p = max(3.0, 0.8 * r)  # pattern period (px)
    h = p / 2
    x, y = xx - cx, yy - cy
    if pattern == "hstripes":
        pat = np.floor(y / h) % 2 == 0
    elif pattern == "vstripes":
        pat = np.floor(x / h) % 2 == 0
    elif pattern == "diag":
        pat = np.floor((x + y) / (1.3 * h)) % 2 == 0
    elif pattern == "checker":
        pat = (np.floor(x / h) + np.floor(y / h)) % 2 == 0
    elif pattern == "dots":
        dx, dy = (x % p) - h, (y % p) - h
        pat = dx * dx + dy * dy < (0.33 * p) ** 2
    elif pattern == "rings":
        pat = np.floor(np.sqrt(x * x + y * y) / h) % 2 == 0
    else:
        raise KeyError(pattern)
    return np.where(pat[..., None], ca, cb)


# ---------------------------------------------------------------------------
# one image
# ---------------------------------------------------------------------------


@dataclass
class SyntheticImage:
    """One rendered image and its annotations (no file written).

    Attributes:
        image: uint8 (S, S, 3) RGB.
        mask: uint8 (S, S): 0 background, 1..C, 255 ignore.
        objects: one dict per visible instance: class (1-based), name, bbox (xmin, ymin, xmax, ymax, 1-based
            inclusive like VOC), area (visible px), head_area (visible head px), headless, truncated, on_band.
        bands: texture names of the background bands drawn.
        labels: sorted 1-based classes present.
        parts: uint8 (S, S) part map (:data:`PART_VALUES`: 0 background, 1 head, 2 body, 3 context band,
            4 clutter), without the ignore band.
    """

    image: np.ndarray
    mask: np.ndarray
    objects: list[dict[str, Any]]
    bands: list[str]
    labels: list[int]
    parts: np.ndarray


def _rng(cfg: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(cfg.seed), SPLITS.index(split), int(index)])


def _plan_classes(rng, cfg: SyntheticConfig) -> list[int]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cls = [int(rng.integers(cfg.n_classes))]
    for _ in range(n - 1):
        if rng.random() < cfg.same_class_prob or len(set(cls)) == cfg.n_classes:
            cls.append(cls[int(rng.integers(len(cls)))])
        else:
            rest = [c for c in range(cfg.n_classes) if c not in cls]
            cls.append(rest[int(rng.integers(len(rest)))])
    return cls


def _band_layout(rng, cfg: SyntheticConfig, kinds: list[str], S: int) -> list[tuple[str, int, int]]:
    """Vertical extents (y0, y1) of the bands, stacked by altitude (sky on top, water at the bottom)."""
    if not kinds:
        return []
    kinds = sorted(kinds, key=lambda k: (_ALTITUDE[k], k))
    hs = rng.uniform(cfg.band_height_min, cfg.band_height_max, len(kinds)) * S
    if hs.sum() > 0.9 * S:
        hs *= 0.9 * S / hs.sum()
    hs = np.maximum(hs.astype(int), 4)
    if len(kinds) == 1:
        y0 = 0 if _ALTITUDE[kinds[0]] == 0 else S - hs[0]
        return [(kinds[0], int(y0), int(y0 + hs[0]))]
    gap = (S - hs.sum()) / (len(kinds) - 1)
    out, y = [], 0.0
    for k, h in zip(kinds, hs):
        out.append((k, int(round(y)), int(round(y + h))))
        y += h + gap
    return out


def render_image(cfg: SyntheticConfig, split: str, index: int) -> SyntheticImage:
    """Render image ``index`` (0-based) of ``split``; the result depends only on (cfg, split, index)."""
    rng = _rng(cfg, split, index)
    for _ in range(50):
        out = _try_render(rng, cfg)
        if out is not None:
            return out
    raise RuntimeError(f"could not render {split} image {index}: the object size / visibility settings conflict")


def _try_render(rng, cfg: SyntheticConfig) -> SyntheticImage | None:
    S = cfg.image_size
    yy, xx = _grid(S)
    n_px = S * S
    planned = _plan_classes(rng, cfg)
    K = cfg.context_classes

    # background and context bands
    img = _background(rng, S, yy, rng.random() < cfg.split_background_prob)
    parts = np.zeros((S, S), np.uint8)  # PART_VALUES; objects are added once placed
    band_kinds, on_band = [], set()
    for c in range(K):
        if c in planned:
            if rng.random() < cfg.context_prob:
                band_kinds.append(CONTEXT_TEXTURES[c])
                on_band.add(c)
        elif rng.random() < cfg.context_alone_prob:
            band_kinds.append(CONTEXT_TEXTURES[c])
    bands = _band_layout(rng, cfg, band_kinds, S)
    band_range = {}
    for kind, y0, y1 in bands:
        amp = rng.uniform(0.005, 0.02) * S
        lam = rng.uniform(0.3, 0.8) * S
        ph = rng.uniform(0, 2 * np.pi)
        wob = amp * np.sin(2 * np.pi * xx / lam + ph)
        top = y0 + (wob if y0 > 0 else 0)
        bot = y1 + (wob if y1 < S else 0)
        region = (yy >= top) & (yy < bot)
        img[region] = _band_texture(rng, kind, S, yy, xx)[region]
        band_range[kind] = (y0, y1)
        parts[region] = PART_VALUES["context"]

    # clutter (background)
    if rng.random() < cfg.clutter_prob:
        for _ in range(int(rng.integers(1, cfg.max_clutter + 1))):
            area = math.exp(rng.uniform(math.log(cfg.clutter_area_min), math.log(cfg.clutter_area_max))) * n_px
            cx, cy = rng.uniform(0, S, 2)
            kind = int(rng.integers(3))
            if kind == 0:
                m = _blob(rng, S, cx, cy, math.sqrt(area / math.pi))
            elif kind == 1:  # thin bar
                L = math.sqrt(area * rng.uniform(6, 14))
                bar = [(np.array([(-1, -0.5), (1, -0.5), (1, 0.5), (-1, 0.5)], float) * [1, 2 * area / (L * L)], 1)]
                m = _raster(bar, S, cx, cy, L / 2, 1.0, rng.uniform(0, np.pi))
            else:  # random convex polygon
                pts = rng.uniform(-1, 1, (6, 2)).astype(np.float32)
                hull = cv2.convexHull(pts)[:, 0].astype(np.float64)
                m = _raster([(hull, 1)], S, cx, cy, math.sqrt(area / 2.0), 1.0, 0.0)
            col = BODY_POOL[int(rng.integers(len(BODY_POOL)))] + rng.uniform(-15, 15, 3).astype(np.float32)
            img[m] = _body_texture(rng, col, S, yy, xx)[m]
            parts[m] = PART_VALUES["clutter"]

    # objects, drawn in random order (later ones occlude)
    order = rng.permutation(len(planned))
    inst = np.zeros((S, S), np.int16)  # 0 = none, k = object k (1-based)
    head_inst = np.zeros((S, S), np.int16)
    placed: list[dict[str, Any]] = []
    min_px = cfg.min_visible * n_px
    for oi in order:
        c = planned[oi]
        headless = rng.random() < (cfg.context_headless_prob if c < K else cfg.headless_prob)
        ops, anchor = _SHAPES[CLASS_SHAPES[c]]
        k = len(placed) + 1
        for _try in range(25):
            target = math.exp(rng.uniform(math.log(cfg.object_area_min), math.log(cfg.object_area_max))) * n_px
            aspect = math.exp(rng.uniform(-math.log(cfg.aspect_max), math.log(cfg.aspect_max)))
            angle = rng.uniform(0, 2 * np.pi)
            cx = rng.uniform(0.15, 0.85) * S
            if c in on_band:
                y0, y1 = band_range[CONTEXT_TEXTURES[c]]
                cy = rng.uniform(y0 + 0.2 * (y1 - y0), y1 - 0.2 * (y1 - y0))
            else:
                cy = rng.uniform(0.15, 0.85) * S
            head_frac = 0.0 if headless else rng.uniform(cfg.head_frac_min, cfg.head_frac_max)
            # size the body so that body + head has the target area
            probe = 0.25 * S
            a0 = _raster(ops, S * 2, S, S, probe, aspect, angle).sum()  # unclipped, on a larger canvas
            scale = probe * math.sqrt(target * (1 - head_frac) / max(a0, 1))
            body = _raster(ops, S, cx, cy, scale, aspect, angle)
            head = np.zeros_like(body)
            hx = hy = hr = 0.0
            if not headless:
                hr = math.sqrt(target * head_frac / math.pi)
                hx, hy = _local_to_image((anchor[0] * 0.9, anchor[1] * 0.9), cx, cy, scale, aspect, angle)
                head = _disc(S, hx, hy, hr)
            obj = body | head
            full = int(obj.sum())
            if full < max(min_px, 0.55 * target):  # too much of it outside the image
                continue
            if not headless and head.sum() < cfg.min_visible_ratio * math.pi * hr * hr:  # head cut off
                continue
            new_inst = inst.copy()
            new_inst[obj] = k
            new_head = head_inst.copy()
            new_head[obj] = 0
            new_head[head] = k
            ok = True
            for p in placed:
                vis = int((new_inst == p["k"]).sum())
                if vis < max(min_px, cfg.min_visible_ratio * p["full"]):
                    ok = False
                    break
                if not p["headless"] and (new_head == p["k"]).sum() < cfg.min_visible_ratio * p["head_full"]:
                    ok = False
                    break
            if not ok:
                continue
            # colour: shared pool (v2: mixed with the class body colour), contrasting with what is underneath
            under = img[obj].mean(0)
            strength = 0.0
            if cfg.body_cue > 0:
                strength = cfg.body_cue * (1.0 + cfg.body_cue_jitter * rng.uniform(-1, 1))
            for _c in range(12):
                col = BODY_POOL[int(rng.integers(len(BODY_POOL)))] + rng.uniform(-15, 15, 3).astype(np.float32)
                if strength > 0:
                    col = (1 - strength) * col + strength * np.asarray(CLASS_BODIES[c][0], np.float32)
                if np.linalg.norm(col - under) > 60:
                    break
            tex = _body_texture(rng, col, S, yy, xx)
            if strength > 0:
                tex = _class_body_texture(rng, c, strength, tex, S, yy, xx, cx, cy, angle)
            img[body] = tex[body]
            if not headless:
                img[head] = _head_texture(cfg.head_of(c), hr, hx, hy, yy, xx)[head]
            inst, head_inst = new_inst, new_head
            placed.append({"k": k, "c": c, "full": full, "head_full": int(head.sum()), "headless": headless,
                           "on_band": c in on_band})
            break
    if not placed:
        return None

    parts[inst > 0] = PART_VALUES["body"]
    parts[head_inst > 0] = PART_VALUES["head"]

    # labels
    cls_of = np.zeros(len(placed) + 1, np.uint8)
    for p in placed:
        cls_of[p["k"]] = p["c"] + 1
    mask = cls_of[inst]
    if cfg.ignore_width > 0:
        ker = np.ones((cfg.ignore_width + 1, cfg.ignore_width + 1), np.uint8)
        border = cv2.dilate(mask, ker) != cv2.erode(mask, ker)
        mask = mask.copy()
        mask[border] = 255

    objects = []
    for p in placed:
        vis = inst == p["k"]
        ys, xs = np.nonzero(vis)
        if ys.size == 0 or not (mask == p["c"] + 1).any():
            return None
        objects.append({
            "class": p["c"] + 1, "name": cfg.classes[p["c"]],
            "bbox": [int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1],
            "area": int(ys.size), "head_area": int((head_inst == p["k"]).sum()), "headless": bool(p["headless"]),
            "truncated": bool(xs.min() == 0 or ys.min() == 0 or xs.max() == S - 1 or ys.max() == S - 1),
            "on_band": bool(p["on_band"]),
        })

    # photometric finish: slight blur (soft edges) and sensor noise
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    img += rng.normal(0, 2.0, img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    labels = sorted({o["class"] for o in objects})
    return SyntheticImage(image=image, mask=mask, objects=objects, bands=[b[0] for b in bands], labels=labels,
                          parts=parts)


# ---------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------


def image_id(split: str, index: int) -> str:
    """Id of image ``index`` (0-based) of ``split``: ``syn_<split>_<index + 1:06d>``."""
    return f"syn_{split}_{index + 1:06d}"


def voc_xml(image_id_: str, sample: SyntheticImage, classes: list[str]) -> str:
    """Pascal VOC annotation XML of one image (one <object> per visible instance)."""
    h, w = sample.mask.shape
    objs = []
    for o in sample.objects:
        x0, y0, x1, y1 = o["bbox"]
        objs.append(
            "  <object>\n"
            f"    <name>{escape(classes[o['class'] - 1])}</name>\n"
            "    <pose>Unspecified</pose>\n"
            f"    <truncated>{int(o['truncated'])}</truncated>\n"
            "    <difficult>0</difficult>\n"
            f"    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>\n"
            "  </object>\n")
    return (
        "<annotation>\n"
        "  <folder>synthetic</folder>\n"
        f"  <filename>{image_id_}.jpg</filename>\n"
        "  <source><database>pnoc synthetic</database></source>\n"
        f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>\n"
        "  <segmented>1</segmented>\n"
        + "".join(objs) +
        "</annotation>\n")


def _summary(sample: SyntheticImage) -> dict[str, Any]:
    m = sample.mask
    return {
        "labels": sample.labels, "bands": sample.bands,
        "objects": [(o["class"], o["area"], o["head_area"], o["headless"]) for o in sample.objects],
        "ignore": int((m == 255).sum()), "pixels": int(m.size),
    }


def _write_one(args) -> dict[str, Any]:
    root, cfg, split, index = args
    sample = render_image(cfg, split, index)
    iid = image_id(split, index)
    write_image(root / "JPEGImages" / f"{iid}.jpg", sample.image, quality=cfg.jpeg_quality,
                subsampling=0 if cfg.jpeg_chroma_full else 2)
    write_mask(root / "SegmentationClass" / f"{iid}.png", sample.mask)
    write_text(root / "Annotations" / f"{iid}.xml", voc_xml(iid, sample, cfg.classes))
    if cfg.write_parts:
        write_mask(root / "SegmentationPart" / f"{iid}.png", sample.parts)
    return _summary(sample)


def compute_stats(cfg: SyntheticConfig, summaries: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
    """Dataset statistics from per-image summaries (see :func:`generate`)."""
    C = cfg.n_classes
    n = len(summaries)
    img_count = np.zeros(C, int)
    inst_count = np.zeros(C, int)
    size_sum = np.zeros(C)
    co = np.zeros(C, int)
    card, multi = [], 0
    ignore = pixels = fg = head_px = n_obj = n_headless = 0
    band_present = {CONTEXT_TEXTURES[c]: [0, 0] for c in range(cfg.context_classes)}  # [band, images] with class
    band_absent = {CONTEXT_TEXTURES[c]: [0, 0] for c in range(cfg.context_classes)}
    for s in summaries:
        labels = s["labels"]
        card.append(len(labels))
        multi += len(labels) > 1
        for c in labels:
            img_count[c - 1] += 1
            co[c - 1] += len(labels) > 1
        for c, area, harea, headless in s["objects"]:
            inst_count[c - 1] += 1
            size_sum[c - 1] += area / s["pixels"]
            fg += area
            head_px += harea
            n_obj += 1
            n_headless += bool(headless)
        ignore += s["ignore"]
        pixels += s["pixels"]
        for c in range(cfg.context_classes):
            t = CONTEXT_TEXTURES[c]
            d = band_present if (c + 1) in labels else band_absent
            d[t][1] += 1
            d[t][0] += t in s["bands"]
    ratio = lambda a, b: round(float(a) / b, 4) if b else None  # noqa: E731
    per_class = {}
    for c, name in enumerate(cfg.classes):
        per_class[name] = {
            "images": int(img_count[c]), "instances": int(inst_count[c]),
            "mean_rel_size": ratio(size_sum[c], inst_count[c]),
            "cooccurrence_rate": ratio(co[c], img_count[c]),
        }
    context = {}
    for c in range(cfg.context_classes):
        t = CONTEXT_TEXTURES[c]
        context[cfg.classes[c]] = {
            "texture": t,
            "band_given_class": ratio(*band_present[t]),
            "band_given_no_class": ratio(*band_absent[t]),
        }
    return {
        "n_images": n, "splits": counts,
        "per_class": per_class,
        "mean_labels_per_image": ratio(sum(card), n),
        "multi_class_fraction": ratio(multi, n),
        "objects_per_image": ratio(n_obj, n),
        "headless_fraction": ratio(n_headless, n_obj),
        "foreground_fraction": ratio(fg, pixels),
        "ignore_fraction": ratio(ignore, pixels),
        "head_fraction_of_foreground": ratio(head_px, fg),
        "context": context,
    }


OWNER_MARKER = ".pnoc-synthetic"
"""File the generator writes first into a folder it creates; it writes into no folder without it."""


def claim_folder(root: Path) -> None:
    """Make ``root`` the generator's own folder, or refuse a folder someone else filled.

    The generator rewrites lists, labels and images: run on a user's dataset (say, by ``snakemake -F``
    with a folder that is really theirs) it would destroy it. It therefore writes only into a new or
    empty folder, which it marks with :data:`OWNER_MARKER`, or into a folder carrying that mark.

    Raises:
        DataError: ``root`` is a file, or a non-empty folder without the mark.
    """
    from pnoc.io import DataError

    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: is a file; dataset.root of the synthetic benchmark must be a folder")
    if root.is_dir() and not (root / OWNER_MARKER).is_file() and any(root.iterdir()):
        raise DataError(
            f"{root}: this folder was not created by the synthetic generator (no {OWNER_MARKER} in it) and is not "
            f"empty, so it is left untouched. For your own data set dataset.name: custom (README: Bring your own "
            f"data); for the benchmark set dataset.root to a new folder, or delete this one if it is an old copy"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / OWNER_MARKER).write_text("written by pnoc.data.synthetic; this folder is regenerated on demand\n")


def generate(root: str | Path, cfg: SyntheticConfig) -> dict[str, Any]:
    """Write the synthetic dataset in Pascal VOC layout under ``root`` (see the module docstring).

    ``dataset.json`` is removed first and written last, so its presence marks a complete dataset.
    Every file is written atomically.

    Returns:
        the stats dict (also stored in dataset.json): n_images, splits, per_class {name: images,
        instances, mean_rel_size, cooccurrence_rate}, mean_labels_per_image, multi_class_fraction,
        objects_per_image, headless_fraction, foreground_fraction, ignore_fraction,
        head_fraction_of_foreground, context {name: texture, band_given_class, band_given_no_class}.
    """
    cfg.validate()
    root = Path(root)
    claim_folder(root)
    meta = root / "dataset.json"
    if meta.exists():
        meta.unlink()
    t0 = time.time()
    counts = {"train": int(cfg.n_train), "val": int(cfg.n_val)}
    jobs = [(root, cfg, split, i) for split in SPLITS for i in range(counts[split])]
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation") + \
            (("SegmentationPart",) if cfg.write_parts else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if cfg.workers > 1 and len(jobs) > 32:
        import multiprocessing as mp

        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with mp.get_context(method).Pool(min(cfg.workers, 8)) as pool:
            summaries = pool.map(_write_one, jobs, chunksize=16)
    else:
        summaries = [_write_one(j) for j in jobs]
    for split in SPLITS:
        ids = [image_id(split, i) for i in range(counts[split])]
        write_text(root / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    # the class list of a custom dataset (dataset.name: custom), so a generated folder also serves as one
    write_text(root / "classes.txt", "".join(f"{c}\n" for c in ["background", *cfg.classes]))
    stats = compute_stats(cfg, summaries, counts)
    write_json(meta, {"name": "synthetic", "classes": cfg.classes, "config": dataclasses.asdict(cfg),
                      "stats": stats, "class_info": class_info(cfg)})
    log.info("generated %d images in %s in %.1f s", len(jobs), root, time.time() - t0)
    return stats
