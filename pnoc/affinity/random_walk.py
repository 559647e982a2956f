"""Random walk over the boundary-derived affinity graph (spec §9, IRN ``propagate_to_edge``).

On the stride-4 grid (n = h·w pixels) the affinity matrix A is

    A[i, j] = affinity of the pair (i, j) if |i − j| < radius (from
              :func:`pnoc.affinity.labels.affinity_from_boundary`), A[i, i] = 1, 0 otherwise,

symmetric. The transition matrix is T = A^β (element-wise) with every column normalised
to sum 1, and the walk is ``RW = seeds · T^(2^exp_times)`` with each class's seed map as a
*row* vector, i.e. ``x_new[j] = Σ_i x[i] T[i, j]``.

The reference forms T densely (n × n, ≈0.55 GB for a 500×375 image) and squares it
``exp_times`` times (O(n³) each). T has only ``1 + 2D`` non-zeros per column (D directions
of the half-disc), so here ``x ← x · T`` is applied 2^exp_times times as a sparse
matrix product instead: same result up to rounding, O(n·D·K) per step and memory linear in
n. The per-step operator is ``Tᵀ`` stored as CSR (row j lists the sources i of column j of T);
several images are walked at once as one block-diagonal matrix, which is what keeps a GPU
busy. :func:`random_walk_dense` keeps the reference formulation for tests and benchmarks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from pnoc.affinity.labels import PathIndex, affinity_from_boundary, path_index


def _check(seeds: torch.Tensor, boundary: torch.Tensor | None, affinity: torch.Tensor | None = None) -> None:
    if affinity is not None:
        if affinity.dim() != 3:
            raise ValueError(f"affinity must be (D, h, w), got {tuple(affinity.shape)}")
        hw = affinity.shape[1:]
    else:
        if boundary.dim() != 2:
            raise ValueError(f"boundary must be (h, w), got {tuple(boundary.shape)}")
        hw = boundary.shape
    if seeds.dim() != 3 or seeds.shape[1:] != hw:
        raise ValueError(f"seeds must be (K, h, w) with (h, w) = {tuple(hw)}, got {tuple(seeds.shape)}")


def _pair_affinities(boundary: torch.Tensor, pi: PathIndex, dtype: torch.dtype) -> torch.Tensor:
    """(D, h, w) pair affinities, clamped to [0, 1] so that a^β is well defined."""
    aff = affinity_from_boundary(boundary.to(dtype)[None, None], pi)[0]
    return aff.clamp_(0.0, 1.0)


def _build_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else the O(n·D) construction is cheap in float64
    return torch.float32 if device.type == "mps" else torch.float64


def _transition_entries(
    boundary: torch.Tensor | None, radius: float, beta: float, dtype: torch.dtype,
    affinity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-zeros of the column-normalised transition matrix T.

    The entries are built in float64 and only then cast to ``dtype``: T^256 is sensitive to
    tiny relative errors of T (nearly disconnected regions), and a float32 build alone
    costs ~2e-4 of max-normalised error, where float32 *steps* cost < 1e-4.

    Args:
        boundary: (h, w) boundary probabilities (ignored when ``affinity`` is given).
        affinity: (D, h, w) pair affinities in [0, 1] for the directions of ``path_index(radius)``,
            used instead of those derived from ``boundary``.

    Returns:
        (src, dst, val), each (nnz,): ``T[src, dst] = val``, src/dst flat pixel indices.
    """
    pi = path_index(radius)
    ref = boundary if affinity is None else affinity
    h, w = ref.shape[-2:]
    dev = ref.device
    out_dtype, dtype = dtype, _build_dtype(dev)
    if affinity is None:
        aff = _pair_affinities(boundary, pi, dtype)
    else:
        if affinity.shape[0] != len(pi.directions):
            raise ValueError(f"affinity has {affinity.shape[0]} directions, radius {radius} has {len(pi.directions)}")
        aff = affinity.to(dtype).clamp(0.0, 1.0)
    aff = aff ** beta  # (D, h, w); A^β for pair (p, p + d)
    dirs = torch.as_tensor(pi.directions, device=dev)
    d = dirs.shape[0]
    # Column j of A holds, besides A[j, j] = 1: A[j + d, j] = aff[d, j] (j is the pair's
    # source) and A[j - d, j] = aff[d, j - d] (j is its target), for every direction d.
    ys = torch.arange(h, device=dev).view(1, h, 1).expand(d, h, w)
    xs = torch.arange(w, device=dev).view(1, 1, w).expand(d, h, w)
    dy, dx = dirs[:, 0].view(d, 1, 1), dirs[:, 1].view(d, 1, 1)
    ty, tx = ys + dy, xs + dx  # targets of the pairs whose source is (ys, xs)
    inside = (ty < h) & (tx >= 0) & (tx < w)  # ty >= 0 always (dy >= 0)
    src_flat = (ys * w + xs)[inside]
    dst_flat = (ty * w + tx)[inside]
    a = aff[inside]
    diag = torch.arange(h * w, device=dev)
    # symmetric A: both (source → target) and (target → source) entries
    i = torch.cat([diag, dst_flat, src_flat])
    j = torch.cat([diag, src_flat, dst_flat])
    v = torch.cat([torch.ones(h * w, dtype=dtype, device=dev), a, a])
    colsum = torch.zeros(h * w, dtype=dtype, device=dev).index_add_(0, j, v)
    return i, j, (v / colsum[j]).to(out_dtype)


@torch.no_grad()
def transition_from_boundary(
    boundary: torch.Tensor, radius: float = 5, beta: float = 10, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The transition matrix T as a sparse tensor.

    Args:
        boundary: (h, w) boundary probabilities in [0, 1]; paths leaving the image count
            as boundary 1 (affinity 0).
        radius: pair radius (5 at inference).
        beta: exponent applied to the affinities.
        dtype: float32 or float64.

    Returns:
        sparse COO (n, n), n = h·w (row-major pixels), coalesced: A^β with A symmetric and
        unit diagonal, each column divided by its sum.
    """
    if boundary.dim() != 2:
        raise ValueError(f"boundary must be (h, w), got {tuple(boundary.shape)}")
    i, j, v = _transition_entries(boundary, radius, beta, dtype)
    n = boundary.numel()
    return torch.sparse_coo_tensor(torch.stack([i, j]), v, (n, n), check_invariants=False).coalesce()


@torch.no_grad()
def random_walk(
    seeds: torch.Tensor | Sequence[torch.Tensor],
    boundary: torch.Tensor | Sequence[torch.Tensor] | None,
    radius: float = 5,
    beta: float = 10,
    exp_times: int = 8,
    dtype: torch.dtype = torch.float32,
    affinity: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Random-walk propagation ``seeds · T^(2^exp_times)``, computed sparsely.

    Args:
        seeds: (K, h, w) seed maps, or a list of them (one per image; K and (h, w) may differ
            between images). All on the device of ``boundary``.
        boundary: (h, w) boundary probabilities in [0, 1], or a list matching ``seeds``; None
            with ``affinity``.
        radius, beta: see :func:`transition_from_boundary`.
        exp_times: the walk takes 2^exp_times steps (the reference squares T this often).
        dtype: computation dtype (float64 for exactness checks).
        affinity: instead of ``boundary``, the pair affinities themselves: (D, h, w) in [0, 1]
            for the directions of ``path_index(radius)`` (entry [k, y, x] pairs (y, x) with
            (y, x) + directions[k]), or a list matching ``seeds``. An affinity graph need not
            come from a boundary map: :func:`label_affinity` gives the ground truth's.

    Returns:
        (K, h, w) propagated maps in ``dtype``, or a list of them for list input.
    """
    single = isinstance(seeds, torch.Tensor)
    seeds_l = [seeds] if single else list(seeds)
    if (boundary is None) == (affinity is None):
        raise ValueError("give exactly one of boundary and affinity")
    graph = boundary if affinity is None else affinity
    graph_l = [graph] if single else list(graph)
    if len(seeds_l) != len(graph_l):
        raise ValueError(f"{len(seeds_l)} seed maps but {len(graph_l)} {'boundary' if affinity is None else 'affinity'} maps")
    if not seeds_l:
        return []
    for s, g in zip(seeds_l, graph_l):
        if affinity is None:
            _check(s, g)
        else:
            _check(s, None, g)
    dev = graph_l[0].device

    # one block-diagonal operator for the whole batch: rows/cols offset per image
    rows, cols, vals, offsets = [], [], [], [0]
    for g in graph_l:
        i, j, v = (_transition_entries(g, radius, beta, dtype) if affinity is None
                   else _transition_entries(None, radius, beta, dtype, affinity=g))
        # x_new[j] = Σ_i x[i] T[i, j]  ⇔  x_new = Tᵀ x: row j of the operator holds column j of T
        rows.append(j + offsets[-1])
        cols.append(i + offsets[-1])
        vals.append(v)
        offsets.append(offsets[-1] + g.shape[-2] * g.shape[-1])
    n = offsets[-1]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "CSR support is in beta" noise
        op = torch.sparse_coo_tensor(
            torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), (n, n), check_invariants=False
        )
        op = op.coalesce().to_sparse_csr()

    kmax = max(s.shape[0] for s in seeds_l)
    x = torch.zeros(n, max(kmax, 1), dtype=dtype, device=dev)
    for s, o0, o1 in zip(seeds_l, offsets[:-1], offsets[1:]):
        x[o0:o1, : s.shape[0]] = s.to(dtype).reshape(s.shape[0], -1).t()
    for _ in range(2 ** int(exp_times)):
        x = op @ x

    out = [
        x[o0:o1, : s.shape[0]].t().reshape(s.shape).contiguous()
        for s, o0, o1 in zip(seeds_l, offsets[:-1], offsets[1:])
    ]
    return out[0] if single else out


def label_affinity(labels: torch.Tensor, radius: float = 5) -> torch.Tensor:
    """The affinity graph of a label map: 1 between two cells of the same label, 0 otherwise.

    The walk over it is the walk with a *perfect* affinity network: each class's seeds spread over
    the cells of their own label and nowhere else. Unlike a boundary map, it keeps every cell's
    seed: a boundary is drawn *on* cells, so on a stride-4 grid the cells along an object's edge
    would carry boundary 1 and lose their seeds (``seeds × (1 − boundary)``).

    Args:
        labels: (h, w) integer labels of the cells.
        radius: pair radius (the directions of ``path_index(radius)``).

    Returns:
        float32 (D, h, w): entry [k, y, x] is 1 when (y, x) + directions[k] is inside the grid and
        has the label of (y, x), else 0.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (h, w), got {tuple(labels.shape)}")
    pi = path_index(radius)
    h, w = labels.shape
    out = torch.zeros(len(pi.directions), h, w, dtype=torch.float32, device=labels.device)
    for k, (dy, dx) in enumerate(pi.directions.tolist()):
        y1, x0, x1 = h - dy, max(0, -dx), min(w, w - dx)  # sources whose target is inside
        if y1 <= 0 or x1 <= x0:
            continue
        out[k, :y1, x0:x1] = (labels[:y1, x0:x1] == labels[dy:dy + y1, x0 + dx:x1 + dx]).float()
    return out


@torch.no_grad()
def random_walk_dense(
    seeds: torch.Tensor,
    boundary: torch.Tensor,
    radius: float = 5,
    beta: float = 10,
    exp_times: int = 8,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The reference formulation: dense n × n T, squared ``exp_times`` times.

    Memory O(n²) and time O(n³·exp_times): for tests and benchmarks only.

    Args:
        seeds: (K, h, w).
        boundary: (h, w).

    Returns:
        (K, h, w) = seeds · T^(2^exp_times) (seeds as row vectors).
    """
    _check(seeds, boundary)
    t = dense_transition(boundary, radius, beta, dtype)
    for _ in range(int(exp_times)):
        t = t @ t
    k = seeds.shape[0]
    return (seeds.to(dtype).reshape(k, -1) @ t).reshape(seeds.shape)


@torch.no_grad()
def dense_transition(boundary: torch.Tensor, radius: float = 5, beta: float = 10,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense column-normalised T (n × n), built pair by pair as the reference does.

    Independent of the sparse construction (it scatters direction by direction into a
    dense matrix), so the tests compare two implementations, not one with itself.
    """
    pi = path_index(radius)
    h, w = boundary.shape
    n = h * w
    aff = _pair_affinities(boundary, pi, dtype)
    a = torch.zeros(n, n, dtype=dtype, device=boundary.device)
    idx = torch.arange(n, device=boundary.device).view(h, w)
    for k, (dy, dx) in enumerate(pi.directions.tolist()):
        # sources whose target (y + dy, x + dx) is inside the image
        y1, x0, x1 = h - dy, max(0, -dx), min(w, w - dx)
        if y1 <= 0 or x1 <= x0:
            continue
        src = idx[:y1, x0:x1].reshape(-1)
        dst = idx[dy:dy + y1, x0 + dx:x1 + dx].reshape(-1)
        val = aff[k, :y1, x0:x1].reshape(-1)
        a[src, dst] = val
        a[dst, src] = val
    a.fill_diagonal_(1.0)
    a.pow_(beta)
    a /= a.sum(dim=0, keepdim=True)
    return a


@torch.no_grad()
def propagate_cams(
    cams: torch.Tensor,
    boundary: torch.Tensor,
    radius: float = 5,
    beta: float = 10,
    exp_times: int = 8,
    normalise: bool = True,
) -> torch.Tensor:
    """Stage-8 propagation of stride-4 CAMs (spec §9 steps 5–6, before upsampling).

    Args:
        cams: (K, h, w) stride-4 CAMs of the positive classes.
        boundary: (h, w) boundary probabilities.
        normalise: divide by the global max over all classes (the reference does this
            after the ×4 upsampling and crop; pass False to do it there).

    Returns:
        (K, h, w) float32 random-walk maps.
    """
    seeds = cams.float() * (1.0 - boundary.float())[None]
    rw = random_walk(seeds, boundary, radius=radius, beta=beta, exp_times=exp_times)
    if normalise and rw.numel():
        rw = rw / rw.max().clamp(min=1e-12)
    return rw
