"""CAM classifier: backbone + bias-free 1×1 conv + global average pooling."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pnoc.io import DataError
from pnoc.models.backbones import Backbone, create_backbone, freeze_bn
from pnoc.training import load_weights


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


def classifier_backbone_state(path: str | Path) -> tuple[dict, dict]:
    """Architecture and backbone weights of an ordinary-classifier artifact.

    The synthetic benchmark has no ImageNet: the classifier trained on its images plays the
    role of the pretrained backbone for every later network (C²AM, PoolNet, AffinityNet).

    Args:
        path: ``results/classifier/seed<k>/model.pt``.

    Returns:
        (arch dict with ``backbone`` and ``output_stride``, state dict of ``Backbone.net``).
    """
    state = load_weights(path)
    if "arch" not in state or "model" not in state:
        raise DataError(f"{path}: not a classifier artifact (no 'arch'/'model'); rerun rule train_classifier")
    prefix = "backbone.net."
    sd = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    if not sd:
        raise DataError(f"{path}: holds no backbone weights; rerun rule train_classifier")
    return state["arch"], sd


def load_backbone_state(backbone: torch.nn.Module, sd: dict, source: str | Path) -> None:
    """Load ``Backbone.net`` weights strictly (stride/dilation changes keep the shapes)."""
    try:
        backbone.net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise DataError(f"{source}: backbone weights do not fit ({e}); check the backbone name in the config") from e
