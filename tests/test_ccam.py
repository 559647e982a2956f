"""C²AM model and losses: exact values computed independently in numpy."""

import math

import numpy as np
import pytest
import torch

from pnoc.models.backbones import create_backbone
from pnoc.models.ccam import CCAM
from pnoc.saliency.losses import (border_on_fraction, ccam_loss, decide_direction, hint_loss, rank_weights, sim_max,
                                  sim_min)

A = 0.25
LO, HI = 5e-4, 0.9995


# ----------------------------------------------------------------- numpy references
def np_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.clip(a @ b.T, LO, HI)


def np_sim_max(v, alpha, exclude_diagonal):
    s = np_cos(v, v)
    n = len(s)
    total = 0.0
    for i in range(n):
        if exclude_diagonal:
            others = sorted((j for j in range(n) if j != i), key=lambda j: -s[i, j])
            total += sum(math.exp(-alpha * r) * -math.log(s[i, j]) for r, j in enumerate(others))
        else:
            order = sorted(range(n), key=lambda j: -s[i, j])
            total += sum(math.exp(-alpha * (r - 1)) * -math.log(s[i, j]) for r, j in enumerate(order))
    return total / (n * (n - 1) if exclude_diagonal else n * n)


def np_sim_min(vb, vf):
    return float(np.mean(-np.log(1 - np_cos(vb, vf))))


def bce(x, t):
    p = 1 / (1 + math.exp(-x))
    return -(t * math.log(p) + (1 - t) * math.log(1 - p))


# ----------------------------------------------------------------- rank weights
def test_rank_weights_hand_made():
    sim = torch.tensor([[1.0, 0.2, 0.5], [0.3, 1.0, 0.1], [0.7, 0.8, 1.0]])
    e = math.exp
    expected = torch.tensor([[e(A), e(-A), 1.0], [1.0, e(A), e(-A)], [e(-A), 1.0, e(A)]])
    assert torch.allclose(rank_weights(sim, A), expected, atol=1e-6)


def test_rank_weights_no_grad_and_alpha():
    sim = torch.tensor([[1.0, 0.9], [0.9, 1.0]], requires_grad=True)
    w = rank_weights(sim, alpha=1.0)
    assert not w.requires_grad
    assert torch.allclose(w, torch.tensor([[math.e, 1.0], [1.0, math.e]]))


# ----------------------------------------------------------------- sim_max / sim_min
def test_sim_max_two_vectors_by_hand():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # paper: one off-diagonal pair per row, rank 0 -> weight 1, s = 1/sqrt(2)
    assert sim_max(v, A, True).item() == pytest.approx(0.5 * math.log(2), rel=1e-5)
    # reference: diagonal (s clamped to 0.9995, weight e^a) included, mean over 4
    ref = (2 * math.exp(A) * -math.log(HI) + 2 * 0.5 * math.log(2)) / 4
    assert sim_max(v, A, False).item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("exclude_diagonal", [True, False])
def test_sim_max_random_matches_numpy(exclude_diagonal):
    v = np.random.default_rng(0).normal(size=(5, 6))
    got = sim_max(torch.tensor(v, dtype=torch.float32), A, exclude_diagonal).item()
    assert got == pytest.approx(np_sim_max(v, A, exclude_diagonal), rel=1e-4)


def test_sim_max_single_sample_paper_mode_is_zero_with_graph():
    v = torch.randn(1, 4, requires_grad=True)
    loss = sim_max(v, A, True)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(v.grad).all()


def test_sim_min_by_hand():
    vb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vf = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    r = 1 / math.sqrt(2)
    expected = (-2 * math.log(1 - r) - math.log(1 - LO) - math.log(1 - HI)) / 4
    assert sim_min(vb, vf).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("exclude_diagonal", [True, False])
def test_ccam_loss_sum_of_parts(exclude_diagonal):
    rng = np.random.default_rng(1)
    vf, vb = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    tf = torch.tensor(vf, dtype=torch.float32, requires_grad=True)
    tb = torch.tensor(vb, dtype=torch.float32, requires_grad=True)
    total, parts = ccam_loss(tf, tb, A, exclude_diagonal)
    exp_f, exp_b, exp_n = np_sim_max(vf, A, exclude_diagonal), np_sim_max(vb, A, exclude_diagonal), np_sim_min(vb, vf)
    assert parts["sim_max_fg"].item() == pytest.approx(exp_f, rel=1e-4)
    assert parts["sim_max_bg"].item() == pytest.approx(exp_b, rel=1e-4)
    assert parts["sim_min"].item() == pytest.approx(exp_n, rel=1e-4)
    assert total.item() == pytest.approx(exp_f + exp_b + exp_n, rel=1e-4)
    total.backward()
    assert torch.isfinite(tf.grad).all() and tf.grad.abs().sum() > 0


# ----------------------------------------------------------------- hint loss
def test_hint_loss_masks_and_exact_value():
    z = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], requires_grad=True)
    hint = torch.tensor([[[[0.9, 0.2], [0.5, 0.25]]]])
    loss, n = hint_loss(z, hint, fg_thr=0.5, smoothing=0.1)
    assert n == 2
    assert loss.item() == pytest.approx((bce(1.0, 0.95) + bce(0.5, 0.95)) / 2, rel=1e-5)
    loss.backward()
    g = z.grad[0, 0]
    assert g[0, 1] == 0 and g[1, 1] == 0 and g[0, 0] != 0 and g[1, 0] != 0


def test_hint_loss_resizes_and_accepts_3d():
    z = torch.zeros(2, 1, 2, 2)
    _, n = hint_loss(z, torch.full((2, 8, 8), 0.6), fg_thr=0.4)
    assert n == 8
    loss, n = hint_loss(z, torch.full((2, 1, 8, 8), 0.6), fg_thr=0.4, smoothing=0.0)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)  # BCE(0, 1)


def test_hint_loss_empty_is_finite_zero_with_graph():
    z = torch.randn(2, 1, 3, 3, requires_grad=True)
    loss, n = hint_loss(z, torch.full((2, 1, 6, 6), 0.1), fg_thr=0.4)
    assert n == 0 and torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


# ----------------------------------------------------------------- direction
def _blob(b=2, size=20):
    m = np.zeros((b, size, size))
    m[:, 6:14, 6:14] = 1.0
    return m


def test_border_prior():
    blob = _blob()
    assert border_on_fraction(blob) == 0.0
    assert border_on_fraction(1 - blob) == 1.0
    d = decide_direction(1 - blob)
    assert d["flip"] is True and d["method"] == "border" and d["correlation"] is None
    assert decide_direction(blob)["flip"] is False


def test_direction_from_hints():
    blob = _blob()
    hints = torch.tensor(0.8 * blob + 0.1)
    d = decide_direction(torch.tensor(1 - blob), hints)
    assert d["flip"] is True and d["method"] == "hints"
    assert d["correlation"] == pytest.approx(-1.0)
    # a map that fills most of the frame but agrees with the hints is kept: hints win
    big = np.ones((1, 20, 20))
    big[0, 0, :] = 0.0
    hint_big = big * 0.9
    d = decide_direction(big, hint_big)
    assert d["flip"] is False and d["border_on_fraction"] > 0.5
    # hints at another resolution are resized
    d = decide_direction(1 - blob, blob.repeat(2, axis=1).repeat(2, axis=2))
    assert d["flip"] is True and d["n_images"] == 2


def test_direction_constant_hints_fall_back_to_border():
    d = decide_direction(1 - _blob(), np.full((2, 20, 20), 0.5))
    assert d["method"] == "border" and d["flip"] is True


# ----------------------------------------------------------------- model
@pytest.mark.parametrize("os_", [16, 32])
def test_ccam_forward_backward(os_):
    torch.manual_seed(0)
    bb = create_backbone("resnet18_w8", output_stride=os_)
    model = CCAM(bb)
    x = torch.randn(2, 3, 64, 64)
    z, vf, vb = model(x)
    h = 64 // os_
    c = bb.channels["layer3"] + bb.channels["layer4"]
    assert z.shape == (2, 1, h, h) and vf.shape == (2, c) and vb.shape == (2, c)
    # the two partitions split the pooled features
    with torch.no_grad():
        feats = model.features(x).mean(dim=(2, 3))
    assert torch.allclose(vf + vb, feats, atol=1e-5)
    total, _ = ccam_loss(vf, vb)
    lh, _ = hint_loss(z, torch.rand(2, 1, 64, 64))
    (total + lh).backward()
    assert model.head[0].weight.grad is not None
    assert any(p.grad is not None for _, p in model.backbone_parameters())


def test_ccam_parameter_groups():
    model = CCAM(create_backbone("resnet18_w8", output_stride=16))
    new = {n for n, _ in model.new_parameters()}
    old = {n for n, _ in model.backbone_parameters()}
    assert new == {"head.0.weight", "head.1.weight", "head.1.bias"}
    assert not new & old and new | old == {n for n, _ in model.named_parameters()}


def test_ccam_loss_finite_under_autocast():
    vf = torch.randn(3, 8, requires_grad=True)
    vb = torch.stack([vf[0].detach(), torch.randn(8), torch.randn(8)])  # a bg == fg pair: s clamps at 0.9995
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = ccam_loss(vf, vb)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(vf.grad).all()
