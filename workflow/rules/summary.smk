# The run's index: results/summary.{md,json}, read by the report and by other tools.


rule summary:
    input:
        summary_inputs(),
    output:
        json=report(f"{RESULTS}/summary.json", caption="../report/summary.rst", category="Summary"),
        md=report(f"{RESULTS}/summary.md", caption="../report/summary.rst", category="Summary"),
    params:
        root=DATASET["root"],
    log:
        f"{RESULTS}/logs/summary.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m pnoc.report.summary --dataset-root {params.root:q} --out {output.json:q} --metrics {input:q} 2> {log:q}"
        " && cat {output.md:q}"
