"""Networks: backbone factory, CAM classifier, C²AM, PoolNet, AffinityNet, DeepLab."""

from pnoc.models.backbones import Backbone, available_backbones, create_backbone
from pnoc.models.classifier import Classifier, create_classifier

__all__ = ["Backbone", "Classifier", "available_backbones", "create_backbone", "create_classifier"]
