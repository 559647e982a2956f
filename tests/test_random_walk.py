"""Sparse random walk == the reference's dense T^(2^exp_times) formulation."""

import pytest
import torch

from pnoc.affinity.labels import half_disc_directions
from pnoc.affinity.random_walk import (dense_transition, propagate_cams, random_walk, random_walk_dense,
                                       transition_from_boundary)


def _inputs(seed=0, h=12, w=15, k=3):
    g = torch.Generator().manual_seed(seed)
    boundary = torch.rand(h, w, generator=g) ** 3  # mostly low, a few strong edges
    cams = torch.rand(k, h, w, generator=g)
    return cams, boundary


def _pipeline(walk, cams, boundary, **kw):
    """Spec §9: seeds = CAM × (1 − boundary), result divided by its global max."""
    rw = walk(cams * (1.0 - boundary)[None], boundary, **kw)
    return rw / rw.max()


def test_transition_matrix_matches_dense_and_is_column_stochastic():
    _, b = _inputs()
    t = transition_from_boundary(b, radius=5, beta=10, dtype=torch.float64)
    dense = dense_transition(b, radius=5, beta=10)
    torch.testing.assert_close(t.to_dense(), dense, atol=1e-12, rtol=0)
    torch.testing.assert_close(dense.sum(0), torch.ones(b.numel(), dtype=torch.float64))
    nz = dense > 0
    assert torch.equal(nz, nz.t())  # A is symmetric; T keeps its support
    assert nz.sum(0).max().item() <= 1 + 2 * len(half_disc_directions(5))
    assert (dense.diagonal() > 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_walk_equals_dense_float64(seed):
    cams, b = _inputs(seed)
    sparse = _pipeline(random_walk, cams, b, dtype=torch.float64)
    dense = _pipeline(random_walk_dense, cams, b, dtype=torch.float64)
    assert (sparse - dense).abs().max().item() < 1e-10


def test_sparse_walk_float32_within_1e4_of_dense():
    cams, b = _inputs(0)
    sparse = _pipeline(random_walk, cams, b)  # default float32
    assert sparse.dtype == torch.float32
    dense = _pipeline(random_walk_dense, cams, b, dtype=torch.float64)
    assert (sparse.double() - dense).abs().max().item() <= 1e-4


@pytest.mark.parametrize("exp_times", [0, 1, 3])
def test_step_counts_and_orientation(exp_times):
    # seed vectors are rows: x_new[j] = Σ_i x[i] T[i, j], applied 2^exp_times times
    cams, b = _inputs(2, h=4, w=5, k=2)
    t = dense_transition(b, radius=3, beta=10)
    x = cams.double().reshape(2, -1)
    for _ in range(2 ** exp_times):
        x = torch.stack([(x[k][:, None] * t).sum(0) for k in range(2)])
    got = random_walk(cams, b, radius=3, exp_times=exp_times, dtype=torch.float64)
    torch.testing.assert_close(got.reshape(2, -1), x, atol=1e-12, rtol=0)
    if exp_times == 0:
        # the other orientation (T @ x) is a different operator: the test would catch a swap
        assert not torch.allclose((t @ cams.double().reshape(2, -1).t()).t(), x)


def test_constant_seed_stays_constant_without_boundaries():
    # column-normalised T: a constant row vector is a fixed point (x·T = x)
    b = torch.zeros(9, 11)
    seeds = torch.full((1, 9, 11), 0.5)
    out = random_walk(seeds, b, dtype=torch.float64)
    torch.testing.assert_close(out, seeds.double())


def test_wall_blocks_propagation():
    # a full-height boundary wall: nothing crosses it, however many steps
    b = torch.zeros(8, 12)
    b[:, 6] = 1.0
    cams = torch.zeros(1, 8, 12)
    cams[0, 3, 1] = 1.0
    out = _pipeline(random_walk, cams, b)
    assert out[0, :, 6:].abs().max().item() == 0.0
    assert (out[0, :, :6] > 0).all()


def test_batch_of_images_matches_single_walks():
    c1, b1 = _inputs(3, h=10, w=13, k=3)
    c2, b2 = _inputs(4, h=7, w=9, k=1)
    outs = random_walk([c1, c2], [b1, b2], dtype=torch.float64)
    assert [o.shape for o in outs] == [c1.shape, c2.shape]
    torch.testing.assert_close(outs[0], random_walk(c1, b1, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(outs[1], random_walk(c2, b2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert random_walk([], []) == []


def test_propagate_cams_normalises_to_global_max():
    cams, b = _inputs(5)
    out = propagate_cams(cams, b)
    assert out.shape == cams.shape and out.dtype == torch.float32
    assert out.max().item() == pytest.approx(1.0)
    ref = _pipeline(random_walk_dense, cams, b, dtype=torch.float64)
    assert (out.double() - ref).abs().max().item() <= 1e-4


def test_shape_errors():
    cams, b = _inputs()
    with pytest.raises(ValueError, match="seeds"):
        random_walk(cams[:, :5], b)
    with pytest.raises(ValueError, match="boundary"):
        random_walk(cams, b[None])


def test_walk_over_given_affinities_equals_walk_over_their_boundary():
    from pnoc.affinity.labels import affinity_from_boundary, path_index

    cams, b = _inputs(seed=3)
    aff = affinity_from_boundary(b[None, None].double(), path_index(5))[0]
    want = random_walk(cams, b, dtype=torch.float64)
    got = random_walk(cams, None, affinity=aff, dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        random_walk(cams, b, affinity=aff)
    with pytest.raises(ValueError, match="exactly one"):
        random_walk(cams, None)
    with pytest.raises(ValueError, match="directions"):
        random_walk(cams, None, affinity=aff[:3])


def test_label_affinity_is_one_exactly_between_cells_of_one_label():
    from pnoc.affinity.random_walk import label_affinity

    labels = torch.tensor([[0, 0, 1], [2, 0, 1]])
    aff = label_affinity(labels, radius=2)
    dirs = half_disc_directions(2).tolist()
    assert aff.shape == (len(dirs), 2, 3)
    for k, (dy, dx) in enumerate(dirs):
        for y in range(2):
            for x in range(3):
                ty, tx = y + dy, x + dx
                inside = 0 <= ty < 2 and 0 <= tx < 3
                want = float(inside and labels[y, x] == labels[ty, tx])
                assert aff[k, y, x].item() == want, (dy, dx, y, x)


def test_walk_over_label_affinities_fills_each_region_and_never_crosses():
    from pnoc.affinity.random_walk import label_affinity

    labels = torch.zeros(10, 12, dtype=torch.long)
    labels[2:8, 3:9] = 1  # one object, 6 x 6 cells
    seeds = torch.zeros(1, 10, 12, dtype=torch.float64)
    seeds[0, 2:4, 3:5] = 1.0  # the object's "head" only
    rw = random_walk(seeds, None, affinity=label_affinity(labels), dtype=torch.float64)[0]
    assert rw[labels == 0].abs().max().item() == 0.0  # nothing leaks to the background
    inside = rw[labels == 1]
    # T is column-normalised: the walk averages, so 256 steps bring the object close to the
    # (degree-weighted) mean of its seeds, 4 cells of 1 over 36
    assert inside.max().item() < 1.25 * inside.min().item()
    assert 0.05 < inside.mean().item() < 0.2
