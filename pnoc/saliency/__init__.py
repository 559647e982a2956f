"""Saliency wing (workflow/rules/saliency.smk): CAM hints, C²AM / C²AM-H and their losses, pseudo-saliency
masks, PoolNet, saliency evaluation and the saliency table (paper Table 6)."""
