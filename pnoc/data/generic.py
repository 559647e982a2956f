"""An auxiliary "generic features" corpus: the demo's stand-in for ImageNet pretraining.

The paper starts every network from ImageNet weights, which the demo cannot download. Rule
``pretrain_backbone`` (:mod:`pnoc.cam.pretrain_backbone`) instead pretrains the backbone on this
in-memory multi-label classification task, whose categories are generic shapes, textures and
colours that share no class with the benchmark (see :data:`CATEGORIES`), so that stages configured
with ``weights: generic`` start from features that were never trained on a benchmark label.

Each image is a muted, smoothly shaded background (the benchmark's background generator) with 1-3
objects. Every object is one of :data:`SHAPES` at a random size (6-30 % of the image area by
default), stretch, rotation and position, filled with one of :data:`TEXTURES` in two colours: a
saturated *dominant* colour whose hue falls in one of :data:`HUES`, and a near-grey dark or light
partner colour that only carries the pattern. Objects stay whole: inside the frame and apart from
each other, so every labelled outline is complete. An image's label vector is the union, over its
objects, of the object's shape, texture and hue categories.

Nothing is written to disk: :func:`render_generic` draws image ``index`` of a split from its own
random stream ``np.random.default_rng([seed, split_id, index])``, so a smaller corpus is a prefix of
a larger one and a :class:`GenericSet` can render in data-loader workers.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from pnoc.data.synthetic import SPLITS, _background, _grid, _raster, _smooth_noise
from pnoc.data.transforms import Augmenter, normalize, to_tensor_image
from pnoc.distributed import SeededItems

SHAPES = ["pentagon", "hexagon", "diamond", "trapezoid", "parallelogram", "semicircle", "chevron", "heart"]
"""Object outlines of the corpus, none of them a benchmark body shape (``synthetic.CLASS_SHAPES``)."""

TEXTURES = ["flat", "hstripes", "vstripes", "diagonal", "checker", "dots", "rings", "mottled"]
"""Fill patterns, axis-aligned in image coordinates (so a rotated object keeps its texture category)."""

HUES = ["red", "yellow", "green", "cyan", "blue", "magenta"]
"""Hue bins (60° wide, centred on 0°, 60°, ...) of an object's dominant colour."""

CATEGORIES = ([f"shape:{s}" for s in SHAPES] + [f"texture:{t}" for t in TEXTURES]
              + [f"hue:{h}" for h in HUES])
"""The K = 22 labels of the corpus, in label-vector order: shapes, then textures, then hues.

Why they are disjoint from the benchmark's classes: a benchmark class (``synthetic.CLASS_NAMES``:
boat, kite, frog, ...) is an object category defined by a *combination* of a body shape from
``synthetic.CLASS_SHAPES``, a head with a specific colour pair and pattern and, for some classes,
a context band. None of these labels names such a category. The shape labels are outlines that no
benchmark class uses (a test checks the two lists do not intersect), and texture and hue are
single appearance attributes shared by objects of every shape here, never tied to one outline or
to a colour pair, so no corpus label is a benchmark label under another name. This mirrors the role
of ImageNet for VOC: generic features (edges, outlines, colour, periodic texture) are learned from
other categories, and the classes of the target task are learned only in its own training stage.
"""

N_CATEGORIES = len(CATEGORIES)


def _f(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class GenericConfig:
    """Parameters of the auxiliary corpus."""

    seed: int = _f(0, "corpus seed; image i of split s uses the stream default_rng([seed, s, i])")
    n_train: int = _f(4000, "images in the train split")
    n_val: int = _f(500, "images in the val split")
    image_size: int = _f(112, "side of the square images (px)")
    min_objects: int = _f(1, "fewest objects per image")
    max_objects: int = _f(3, "most objects per image (one that finds no free place is left out)")
    object_area_min: float = _f(0.06, "smallest object area as a fraction of the image (log-uniform)")
    object_area_max: float = _f(0.30, "largest object area as a fraction of the image")

    def size(self, split: str) -> int:
        """Number of images of ``split`` (``train`` or ``val``)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: use one of {SPLITS}")
        return self.n_train if split == "train" else self.n_val


# ---------------------------------------------------------------------------- shapes
def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _outline(name: str) -> np.ndarray:
    """Polygon (N, 2) of a corpus shape in local unit coordinates ([-1, 1]^2, y down)."""
    P = lambda pts: np.asarray(pts, np.float64)  # noqa: E731
    if name == "pentagon":
        return _regular(5)
    if name == "hexagon":
        return _regular(6, 0.0)
    if name == "diamond":  # a rhombus 2 x 1.2: with stretch <= 1.2 it never becomes a square (rectangle)
        return P([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])
    if name == "trapezoid":
        return P([(-1, 0.6), (1, 0.6), (0.45, -0.6), (-0.45, -0.6)])
    if name == "parallelogram":  # sheared: no right angle, so not a rectangle
        return P([(-1, 0.55), (0.35, 0.55), (1, -0.55), (-0.35, -0.55)])
    if name == "semicircle":
        t = np.linspace(0, np.pi, 25)
        return np.stack([np.cos(t), 0.5 - np.sin(t)], 1)
    if name == "chevron":  # a thick, narrow "V" (~45°, far from the right angle of the benchmark's L)
        return P([(-0.8, -1), (-0.38, -1), (0, 0.15), (0.38, -1), (0.8, -1), (0, 1)])
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], 1) / 17.0
    raise KeyError(name)


def _polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


_OUTLINES = {name: _outline(name) for name in SHAPES}
_UNIT_AREA = {name: _polygon_area(p) for name, p in _OUTLINES.items()}
_ASPECT_MAX = 1.2  # object stretch; the diamond stays a non-square rhombus below 1/0.6^0.5 = 1.29
_GAP = np.ones((5, 5), np.uint8)  # dilation kernel: 2 px between objects


# ---------------------------------------------------------------------------- colours and textures
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0


def _colours(rng, hue_bin: int) -> tuple[np.ndarray, np.ndarray]:
    """(dominant, partner) RGB float32 (3,) colours.

    The dominant colour is saturated with its hue within ±20° of the bin centre (a 10° margin to
    the neighbouring bins keeps the hue label unambiguous); the partner is near-grey, dark or
    light, so it carries the pattern by luminance without adding a second hue.
    """
    a = _hsv((hue_bin + rng.uniform(-1 / 3, 1 / 3)) / 6.0, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    h = rng.uniform(0, 1)
    if rng.random() < 0.5:
        b = _hsv(h, rng.uniform(0.0, 0.25), rng.uniform(0.05, 0.3))
    else:
        b = _hsv(h, rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0))
    return a, b


def _texture(rng, kind: str, a: np.ndarray, b: np.ndarray, yy: np.ndarray, xx: np.ndarray,
             cx: float, cy: float, S: int) -> np.ndarray:
    """A fill of texture ``kind`` in colours ``a`` (dominant) and ``b`` over a window of the image.

    Args:
        yy, xx: float32 (h, w) image coordinates of the window's pixels (the object's bounding box).
        cx, cy: the object's centre (rings are centred there).
        S: image side; the pattern period scales with it.

    Returns:
        float32 (h, w, 3).
    """
    h, w = yy.shape
    if kind == "flat":
        return np.broadcast_to(a, (h, w, 3))
    if kind == "mottled":
        # b covers ~30 % of the object in smooth patches: a stays the dominant colour
        n = _smooth_noise(rng, max(h, w), int(rng.integers(3, 6)))[:h, :w]
        t = 1.0 / (1.0 + np.exp(-(2.5 * n - 1.3)))
        return a + (b - a) * t[..., None]
    p = max(3.0, rng.uniform(0.05, 0.12) * S)  # period (px): 6-13 px at 112 px
    half = p / 2
    x, y = xx - cx + rng.uniform(0, p), yy - cy + rng.uniform(0, p)
    if kind == "hstripes":
        pat = np.floor(y / half) % 2 == 0
    elif kind == "vstripes":
        pat = np.floor(x / half) % 2 == 0
    elif kind == "diagonal":
        pat = np.floor((x + (1 if rng.random() < 0.5 else -1) * y) / (1.3 * half)) % 2 == 0
    elif kind == "checker":
        pat = (np.floor(x / half) + np.floor(y / half)) % 2 == 0
    elif kind == "dots":  # b dots on a: a dominates (dots cover ~35 % of the area)
        dx, dy = (x % p) - half, (y % p) - half
        pat = dx * dx + dy * dy >= (0.33 * p) ** 2
    elif kind == "rings":
        pat = np.floor(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / half) % 2 == 0
    else:
        raise KeyError(kind)
    return np.where(pat[..., None], a, b)


# ---------------------------------------------------------------------------- one image
def _rng(cfg: GenericConfig, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {SPLITS}")
    return np.random.default_rng([int(cfg.seed), SPLITS.index(split), int(index)])


def render_generic(cfg: GenericConfig, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Render image ``index`` (0-based) of ``split``; the result depends only on (cfg, split, index).

    Args:
        cfg: corpus parameters.
        split: ``train`` or ``val``.
        index: image index (any non-negative integer; ``n_train``/``n_val`` only size the datasets).

    Returns:
        image: uint8 (S, S, 3) RGB, S = ``cfg.image_size``.
        labels: float32 (K,) multi-hot over :data:`CATEGORIES` (K = 22): the shape, texture and hue of
            every object drawn (at least one: the first object always finds a place).
    """
    rng = _rng(cfg, split, index)
    S = cfg.image_size
    yy, xx = _grid(S)
    img = _background(rng, S, yy, rng.random() < 0.3)
    occupied = np.zeros((S, S), np.uint8)  # objects so far, grown by 2 px so that outlines never touch
    labels = np.zeros(N_CATEGORIES, np.float32)
    lo, hi = math.log(cfg.object_area_min), math.log(cfg.object_area_max)
    for _ in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
        shape = int(rng.integers(len(SHAPES)))
        texture = int(rng.integers(len(TEXTURES)))
        hue = int(rng.integers(len(HUES)))
        scale = math.sqrt(math.exp(rng.uniform(lo, hi)) * S * S / _UNIT_AREA[SHAPES[shape]])  # stretch keeps area
        aspect = math.exp(rng.uniform(-math.log(_ASPECT_MAX), math.log(_ASPECT_MAX)))
        angle = rng.uniform(0, 2 * math.pi)
        # extent of the placed outline around its centre; a shape that cannot fit the frame is shrunk
        poly = _OUTLINES[SHAPES[shape]]
        u, v = poly[:, 0] * aspect, poly[:, 1] / aspect
        px, py = math.cos(angle) * u - math.sin(angle) * v, math.sin(angle) * u + math.cos(angle) * v
        scale = min(scale, (S - 3) / max(np.ptp(px), np.ptp(py)))
        # whole outlines only: the object stays inside the frame and off the other objects (a cut or
        # occluded outline would be a wrong shape label); after 10 tries it is left out
        for _attempt in range(10):
            cx = rng.uniform(1 - scale * px.min(), S - 1 - scale * px.max())
            cy = rng.uniform(1 - scale * py.min(), S - 1 - scale * py.max())
            m = _raster([(poly, 1)], S, cx, cy, scale, aspect, angle)
            if not (occupied.view(bool) & m).any():
                break
        else:
            continue
        a, b = _colours(rng, hue)
        # texture only the bounding box: 3-5x cheaper than the full image for a 5-30 % object
        x0, y0, w, h = cv2.boundingRect(m.view(np.uint8))
        box = (slice(y0, y0 + h), slice(x0, x0 + w))
        mb = m[box]
        img[box][mb] = _texture(rng, TEXTURES[texture], a, b, yy[box], xx[box], cx, cy, S)[mb]
        occupied |= cv2.dilate(m.view(np.uint8), _GAP)
        labels[[shape, len(SHAPES) + texture, len(SHAPES) + len(TEXTURES) + hue]] = 1.0
    img += 3.0 * rng.standard_normal((S, S, 3), np.float32)  # sensor noise over the objects too
    return np.clip(img, 0, 255).astype(np.uint8), labels


class GenericSet(SeededItems):
    """The corpus as a ``torch.utils.data.Dataset``, rendered on access (workers render in parallel).

    Items: ``(x float (3, crop, crop) normalised, y float (K,), index)``, as
    :class:`pnoc.data.loaders.ClassificationSet`, so the training loops are the same.

    Args:
        cfg: corpus parameters.
        split: ``train`` or ``val``.
        augmenter: flip / resize / crop applied to each rendered image (``None``: normalise only).
        cache: keep every rendered image (uint8, ``n * S * S * 3`` bytes: 150 MB for 4000 images at
            112 px) so later epochs skip the rendering. Worth it only without data-loader workers: a
            worker's cache dies with the worker at the end of the epoch.
    """

    def __init__(self, cfg: GenericConfig, split: str, augmenter: Augmenter | None = None, cache: bool = False):
        self.cfg, self.split, self.aug = cfg, split, augmenter
        self.n = cfg.size(split)
        self.classes = list(CATEGORIES)
        self._images = np.zeros((self.n, cfg.image_size, cfg.image_size, 3), np.uint8) if cache else None
        self._labels = np.zeros((self.n, N_CATEGORIES), np.float32) if cache else None
        self._done = np.zeros(self.n, bool) if cache else None

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i`` and its labels (see :func:`render_generic`), from the cache when enabled."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self._images is None:
            return render_generic(self.cfg, self.split, i)
        if not self._done[i]:
            self._images[i], self._labels[i] = render_generic(self.cfg, self.split, i)
            self._done[i] = True
        return self._images[i], self._labels[i]

    def item(self, i: int):
        image, labels = self.sample(i)
        img = to_tensor_image(image)
        x = normalize(img) if self.aug is None else self.aug(img)[0]
        return x, torch.from_numpy(labels.copy()), i
