"""DeepLabV3+/V2 models, multi-scale merging and the submission mask writers (CPU, tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pnoc.io import read_mask
from pnoc.models.backbones import create_backbone
from pnoc.models.deeplab import DeepLabV2, DeepLabV3Plus, create_segmenter
from pnoc.segmentation.multiscale import multiscale_logits, to_voc_submission, write_index_png

SMALL = dict(aspp_channels=16, decoder_low_channels=8, decoder_channels=16)
N_CLASSES = 5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv2"])
@pytest.mark.parametrize("os_", [16, 8])
def test_forward_backward_shapes(arch, os_):
    widths = SMALL if arch == "deeplabv3plus" else {}
    model = create_segmenter(arch, "resnet18_w8", N_CLASSES, output_stride=os_, **widths).train()
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    assert y.shape == (2, N_CLASSES, 64, 64)
    F.cross_entropy(y, torch.randint(0, N_CLASSES, (2, 64, 64))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_odd_input_size_upsamples_to_input():
    model = create_segmenter("deeplabv3plus", "resnet18_w8", N_CLASSES, **SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 70)).shape == (1, N_CLASSES, 50, 70)


def test_os8_doubles_aspp_rates():
    m16 = create_segmenter("deeplabv3plus", "resnet18_w8", N_CLASSES, output_stride=16, **SMALL)
    m8 = create_segmenter("deeplabv3plus", "resnet18_w8", N_CLASSES, output_stride=8, **SMALL)
    rates = lambda m: [b[0].dilation[0] for b in m.aspp.branches[1:]]  # noqa: E731
    assert rates(m16) == [6, 12, 18]
    assert rates(m8) == [12, 24, 36]
    m = create_segmenter("deeplabv3plus", "resnet18_w8", N_CLASSES, output_stride=8, aspp_rates=(2, 3, 4), **SMALL)
    assert rates(m) == [2, 3, 4]


def test_groupnorm_batch1_train_default_widths():
    # default widths (256/48/256) with GN: the pooled ASPP branch is 1×1, which GN handles at batch 1
    model = DeepLabV3Plus(create_backbone("resnet18_w8", output_stride=16), N_CLASSES, norm="gn").train()
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 4 for m in model.aspp.modules())
    y = model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, N_CLASSES, 64, 64)
    y.mean().backward()


def test_batchnorm_variant():
    model = DeepLabV3Plus(create_backbone("resnet18_w8", output_stride=16), N_CLASSES, norm="bn", **SMALL)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.aspp.modules())
    assert not any(isinstance(m, nn.GroupNorm) for m in model.modules())
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, N_CLASSES, 64, 64)


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        create_segmenter("unet", "resnet18_w8", N_CLASSES)
    with pytest.raises(ValueError, match="norm"):
        create_segmenter("deeplabv3plus", "resnet18_w8", N_CLASSES, norm="ln", **SMALL)
    with pytest.raises(ValueError, match="divisible"):
        create_segmenter("deeplabv3plus", "resnet18_w8", N_CLASSES, aspp_channels=18)


@pytest.mark.parametrize("arch", ["deeplabv3plus", "deeplabv2"])
def test_parameter_partition(arch):
    widths = SMALL if arch == "deeplabv3plus" else {}
    model = create_segmenter(arch, "resnet18_w8", N_CLASSES, **widths)
    new = [id(p) for p in model.new_parameters()]
    old = [id(p) for p in model.backbone_parameters()]
    assert new and old
    assert not set(new) & set(old)
    assert sorted(new + old) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in model.backbone.parameters()} == set(old)


def test_deeplabv2_is_sum_of_dilated_convs():
    model = DeepLabV2(create_backbone("resnet18_w8", output_stride=8), N_CLASSES).eval()
    assert [c.dilation[0] for c in model.aspp] == [6, 12, 18, 24]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        f = model.backbone(x)["layer4"]
        expect = F.interpolate(sum(c(f) for c in model.aspp), size=(32, 32), mode="bilinear", align_corners=True)
        assert torch.allclose(model(x), expect, atol=1e-6)


# ---------------------------------------------------------------------------
# multi-scale merging
# ---------------------------------------------------------------------------


def _ramps(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w) image linear in the (align_corners) normalised coordinates; asymmetric in x."""
    ys = torch.linspace(-1, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(-1, 1, w).view(1, w).expand(h, w)
    return torch.stack([xs, ys, 0.7 * xs - 0.3 * ys + 0.2])[None]


class _PointwiseModel(nn.Module):
    """Logits = a fixed affine map of each pixel, returned at half resolution.

    Flip-equivariant, and an affine map commutes with bilinear resizing, so on a
    coordinate-linear image every scale reproduces the same logits at H×W.
    """

    def __init__(self, c: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(c, 3, generator=g) * 2
        self.b = torch.randn(c, generator=g)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ck,bkhw->bchw", self.w, x) + self.b.view(1, -1, 1, 1)

    def forward(self, x):
        y = self.logits(x)
        return F.interpolate(y, size=(x.shape[2] // 2 + 1, x.shape[3] // 2 + 1), mode="bilinear",
                             align_corners=True)


class _CoordModel(nn.Module):
    """Logits = fixed function of the output *grid* only (ignores content): not flip-equivariant."""

    def __init__(self):
        super().__init__()
        self.w = torch.tensor([[1.5, 0.0], [-1.0, 0.5], [0.3, -2.0]])  # (C, 2) over (x, y)

    def forward(self, x):
        r = _ramps(x.shape[2], x.shape[3])[:, :2]  # (1, 2, h, w)
        y = torch.einsum("cj,bjhw->bchw", self.w, r)
        return y.expand(x.shape[0], -1, -1, -1)


def test_multiscale_roundtrip_no_flip():
    model = _PointwiseModel()
    img = _ramps(37, 53)
    probs = multiscale_logits(model, img, scales=(0.5, 1.0, 1.5, 2.0), flip=False)
    expect = torch.softmax(model.logits(img)[0], dim=0)
    assert probs.shape == expect.shape == (4, 37, 53)
    assert torch.allclose(probs, expect, atol=1e-5)
    assert torch.allclose(probs.sum(0), torch.ones(37, 53), atol=1e-5)


def test_multiscale_flip_sums_unflipped_logits():
    model = _PointwiseModel()
    img = _ramps(37, 53)
    probs = multiscale_logits(model, img, flip=True)
    # flip-equivariant model: the un-flipped second pass equals the first; flips are summed
    expect = torch.softmax(2 * model.logits(img)[0], dim=0)
    assert torch.allclose(probs, expect, atol=1e-5)
    # a missing un-flip would mirror the (x-asymmetric) second pass: make sure that differs
    wrong = torch.softmax(model.logits(img)[0] + model.logits(img.flip(-1))[0], dim=0)
    assert (wrong - expect).abs().max() > 1e-2


def test_multiscale_flip_with_asymmetric_coordinate_map():
    model = _CoordModel()
    img = torch.zeros(1, 3, 30, 41)
    f = model(img)[0]  # (3, 30, 41), asymmetric in x
    assert (f - f.flip(-1)).abs().max() > 0.5
    probs = multiscale_logits(model, img, scales=(0.5, 1.0, 2.0), flip=True)
    assert torch.allclose(probs, torch.softmax(f + f.flip(-1), dim=0), atol=1e-5)
    probs = multiscale_logits(model, img, scales=(0.75, 1.25), flip=False)
    assert torch.allclose(probs, torch.softmax(f, dim=0), atol=1e-5)


def test_multiscale_rejects_batches():
    with pytest.raises(ValueError, match="1, 3, H, W"):
        multiscale_logits(_CoordModel(), torch.zeros(2, 3, 8, 8))


def test_multiscale_with_real_model_eval():
    model = create_segmenter("deeplabv3plus", "resnet18_w8", N_CLASSES, **SMALL).eval()
    probs = multiscale_logits(model, torch.randn(1, 3, 40, 48), scales=(0.75, 1.0))
    assert probs.shape == (N_CLASSES, 40, 48)
    assert torch.allclose(probs.sum(0), torch.ones(40, 48), atol=1e-5)


# ---------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------


def _mask():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 21, size=(23, 31)).astype(np.int64)
    m[:3, :5] = 255
    return m


def test_voc_submission_palette_png(tmp_path):
    m = _mask()
    p = tmp_path / "sub" / "2008_000001.png"
    to_voc_submission(torch.from_numpy(m), p)
    with Image.open(p) as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), m)
        assert tuple(im.getpalette()[3:6]) == (128, 0, 0)  # VOC colour of class 1
    assert np.array_equal(read_mask(p), m)
    assert not [q for q in p.parent.iterdir() if q.name != p.name]  # no temp files left


def test_index_png_raw(tmp_path):
    m = _mask()
    p = tmp_path / "a.png"
    write_index_png(m.astype(np.uint8), p)
    with Image.open(p) as im:
        assert im.mode == "L"
        assert np.array_equal(np.asarray(im), m)


def test_writer_rejects_float_masks(tmp_path):
    with pytest.raises(ValueError, match="integer"):
        to_voc_submission(np.zeros((4, 4), np.float32), tmp_path / "x.png")
