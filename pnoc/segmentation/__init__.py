"""Segmentation wing (workflow/rules/segmentation.smk): DeepLab training on pseudo masks, multi-scale
inference and evaluation."""
