# The run's index: results/summary.{md,json}, read by the report and by other tools.


rule summary:
    input:
        summary_inputs(),
    output:
        json=f"{RESULTS}/summary.json",
        md=f"{RESULTS}/summary.md",
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
        "python -m pnoc.summary --dataset-root {params.root} --out {output.json} --metrics {input} 2> {log}"
        " && cat {output.md}"
