"""PoolNet salient object detector on a factory backbone (reference spec §7).

Layout (Liu et al., 2019, ResNet variant), top-down over ``layer4 → layer3 → layer2 → layer1``:

* **convert**: a 1×1 conv + ReLU brings every level to a common ``width``.
* **global guidance module (GGM)**: a pyramid pooling module on ``layer4`` — an identity branch
  plus adaptive average pools to 1×1, 3×3 and 5×5, each followed by a 3×3 conv, upsampled back
  and fused by a 3×3 conv. The result is upsampled to each finer level and adapted by a 3×3
  conv, so that deep location information reaches every stage ("guidance").
* **feature aggregation modules (FAM)**, one per level: average-pool the input at 2, 4 and 8,
  3×3 conv each, upsample and add to the input, ReLU, move to the next level's size, 3×3
  conv; then fuse with the next level's features and its guidance (sum, 3×3 conv). The last
  FAM (at ``layer1``) has no fusion.
* **score**: a 1×1 conv to one channel, bilinearly upsampled to the input size.

The reference keeps the whole network in ``eval()`` (BN on global statistics, frozen BN
parameters of the Caffe ResNet) and trains with batch 1; ``fixed_bn=True`` reproduces that.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnoc.models.backbones import Backbone, create_backbone, freeze_bn

LEVELS = ("layer4", "layer3", "layer2", "layer1")  # top-down order


def _conv3(cin: int, cout: int, relu: bool = True) -> nn.Module:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    return nn.Sequential(conv, nn.ReLU(inplace=True)) if relu else conv


def _up(x: torch.Tensor, size) -> torch.Tensor:
    if x.shape[-2:] == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _avg_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    # k×k stride-k average pooling that degrades gracefully on maps smaller than k
    # (a plain AvgPool2d(k) raises on the 2×2 top level of a 64-px image at stride 32)
    h, w = x.shape[-2:]
    return F.adaptive_avg_pool2d(x, (max(1, math.ceil(h / k)), max(1, math.ceil(w / k))))


class GlobalGuidance(nn.Module):
    """Pyramid pooling over the top level, then one adapter per finer level.

    Args:
        width: channels of the (converted) top level and of the guidance.
        n_targets: number of levels that receive guidance.
        bins: adaptive pooling sizes.
    """

    def __init__(self, width: int, n_targets: int, bins: tuple[int, ...] = (1, 3, 5)):
        super().__init__()
        self.bins = bins
        self.branches = nn.ModuleList(_conv3(width, width) for _ in bins)
        self.fuse = _conv3(width * (len(bins) + 1), width)
        self.adapters = nn.ModuleList(_conv3(width, width) for _ in range(n_targets))

    def forward(self, top: torch.Tensor, sizes: list) -> list[torch.Tensor]:
        """Args: top (B, W, h, w); sizes: the (h_k, w_k) of each target level.

        Returns: guidance maps, (B, W, h_k, w_k) each.
        """
        size = top.shape[-2:]
        parts = [top] + [_up(conv(F.adaptive_avg_pool2d(top, b)), size)
                         for b, conv in zip(self.bins, self.branches)]
        g = self.fuse(torch.cat(parts, dim=1))
        return [adapt(_up(g, s)) for adapt, s in zip(self.adapters, sizes)]


class FeatureAggregation(nn.Module):
    """FAM: multi-scale average pooling to suppress upsampling aliasing, then fusion.

    Args:
        width: channels in and out.
        fuse: whether a next level (and its guidance) is fused in.
        pools: pooling factors.
    """

    def __init__(self, width: int, fuse: bool, pools: tuple[int, ...] = (2, 4, 8)):
        super().__init__()
        self.pools = pools
        self.convs = nn.ModuleList(_conv3(width, width, relu=False) for _ in pools)
        self.conv_sum = _conv3(width, width, relu=False)
        self.conv_fuse = _conv3(width, width, relu=False) if fuse else None

    def forward(self, x: torch.Tensor, lateral: torch.Tensor | None = None,
                guide: torch.Tensor | None = None) -> torch.Tensor:
        """Args: x (B, W, h, w); lateral, guide (B, W, h', w') of the next level (fusing FAMs).

        Returns: (B, W, h', w') (or (B, W, h, w) without fusion).
        """
        size = x.shape[-2:]
        y = x
        for k, conv in zip(self.pools, self.convs):
            y = y + _up(conv(_avg_pool(x, k)), size)
        y = F.relu(y)
        if self.conv_fuse is None:
            return self.conv_sum(y)
        y = self.conv_sum(_up(y, lateral.shape[-2:]))
        return self.conv_fuse(y + lateral + guide)


class PoolNet(nn.Module):
    """Saliency network: backbone + GGM + four FAMs + score.

    Args:
        backbone: a :class:`~pnoc.models.backbones.Backbone`.
        width: common channel width of the decoder (128 default; 32–64 for tiny CPU nets).
        fixed_bn: keep the backbone's BN in eval mode with frozen affine parameters.
    """

    def __init__(self, backbone: Backbone, width: int = 128, fixed_bn: bool = True):
        super().__init__()
        self.backbone = backbone
        self.width = width
        self.convert = nn.ModuleDict({
            name: nn.Sequential(nn.Conv2d(backbone.channels[name], width, 1), nn.ReLU(inplace=True))
            for name in LEVELS
        })
        self.guidance = GlobalGuidance(width, n_targets=len(LEVELS) - 1)
        self.fams = nn.ModuleList(FeatureAggregation(width, fuse=i < len(LEVELS) - 1)
                                  for i in range(len(LEVELS)))
        self.score = nn.Conv2d(width, 1, 1)
        self.fixed_bn = fixed_bn
        for m in self._new_modules():
            for mod in m.modules():
                if isinstance(mod, nn.Conv2d):
                    nn.init.normal_(mod.weight, std=0.01)
                    nn.init.zeros_(mod.bias)
        if fixed_bn:
            freeze_bn(self.backbone)

    def _new_modules(self) -> list[nn.Module]:
        return [self.convert, self.guidance, self.fams, self.score]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x (B, 3, H, W) normalised images.

        Returns: saliency logits (B, 1, H, W).
        """
        feats = self.backbone(x)
        levels = [self.convert[name](feats[name]) for name in LEVELS]
        guides = self.guidance(levels[0], [f.shape[-2:] for f in levels[1:]])
        y = levels[0]
        for i, fam in enumerate(self.fams[:-1]):
            y = fam(y, levels[i + 1], guides[i])
        y = self.fams[-1](y)
        return _up(self.score(y), x.shape[-2:])

    def new_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Decoder layers trained from scratch."""
        out = []
        for name in ("convert", "guidance", "fams", "score"):
            out += list(getattr(self, name).named_parameters(prefix=name))
        return out

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Backbone parameters (BN affine ones have ``requires_grad=False`` when ``fixed_bn``)."""
        return list(self.backbone.named_parameters(prefix="backbone"))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.fixed_bn and mode:
            freeze_bn(self.backbone)
        return self


def create_poolnet(backbone: str, output_stride: int = 32, weights: str | Path | None = "none",
                   width: int = 128, fixed_bn: bool = True) -> PoolNet:
    """Build a :class:`PoolNet` from a backbone name (see :mod:`pnoc.models.backbones`)."""
    return PoolNet(create_backbone(backbone, output_stride, weights), width, fixed_bn)


def poolnet_from_artifact(state: dict) -> PoolNet:
    """Rebuild a PoolNet from a ``save_weights`` artifact.

    ``arch`` holds ``backbone``, ``output_stride``, ``width`` and optionally ``fixed_bn``.
    """
    arch = state["arch"]
    model = create_poolnet(arch["backbone"], arch["output_stride"], "none", arch["width"],
                           arch.get("fixed_bn", True))
    model.load_state_dict(state["model"])
    return model
