# Stage 1-4: ordinary classifier, CAM inference with TTA, prior evaluation.


rule train_classifier:
    input:
        dataset_marker(),
    output:
        model=f"{RESULTS}/classifier/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/classifier/seed{{seed}}/metrics.json",
    params:
        data=dataset_args(),
        split=DATASET["train_split"],
        val=DATASET["val_split"],
        args=flags(config["classifier"]),
        state=lambda w: state_dir("classifier", f"seed{w.seed}"),
        device=config["device"],
        workers=config["workers"],
    log:
        f"{RESULTS}/logs/train_classifier/seed{{seed}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=GPU,
        mem_mb=mem_train,
        runtime=runtime_train,
    shell:
        "python -m pnoc.cam.train_classifier {params.data} --split {params.split} --val-split {params.val}"
        " --out {output.model} --metrics {output.metrics} --state-dir {params.state}"
        " --seed {wildcards.seed} --device {params.device} --num-workers {params.workers}"
        " --threads {threads} {params.args} 2> {log}"


rule infer_cams:
    input:
        dataset_marker(),
        model=cam_model,
    output:
        cams=directory(f"{RESULTS}/cams/{{variant}}/seed{{seed}}/{{split}}"),
    params:
        data=dataset_args(),
        args=flags(config["inference"]),
        device=config["device"],
    log:
        f"{RESULTS}/logs/infer_cams/{{variant}}-seed{{seed}}-{{split}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=GPU,
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.cam.infer_cams {params.data} --split {wildcards.split} --model {input.model}"
        " --out-dir {output.cams} --device {params.device} --threads {threads} {params.args} 2> {log}"


rule evaluate_priors:
    input:
        dataset_marker(),
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
        "python -m pnoc.cam.evaluate_priors {params.data} --split {wildcards.split} --variant {wildcards.variant}"
        " --maps-dir {input.cams} --out {output.metrics} --masks-dir {output.masks} {params.args} 2> {log}"


rule train_cam:
    input:
        dataset_marker(),
        classifier=f"{RESULTS}/classifier/seed{{seed}}/model.pt",
    output:
        model=f"{RESULTS}/cam/{{variant}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/cam/{{variant}}/seed{{seed}}/metrics.json",
    params:
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
    log:
        f"{RESULTS}/logs/train_cam/{{variant}}-seed{{seed}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=GPU,
        mem_mb=mem_train,
        runtime=runtime_train,
    shell:
        "python -m pnoc.cam.train_cam {params.data} --split {params.split} --eval-split {params.eval_split}"
        " --classifier {input.classifier} --strategy {params.strategy} --label-smoothing {params.ls}"
        " --out {output.model} --metrics {output.metrics} --state-dir {params.state}"
        " --seed {wildcards.seed} --device {params.device} --num-workers {params.workers}"
        " --threads {threads} {params.arch} {params.args} 2> {log}"


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
        "python -m pnoc.cam.priors_table --out {output.md} --priors {input.metrics}"
        " --training {input.training} 2> {log} && cat {output.md}"
