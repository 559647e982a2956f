# pnoc: P-NOC weakly supervised semantic segmentation as a Snakemake DAG.
#
#   snakemake --cores all                      # the whole chain on the embedded synthetic benchmark
#   snakemake --profile slurm                  # the same on a SLURM cluster (see slurm/)
#   snakemake --configfile config/voc12.yaml   # Pascal VOC 2012 (paper settings)
#
# Outputs live under results/<stage>/<variant>/...; results/summary.{md,json} index them.

import os

from snakemake.utils import min_version, validate

min_version("8.0")


# the defaults live beside this Snakefile, so a run from another folder (--snakefile, --directory) still
# reads them; --configfile files are applied on top
configfile: os.path.join(workflow.basedir, "config.yaml")


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


check_global_batches()


include: "workflow/rules/dataset.smk"
include: "workflow/rules/cam.smk"
include: "workflow/rules/saliency.smk"
include: "workflow/rules/affinity.smk"
include: "workflow/rules/segmentation.smk"
# report.smk builds its pages from the evaluations the stage files above register: keep it last
include: "workflow/rules/report.smk"
include: "workflow/rules/summary.smk"


rule all:
    input:
        f"{RESULTS}/summary.json",
        report_targets(),
        default_diagnostics(),
    default_target: True


# benchmark diagnostics (rule walk_share; rule diagnose on the synthetic benchmark) for any dataset; they are in
# the default target of the synthetic benchmark only:  snakemake diagnostics
rule diagnostics:
    input:
        diagnostic_targets(),
