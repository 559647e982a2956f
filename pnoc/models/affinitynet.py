"""AffinityNet: IRN's inter-pixel boundary network on a frozen backbone (spec §9).

The backbone is frozen (BN fixed to running statistics, no gradients, features detached);
only five light side branches and a 1×1 fusion conv are trained::

    stem, layer1..layer4 ─ 1×1 conv → 32 ─ GroupNorm(4) ─ ReLU ─ upsample to stride 4
                                  └──────────── concat (160 ch) ─ 1×1 conv (bias) → boundary logit

Branch input widths come from ``backbone.channels``, so every backbone works (the reference
hard-codes the stem width and, at HEAD, no longer feeds the stem at all).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnoc.models.backbones import FEATURES, Backbone, create_backbone, freeze_bn


class AffinityNet(nn.Module):
    """Boundary network over a frozen :class:`~pnoc.models.backbones.Backbone`.

    Args:
        backbone: returns ``stem`` and ``layer1``..``layer4`` maps (``stem`` must be stride 4).
        branch_channels: width of each side branch (32 in IRN).
        gn_groups: GroupNorm groups per branch.
    """

    def __init__(self, backbone: Backbone, branch_channels: int = 32, gn_groups: int = 4):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        freeze_bn(self.backbone)
        self.backbone.eval()
        self.branches = nn.ModuleDict({
            name: nn.Sequential(
                nn.Conv2d(backbone.channels[name], branch_channels, 1, bias=False),
                nn.GroupNorm(gn_groups, branch_channels),
                nn.ReLU(inplace=True),
            )
            for name in FEATURES
        })
        self.fuse = nn.Conv2d(branch_channels * len(FEATURES), 1, 1, bias=True)

    def train(self, mode: bool = True) -> "AffinityNet":
        super().train(mode)
        # the backbone stays in eval mode: BN running statistics are never updated
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the side branches and the fusion conv (the backbone is frozen)."""
        return list(self.branches.parameters()) + list(self.fuse.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Boundary logits.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            (B, 1, h, w) logits on the stem's stride-4 grid (h = ⌈H/4⌉ for ResNets).
        """
        with torch.no_grad():
            feats = self.backbone(x)
        base = self.backbone.strides["stem"]
        size = feats["stem"].shape[-2:]
        outs = []
        for name in FEATURES:
            y = self.branches[name](feats[name].detach())
            scale = self.backbone.strides[name] // base
            if scale > 1:
                # upsample by the stride ratio and crop (not resize to `size`): keeps the
                # feature grid aligned with the stride-4 grid when H is not a multiple of 16
                y = F.interpolate(y, scale_factor=scale, mode="bilinear", align_corners=False)
            if y.shape[-2] < size[0] or y.shape[-1] < size[1]:
                y = F.pad(y, (0, max(0, size[1] - y.shape[-1]), 0, max(0, size[0] - y.shape[-2])), mode="replicate")
            outs.append(y[..., : size[0], : size[1]])
        return self.fuse(torch.cat(outs, dim=1))

    @torch.no_grad()
    def boundary(self, x: torch.Tensor, flip: bool = True) -> torch.Tensor:
        """Boundary probabilities for inference.

        Args:
            x: (B, 3, H, W) normalised images.
            flip: also run the horizontally flipped images and average the logits of the
                original and the un-flipped flip before the sigmoid (the reference's TTA).

        Returns:
            (B, 1, h, w) probabilities in [0, 1].
        """
        if not flip:
            return torch.sigmoid(self(x))
        logits = self(torch.cat([x, x.flip(-1)], dim=0))
        b = x.shape[0]
        return torch.sigmoid(0.5 * (logits[:b] + logits[b:].flip(-1)))


def affinitynet_from_artifact(state: dict) -> AffinityNet:
    """Rebuild a trained AffinityNet from its ``model.pt`` (the frozen backbone is stored too)."""
    arch = state["arch"]
    model = AffinityNet(create_backbone(arch["backbone"], arch["output_stride"], "none"), arch["branch_channels"])
    model.load_state_dict(state["model"])
    return model
