"""Affinity labels (stage 7) and the inter-pixel pair machinery of AffinityNet (stage 8).

Affinity labels (spec §8) are uint8 maps: 0 confident background, 1..C confident class,
255 uncertain. Two builders: :func:`affinity_labels_classic` (IRN/PSA: two CAM thresholds)
and :func:`affinity_labels_saliency` (P-NOC: the saliency map decides background).

Pairs (spec §9) live on the stride-4 grid. A pixel p is paired with p + d for every
direction d of the half-disc ``{(dy, dx): dy² + dx² < r², dy > 0 or (dy == 0 and dx > 0)}``
(the other half is the same pairs seen from the other end). The affinity of a pair is
``1 − max`` of the boundary probability over its *path*: the grid cells closer than 1 to
the segment from p to p + d. Every map of pairs here has shape (B, D, h, w), indexed by the
source pixel p; a pair whose target falls outside the image has affinity 0 (the boundary
is padded with 1) and is never a training pair (its label is padded with 255).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pnoc.crf import crf_label

IGNORE = 255


# ---------------------------------------------------------------------------
# affinity labels
# ---------------------------------------------------------------------------


def _argmax_with_bg(cams: np.ndarray, bg: float) -> np.ndarray:
    """Index map over ``[bg plane, cams...]``: 0 = background, k + 1 = ``cams[k]``.

    Ties go to the background (np.argmax takes the first), so a class must score strictly
    above ``bg`` to win.
    """
    k, h, w = cams.shape
    stack = np.concatenate([np.full((1, h, w), bg, dtype=np.float32), cams.astype(np.float32, copy=False)])
    return np.argmax(stack, axis=0)


def _check_cams(cams, keys) -> tuple[np.ndarray, np.ndarray]:
    cams = np.asarray(cams, dtype=np.float32)
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, H, W), got shape {cams.shape}")
    if cams.shape[0] != keys.shape[0]:
        raise ValueError(f"{cams.shape[0]} CAM planes but {keys.shape[0]} keys")
    if keys.size and (keys.min() < 1 or keys.max() > 254):
        raise ValueError(f"keys must be class ids in 1..254 (0 is background), got {keys.tolist()}")
    return cams, keys


def _refine(img, labels: np.ndarray, n_labels: int, crf: Mapping | None) -> np.ndarray:
    if crf is None:
        return labels
    if img is None:
        raise ValueError("a CRF needs the image: pass img or crf=None")
    return crf_label(img, labels, n_labels, **dict(crf))


def affinity_labels_classic(
    cams: np.ndarray,
    keys: Sequence[int] | np.ndarray,
    img: np.ndarray | None,
    fg_thr: float = 0.30,
    bg_thr: float = 0.05,
    crf: Mapping | None = None,
) -> np.ndarray:
    """IRN/PSA affinity labels from two CAM thresholds.

    A high threshold gives a conservative foreground map, a low one a conservative
    background map; pixels that are background only under the high one are uncertain.

    Args:
        cams: float (K, H, W) in [0, 1], one plane per positive class.
        keys: (K,) class ids (1..C) of the planes.
        img: uint8 (H, W, 3) RGB image (only needed when ``crf`` is not None).
        fg_thr: background score of the foreground map.
        bg_thr: background score of the background map.
        crf: keyword arguments of :func:`pnoc.crf.crf_label` (``{}`` for its defaults,
            t = 10 and gt_prob 0.7) or None for no refinement.

    Returns:
        uint8 (H, W): 0 background, class id, 255 uncertain.
    """
    cams, keys = _check_cams(cams, keys)
    n = cams.shape[0] + 1
    fg = _refine(img, _argmax_with_bg(cams, fg_thr), n, crf)
    bg = _refine(img, _argmax_with_bg(cams, bg_thr), n, crf)
    lut = np.concatenate([[0], keys]).astype(np.uint8)
    out = lut[fg]
    out[fg == 0] = IGNORE
    # both CRFs run independently, so "bg under the low threshold" alone does not imply fg == 0
    out[(fg == 0) & (bg == 0)] = 0
    return out


def affinity_labels_saliency(
    cams: np.ndarray,
    keys: Sequence[int] | np.ndarray,
    saliency: np.ndarray,
    img: np.ndarray | None,
    fg_thr: float = 0.40,
    bg_thr: float = 0.10,
    crf: Mapping | None = None,
    salient_thr: float | None = None,
) -> np.ndarray:
    """P-NOC saliency-aware affinity labels (spec §8).

    The saliency map decides where the background is; CAMs only label the salient region.

    Args:
        cams: float (K, H, W) in [0, 1].
        keys: (K,) class ids (1..C).
        saliency: float (H, W) in [0, 1] (PoolNet output / 255).
        img: uint8 (H, W, 3) RGB image (only needed when ``crf`` is not None).
        fg_thr: a salient pixel gets a class only if its CAM exceeds this.
        bg_thr: a pixel is salient if ``saliency > bg_thr``.
        crf: keyword arguments of :func:`pnoc.crf.crf_label` or None.
        salient_thr: a pixel may take a class only if ``saliency > salient_thr`` (None: ``bg_thr``,
            the reference). Pixels with ``bg_thr < saliency <= salient_thr`` are uncertain: the
            paper gives classes to pixels of *strong* saliency and background to those of *weak*
            saliency; soft saliency maps need the two thresholds apart.

    Returns:
        uint8 (H, W): non-salient → 0; salient with a CAM > ``fg_thr`` → class id;
        salient with weak CAMs → 255 (after CRF refinement of the maps).
    """
    cams, keys = _check_cams(cams, keys)
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.shape != cams.shape[1:]:
        raise ValueError(f"saliency is {saliency.shape} but the CAMs are {cams.shape[1:]}")
    if salient_thr is not None and salient_thr < bg_thr:
        raise ValueError(f"salient_thr {salient_thr} is below bg_thr {bg_thr}")
    salient = _refine(img, (saliency > bg_thr).astype(np.int64), 2, crf).astype(bool)
    core = salient
    if salient_thr is not None and salient_thr > bg_thr:
        core = _refine(img, (saliency > salient_thr).astype(np.int64), 2, crf).astype(bool)
    fg = _refine(img, _argmax_with_bg(cams, fg_thr) * core, cams.shape[0] + 1, crf)
    lut = np.concatenate([[0], keys]).astype(np.uint8)
    out = lut[fg]
    out[fg == 0] = IGNORE
    out[(fg == 0) & ~salient] = 0
    return out


# ---------------------------------------------------------------------------
# pairs and paths
# ---------------------------------------------------------------------------


def half_disc_directions(radius: float) -> np.ndarray:
    """Pair directions of radius ``radius``.

    Returns:
        int64 (D, 2) offsets (dy, dx): dy² + dx² < radius², dy > 0, or dy == 0 and dx > 0.
        D = 34 for radius 5 and 152 for radius 10.
    """
    rf = int(math.ceil(radius)) - 1
    dirs = [(0, dx) for dx in range(1, rf + 1) if dx * dx < radius * radius]
    dirs += [(dy, dx) for dy in range(1, rf + 1) for dx in range(-rf, rf + 1) if dy * dy + dx * dx < radius * radius]
    return np.asarray(dirs, dtype=np.int64).reshape(-1, 2)


def _path_cells(dy: int, dx: int) -> list[tuple[int, int]]:
    """Grid cells at distance < 1 from the segment (0, 0)–(dy, dx), both ends included.

    Such cells all lie in the segment's bounding box, where distance to the segment equals
    distance to the line, so this is the same cell set as IRN's path definition.
    """
    v = np.array([dy, dx], dtype=np.float64)
    cells = []
    for py in range(min(0, dy) - 1, max(0, dy) + 2):
        for px in range(min(0, dx) - 1, max(0, dx) + 2):
            c = np.array([py, px], dtype=np.float64)
            t = min(max(float(c @ v) / float(v @ v), 0.0), 1.0)
            if float(np.sum((c - t * v) ** 2)) < 1.0 - 1e-9:
                cells.append((py, px))
    return cells


class PathIndex:
    """Directions and paths of one radius, precomputed once (see :func:`path_index`).

    Attributes:
        radius: the pair radius.
        directions: int64 (D, 2) offsets (dy, dx).
        paths: list of D lists of cell offsets (dy, dx) on each pair's path.
        cells: int64 (n_cells, 2), the union of all path cells.
        margin: cells reach rows 0..margin and columns -margin..margin.
        groups: list of (direction ids (G,), cell ids (G, L)): directions with equal path
            length L, so that one gather + max handles the whole group.
        order: int64 (D,) the concatenated direction ids of ``groups``.
    """

    def __init__(self, radius: float):
        if radius <= 1:
            raise ValueError(f"radius must be > 1, got {radius}")
        self.radius = radius
        self.directions = half_disc_directions(radius)
        self.paths = [_path_cells(int(dy), int(dx)) for dy, dx in self.directions]
        cells = sorted({c for p in self.paths for c in p})
        pos = {c: i for i, c in enumerate(cells)}
        self.cells = np.asarray(cells, dtype=np.int64)
        self.margin = int(np.abs(self.cells).max())
        by_len: dict[int, list[int]] = {}
        for k, p in enumerate(self.paths):
            by_len.setdefault(len(p), []).append(k)
        self.groups = [
            (np.asarray(ks, dtype=np.int64), np.asarray([[pos[c] for c in self.paths[k]] for k in ks], dtype=np.int64))
            for _, ks in sorted(by_len.items())
        ]
        self.order = np.concatenate([g[0] for g in self.groups])

    @property
    def n_directions(self) -> int:
        return len(self.directions)


@functools.lru_cache(maxsize=8)
def path_index(radius: float) -> PathIndex:
    """Cached :class:`PathIndex` for ``radius``."""
    return PathIndex(radius)


def _as_index(radius: float | PathIndex) -> PathIndex:
    return radius if isinstance(radius, PathIndex) else path_index(radius)


def affinity_from_boundary(boundary: torch.Tensor, radius: float | PathIndex) -> torch.Tensor:
    """Affinities of all (pixel, direction) pairs: 1 − max boundary along the path.

    Differentiable (max picks one cell per pair, so the gradient is sparse).

    Args:
        boundary: (B, 1, h, w) boundary probabilities in [0, 1].
        radius: pair radius or a :class:`PathIndex`.

    Returns:
        (B, D, h, w): entry [b, k, y, x] is the affinity between (y, x) and
        (y, x) + ``directions[k]``; 0 when the target is outside the image.
    """
    if boundary.dim() != 4 or boundary.shape[1] != 1:
        raise ValueError(f"boundary must be (B, 1, h, w), got {tuple(boundary.shape)}")
    pi = _as_index(radius)
    bsz, _, h, w = boundary.shape
    m = pi.margin
    # paths only go down (dy >= 0), so no top padding; value 1 = certain boundary
    padded = F.pad(boundary, (m, m, 0, m), value=1.0)[:, 0]
    # one shifted copy per distinct path cell, shared by all directions crossing it
    shifted = torch.stack([padded[:, cy:cy + h, m + cx:m + cx + w] for cy, cx in pi.cells.tolist()], dim=1)
    maxima = []
    for _, cell_ids in pi.groups:
        g, length = cell_ids.shape
        idx = torch.as_tensor(cell_ids.reshape(-1), device=boundary.device)
        # max(dim) (not amax) so autograd keeps only the argmax indices, not the gathered copy
        maxima.append(shifted[:, idx].view(bsz, g, length, h, w).max(dim=2).values)
    inverse = np.empty_like(pi.order)
    inverse[pi.order] = np.arange(len(pi.order))
    mx = torch.cat(maxima, dim=1)[:, torch.as_tensor(inverse, device=boundary.device)]
    return 1.0 - mx


def pair_labels(
    label: torch.Tensor, radius: float | PathIndex, n_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training pairs from a stride-4 affinity label map.

    Args:
        label: int (B, h, w), 0 background, 1..n_classes classes, 255 (or anything above
            n_classes) ignored.
        radius: pair radius or a :class:`PathIndex`.
        n_classes: number of foreground classes C (VOC 20): labels 0..C are valid.

    Returns:
        (bg_pos, fg_pos, neg): bool (B, D, h, w) masks indexed like
        :func:`affinity_from_boundary`. A pair counts only if both labels are valid and
        the target is inside the image; positive if the labels are equal (bg if 0, fg
        otherwise), negative if they differ.
    """
    if label.dim() != 3:
        raise ValueError(f"label must be (B, h, w), got {tuple(label.shape)}")
    pi = _as_index(radius)
    _, h, w = label.shape
    lab = label.long()
    m = pi.margin
    padded = F.pad(lab, (m, m, 0, m), value=IGNORE)
    dst = torch.stack([padded[:, dy:dy + h, m + dx:m + dx + w] for dy, dx in pi.directions.tolist()], dim=1)
    src = lab[:, None]
    valid = (src <= n_classes) & (dst <= n_classes)
    same = src == dst
    bg_pos = valid & same & (src == 0)
    fg_pos = valid & same & (src > 0)
    neg = valid & ~same
    return bg_pos, fg_pos, neg


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # sum / clamp(count) instead of x[mask].mean(): no NaN for an empty group, no host sync
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def affinity_loss(
    aff: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IRN affinity loss.

    Args:
        aff: (B, D, h, w) affinities in [0, 1].
        bg_pos, fg_pos, neg: bool masks of the same shape (from :func:`pair_labels`).

    Returns:
        loss: scalar, ½(½·L_bgpos + ½·L_fgpos) + ½·L_neg, where positive pairs cost
            −log(a + 1e-5), negative pairs −log(1 + 1e-5 − a), each group averaged over
            its own pairs (an empty group contributes 0).
        parts: detached ``{"bg_pos", "fg_pos", "neg"}`` group means.
    """
    pos_cost = -torch.log(aff + 1e-5)
    neg_cost = -torch.log(1.0 + 1e-5 - aff)
    l_bg = _masked_mean(pos_cost, bg_pos)
    l_fg = _masked_mean(pos_cost, fg_pos)
    l_neg = _masked_mean(neg_cost, neg)
    loss = 0.5 * (0.5 * l_bg + 0.5 * l_fg) + 0.5 * l_neg
    return loss, {"bg_pos": l_bg.detach(), "fg_pos": l_fg.detach(), "neg": l_neg.detach()}
