# Stage 9: semantic segmentation on the pseudo masks (paper section 6.3, reference spec section 10).
#
#   results/segmentation/{variant}/seed{seed}/model.pt, metrics.json     training (last epoch kept)
#   results/segmentation/{variant}/seed{seed}/{split}/masks/             <id>.png class indices
#                                                  (+ submission/ VOC palette PNGs for split test)
#   results/segmentation/{variant}/seed{seed}/{split}/metrics.{json,md}  mIoU vs ground truth
#
# variant: deeplabv3plus | deeplabv2 train on pseudo_masks_dir() of the training split;
# supervised (segmentation.arch) | supervised_deeplabv3plus | supervised_deeplabv2 train on the
# ground truth (the fully supervised upper bound).


rule train_segmentation:
    input:
        dataset_inputs(images=[DATASET["train_split"]], masks=[DATASET["train_split"]]),
        unpack(segmentation_train_inputs),
        weights=backbone_weights(SEG, SEG["init"] == "weights").input,
    output:
        model=f"{RESULTS}/segmentation/{{variant}}/seed{{seed}}/model.pt",
        metrics=f"{RESULTS}/segmentation/{{variant}}/seed{{seed}}/metrics.json",
    wildcard_constraints:
        variant=SEGMENTATION_VARIANTS,
    params:
        launch=launch("train_segmentation"),
        sync_bn=SYNC_BN,
        data=dataset_args(),
        split=DATASET["train_split"],
        arch=lambda w: segmentation_arch(w.variant),
        masks=segmentation_masks,
        init=lambda w, input: f"--classifier {shlex.quote(input.classifier)}" if input.get("classifier") else "",
        args=flags(SEG, exclude=("arch", "init", "supervised") + SEG_INFER_KEYS),
        state=lambda w: state_dir("segmentation", w.variant, f"seed{w.seed}"),
        device=config["device"],
        workers=config["workers"],
        speed=SPEED,
    log:
        f"{RESULTS}/logs/train_segmentation/{{variant}}-seed{{seed}}.log",
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=train_gpus("train_segmentation"),
        tasks_per_gpu=0,
        mem_mb=mem_train("train_segmentation"),
        runtime=runtime_train,
    shell:
        "{params.launch} -m pnoc.segmentation.train_segmentation {params.data} --split {params.split:q} --variant {wildcards.variant:q}"
        " --arch {params.arch} --masks-dir {params.masks:q} {params.init}"
        " --out {output.model:q} --metrics {output.metrics:q} --state-dir {params.state:q}"
        " --seed {wildcards.seed:q} --device {params.device:q} --num-workers {params.workers:q} {params.speed}"
        " --threads {threads} --sync-bn {params.sync_bn:q} {params.args} 2> {log:q}"


SEGMENTATION_MASKS_OUT = f"{RESULTS}/segmentation/{{variant}}/seed{{seed}}/{{split}}/masks"


rule infer_segmentation:
    input:
        dataset_inputs(split="images"),
        model=f"{RESULTS}/segmentation/{{variant}}/seed{{seed}}/model.pt",
    output:
        masks=sharded(SEGMENTATION_MASKS_OUT),
    wildcard_constraints:
        variant=SEGMENTATION_VARIANTS,
    params:
        data=dataset_args(),
        args=shard_args(flags({k: SEG[k] for k in SEG_INFER_KEYS})),
        device=config["device"],
    log:
        sharded_log(f"{RESULTS}/logs/infer_segmentation/{{variant}}-seed{{seed}}-{{split}}.log"),
    conda:
        ENV
    threads: THREADS
    resources:
        gpu=GPU,
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.segmentation.infer_segmentation {params.data} --split {wildcards.split:q} --model {input.model:q}"
        " --out-dir {output.masks:q} --device {params.device:q} --threads {threads} {params.args} 2> {log:q}"


if SHARDS > 1:

    localrules:
        gather_segmentation,

    rule gather_segmentation:
        """The predicted masks of a split (and VOC submission), put together from the shard folders of infer_segmentation."""
        input:
            shards=shard_dirs(SEGMENTATION_MASKS_OUT),
        output:
            masks=directory(SEGMENTATION_MASKS_OUT),
        wildcard_constraints:
            variant=SEGMENTATION_VARIANTS,
        log:
            f"{RESULTS}/logs/gather_segmentation/{{variant}}-seed{{seed}}-{{split}}.log",
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        shell:
            "python -m pnoc.shards --out {output.masks:q} --shards {input.shards:q} 2> {log:q}"


rule evaluate_segmentation:
    input:
        dataset_inputs(split="masks"),
        masks=f"{RESULTS}/segmentation/{{variant}}/seed{{seed}}/{{split}}/masks",
    output:
        metrics=f"{RESULTS}/segmentation/{{variant}}/seed{{seed}}/{{split}}/metrics.json",
        table=f"{RESULTS}/segmentation/{{variant}}/seed{{seed}}/{{split}}/metrics.md",
    wildcard_constraints:
        variant=SEGMENTATION_VARIANTS,
    params:
        data=dataset_args(),
    log:
        f"{RESULTS}/logs/evaluate_segmentation/{{variant}}-seed{{seed}}-{{split}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=mem_infer,
        runtime=runtime_infer,
    shell:
        "python -m pnoc.segmentation.evaluate_segmentation {params.data} --split {wildcards.split:q} --variant {wildcards.variant:q}"
        " --masks-dir {input.masks:q} --out {output.metrics:q} 2> {log:q}"


# the chain's segmentation (val and the evaluated training split) and, optionally, the fully
# supervised upper bound on val go into results/summary.json
SUMMARY_EXTRA.extend(
    [segmentation_metrics(SEG["arch"], DATASET["val_split"])]
    + [segmentation_metrics(SEG["arch"], DATASET["eval_split"])]
    + ([segmentation_metrics("supervised", DATASET["val_split"])] if SEG["supervised"] else [])
)
