"""Dense CRF (Krähenbühl & Koltun) wrappers over ``pydensecrf`` (the ``pydensecrf2`` package).

Two flavours are used by the pipeline:

* :func:`crf_label` refines a *hard* label map (affinity labels, RW pseudo masks). The unary
  puts probability ``gt_prob`` on the given label and spreads the rest uniformly over the
  other labels (IRN/PSA ``crf_inference_label``; no label means "unsure").
* :func:`crf_prob` refines *soft* class probabilities (DeepLab-v2 style post-processing of
  segmentation outputs); it returns the CRF marginals.

Both are CPU-only and take the image in RGB uint8, as the bilateral kernel's colour
bandwidth ``srgb`` is defined in 0..255 units.
"""

from __future__ import annotations

import numpy as np

_INSTALL_HINT = "the dense CRF needs pydensecrf: pip install pydensecrf2 (or 'pip install -e .' in the repo)"


def _densecrf():
    """Import ``pydensecrf.densecrf`` lazily so that modules not using the CRF import without it."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return dcrf


def _check_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img must be (H, W, 3) RGB, got shape {img.shape}")
    if img.shape[:2] != tuple(hw):
        raise ValueError(f"img is {img.shape[:2]} but the map is {tuple(hw)}; resize one to the other first")
    # the C++ bilateral kernel reads the raw buffer: it must be uint8, C-contiguous and writable
    # (arrays backed by PIL images are read-only, which pydensecrf's typed memoryview rejects)
    return np.array(img, dtype=np.uint8, order="C", copy=True)


def _pairwise_and_infer(d, img: np.ndarray, t: int, gauss_sxy: float, gauss_compat: float,
                        bi_sxy: float, bi_srgb: float, bi_compat: float) -> np.ndarray:
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=img, compat=bi_compat)
    return np.asarray(d.inference(int(t)), dtype=np.float32)


def crf_label(
    img: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    t: int = 10,
    gt_prob: float = 0.7,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bi_sxy: float = 50,
    bi_srgb: float = 5,
    bi_compat: float = 10,
) -> np.ndarray:
    """Refine a hard label map with a dense CRF.

    Args:
        img: uint8 (H, W, 3) RGB image.
        labels: int (H, W), values in ``0..n_labels-1`` (every value is a real label; none
            means "unsure").
        n_labels: number of labels of the CRF (may exceed ``labels.max() + 1``).
        t: mean-field iterations.
        gt_prob: probability the unary gives the input label, in (0, 1); the remaining
            ``1 - gt_prob`` is shared uniformly by the other labels.
        gauss_sxy, gauss_compat: smoothness (position-only) kernel.
        bi_sxy, bi_srgb, bi_compat: appearance (position + colour) kernel.

    Returns:
        int64 (H, W) refined labels in ``0..n_labels-1``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must lie in 0..{n_labels - 1}, got {labels.min()}..{labels.max()}")
    if n_labels == 1:
        # one label: nothing to decide (and the uniform-rest unary would divide by zero)
        return labels.astype(np.int64, copy=True)
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    h, w = labels.shape
    img = _check_image(img, (h, w))
    dcrf = _densecrf()

    flat = labels.reshape(-1).astype(np.int64)
    unary = np.full((n_labels, h * w), -np.log((1.0 - gt_prob) / (n_labels - 1)), dtype=np.float32)
    unary[flat, np.arange(h * w)] = -np.log(gt_prob)

    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    q = _pairwise_and_infer(d, img, t, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat)
    return np.argmax(q.reshape(n_labels, h, w), axis=0).astype(np.int64)


def crf_prob(
    img: np.ndarray,
    probs: np.ndarray,
    t: int = 10,
    gauss_sxy: float = 1,
    gauss_compat: float = 3,
    bi_sxy: float = 67,
    bi_srgb: float = 3,
    bi_compat: float = 4,
) -> np.ndarray:
    """Refine class probabilities with a dense CRF (DeepLab-v2 defaults).

    Args:
        img: uint8 (H, W, 3) RGB image.
        probs: float (K, H, W) per-pixel class probabilities (softmax output; each pixel
            should sum to 1). Values are clipped to [1e-5, 1] before taking -log.
        t: mean-field iterations.
        gauss_sxy, gauss_compat: smoothness kernel.
        bi_sxy, bi_srgb, bi_compat: appearance kernel.

    Returns:
        float32 (K, H, W) CRF marginals (each pixel sums to 1).
    """
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probs must be (K, H, W), got shape {probs.shape}")
    k, h, w = probs.shape
    if k == 1:
        return probs.astype(np.float32, copy=True)
    img = _check_image(img, (h, w))
    dcrf = _densecrf()

    unary = -np.log(np.clip(probs.reshape(k, -1), 1e-5, 1.0)).astype(np.float32)
    d = dcrf.DenseCRF2D(w, h, k)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    q = _pairwise_and_infer(d, img, t, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat)
    return q.reshape(k, h, w)
