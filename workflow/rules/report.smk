# The HTML report:  snakemake --report report.html
#
#   results/report/tables/<page>.html   one page per stage (priors, saliency, pseudo_masks,
#                                       segmentation) + class_groups + summary, from the
#                                       evaluations listed in summary_inputs()
#   results/report/gallery/<column>.png image | ground truth | stage overlay, and all.png
#
# Include this file AFTER every stage's rule file (its pages come from SUMMARY_EXTRA as
# filled by them) and before summary.smk. rule all requests report_targets(), so that
# --report finds these outputs in the DAG. Captions: workflow/report/<page>.rst.


rule report_tables:
    input:
        metrics=[p for _, p in report_metrics()],
        summary=f"{RESULTS}/summary.md",
    output:
        **{
            page: report(
                f"{RESULTS}/report/tables/{page}.html",
                caption=f"../report/{page}.rst",
                category=category,
            )
            for page, category in report_pages().items()
        },
    params:
        pages=lambda w, input: " ".join(shlex.quote(f"{page}={p}") for (page, _), p in zip(report_metrics(), input.metrics)),
        out=lambda w, output: output[0].rsplit("/", 1)[0],
    log:
        f"{RESULTS}/logs/report_tables.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m pnoc.report.report_tables --out-dir {params.out:q} --metrics {params.pages}"
        " --summary {input.summary:q} 2> {log:q}"


rule gallery:
    input:
        dataset_inputs(masks=[GALLERY_SPLIT], images=[GALLERY_SPLIT]),
        unpack(gallery_inputs),
    output:
        panels=report(
            directory(f"{RESULTS}/report/gallery"),
            patterns=["{panel}.png"],
            caption="../report/gallery.rst",
            category="Gallery",
            labels={"panel": "{panel}"},
        ),
    params:
        data=dataset_args(),
        split=GALLERY_SPLIT,
        columns=gallery_args,
        args=flags(config["report"], exclude=("gallery_split", "gallery_columns")),
    log:
        f"{RESULTS}/logs/gallery.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m pnoc.report.gallery {params.data} --split {params.split:q} --out-dir {output.panels:q}"
        " {params.columns} {params.args} 2> {log:q}"
