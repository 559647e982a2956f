# What a researcher brings: the dataset (or the embedded synthetic benchmark, generated when dataset.name is
# synthetic), checked up front split by split, whose manifests are the dataset input of every rule; and the
# ImageNet weights of "weights: imagenet", fetched once on the host that runs snakemake.


localrules:
    fetch_weights,


rule fetch_weights:
    """One backbone's ImageNet weights into imagenet_weights.dir, hash-checked (pnoc.data.fetch_weights). A local
    rule: it runs where snakemake runs (the submit host has internet where compute nodes often have none)."""
    output:
        weights=f"{IMAGENET['dir']}/{{file}}",
    wildcard_constraints:
        file="|".join(re.escape(f) for f in IMAGENET_FILES) or "(?!)",
    params:
        backbone=lambda w: IMAGENET_FILES[w.file],
        args=fetch_args,
    log:
        f"{RESULTS}/logs/fetch_weights/{{file}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=60,
    shell:
        "python -m pnoc.data.fetch_weights --backbone {params.backbone:q} --out {output.weights:q} {params.args}"
        " 2> {log:q}"


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
        mismatch=DATASET["max_label_mismatch"],
        record=lambda w: dataset_checked_record(w.split, w.kind),
        fingerprint=dataset_split_fingerprint,
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
        " --need-masks {params.masks:q} --max-label-mismatch {params.mismatch:q}"
        " --out {output.manifest:q} --record {params.record:q} --threads {threads} 2> {log:q}"
