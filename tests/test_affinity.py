"""Affinity labels, pair directions/paths, boundary → affinity, pair labels, loss, AffinityNet."""

import math

import numpy as np
import pytest
import torch

from pnoc.affinity.labels import (affinity_from_boundary, affinity_labels_classic, affinity_labels_saliency,
                                  affinity_loss, half_disc_directions, pair_labels, path_index)
from pnoc.models.affinitynet import AffinityNet
from pnoc.models.backbones import create_backbone

X = 255  # ignore


def _cams6():
    """6×6 CAMs of classes 3 and 7 (values chosen to hit every threshold case)."""
    c3 = np.zeros((6, 6), np.float32)
    c3[0:2, 0:3] = 0.9
    c3[2, 0:3] = 0.2
    c3[5, 0] = 0.05  # equals bg_thr: ties go to background
    c7 = np.zeros((6, 6), np.float32)
    c7[4:6, 4:6] = 0.6
    c7[3, 4:6] = 0.1
    c7[0, 5] = 0.30  # equals fg_thr: background in the fg map
    c7[1, 2] = 0.95  # beats class 3's 0.9
    return np.stack([c3, c7]), np.array([3, 7])


# ---------------------------------------------------------------------------
# affinity labels
# ---------------------------------------------------------------------------


def test_affinity_labels_classic_by_hand():
    cams, keys = _cams6()
    out = affinity_labels_classic(cams, keys, img=None, fg_thr=0.30, bg_thr=0.05, crf=None)
    expected = np.array([
        [3, 3, 3, 0, 0, X],
        [3, 3, 7, 0, 0, 0],
        [X, X, X, 0, 0, 0],
        [0, 0, 0, 0, X, X],
        [0, 0, 0, 0, 7, 7],
        [0, 0, 0, 0, 7, 7],
    ], np.uint8)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_affinity_labels_saliency_by_hand():
    cams, keys = _cams6()
    sal = np.ones((6, 6), np.float32)
    sal[:, 5] = 0.0
    sal[0, 4] = 0.10  # not salient: must exceed bg_thr
    sal[1, 4] = 0.11
    out = affinity_labels_saliency(cams, keys, sal, img=None, fg_thr=0.40, bg_thr=0.10, crf=None)
    expected = np.array([
        [3, 3, 3, X, 0, 0],
        [3, 3, 7, X, X, 0],
        [X, X, X, X, X, 0],
        [X, X, X, X, X, 0],
        [X, X, X, X, 7, 0],
        [X, X, X, X, 7, 0],
    ], np.uint8)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_affinity_labels_saliency_salient_threshold_by_hand():
    """With salient_thr above bg_thr, weakly salient pixels are uncertain even under a strong CAM."""
    cams, keys = _cams6()
    sal = np.ones((6, 6), np.float32)
    sal[:, 5] = 0.0
    sal[0, 0:2] = 0.5   # salient (> bg_thr) but not above salient_thr: the class-3 CAM there is ignored
    sal[1, 0] = 0.51    # above salient_thr: keeps class 3
    sal[4, 4] = 0.3     # weak saliency under the class-7 CAM
    out = affinity_labels_saliency(cams, keys, sal, img=None, fg_thr=0.40, bg_thr=0.10, crf=None, salient_thr=0.5)
    expected = np.array([
        [X, X, 3, X, X, 0],
        [3, 3, 7, X, X, 0],
        [X, X, X, X, X, 0],
        [X, X, X, X, X, 0],
        [X, X, X, X, X, 0],
        [X, X, X, X, 7, 0],
    ], np.uint8)
    np.testing.assert_array_equal(out, expected)
    # salient_thr == bg_thr is the reference rule
    ref = affinity_labels_saliency(cams, keys, sal, img=None, fg_thr=0.40, bg_thr=0.10, crf=None)
    np.testing.assert_array_equal(
        affinity_labels_saliency(cams, keys, sal, img=None, fg_thr=0.40, bg_thr=0.10, crf=None, salient_thr=0.10), ref)
    with pytest.raises(ValueError, match="below bg_thr"):
        affinity_labels_saliency(cams, keys, sal, img=None, fg_thr=0.40, bg_thr=0.10, salient_thr=0.05)


def test_affinity_labels_without_classes():
    cams = np.zeros((0, 4, 4), np.float32)
    keys = np.zeros(0, np.int64)
    np.testing.assert_array_equal(affinity_labels_classic(cams, keys, None), 0)
    sal = np.zeros((4, 4), np.float32)
    sal[:2] = 1.0
    out = affinity_labels_saliency(cams, keys, sal, None)
    np.testing.assert_array_equal(out, np.array([[X] * 4] * 2 + [[0] * 4] * 2, np.uint8))


def test_affinity_labels_check_inputs():
    cams, keys = _cams6()
    with pytest.raises(ValueError, match="keys"):
        affinity_labels_classic(cams, keys[:1], None)
    with pytest.raises(ValueError, match="saliency"):
        affinity_labels_saliency(cams, keys, np.ones((5, 5)), None)
    with pytest.raises(ValueError, match="image"):
        affinity_labels_classic(cams, keys, None, crf={})


def test_affinity_labels_crf_removes_spurious_blob():
    # a square object with its own colour; a spurious CAM blob on plain background
    img = np.full((24, 24, 3), (40, 90, 60), np.uint8)
    img[6:18, 6:18] = (230, 210, 40)
    cam = np.zeros((1, 24, 24), np.float32)
    cam[0, 6:18, 6:18] = 0.9
    cam[0, 1:3, 20:22] = 0.5
    keys = [5]
    raw = affinity_labels_classic(cam, keys, img, crf=None)
    assert (raw[1:3, 20:22] == 5).all()
    out = affinity_labels_classic(cam, keys, img, crf={"t": 10, "gt_prob": 0.7})
    expected = np.zeros((24, 24), np.uint8)
    expected[6:18, 6:18] = 5
    np.testing.assert_array_equal(out, expected)
    sal = np.zeros((24, 24), np.float32)
    sal[6:18, 6:18] = 1.0
    sal[1:3, 20:22] = 1.0  # spurious salient blob too
    out_s = affinity_labels_saliency(cam, keys, sal, img, crf={})
    np.testing.assert_array_equal(out_s, expected)


# ---------------------------------------------------------------------------
# directions and paths
# ---------------------------------------------------------------------------


def test_direction_counts_and_half_disc():
    assert len(half_disc_directions(5)) == 34
    assert len(half_disc_directions(10)) == 152
    for r in (5, 10):
        dirs = {tuple(d) for d in half_disc_directions(r).tolist()}
        assert all(dy * dy + dx * dx < r * r for dy, dx in dirs)
        assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in dirs)
        assert not any((-dy, -dx) in dirs for dy, dx in dirs)  # each pair once
    assert half_disc_directions(2).tolist() == [[0, 1], [1, -1], [1, 0], [1, 1]]


def test_paths_by_hand():
    pi = path_index(5)
    paths = {tuple(d): set(p) for d, p in zip(pi.directions.tolist(), pi.paths)}
    assert paths[(0, 3)] == {(0, 0), (0, 1), (0, 2), (0, 3)}
    assert paths[(1, 1)] == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert paths[(2, 1)] == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)}
    assert paths[(2, 4)] == {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4)}
    assert len(paths[(1, -3)]) == 8
    assert len(paths[(3, 1)]) == 8


# ---------------------------------------------------------------------------
# affinities from boundaries
# ---------------------------------------------------------------------------


def _aff_at(aff, pi, y, x, d):
    k = [tuple(v) for v in pi.directions.tolist()].index(d)
    return aff[0, k, y, x].item()


def test_affinity_from_boundary_by_hand():
    b = torch.zeros(1, 1, 5, 6)
    b[0, 0, :, 3] = 0.8  # a vertical wall
    b[0, 0, 0, 0] = 0.5
    pi = path_index(5)
    aff = affinity_from_boundary(b, 5)
    assert aff.shape == (1, 34, 5, 6)
    assert _aff_at(aff, pi, 2, 1, (0, 1)) == pytest.approx(1.0)
    assert _aff_at(aff, pi, 2, 1, (0, 3)) == pytest.approx(0.2)  # crosses the wall
    assert _aff_at(aff, pi, 0, 0, (0, 1)) == pytest.approx(0.5)
    assert _aff_at(aff, pi, 0, 4, (1, -1)) == pytest.approx(0.2)
    assert _aff_at(aff, pi, 1, 4, (2, 1)) == pytest.approx(1.0)
    assert _aff_at(aff, pi, 4, 0, (1, 0)) == 0.0  # target below the image
    assert _aff_at(aff, pi, 2, 5, (0, 1)) == 0.0  # target right of the image
    assert _aff_at(aff, pi, 2, 0, (1, -1)) == 0.0  # target left of the image


def test_affinity_from_boundary_matches_brute_force():
    torch.manual_seed(0)
    b = torch.rand(2, 1, 7, 9)
    pi = path_index(4)
    aff = affinity_from_boundary(b, pi)
    bn = b.numpy()
    for n in range(2):
        for k, path in enumerate(pi.paths):
            for y in range(7):
                for x in range(9):
                    vals = [bn[n, 0, y + cy, x + cx] if 0 <= y + cy < 7 and 0 <= x + cx < 9 else 1.0
                            for cy, cx in path]
                    assert aff[n, k, y, x].item() == pytest.approx(1.0 - max(vals), abs=1e-6)


def test_affinity_from_boundary_is_differentiable():
    b = torch.rand(1, 1, 6, 6, requires_grad=True)
    affinity_from_boundary(b, 3).sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and (b.grad <= 0).all()


# ---------------------------------------------------------------------------
# pair labels and loss
# ---------------------------------------------------------------------------


def test_pair_labels_by_hand():
    label = torch.tensor([[[0, 0, 1, 1], [0, X, 1, 2], [0, 0, 2, 2]]])
    bg, fg, neg = pair_labels(label, 2, n_classes=20)
    assert bg.shape == (1, 4, 3, 4) and bg.dtype == torch.bool
    # direction 0 is (0, 1)
    np.testing.assert_array_equal(bg[0, 0].int().numpy(), [[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(fg[0, 0].int().numpy(), [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(neg[0, 0].int().numpy(), [[0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0]])
    # direction 3 is (1, 1): (0,0)→(1,1) touches 255; (1,2)→(2,3) is 1 vs 2; (0,1)→(1,2) is 0 vs 1
    assert not (bg | fg | neg)[0, 3, 0, 0]
    assert neg[0, 3, 1, 2] and neg[0, 3, 0, 1]
    # direction 1 is (1, -1): (1,3)→(2,2) both 2; (0,0)→ outside
    assert fg[0, 1, 1, 3] and not (bg | fg | neg)[0, 1, 0, 0]
    # no pair is in two groups; 255 never pairs
    assert not ((bg.int() + fg.int() + neg.int()) > 1).any()
    assert not (bg | fg | neg)[0, :, 1, 1].any()
    # labels above n_classes are ignored like 255
    _, fg1, neg1 = pair_labels(label, 2, n_classes=1)
    assert not fg1[0, 1, 1, 3] and not neg1[0, 3, 1, 2]
    assert pair_labels(label, 5, 20)[0].shape == (1, 34, 3, 4)


def test_affinity_loss_by_hand():
    aff = torch.tensor([1.0, 0.5, 0.0, 0.25]).view(1, 4, 1, 1)
    bg = torch.tensor([1, 0, 0, 0], dtype=torch.bool).view(1, 4, 1, 1)
    fg = torch.tensor([0, 1, 0, 0], dtype=torch.bool).view(1, 4, 1, 1)
    neg = torch.tensor([0, 0, 1, 1], dtype=torch.bool).view(1, 4, 1, 1)
    loss, parts = affinity_loss(aff, bg, fg, neg)
    l_bg = -math.log(1.0 + 1e-5)
    l_fg = -math.log(0.5 + 1e-5)
    l_neg = 0.5 * (-math.log(1.0 + 1e-5) - math.log(0.75 + 1e-5))
    assert parts["bg_pos"].item() == pytest.approx(l_bg, rel=1e-4, abs=1e-7)
    assert parts["fg_pos"].item() == pytest.approx(l_fg, rel=1e-6)
    assert parts["neg"].item() == pytest.approx(l_neg, rel=1e-6)
    assert loss.item() == pytest.approx(0.25 * l_bg + 0.25 * l_fg + 0.5 * l_neg, rel=1e-6)


def test_affinity_loss_empty_groups_are_zero():
    aff = torch.tensor([0.3, 0.6]).view(1, 2, 1, 1).requires_grad_()
    none = torch.zeros(1, 2, 1, 1, dtype=torch.bool)
    neg = torch.tensor([True, False]).view(1, 2, 1, 1)
    loss, parts = affinity_loss(aff, none, none, neg)
    assert parts["bg_pos"].item() == 0.0 and parts["fg_pos"].item() == 0.0
    assert loss.item() == pytest.approx(0.5 * -math.log(0.7 + 1e-5), rel=1e-6)
    loss0, _ = affinity_loss(aff, none, none, none)
    loss0.backward()
    assert loss0.item() == 0.0 and torch.isfinite(aff.grad).all()


# ---------------------------------------------------------------------------
# AffinityNet
# ---------------------------------------------------------------------------


def _net():
    torch.manual_seed(0)
    return AffinityNet(create_backbone("resnet18_w8", output_stride=16))


def test_affinitynet_forward_backward_trains_branches_only():
    net = _net().train()
    assert not net.backbone.training  # BN stays fixed
    bn = net.backbone.net.bn1
    mean_before = bn.running_mean.clone()
    x = torch.randn(2, 3, 64, 48)
    logits = net(x)
    assert logits.shape == (2, 1, 16, 12)
    torch.testing.assert_close(bn.running_mean, mean_before)
    # the stage-8 training step end to end on the stride-4 grid
    label = torch.randint(0, 3, (2, 16, 12))
    label[:, :2] = 255
    aff = affinity_from_boundary(torch.sigmoid(logits), 10)
    loss, _ = affinity_loss(aff, *pair_labels(label, 10, n_classes=20))
    loss.backward()
    trainable = net.trainable_parameters()
    assert len(trainable) == 5 * 3 + 2  # per branch conv + GN (w, b); fuse (w, b)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert all(p.grad is None and not p.requires_grad for p in net.backbone.parameters())
    ids = {id(p) for p in trainable}
    assert {id(p) for p in net.parameters() if p.requires_grad} == ids


def test_affinitynet_odd_sizes_and_flip_boundary():
    net = _net().eval()
    x = torch.randn(1, 3, 70, 50)
    assert net(x).shape[-2:] == net.backbone(x)["stem"].shape[-2:] == (18, 13)
    x = torch.randn(1, 3, 64, 64)
    b = net.boundary(x, flip=True)
    assert b.shape == (1, 1, 16, 16) and ((b >= 0) & (b <= 1)).all()
    # averaging with the un-flipped flip makes the map flip-equivariant
    torch.testing.assert_close(net.boundary(x.flip(-1), flip=True), b.flip(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.boundary(x, flip=False), torch.sigmoid(net(x)))
