"""pnoc: P-NOC weakly supervised semantic segmentation.

One wing per rule file (cam, saliency, affinity, segmentation, report), one module per stage, above
shared machinery (data, models, training, evaluation, io, crf, parallel, shards, cli); see docs/architecture.md.
"""

__version__ = "0.1.0"
