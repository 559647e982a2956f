# The embedded synthetic benchmark (skipped when dataset.name is voc12 or coco14).

if DATASET["name"] == "synthetic":

    rule make_dataset:
        output:
            meta=f"{DATASET['root']}/dataset.json",
        params:
            args=flags(DATASET["synthetic"]),
        log:
            f"{RESULTS}/logs/make_dataset.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=2000,
            runtime=15,
        shell:
            "python -m pnoc.data.make_dataset --out $(dirname {output.meta}) {params.args} 2> {log}"
