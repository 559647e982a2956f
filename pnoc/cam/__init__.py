"""CAM wing (workflow/rules/cam.smk): ordinary classifier, CAM strategies (CAM, Puzzle, OC-CSE, P-OC,
P-NOC, ± label smoothing), CAM inference with TTA, prior evaluation and the priors table (paper Tables 2/3)."""
