"""Datasets (synthetic, VOC 2012, COCO 2014), transforms and loaders."""

from pnoc.data.datasets import COCO_CLASSES, DATASETS, VOC_CLASSES, WSSSDataset, open_dataset

__all__ = ["COCO_CLASSES", "DATASETS", "VOC_CLASSES", "WSSSDataset", "open_dataset"]
