# Stage 7-8: affinity labels, AffinityNet, random walk, pseudo masks (paper section 5 and 7.3,
# Table 7; reference spec sections 8-9).
#
# chain = <prior variant>+<affinity-label method>, e.g. pnoc_ls+saliency, poc+classic
#
#   results/affinity_labels/{chain}/seed{seed}/<train split>/   <id>.png (0 bg, 1..C, 255) + summary.json
#   results/affinity/{chain}/seed{seed}/model.pt                  AffinityNet (+ metrics.json)
#   results/rw/{chain}/seed{seed}/{split}/                        <id>.npz random-walk maps (save_maps)
#   results/pseudo_masks/{chain}/seed{seed}/{split}/masks/        <id>.png pseudo masks (palette = class ids)
#   results/pseudo_masks/{chain}/seed{seed}/{split}/metrics.json  mIoU vs GT (+ the prior's mIoU)
#   results/tables/masks.{md,csv}                                 `snakemake masks_table` (Table 7)

# the chain's pseudo masks: segmentation trains on them (pseudo_masks_dir() in common.smk)
PSEUDO_VARIANT = CHAIN_MASKS


wildcard_constraints:
    chain=r"[a-z0-9_]+\+(classic|saliency)",


AFFINITY_LABELS_OUT = f"{RESULTS}/affinity_labels/{{chain}}/seed{{seed}}/{AFF_TRAIN_SPLIT}"


rule make_affinity_labels:
    input:
        dataset_inputs(images=[AFF_TRAIN_SPLIT], masks=[AFF_TRAIN_SPLIT]),
        unpack(affinity_inputs),
    output:
        labels=sharded(AFFINITY_LABELS_OUT),
    params:
        data=dataset_args(),
        split=AFF_TRAIN_SPLIT,
        method=chain_method,
        saliency=lambda w, input: f"--saliency-dir {shlex.quote(input.saliency)}" if "saliency" in input.keys() else "",
        args=shard_args(lambda w: f"{flags(AFF['labels'][chain_method(w)])} {flags(AFF['labels'])}"),
    log:
        sharded_log(f"{RESULTS}/logs/make_affinity_labels/{{chain}}-seed{{seed}}.log"),
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.affinity.make_affinity_labels {params.data} --split {params.split:q} --method {params.method:q}"
        " --cams-dir {input.cams:q} {params.saliency} --out-dir {output.labels:q} --threads {threads}"
        " {params.args} 2> {log:q}"


if SHARDS > 1:

    localrules:
        gather_affinity_labels,

    rule gather_affinity_labels:
        """The affinity labels, put together from the shard folders of make_affinity_labels (summary.json merged)."""
        input:
            shards=shard_dirs(AFFINITY_LABELS_OUT),
        output:
            labels=directory(AFFINITY_LABELS_OUT),
        log:
            f"{RESULTS}/logs/gather_affinity_labels/{{chain}}-seed{{seed}}.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "python -m pnoc.shards --out {output.labels:q} --shards {input.shards:q} 2> {log:q}"


rule train_affinity:
    input:
        dataset_inputs(images=[AFF_TRAIN_SPLIT]),
        unpack(affinity_source),
        weights=backbone_weights(AFF["train"], AFF["train"]["init"] == "backbone").input,
        labels=f"{RESULTS}/affinity_labels/{{chain}}/seed{{seed}}/{AFF_TRAIN_SPLIT}",
    output:
        model=f"{RESULTS}/affinity/{{chain}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/affinity/{{chain}}/seed{{seed}}/metrics.json",
    params:
        launch=launch("train_affinity"),
        sync_bn=SYNC_BN,
        data=dataset_args(),
        split=AFF_TRAIN_SPLIT,
        source=lambda w, input: f"--source-model {shlex.quote(input.source)}" if "source" in input.keys() else "",
        args=flags(AFF["train"]),
        state=lambda w: state_dir("affinity", w.chain, f"seed{w.seed}"),
        device=config["device"],
        workers=config["workers"],
        speed=SPEED,
    log:
        f"{RESULTS}/logs/train_affinity/{{chain}}-seed{{seed}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=train_gpus("train_affinity"),
        tasks_per_gpu=0,
        mem_mb=mem_train("train_affinity"),
        runtime=runtime_train,
    shell:
        "{params.launch} -m pnoc.affinity.train_affinity {params.data} --split {params.split:q} --labels {input.labels:q}"
        " {params.source} --out {output.model:q} --metrics {output.metrics:q} --state-dir {params.state:q}"
        " --seed {wildcards.seed:q} --device {params.device:q} --num-workers {params.workers:q} {params.speed}"
        " --threads {threads} --sync-bn {params.sync_bn:q} {params.args} 2> {log:q}"


RW_OUT = f"{RESULTS}/rw/{{chain}}/seed{{seed}}/{{split}}"


rule propagate:
    input:
        dataset_inputs(split="images"),
        model=f"{RESULTS}/affinity/{{chain}}/seed{{seed}}/model.pt",
        cams=chain_cams(),
    output:
        rw=sharded(RW_OUT),
    params:
        data=dataset_args(),
        args=shard_args(flags(AFF["rw"])),
        device=config["device"],
    log:
        sharded_log(f"{RESULTS}/logs/propagate/{{chain}}-seed{{seed}}-{{split}}.log"),
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=GPU,
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.affinity.propagate {params.data} --split {wildcards.split:q} --model {input.model:q}"
        " --cams-dir {input.cams:q} --out-dir {output.rw:q} --device {params.device:q} --threads {threads}"
        " {params.args} 2> {log:q}"


if SHARDS > 1:

    localrules:
        gather_rw,

    rule gather_rw:
        """The random-walk maps of a split, put together from the shard folders of propagate (pnoc.shards)."""
        input:
            shards=shard_dirs(RW_OUT),
        output:
            rw=directory(RW_OUT),
        log:
            f"{RESULTS}/logs/gather_rw/{{chain}}-seed{{seed}}-{{split}}.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "python -m pnoc.shards --out {output.rw:q} --shards {input.shards:q} 2> {log:q}"


PSEUDO_MASKS_OUT = f"{RESULTS}/pseudo_masks/{{chain}}/seed{{seed}}/{{split}}/masks"


rule make_pseudo_masks:
    input:
        dataset_inputs(split="images"),
        unpack(pseudo_mask_inputs),
    output:
        masks=sharded(PSEUDO_MASKS_OUT),
    params:
        data=dataset_args(),
        args=shard_args(flags(AFF["masks"])),
        saliency=lambda w, input: f"--saliency-dir {shlex.quote(input.saliency)}" if "saliency" in input.keys() else "",
    log:
        sharded_log(f"{RESULTS}/logs/make_pseudo_masks/{{chain}}-seed{{seed}}-{{split}}.log"),
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.affinity.make_pseudo_masks {params.data} --split {wildcards.split:q} --rw-dir {input.rw:q}"
        " --out-dir {output.masks:q} --threads {threads} {params.args} {params.saliency} 2> {log:q}"


if SHARDS > 1:

    localrules:
        gather_pseudo_masks,

    rule gather_pseudo_masks:
        """The pseudo masks of a split, put together from the shard folders of make_pseudo_masks (pnoc.shards)."""
        input:
            shards=shard_dirs(PSEUDO_MASKS_OUT),
        output:
            masks=directory(PSEUDO_MASKS_OUT),
        log:
            f"{RESULTS}/logs/gather_pseudo_masks/{{chain}}-seed{{seed}}-{{split}}.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "python -m pnoc.shards --out {output.masks:q} --shards {input.shards:q} 2> {log:q}"


rule evaluate_masks:
    input:
        dataset_inputs(split="masks"),
        masks=f"{RESULTS}/pseudo_masks/{{chain}}/seed{{seed}}/{{split}}/masks",
        prior=lambda w: f"{RESULTS}/priors/{chain_prior(w)}/seed{w.seed}/{w.split}/metrics.json",
    output:
        metrics=f"{RESULTS}/pseudo_masks/{{chain}}/seed{{seed}}/{{split}}/metrics.json",
        table=f"{RESULTS}/pseudo_masks/{{chain}}/seed{{seed}}/{{split}}/metrics.md",
    params:
        data=dataset_args(),
    log:
        f"{RESULTS}/logs/evaluate_masks/{{chain}}-seed{{seed}}-{{split}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.affinity.evaluate_masks {params.data} --split {wildcards.split:q} --variant {wildcards.chain:q}"
        " --masks-dir {input.masks:q} --prior-metrics {input.prior:q} --out {output.metrics:q} 2> {log:q}"


rule masks_table:
    input:
        metrics=mask_metrics([f"{p}+{m}" for p in AFF["table_priors"] for m in AFF["table_methods"]]),
    output:
        md=f"{RESULTS}/tables/masks.md",
        csv=f"{RESULTS}/tables/masks.csv",
    params:
        args=flags({"saliency_method": SAL["method"], "saliency_gate": AFF["masks"]["saliency_threshold"]}),
    log:
        f"{RESULTS}/logs/masks_table.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m pnoc.affinity.masks_table --out {output.md:q} --metrics {input.metrics:q} {params.args} 2> {log:q}"
        " && cat {output.md:q}"


rule walk_share:
    """The walk's own share: prior vs random walk, each with and without the dCRF of the pseudo masks, every
    background threshold chosen on the val split and scored on the evaluated split, beside the walks over the
    ground-truth boundary map and over the ground-truth affinities (the walk's ceiling at the stride-4 grid;
    pnoc.affinity.walk_share)."""
    input:
        dataset_inputs(images=[DATASET["val_split"], DATASET["eval_split"]], masks=[DATASET["val_split"], DATASET["eval_split"]]),
        prior_select=lambda w: f"{RESULTS}/cams/{chain_prior(w)}/seed{w.seed}/{DATASET['val_split']}",
        prior_eval=lambda w: f"{RESULTS}/cams/{chain_prior(w)}/seed{w.seed}/{DATASET['eval_split']}",
        rw_select=f"{RESULTS}/rw/{{chain}}/seed{{seed}}/{DATASET['val_split']}",
        rw_eval=f"{RESULTS}/rw/{{chain}}/seed{{seed}}/{DATASET['eval_split']}",
    output:
        metrics=f"{RESULTS}/walk_share/{{chain}}/seed{{seed}}/metrics.json",
        table=f"{RESULTS}/walk_share/{{chain}}/seed{{seed}}/metrics.md",
    params:
        data=dataset_args(),
        select=DATASET["val_split"],
        eval=DATASET["eval_split"],
        # the threshold grid is walk_share's own (0.05-0.80 by 0.05): borrowing the priors' keys would make a change of
        # the priors' sweep rerun this job, which does not descend from evaluate_priors
        args=flags({"crf_t": AFF["masks"]["crf_t"], "crf_gt_prob": AFF["masks"]["crf_gt_prob"],
                    **{k: AFF["rw"][k] for k in ("radius", "beta", "exp_times", "seed_mask")}}),
    log:
        f"{RESULTS}/logs/walk_share/{{chain}}-seed{{seed}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.affinity.walk_share {params.data} --select-split {params.select:q} --eval-split {params.eval:q}"
        " --prior-select {input.prior_select:q} --prior-eval {input.prior_eval:q} --rw-select {input.rw_select:q}"
        " --rw-eval {input.rw_eval:q} --variant {wildcards.chain:q} --out {output.metrics:q} --threads {threads}"
        " {params.args} 2> {log:q}"


# the default chain's pseudo masks (eval and val splits) go into results/summary.json
SUMMARY_EXTRA.extend(mask_metrics([CHAIN_MASKS], seeds=[SEED0]))
