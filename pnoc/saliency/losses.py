"""C²AM / C²AM-H losses (paper §2.4.4 Eq. 7 and §4 Eq. 11; reference spec §6).

Notation: n = batch size, v (n, d) pooled partition vectors (see :class:`pnoc.models.ccam.CCAM`),
s_ij the cosine similarity of rows i and j, clamped to [5e-4, 0.9995] so that both −log s and
−log(1 − s) stay finite.

Two normalisations of the positive (SimMax) terms exist:

* **paper** (``exclude_diagonal=True``, the default here):
  L = 1/(n(n−1)) Σ_{i≠j} w_ij · (−log s_ij) — self-pairs carry no information.
* **reference code** (``exclude_diagonal=False``): the mean over all n² pairs, diagonal
  included. A self-pair has s = 0.9995 after clamping, so it only adds ≈ 5e-4·w_ii per row but
  dilutes the mean by n/(n−1).

The rank weights are w_ij = exp(−α·(rank_ij − 1)), rank_ij the 0-based position of s_ij in row
i sorted in descending order (the reference's convention: rank 0 is normally the self-pair,
which thus gets weight e^α, and the nearest other sample gets weight 1). In the paper mode the
self-pair is forced to rank 0, so the off-diagonal weights are exp(−α·r), r = 0 … n−2.

SimMin (fg vs bg) is the mean over all n² pairs of −log(1 − s_ij) in both modes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIM_MIN_CLAMP = 5e-4
SIM_MAX_CLAMP = 0.9995


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities.

    Args:
        a: (n, d). b: (m, d).

    Returns:
        (n, m) with entry (i, j) = cos(a_i, b_j).
    """
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()


def _clamped_sim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float32 even under autocast: autocast would run the matmul in fp16/bf16, where 0.9995
    # rounds to 1 and −log(1 − s) becomes inf
    with torch.autocast(device_type=a.device.type, enabled=False):
        return cosine_similarity_matrix(a.float(), b.float()).clamp(SIM_MIN_CLAMP, SIM_MAX_CLAMP)


def rank_weights(sim: torch.Tensor, alpha: float = 0.25) -> torch.Tensor:
    """Rank-based pair weights of the reference SimMax loss.

    Each row is sorted in descending order (ties keep column order); rank_ij is the 0-based
    position of column j in row i and the weight is exp(−α·(rank_ij − 1)), so the top pair
    (normally the self-pair) weighs e^α and the second one 1.

    Args:
        sim: (n, n) similarities.
        alpha: decay per rank step.

    Returns:
        (n, n) weights (no gradient: ranks are piecewise constant).
    """
    sim = sim.detach()
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    rank = torch.argsort(order, dim=1)  # inverse permutation: position of each column
    return torch.exp(-alpha * (rank.to(sim.dtype) - 1.0))


def sim_max(v: torch.Tensor, alpha: float = 0.25, exclude_diagonal: bool = True) -> torch.Tensor:
    """Rank-weighted positive contrastive term: pull same-partition vectors together.

    Args:
        v: (n, d) vectors of one partition (fg or bg) over the batch.
        alpha: rank-weight decay.
        exclude_diagonal: paper normalisation (Σ_{i≠j} / (n(n−1))) if True, else the
            reference's mean over all n² pairs.

    Returns:
        Scalar loss (float32). With ``exclude_diagonal`` and n = 1 there is no pair: a zero
        that keeps the graph.
    """
    s = _clamped_sim(v, v)
    loss = -torch.log(s)
    n = s.shape[0]
    if not exclude_diagonal:
        return (loss * rank_weights(s, alpha)).mean()
    if n < 2:
        return loss.sum() * 0.0
    eye = torch.eye(n, dtype=torch.bool, device=s.device)
    # force the self-pair to rank 0 so that off-diagonal ranks are 0..n-2 even on ties
    w = rank_weights(s.detach().masked_fill(eye, float("inf")), alpha)
    return (loss * w).masked_fill(eye, 0.0).sum() / (n * (n - 1))


def sim_min(v_b: torch.Tensor, v_f: torch.Tensor) -> torch.Tensor:
    """Negative contrastive term: push bg vectors away from fg vectors.

    Args:
        v_b: (n, d) background vectors. v_f: (n, d) foreground vectors.

    Returns:
        Scalar: mean over the n² pairs (i, j) of −log(1 − cos(v_b_i, v_f_j)).
    """
    return (-torch.log(1.0 - _clamped_sim(v_b, v_f))).mean()


def ccam_loss(v_fg: torch.Tensor, v_bg: torch.Tensor, alpha: float = 0.25,
              exclude_diagonal: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_C²AM = SimMax(v_fg) + SimMin(v_bg, v_fg) + SimMax(v_bg).

    Args:
        v_fg, v_bg: (n, d) partition vectors of the whole batch (gather them first when the
            batch is split across devices: the loss couples samples).
        alpha: rank-weight decay.
        exclude_diagonal: see :func:`sim_max`.

    Returns:
        total: scalar loss; parts: ``sim_max_fg``, ``sim_min``, ``sim_max_bg`` (detached).
    """
    pos_f = sim_max(v_fg, alpha, exclude_diagonal)
    neg = sim_min(v_bg, v_fg)
    pos_b = sim_max(v_bg, alpha, exclude_diagonal)
    total = pos_f + neg + pos_b
    return total, {"sim_max_fg": pos_f.detach(), "sim_min": neg.detach(), "sim_max_bg": pos_b.detach()}


def hint_loss(z: torch.Tensor, hint: torch.Tensor, fg_thr: float = 0.4,
              smoothing: float = 0.1) -> tuple[torch.Tensor, int]:
    """C²AM-H hint loss: anchor the sigmoid-high side of z on confident CAM foreground.

    The reference's form (spec §6), not the paper's Eq. 11 sum: the mean over every foreground
    hint pixel of the batch of BCE-with-logits(z, 1 − smoothing/2). There is no background term.

    Args:
        z: (B, 1, h, w) C²AM logits.
        hint: (B, 1, H, W) or (B, H, W) hint maps in [0, 1] (max over classes of the CAMs);
            resized to (h, w) bicubically and clamped back to [0, 1] (bicubic overshoots).
        fg_thr: δ_fg; pixels with hint ≥ δ_fg are foreground hints.
        smoothing: label smoothing ε; the target is 1 − ε/2 (0.95 for ε = 0.1).

    Returns:
        loss: scalar. A batch without any foreground hint pixel gives ``z.sum() * 0`` — zero,
            finite, still attached to the graph (the reference returns NaN here).
        n_pixels: number of foreground hint pixels.
    """
    if hint.dim() == 3:
        hint = hint.unsqueeze(1)
    hint = hint.to(device=z.device, dtype=torch.float32)
    if hint.shape[-2:] != z.shape[-2:]:
        hint = F.interpolate(hint, size=z.shape[-2:], mode="bicubic", align_corners=False)
    hint = hint.clamp(0.0, 1.0)
    fg = hint >= fg_thr
    n_pixels = int(fg.sum().item())
    if n_pixels == 0:
        return z.sum() * 0.0, 0
    target = torch.full_like(z, 1.0 - smoothing / 2.0, dtype=torch.float32)
    bce = F.binary_cross_entropy_with_logits(z.float(), target, reduction="none")
    return bce[fg].mean(), n_pixels


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"expected (B, H, W) maps, got shape {a.shape}")
    return a


def border_on_fraction(sal, border: float = 0.1, on_threshold: float = 0.5) -> float:
    """Fraction of the outer frame's pixels where the binarised map is "on".

    Args:
        sal: (B, H, W) (or (H, W)) maps in [0, 1].
        border: frame width as a fraction of min(H, W) (at least one pixel).
        on_threshold: a pixel is on when sal > on_threshold.

    Returns:
        The fraction in [0, 1], pooled over the batch.
    """
    a = _as_numpy(sal)
    _, h, w = a.shape
    b = max(1, int(round(border * min(h, w))))
    frame = np.ones((h, w), dtype=bool)
    frame[b:h - b, b:w - b] = False
    return float((a[:, frame] > on_threshold).mean())


def decide_direction(sal, hints=None, border: float = 0.1, on_threshold: float = 0.5) -> dict:
    """Decide whether an unsupervised C²AM map marks the background as its "on" side.

    Plain C²AM has no anchor, so which partition σ(z) selects is arbitrary. Two kinds of
    evidence are used:

    * **hints** (CAM foreground maps, when available): the Pearson correlation between the map
      and the hints over all pixels of the batch; the map is flipped when it is negative (the
      map is high where the hints are low).
    * **border prior** (no hints, or a constant map/hint where correlation is undefined):
      objects rarely fill the image frame, so the map is flipped when more than half of the
      outer ``border`` frame is on (the reference checks the same on one sample's binarised map,
      for visualisation only).

    Args:
        sal: (B, H, W) maps in [0, 1] (numpy or torch; (H, W) and (B, 1, H, W) accepted).
        hints: None or hint maps of the same layout; resized to sal's size if they differ.
        border: frame width as a fraction of min(H, W).
        on_threshold: binarisation threshold of the border prior.

    Returns:
        dict with ``flip`` (bool), ``method`` (``"hints"`` or ``"border"``), ``correlation``
        (float or None), ``border_on_fraction`` (float), ``n_images`` (int) — JSON-ready, so a
        stage can record why it flipped.
    """
    a = _as_numpy(sal)
    frac = border_on_fraction(a, border, on_threshold)
    corr = None
    if hints is not None:
        h = _as_numpy(hints)
        if h.shape[0] != a.shape[0]:
            raise ValueError(f"sal has {a.shape[0]} maps but hints {h.shape[0]}")
        if h.shape[1:] != a.shape[1:]:
            h = F.interpolate(torch.from_numpy(h)[:, None], size=a.shape[1:], mode="bilinear",
                              align_corners=False)[:, 0].numpy()
        x, y = a.ravel() - a.mean(), h.ravel() - h.mean()
        denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
        if denom > 1e-12:
            corr = float((x * y).sum() / denom)
    if corr is not None:
        flip, method = corr < 0.0, "hints"
    else:
        flip, method = frac > 0.5, "border"
    return {"flip": bool(flip), "method": method, "correlation": corr,
            "border_on_fraction": frac, "n_images": int(a.shape[0])}
