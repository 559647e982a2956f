# The dataset: the embedded synthetic benchmark (generated when dataset.name is synthetic), and the
# up-front check of every split the chain reads, whose manifest is the dataset input of every rule.


if DATASET["name"] == "synthetic":

    rule make_dataset:
        output:
            meta=f"{DATASET['root']}/dataset.json",
        params:
            root=lambda w, output: os.path.dirname(output.meta),
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
            "python -m pnoc.data.make_dataset --out {params.root:q} {params.args} 2> {log:q}"


rule check_dataset:
    """Check one kind of a split (images + labels, or masks) and write its manifest (pnoc.data.check_dataset)."""
    input:
        dataset_split_files,
    output:
        manifest=dataset_manifest("{split}", "{kind}"),
    wildcard_constraints:
        kind="images|masks",
    params:
        data=dataset_args(),
        masks=lambda w: "true" if split_needs_masks(w.split) else "false",
    log:
        f"{RESULTS}/logs/check_dataset/{{split}}-{{kind}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=2000,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.data.check_dataset {params.data} --split {wildcards.split:q} --kind {wildcards.kind:q}"
        " --need-masks {params.masks:q}"
        " --out {output.manifest:q} --threads {threads} 2> {log:q}"
