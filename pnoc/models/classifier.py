"""CAM classifier: backbone + bias-free 1×1 conv + global average pooling."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .backbones import Backbone, create_backbone, freeze_bn


class Classifier(nn.Module):
    """Fully convolutional multi-label classifier whose 1×1 head gives the CAMs.

    Args:
        backbone: a :class:`Backbone`.
        n_classes: C (background excluded).
    """

    def __init__(self, backbone: Backbone, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.out_channels, n_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight)
        self.n_classes = n_classes
        self.fixed_bn = False

    def forward(self, x: torch.Tensor, with_cam: bool = True):
        """Args: x (B, 3, H, W).

        Returns:
            logits (B, C) = GAP of the CAMs, and the raw (pre-ReLU) CAMs (B, C, H/os, W/os).
        """
        cam = self.classifier(self.backbone(x)["layer4"])
        return cam.mean(dim=(2, 3)), cam

    def new_parameters(self):
        return list(self.classifier.named_parameters(prefix="classifier"))

    def backbone_parameters(self):
        return list(self.backbone.named_parameters(prefix="backbone"))

    def fix_bn(self) -> "Classifier":
        """BN frozen to running statistics (the reference's ``mode=fix``, used for noc)."""
        self.fixed_bn = True
        freeze_bn(self)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.fixed_bn and mode:
            freeze_bn(self)
        return self


def create_classifier(backbone: str, n_classes: int, output_stride: int = 16,
                      weights: str | Path | None = "none") -> Classifier:
    """Build a :class:`Classifier` from a backbone name (see :mod:`pnoc.models.backbones`)."""
    return Classifier(create_backbone(backbone, output_stride, weights), n_classes)


def classifier_from_artifact(state: dict) -> Classifier:
    """Rebuild a classifier from a ``save_weights`` artifact (``arch`` metadata + ``model`` state)."""
    arch = state["arch"]
    model = create_classifier(arch["backbone"], arch["n_classes"], arch["output_stride"], "none")
    model.load_state_dict(state["model"])
    return model
