# Stage 5-6: saliency from weak supervision — hints, C2AM / C2AM-H, pseudo-saliency masks,
# PoolNet, evaluation (paper sections 4 and 7.2, Table 6).
#
#   results/hints/{variant}/seed{seed}/{split}/           <id>.png hints + summary.json
#   results/ccam/{method}/seed{seed}/model.pt             method = c2am | c2amh (direction stored)
#   results/saliency/{method}/seed{seed}/{split}/raw/     <id>.npz C2AM maps (P.)
#   results/saliency/{method}/seed{seed}/{split}/pseudo/  <id>.png 0/255 pseudo-saliency masks
#   results/poolnet/{method}/seed{seed}/model.pt
#   results/saliency/{method}/seed{seed}/{split}/poolnet/ <id>.png 0..255 final maps (R.)
#   results/saliency_eval/{variant}/seed{seed}/{split}/metrics.json   variant = <method>[_raw]
#
# Helpers (SAL, SAL_PRIOR, saliency_*) live in common.smk.


rule extract_hints:
    input:
        dataset_inputs(split="masks"),
        cams=f"{RESULTS}/cams/{{variant}}/seed{{seed}}/{{split}}",
    output:
        hints=directory(f"{RESULTS}/hints/{{variant}}/seed{{seed}}/{{split}}"),
    params:
        data=dataset_args(),
        args=flags({k: SAL[k] for k in ("fg_threshold", "bg_threshold")}),
    log:
        f"{RESULTS}/logs/extract_hints/{{variant}}-seed{{seed}}-{{split}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.saliency.extract_hints {params.data} --split {wildcards.split:q} --cams-dir {input.cams:q}"
        " --out-dir {output.hints:q} {params.args} 2> {log:q}"


rule train_ccam:
    input:
        dataset_inputs(images=[DATASET["train_split"]], masks=[DATASET["train_split"]]),
        hints=saliency_hints,
        classifier=saliency_classifier("ccam"),
        weights=backbone_weights(SAL["ccam"], SAL["ccam"]["init"] == "backbone").input,
    output:
        model=f"{RESULTS}/ccam/{{method}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/ccam/{{method}}/seed{{seed}}/metrics.json",
    wildcard_constraints:
        method=r"c2amh?",
    params:
        launch=launch("train_ccam"),
        sync_bn=SYNC_BN,
        data=dataset_args(),
        split=DATASET["train_split"],
        fg=SAL["fg_threshold"],
        bg=SAL["bg_threshold"],
        classifier=saliency_classifier_flag("ccam"),
        args=flags(SAL["ccam"]),
        state=lambda w: state_dir("ccam", w.method, f"seed{w.seed}"),
        device=config["device"],
        workers=config["workers"],
        speed=SPEED,
    log:
        f"{RESULTS}/logs/train_ccam/{{method}}-seed{{seed}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=train_gpus("train_ccam"),
        tasks_per_gpu=0,
        mem_mb=mem_train("train_ccam"),
        runtime=runtime_train,
    shell:
        "{params.launch} -m pnoc.saliency.train_ccam {params.data} --split {params.split:q} --method {wildcards.method:q}"
        " --hints {input.hints:q} {params.classifier} --fg-threshold {params.fg:q} --bg-threshold {params.bg:q}"
        " --out {output.model:q} --metrics {output.metrics:q} --state-dir {params.state:q}"
        " --seed {wildcards.seed:q} --device {params.device:q} --num-workers {params.workers:q} {params.speed}"
        " --threads {threads} --sync-bn {params.sync_bn:q} {params.args} 2> {log:q}"


SALIENCY_RAW_OUT = f"{RESULTS}/saliency/{{method}}/seed{{seed}}/{{split}}/raw"
SALIENCY_PSEUDO_OUT = f"{RESULTS}/saliency/{{method}}/seed{{seed}}/{{split}}/pseudo"


rule infer_saliency:
    input:
        dataset_inputs(split="images"),
        model=f"{RESULTS}/ccam/{{method}}/seed{{seed}}/model.pt",
    output:
        raw=sharded(SALIENCY_RAW_OUT),
        pseudo=sharded(SALIENCY_PSEUDO_OUT),
    wildcard_constraints:
        method=r"c2amh?",
    params:
        data=dataset_args(),
        args=shard_args(flags(SAL["inference"])),
        device=config["device"],
    log:
        sharded_log(f"{RESULTS}/logs/infer_saliency/{{method}}-seed{{seed}}-{{split}}.log"),
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=GPU,
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.saliency.infer_saliency {params.data} --split {wildcards.split:q} --model {input.model:q}"
        " --raw-dir {output.raw:q} --pseudo-dir {output.pseudo:q} --device {params.device:q}"
        " --threads {threads} {params.args} 2> {log:q}"


if SHARDS > 1:

    localrules:
        gather_saliency_raw,
        gather_saliency_pseudo,

    rule gather_saliency_raw:
        """The raw C2AM maps of a split, put together from the shard folders of infer_saliency (pnoc.shards)."""
        input:
            shards=shard_dirs(SALIENCY_RAW_OUT),
        output:
            raw=directory(SALIENCY_RAW_OUT),
        wildcard_constraints:
            method=r"c2amh?",
        log:
            f"{RESULTS}/logs/gather_saliency_raw/{{method}}-seed{{seed}}-{{split}}.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "python -m pnoc.shards --out {output.raw:q} --shards {input.shards:q} 2> {log:q}"

    rule gather_saliency_pseudo:
        """The pseudo-saliency masks of a split, put together from the shard folders of infer_saliency."""
        input:
            shards=shard_dirs(SALIENCY_PSEUDO_OUT),
        output:
            pseudo=directory(SALIENCY_PSEUDO_OUT),
        wildcard_constraints:
            method=r"c2amh?",
        log:
            f"{RESULTS}/logs/gather_saliency_pseudo/{{method}}-seed{{seed}}-{{split}}.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "python -m pnoc.shards --out {output.pseudo:q} --shards {input.shards:q} 2> {log:q}"


rule train_poolnet:
    input:
        dataset_inputs(images=[DATASET["train_split"]]),
        masks=f"{RESULTS}/saliency/{{method}}/seed{{seed}}/{DATASET['train_split']}/pseudo",
        classifier=saliency_classifier("poolnet"),
        weights=backbone_weights(SAL["poolnet"], SAL["poolnet"]["init"] == "backbone").input,
    output:
        model=f"{RESULTS}/poolnet/{{method}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/poolnet/{{method}}/seed{{seed}}/metrics.json",
    wildcard_constraints:
        method=r"c2amh?",
    params:
        launch=launch("train_poolnet"),
        sync_bn=SYNC_BN,
        data=dataset_args(),
        split=DATASET["train_split"],
        classifier=saliency_classifier_flag("poolnet"),
        args=flags(SAL["poolnet"], exclude=("flip",)),
        state=lambda w: state_dir("poolnet", w.method, f"seed{w.seed}"),
        device=config["device"],
        workers=config["workers"],
        speed=SPEED,
    log:
        f"{RESULTS}/logs/train_poolnet/{{method}}-seed{{seed}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=train_gpus("train_poolnet"),
        tasks_per_gpu=0,
        mem_mb=mem_train("train_poolnet"),
        runtime=runtime_train,
    shell:
        "{params.launch} -m pnoc.saliency.train_poolnet {params.data} --split {params.split:q} --masks {input.masks:q}"
        " {params.classifier} --out {output.model:q} --metrics {output.metrics:q} --state-dir {params.state:q}"
        " --seed {wildcards.seed:q} --device {params.device:q} --num-workers {params.workers:q} {params.speed}"
        " --threads {threads} --sync-bn {params.sync_bn:q} {params.args} 2> {log:q}"


POOLNET_OUT = f"{RESULTS}/saliency/{{method}}/seed{{seed}}/{{split}}/poolnet"


rule infer_poolnet:
    input:
        dataset_inputs(split="images"),
        model=f"{RESULTS}/poolnet/{{method}}/seed{{seed}}/model.pt",
    output:
        maps=sharded(POOLNET_OUT),
    wildcard_constraints:
        method=r"c2amh?",
    params:
        data=dataset_args(),
        args=shard_args(flags({"flip": SAL["poolnet"]["flip"], "batch_size": SAL["inference"]["batch_size"]})),
        device=config["device"],
    log:
        sharded_log(f"{RESULTS}/logs/infer_poolnet/{{method}}-seed{{seed}}-{{split}}.log"),
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=GPU,
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.saliency.infer_poolnet {params.data} --split {wildcards.split:q} --model {input.model:q}"
        " --out-dir {output.maps:q} --device {params.device:q} --threads {threads} {params.args} 2> {log:q}"


if SHARDS > 1:

    localrules:
        gather_poolnet,

    rule gather_poolnet:
        """The PoolNet saliency maps of a split, put together from the shard folders of infer_poolnet."""
        input:
            shards=shard_dirs(POOLNET_OUT),
        output:
            maps=directory(POOLNET_OUT),
        wildcard_constraints:
            method=r"c2amh?",
        log:
            f"{RESULTS}/logs/gather_poolnet/{{method}}-seed{{seed}}-{{split}}.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "python -m pnoc.shards --out {output.maps:q} --shards {input.shards:q} 2> {log:q}"


rule evaluate_saliency:
    input:
        dataset_inputs(split="masks"),
        maps=saliency_eval_maps,
        cams=f"{RESULTS}/cams/{SAL_PRIOR}/seed{{seed}}/{{split}}",
    output:
        metrics=f"{RESULTS}/saliency_eval/{{variant}}/seed{{seed}}/{{split}}/metrics.json",
        table=f"{RESULTS}/saliency_eval/{{variant}}/seed{{seed}}/{{split}}/metrics.md",
        masks=directory(f"{RESULTS}/saliency_eval/{{variant}}/seed{{seed}}/{{split}}/masks"),
    wildcard_constraints:
        variant=r"c2amh?(_raw)?",
    params:
        data=dataset_args(),
        fmt=lambda w: "npz" if w.variant.endswith("_raw") else "png",
        prior=SAL_PRIOR,
        args=flags(SAL["evaluation"]),
    log:
        f"{RESULTS}/logs/evaluate_saliency/{{variant}}-seed{{seed}}-{{split}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.saliency.evaluate_saliency {params.data} --split {wildcards.split:q} --variant {wildcards.variant:q}"
        " --maps-dir {input.maps:q} --maps-format {params.fmt:q} --cams-dir {input.cams:q} --cam-variant {params.prior:q}"
        " --out {output.metrics:q} --masks-dir {output.masks:q} {params.args} 2> {log:q}"


rule saliency_table:
    input:
        metrics=saliency_metrics([f"{m}{k}" for m in SAL["table_methods"] for k in ("_raw", "")]),
        hints=[f"{RESULTS}/hints/{SAL_PRIOR}/seed{s}/{DATASET['train_split']}" for s in SEEDS],
        training=[f"{RESULTS}/ccam/{m}/seed{s}/metrics.json" for m in SAL["table_methods"] for s in SEEDS],
    output:
        md=f"{RESULTS}/tables/saliency.md",
        csv=f"{RESULTS}/tables/saliency.csv",
    params:
        hints=lambda w, input: " ".join(shlex.quote(f"{h}/summary.json") for h in input.hints),
    log:
        f"{RESULTS}/logs/saliency_table.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m pnoc.saliency.saliency_table --out {output.md:q} --metrics {input.metrics:q} --hints {params.hints}"
        " --training {input.training:q} 2> {log:q} && cat {output.md:q}"


# the default chain's saliency (raw maps and PoolNet) goes into results/summary.json
SUMMARY_EXTRA.extend(saliency_metrics([f"{SAL['method']}_raw", SAL["method"]], seeds=[SEED0]))
