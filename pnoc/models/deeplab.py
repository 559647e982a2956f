"""Semantic segmentation networks for stage 9: DeepLabV3+ and DeepLabV2.

Both wrap a :class:`pnoc.models.backbones.Backbone` (a dict of feature maps) and return
per-pixel class logits at the *input* resolution::

    model(images (B, 3, H, W)) -> logits (B, n_classes, H, W)

``n_classes`` includes the background (21 for VOC, 81 for COCO).

Both expose :meth:`backbone_parameters` (pretrained trunk) and :meth:`new_parameters`
(layers trained from scratch: ASPP, decoder, classifier) so that the trainer can give
the new layers their ×10 learning rate (reference spec §1, "parameter groups").
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnoc.io import DataError
from pnoc.models.backbones import Backbone, create_backbone

GN_GROUPS = 4  # reference use_gn=true: GroupNorm with 4 groups in ASPP/decoder

DEFAULT_V3P_RATES = (6, 12, 18)  # at output stride 16
DEFAULT_V2_RATES = (6, 12, 18, 24)


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer of the ASPP/decoder.

    Args:
        norm: ``"gn"`` (GroupNorm, 4 groups) or ``"bn"`` (BatchNorm2d).
        channels: number of channels.

    Raises:
        ValueError: unknown ``norm`` or channels not divisible into 4 groups.
    """
    if norm == "gn":
        if channels % GN_GROUPS:
            raise ValueError(f"GroupNorm({GN_GROUPS}) needs channels divisible by {GN_GROUPS}, got {channels}")
        return nn.GroupNorm(GN_GROUPS, channels)
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'gn' or 'bn', got {norm!r}")


def _conv_norm_relu(cin: int, cout: int, k: int, norm: str, dilation: int = 1) -> nn.Sequential:
    # bias-free: the norm's shift makes a conv bias redundant
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        make_norm(norm, cout),
        nn.ReLU(inplace=True),
    )


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask does not depend on the input's memory format.

    torch draws a dropout mask in the input's memory order, so an NHWC (``speed.channels_last``) activation
    would get other draws from the same RNG state than its NCHW twin: an equally good mask, but another
    result. The input is made NCHW-contiguous first, so the mask of element (n, c, y, x) is the same either
    way; for an NCHW input ``contiguous()`` is the input itself and nothing changes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, C, h, w). Returns: (B, C, h, w), NCHW-contiguous."""
        return F.dropout(x.contiguous(), self.p, self.training, self.inplace)


def _init_new(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _Segmenter(nn.Module):
    """Shared parameter bookkeeping: ``backbone`` is pretrained, everything else is new."""

    backbone: Backbone

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the (pretrained) trunk."""
        return self.backbone.parameters()

    def new_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the layers trained from scratch (everything outside ``backbone``)."""
        own = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in own)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3).

    Five parallel branches on the deepest feature map: 1×1 conv, one 3×3 conv per atrous
    rate, and image pooling (global average → 1×1 conv → broadcast); concatenated, fused
    by a 1×1 conv, then dropout.

    Args:
        in_channels: channels of the input feature map.
        out_channels: channels of every branch and of the output.
        rates: dilation rates of the 3×3 branches.
        norm: ``"gn"`` or ``"bn"``.
        dropout: dropout after the fuse conv.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = DEFAULT_V3P_RATES,
                 norm: str = "gn", dropout: float = 0.5):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_norm_relu(in_channels, out_channels, 1, norm)]
            + [_conv_norm_relu(in_channels, out_channels, 3, norm, dilation=int(r)) for r in rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )
        n = len(self.branches) + 1
        self.fuse = _conv_norm_relu(n * out_channels, out_channels, 1, norm)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, Cin, h, w). Returns: (B, out_channels, h, w)."""
        outs = [b(x) for b in self.branches]
        # the pooled branch is constant over space: broadcast it back to h×w
        outs.append(self.pool(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.dropout(self.fuse(torch.cat(outs, dim=1)))


class DeepLabV3Plus(_Segmenter):
    """DeepLabV3+ (reference spec §10): ASPP on ``layer4`` + a decoder fed by ``layer1``.

    Args:
        backbone: feature extractor returning ``"layer1"`` and ``"layer4"``.
        n_classes: output classes including background.
        aspp_channels: width of the ASPP branches (256 in the paper).
        aspp_rates: atrous rates of the 3×3 ASPP branches; (6, 12, 18) suits output
            stride 16 (:func:`create_segmenter` doubles them at OS 8).
        decoder_low_channels: width ``layer1`` is reduced to (48).
        decoder_channels: width of the two 3×3 decoder convs (256).
        norm: ``"gn"`` (GroupNorm(4), the reference ``use_gn=true``) or ``"bn"``.
        dropout: dropout after the ASPP fuse and after the first decoder conv; the
            second decoder conv is followed by ``dropout / 5`` (0.5 → 0.1).

    Smaller widths (e.g. 32/16/32) give a CPU-sized model; every width must be a
    multiple of 4 with ``norm="gn"``.
    """

    def __init__(self, backbone: Backbone, n_classes: int, aspp_channels: int = 256,
                 aspp_rates: Sequence[int] = DEFAULT_V3P_RATES, decoder_low_channels: int = 48,
                 decoder_channels: int = 256, norm: str = "gn", dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.n_classes = n_classes
        self.aspp = ASPP(backbone.channels["layer4"], aspp_channels, aspp_rates, norm, dropout)
        self.low = _conv_norm_relu(backbone.channels["layer1"], decoder_low_channels, 1, norm)
        self.decoder = nn.Sequential(
            _conv_norm_relu(aspp_channels + decoder_low_channels, decoder_channels, 3, norm),
            Dropout(dropout),
            _conv_norm_relu(decoder_channels, decoder_channels, 3, norm),
            Dropout(dropout / 5),
        )
        self.classifier = nn.Conv2d(decoder_channels, n_classes, 1)
        for m in (self.aspp, self.low, self.decoder, self.classifier):
            _init_new(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, 3, H, W) normalised images. Returns: logits (B, n_classes, H, W)."""
        feats = self.backbone(x)
        low = self.low(feats["layer1"])  # (B, 48, H/4, W/4)
        high = self.aspp(feats["layer4"])  # (B, 256, H/os, W/os)
        high = F.interpolate(high, size=low.shape[2:], mode="bilinear", align_corners=True)
        y = self.classifier(self.decoder(torch.cat([high, low], dim=1)))
        return F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=True)


class DeepLabV2(_Segmenter):
    """DeepLabV2 (paper rows; the reference repo has none): ASPP classifier on ``layer4``.

    The classifier is the *sum* of one dilated 3×3 conv (with bias) per rate, each mapping
    ``layer4`` straight to ``n_classes``; logits are upsampled to the input size.

    Args:
        backbone: feature extractor returning ``"layer4"``.
        n_classes: output classes including background.
        rates: dilation rates, (6, 12, 18, 24) as in DeepLab-v2.
    """

    def __init__(self, backbone: Backbone, n_classes: int, rates: Sequence[int] = DEFAULT_V2_RATES):
        super().__init__()
        self.backbone = backbone
        self.n_classes = n_classes
        cin = backbone.channels["layer4"]
        self.aspp = nn.ModuleList(
            nn.Conv2d(cin, n_classes, 3, padding=int(r), dilation=int(r), bias=True) for r in rates
        )
        # DeepLab-v2 initialises the classifier with N(0, 0.01): small logits at the start
        for c in self.aspp:
            nn.init.normal_(c.weight, 0.0, 0.01)
            nn.init.zeros_(c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, 3, H, W) normalised images. Returns: logits (B, n_classes, H, W)."""
        f = self.backbone(x)["layer4"]
        y = sum(c(f) for c in self.aspp)
        return F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=True)


ARCHS = ("deeplabv3plus", "deeplabv2")


def create_segmenter(arch: str, backbone_name: str, n_classes: int, output_stride: int = 16,
                     weights: str | Path | None = "none", **widths) -> _Segmenter:
    """Build a segmentation network by name.

    Args:
        arch: ``"deeplabv3plus"`` or ``"deeplabv2"``.
        backbone_name: any name accepted by :func:`pnoc.models.backbones.create_backbone`.
        n_classes: classes including background.
        output_stride: 8 or 16 (stride of ``layer4``).
        weights: backbone weights: ``"none"``, ``"imagenet"`` or a ``.pth`` path.
        **widths: extra constructor arguments (``aspp_channels``, ``aspp_rates``,
            ``decoder_low_channels``, ``decoder_channels``, ``norm``, ``dropout`` for
            DeepLabV3+; ``rates`` for DeepLabV2). Without ``aspp_rates`` DeepLabV3+ uses
            (6, 12, 18) scaled by 16 / output_stride, i.e. (12, 24, 36) at OS 8, so the
            receptive field per rate stays the same in pixels.

    Returns:
        :class:`DeepLabV3Plus` or :class:`DeepLabV2`.

    Raises:
        ValueError: unknown ``arch`` (or backbone, from ``create_backbone``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown segmentation arch {arch!r}; choose one of {list(ARCHS)}")
    backbone = create_backbone(backbone_name, output_stride=output_stride, weights=weights)
    if arch == "deeplabv3plus":
        if widths.get("aspp_rates") is None:
            widths["aspp_rates"] = tuple(r * 16 // output_stride for r in DEFAULT_V3P_RATES)
        return DeepLabV3Plus(backbone, n_classes, **widths)
    return DeepLabV2(backbone, n_classes, **widths)


def build_segmenter(spec: dict, weights: str = "none"):
    return create_segmenter(spec["arch"], spec["backbone"], spec["n_classes"], spec["output_stride"], weights,
                            **dict(spec.get("widths", {})))


def segmenter_from_artifact(state: dict):
    """Rebuild a segmentation network from a ``train_segmentation`` artifact."""
    if "arch" not in state or "model" not in state or "arch" not in state["arch"]:
        raise DataError("the model file is not a train_segmentation artifact (no 'arch'/'model'); "
                        "point --model at results/segmentation/<variant>/seed<k>/model.pt")
    model = build_segmenter(state["arch"])
    model.load_state_dict(state["model"])
    return model
