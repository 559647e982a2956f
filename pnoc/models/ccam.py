"""C²AM: class-agnostic activation map by contrastive fg/bg disentangling (paper §2.4.4).

A backbone's ``layer3`` and ``layer4`` maps are concatenated into F (B, C_f, h, w); a
"disentangler" head (3×3 conv to one channel, no bias, then BatchNorm(1)) gives a logit map
z, p = σ(z) the probability that a region belongs to the first partition, and the pooled
partition vectors

    v_fg = Σ_hw p·F / (h·w),   v_bg = Σ_hw (1 − p)·F / (h·w)   (both (B, C_f)).

Both vectors are divided by the full pixel count h·w, not by Σp (as the reference does), so
an almost-empty partition yields a short vector rather than an amplified noisy one. The
contrastive losses over these vectors live in :mod:`pnoc.saliency.losses`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pnoc.models.backbones import Backbone, create_backbone


class CCAM(nn.Module):
    """Backbone + disentangler head.

    Args:
        backbone: a :class:`~pnoc.models.backbones.Backbone` (its ``layer3``/``layer4`` are used).
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.feature_channels = backbone.channels["layer3"] + backbone.channels["layer4"]
        self.head = nn.Sequential(
            nn.Conv2d(self.feature_channels, 1, 3, padding=1, bias=False),
            nn.BatchNorm2d(1),
        )
        nn.init.kaiming_normal_(self.head[0].weight, mode="fan_in", nonlinearity="linear")
        nn.init.ones_(self.head[1].weight)
        nn.init.zeros_(self.head[1].bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated ``layer3``/``layer4`` features.

        Args:
            x: (B, 3, H, W) normalised images.

        Returns:
            F: (B, C3 + C4, h, w) at ``layer4``'s resolution (h = H / os).
        """
        feats = self.backbone(x)
        f3, f4 = feats["layer3"], feats["layer4"]
        if f3.shape[-2:] != f4.shape[-2:]:
            # only differs at output stride 32 (layer3 at 16): bring layer3 down to layer4's grid
            f3 = F.interpolate(f3, size=f4.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([f3, f4], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: x (B, 3, H, W) normalised images.

        Returns:
            z: (B, 1, h, w) logit map (p = σ(z) is the first partition's probability).
            v_fg: (B, C_f) = mean over h·w of p·F.
            v_bg: (B, C_f) = mean over h·w of (1 − p)·F.
        """
        feats = self.features(x)
        z = self.head(feats)
        p = torch.sigmoid(z)
        # mean over the spatial grid == Σ_hw (·) / (h·w): the reference's normalisation
        v_fg = (p * feats).mean(dim=(2, 3))
        v_bg = ((1.0 - p) * feats).mean(dim=(2, 3))
        return z, v_fg, v_bg

    def new_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The scratch head (10×/20× LR multipliers)."""
        return list(self.head.named_parameters(prefix="head"))

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The (usually pretrained) backbone."""
        return list(self.backbone.named_parameters(prefix="backbone"))


def create_ccam(backbone: str, output_stride: int = 16, weights: str | Path | None = "none") -> CCAM:
    """Build a :class:`CCAM` from a backbone name (see :mod:`pnoc.models.backbones`)."""
    return CCAM(create_backbone(backbone, output_stride, weights))


def ccam_from_artifact(state: dict) -> CCAM:
    """Rebuild a C²AM from a ``save_weights`` artifact (``arch`` metadata + ``model`` state).

    ``arch`` holds ``backbone`` and ``output_stride``.
    """
    arch = state["arch"]
    model = create_ccam(arch["backbone"], arch["output_stride"], "none")
    model.load_state_dict(state["model"])
    return model
