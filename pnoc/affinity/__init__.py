"""Affinity wing (workflow/rules/affinity.smk): affinity labels, AffinityNet, the random walk, pseudo masks,
their evaluation and the masks table (paper Table 7)."""
