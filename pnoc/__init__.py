"""pnoc: P-NOC weakly supervised semantic segmentation, one module per pipeline stage."""

__version__ = "0.1.0"
