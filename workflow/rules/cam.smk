# Stage 1-4: ordinary classifier, CAM inference with TTA, prior evaluation; before them, only when a
# section says weights: generic, the backbone pretraining that stands in for ImageNet weights.


rule pretrain_backbone:
    output:
        weights=PRETRAIN_WEIGHTS,
        metrics=f"{RESULTS}/pretrain/metrics.json",
    params:
        launch=launch("pretrain_backbone"),
        sync_bn=SYNC_BN,
        args=flags(config["pretrain"]),
        state=state_dir("pretrain"),
        device=config["device"],
        workers=config["workers"],
        speed=SPEED,
    log:
        f"{RESULTS}/logs/pretrain_backbone.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=train_gpus("pretrain_backbone"),
        tasks_per_gpu=0,
        mem_mb=mem_train("pretrain_backbone"),
        runtime=runtime_train,
    shell:
        "{params.launch} -m pnoc.cam.pretrain_backbone --out {output.weights:q} --metrics {output.metrics:q}"
        " --state-dir {params.state:q} --device {params.device:q} --num-workers {params.workers:q} {params.speed}"
        " --threads {threads} --sync-bn {params.sync_bn:q} {params.args} 2> {log:q}"


rule train_classifier:
    input:
        dataset_inputs(images=[DATASET["train_split"], DATASET["val_split"]]),
        labels_agree=labels_agree_with_masks(),
        weights=backbone_weights(config["classifier"]).input,
    output:
        model=f"{RESULTS}/classifier/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/classifier/seed{{seed}}/metrics.json",
    params:
        launch=launch("train_classifier"),
        sync_bn=SYNC_BN,
        data=dataset_args(),
        split=DATASET["train_split"],
        val=DATASET["val_split"],
        args=flags(config["classifier"]),
        state=lambda w: state_dir("classifier", f"seed{w.seed}"),
        device=config["device"],
        workers=config["workers"],
        speed=SPEED,
    log:
        f"{RESULTS}/logs/train_classifier/seed{{seed}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=train_gpus("train_classifier"),
        tasks_per_gpu=0,
        mem_mb=mem_train("train_classifier"),
        runtime=runtime_train,
    shell:
        "{params.launch} -m pnoc.cam.train_classifier {params.data} --split {params.split:q} --val-split {params.val:q}"
        " --out {output.model:q} --metrics {output.metrics:q} --state-dir {params.state:q}"
        " --seed {wildcards.seed:q} --device {params.device:q} --num-workers {params.workers:q} {params.speed}"
        " --threads {threads} --sync-bn {params.sync_bn:q} {params.args} 2> {log:q}"


CAMS_OUT = f"{RESULTS}/cams/{{variant}}/seed{{seed}}/{{split}}"


rule infer_cams:
    input:
        dataset_inputs(split="images"),
        model=cam_model,
    output:
        cams=sharded(CAMS_OUT),
    params:
        data=dataset_args(),
        args=shard_args(flags(config["inference"])),
        device=config["device"],
    log:
        sharded_log(f"{RESULTS}/logs/infer_cams/{{variant}}-seed{{seed}}-{{split}}.log"),
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=GPU,
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.cam.infer_cams {params.data} --split {wildcards.split:q} --model {input.model:q}"
        " --out-dir {output.cams:q} --device {params.device:q} --threads {threads} {params.args} 2> {log:q}"


if SHARDS > 1:

    localrules:
        gather_cams,

    rule gather_cams:
        """The CAM folder of a split, put together from the shard folders of infer_cams (pnoc.shards)."""
        input:
            shards=shard_dirs(CAMS_OUT),
        output:
            cams=directory(CAMS_OUT),
        log:
            f"{RESULTS}/logs/gather_cams/{{variant}}-seed{{seed}}-{{split}}.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "python -m pnoc.shards --out {output.cams:q} --shards {input.shards:q} 2> {log:q}"


rule evaluate_priors:
    input:
        dataset_inputs(split="masks"),
        cams=f"{RESULTS}/cams/{{variant}}/seed{{seed}}/{{split}}",
    output:
        metrics=f"{RESULTS}/priors/{{variant}}/seed{{seed}}/{{split}}/metrics.json",
        table=f"{RESULTS}/priors/{{variant}}/seed{{seed}}/{{split}}/metrics.md",
        masks=directory(f"{RESULTS}/priors/{{variant}}/seed{{seed}}/{{split}}/masks"),
    params:
        data=dataset_args(),
        args=flags(config["priors"]),
    log:
        f"{RESULTS}/logs/evaluate_priors/{{variant}}-seed{{seed}}-{{split}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.cam.evaluate_priors {params.data} --split {wildcards.split:q} --variant {wildcards.variant:q}"
        " --maps-dir {input.cams:q} --out {output.metrics:q} --masks-dir {output.masks:q} {params.args} 2> {log:q}"


rule train_cam:
    input:
        dataset_inputs(images=[DATASET["train_split"], DATASET["eval_split"]], masks=[DATASET["eval_split"]]),
        classifier=f"{RESULTS}/classifier/seed{{seed}}/model.pt",
        weights=backbone_weights(config["classifier"], config["cam"]["init"] == "backbone").input,
    output:
        model=f"{RESULTS}/cam/{{variant}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/cam/{{variant}}/seed{{seed}}/metrics.json",
    params:
        launch=launch("train_cam"),
        sync_bn=SYNC_BN,
        data=dataset_args(),
        split=DATASET["train_split"],
        eval_split=DATASET["eval_split"],
        strategy=lambda w: variant_strategy(w.variant)[0],
        ls=lambda w: variant_strategy(w.variant)[1],
        args=flags(config["cam"], exclude=("variant", "baseline", "table_variants", "label_smoothing")),
        arch=flags({k: config["classifier"][k] for k in ("backbone", "output_stride", "weights")}),
        state=lambda w: state_dir("cam", w.variant, f"seed{w.seed}"),
        device=config["device"],
        workers=config["workers"],
        speed=SPEED,
    log:
        f"{RESULTS}/logs/train_cam/{{variant}}-seed{{seed}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=train_gpus("train_cam"),
        tasks_per_gpu=0,
        mem_mb=mem_train("train_cam"),
        runtime=runtime_train,
    shell:
        "{params.launch} -m pnoc.cam.train_cam {params.data} --split {params.split:q} --eval-split {params.eval_split:q}"
        " --classifier {input.classifier:q} --strategy {params.strategy:q} --label-smoothing {params.ls:q}"
        " --out {output.model:q} --metrics {output.metrics:q} --state-dir {params.state:q}"
        " --seed {wildcards.seed:q} --device {params.device:q} --num-workers {params.workers:q} {params.speed}"
        " --threads {threads} --sync-bn {params.sync_bn:q} {params.arch} {params.args} 2> {log:q}"


rule priors_table:
    input:
        metrics=prior_metrics(config["cam"]["table_variants"]),
        training=[
            f"{RESULTS}/cam/{v}/seed{s}/metrics.json"
            for v in config["cam"]["table_variants"]
            for s in SEEDS
        ],
    output:
        md=f"{RESULTS}/tables/priors.md",
        csv=f"{RESULTS}/tables/priors.csv",
    log:
        f"{RESULTS}/logs/priors_table.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m pnoc.cam.priors_table --out {output.md:q} --priors {input.metrics:q}"
        " --training {input.training:q} 2> {log:q} && cat {output.md:q}"


if DATASET["name"] == "synthetic":

    rule diagnose:
        """The benchmark's spec sheet: the premises of erasing, Puzzle and context, measured (pnoc.cam.diagnose)."""
        input:
            dataset_inputs(images=[DATASET["val_split"]], masks=[DATASET["val_split"]]),
            classifier=f"{RESULTS}/classifier/seed{SEED0}/model.pt",
        output:
            json=f"{RESULTS}/tables/benchmark.json",
            md=benchmark_tables()[0],
        params:
            data=dataset_args(),
            split=DATASET["val_split"],
            args=flags(config["diagnose"]),
            delta=config["cam"]["noc_delta"],
            device=config["device"],
        log:
            f"{RESULTS}/logs/diagnose.log",
        conda:
            ENV
        threads: THREADS
        resources:
            mem_mb=mem_infer,
            runtime=runtime_infer,
        shell:
            "python -m pnoc.cam.diagnose {params.data} --split {params.split:q} --classifier {input.classifier:q}"
            " --out {output.json:q} --table {output.md:q} --noc-delta {params.delta:q} --device {params.device:q}"
            " --threads {threads} {params.args} 2> {log:q}"
