"""Dense CRF wrappers: noisy maps with a clear colour edge get cleaned, edge cases."""

import sys

import numpy as np
import pytest

from pnoc.crf import crf_label, crf_prob


def _two_tone(h=24, w=24):
    """Image with a vertical colour edge at w/2 and the matching 0/1 label map."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (30, 60, 40)
    img[:, w // 2:] = (220, 200, 210)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2:] = 1
    return img, truth


def test_crf_label_cleans_noisy_labels():
    img, truth = _two_tone()
    rng = np.random.default_rng(0)
    noisy = truth.copy()
    flip = rng.random(truth.shape) < 0.15
    noisy[flip] = 1 - noisy[flip]
    noisy[5:7, 3:5] = 1  # 2×2 wrong blobs on both sides
    noisy[15:17, 18:20] = 0
    assert (noisy != truth).sum() == 80
    out = crf_label(img, noisy, n_labels=2)
    assert out.dtype == np.int64 and out.shape == truth.shape
    np.testing.assert_array_equal(out, truth)


def test_crf_label_accepts_non_contiguous_image_and_extra_labels():
    img, truth = _two_tone()
    view = np.repeat(img, 2, axis=1)[:, ::2]  # same pixels, strided view
    assert not view.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(view, img)
    out = crf_label(view, truth, n_labels=4)  # n_labels larger than the labels used
    np.testing.assert_array_equal(out, truth)


def test_crf_label_single_label_returns_input():
    img, _ = _two_tone(6, 6)
    labels = np.zeros((6, 6), np.uint8)
    out = crf_label(img, labels, n_labels=1)
    np.testing.assert_array_equal(out, 0)
    assert out.shape == (6, 6)


def test_crf_label_rejects_bad_input():
    img, truth = _two_tone(8, 8)
    with pytest.raises(ValueError, match="0..1"):
        crf_label(img, truth + 1, n_labels=2)
    with pytest.raises(ValueError, match="img is"):
        crf_label(img[:4], truth, n_labels=2)


def test_crf_prob_cleans_noisy_probabilities():
    img, truth = _two_tone()
    rng = np.random.default_rng(0)
    p1 = np.where(truth == 1, 0.6, 0.4) + rng.normal(0, 0.15, truth.shape)
    p1 = np.clip(p1, 0.01, 0.99)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    assert (probs.argmax(0) != truth).sum() > 50
    q = crf_prob(img, probs)
    assert q.dtype == np.float32 and q.shape == probs.shape
    np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(q.argmax(0), truth)


def test_crf_prob_single_class_returns_input():
    img, _ = _two_tone(5, 5)
    probs = np.ones((1, 5, 5), np.float32)
    np.testing.assert_array_equal(crf_prob(img, probs), probs)


def test_missing_pydensecrf_gives_clear_error(monkeypatch):
    img, truth = _two_tone(6, 6)
    # a None entry in sys.modules makes the import fail as if the package were absent
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        crf_label(img, truth, n_labels=2)
