# Helper functions shared by the rule files (and nothing else lives here).

import math
import os
import re
import shlex
import sys
from collections import namedtuple

from snakemake.exceptions import WorkflowError

RESULTS = config["results"]
DATASET = config["dataset"]
SEEDS = config["seeds"]
SEED0 = SEEDS[0]
ENV = "../../envs/pnoc.yaml"


# Each job runs pnoc with the Python that runs Snakemake (pnoc.cli.run_rules_with_this_python); a Snakemake that
# cannot import torch and pnoc stops here, before any job, saying how to start it from pnoc's environment.
try:
    from pnoc.cli import run_rules_with_this_python
except ImportError as e:
    raise WorkflowError(
        f"Snakemake runs with {sys.executable}, which cannot import pnoc ({e}); run Snakemake from pnoc's "
        f"environment (`source .venv/bin/activate` first, or `.venv/bin/snakemake ...`)"
    )
try:
    run_rules_with_this_python()
except ImportError as e:
    raise WorkflowError(str(e))


wildcard_constraints:
    seed=r"\d+",
    split=r"[A-Za-z0-9_]+",
    variant=r"[a-z0-9_]+",
    shard=r"\d+of\d+",


def flags(section, exclude=()):
    """Turn a config section into ``--key value`` command-line flags (lists become repeated values)."""
    out = []
    for key, value in section.items():
        if key in exclude or isinstance(value, dict):
            continue
        if key == "weights":  # the keyword generic becomes the path of the pretrained backbone
            value = backbone_weights(section, used=False).path
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, (list, tuple)):
            values = " ".join(shlex.quote(str(v)) for v in value)
            out.append(f"{flag} {values}")
        elif isinstance(value, bool):
            out.append(f"{flag} {'true' if value else 'false'}")
        else:
            out.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(out)


# the speed group's flags (--channels-last true ...), given to every training rule as {params.speed}
SPEED = flags(config["speed"])


# Backbone weights of a section: none | imagenet | generic | path. "generic" is the demo's stand-in
# for ImageNet: the backbone rule pretrain_backbone trains on the generic corpus (pnoc/data/generic.py).
# "imagenet" is the backbone's file in imagenet_weights.dir, fetched once by the local rule fetch_weights
# (dataset.smk) on the host that runs snakemake: no job downloads anything.
PRETRAIN_WEIGHTS = f"{RESULTS}/pretrain/backbone.pth"
IMAGENET = config["imagenet_weights"]
# weights file name -> backbone (the fetch_weights jobs)
IMAGENET_FILES = {src["file"]: name for name, src in IMAGENET["sources"].items()}
BackboneWeights = namedtuple("BackboneWeights", "path input")


def imagenet_weights(backbone):
    """The ImageNet weights file of a backbone (``imagenet_weights.dir`` / its source's file), or None."""
    src = IMAGENET["sources"].get(backbone)
    return None if src is None else os.path.join(IMAGENET["dir"], src["file"])


def backbone_weights(section, used=True):
    """Resolve the ``weights`` value of a config section for one rule.

    Args:
        section: config section (dict) with a ``weights`` and a ``backbone`` key.
        used: whether the rule's stage reads ``weights`` under this config (e.g. only with
            ``init: backbone``); an unused ``generic`` / ``imagenet`` adds no dependency and is not checked.

    Returns:
        BackboneWeights(path, input). ``path``: the value to pass as ``--weights`` (``generic`` ->
        PRETRAIN_WEIGHTS, ``imagenet`` -> the backbone's file of imagenet_weights, anything else unchanged);
        ``flags()`` already does this for every ``weights`` key. ``input``: an input function giving that file
        when the section says ``generic`` or ``imagenet`` and ``used``, else [], so the rule depends on rule
        pretrain_backbone or fetch_weights exactly when it needs it. Usage, one line in a rule's ``input:``::

            weights=backbone_weights(SAL["ccam"], SAL["ccam"]["init"] == "backbone").input,

    Raises:
        ValueError: ``generic`` (and used) with a backbone other than ``pretrain.backbone``, whose weights would
            not fit, or ``imagenet`` (and used) for a backbone without a source in imagenet_weights.sources;
            raised when the Snakefile is parsed, before any job runs.
    """
    value = str(section.get("weights", "none"))
    backbone = section.get("backbone")
    if value == "imagenet":
        path = imagenet_weights(backbone)
        if path is None:
            if used:
                raise ValueError(
                    f"weights: imagenet for backbone {backbone}, which has no entry in imagenet_weights.sources: add "
                    f"{backbone}: {{file: <name>.pth, urls: [...]}} there, or set weights to the path of a state dict"
                )
            return BackboneWeights(value, lambda wildcards: [])  # never read by the stage
        return BackboneWeights(path, lambda wildcards: [path] if used else [])
    generic = value == "generic"
    pretrained = config["pretrain"]["backbone"]
    if generic and used and section.get("backbone", pretrained) != pretrained:
        raise ValueError(
            f"weights: generic loads the {pretrained} of rule pretrain_backbone, but the section asks for backbone "
            f"{section['backbone']}: set pretrain.backbone to {section['backbone']} (or weights: none)"
        )
    needed = [PRETRAIN_WEIGHTS] if generic and used else []
    return BackboneWeights(PRETRAIN_WEIGHTS if generic else value, lambda wildcards: needed)


def fetch_args(wildcards):
    """Flags of a fetch_weights job: the backbone's URLs and, where configured, its full sha256."""
    src = IMAGENET["sources"][IMAGENET_FILES[wildcards.file]]
    urls = " ".join(shlex.quote(u) for u in src["urls"])
    return f"--urls {urls}" + (f" --sha256 {shlex.quote(src['sha256'])}" if src.get("sha256") else "")


# dataset keys passed to every stage (pnoc.data.datasets.DataSource) only when they differ from their default, so a
# run that leaves them alone keeps its recorded params (and reruns nothing)
DATASET_OPTIONS = {"label_file": None, "list_dir": None, "coco_mask_values": "auto", "drop_unlabelled": False}


def dataset_options():
    """The dataset keys of DATASET_OPTIONS that are set, as keyword arguments of WSSSDataset."""
    return {k: DATASET[k] for k, default in DATASET_OPTIONS.items() if DATASET.get(k, default) != default}


def dataset_args():
    """``--dataset``, ``--root`` and the set dataset options, shell-quoted: the data flags of every stage."""
    extra = "".join(f" --{k.replace('_', '-')} {shlex.quote(str(v).lower() if isinstance(v, bool) else str(v))}"
                    for k, v in dataset_options().items())
    return f"--dataset {DATASET['name']} --root {shlex.quote(DATASET['root'])}{extra}"


def dataset_manifest(split, kind="images"):
    """Manifest of one kind (images | masks) of a split, written by the check_dataset job (dataset.smk)."""
    return f"{RESULTS}/dataset/manifest/{split}/{kind}.json"


def dataset_inputs(images=(), masks=(), split=None):
    """The dataset as a DAG input: the manifests of what a job reads.

    Args:
        images: splits whose images and labels the job reads.
        masks: splits whose ground-truth masks it reads (evaluations; scores against masks where present).
        split: "images" or "masks" for the split of the job's ``{split}`` wildcard ("masks" adds both).

    Returns:
        an input function; the job reruns exactly when a file of what it reads changes: a corrected val
        mask reruns the val evaluations, not the training.
    """

    def inner(wildcards):
        imgs, msks = list(images), list(masks)
        if split is not None:
            imgs.append(wildcards.split)
            if split == "masks":
                msks.append(wildcards.split)
        out = [dataset_manifest(s, "images") for s in imgs] + [dataset_manifest(s, "masks") for s in msks]
        return list(dict.fromkeys(out))

    return inner


def dataset_checked_record(split, kind):
    """What the last successful check of one kind of a split read (size, mtime, SHA-256 of each file), written by
    the check_dataset job; dataset_split_fingerprint compares the files with it."""
    return f"{RESULTS}/dataset/checked/{split}/{kind}.json"


_FINGERPRINTS = {}


def dataset_split_fingerprint(wildcards):
    """The check_dataset job's ``params.fingerprint``: a digest of the files of one kind of a split, read when
    the DAG is built (pnoc.data.check_dataset.dataset_fingerprint). A changed, added or removed file changes it,
    so Snakemake's params trigger reruns the check, whose new manifest reruns exactly the stages that read it.
    The files are not the job's inputs: at COCO's size, one input a file cost Snakemake about 30 s of every
    dry run (docs/benchmarks.md). Computed once per split and kind and run (dataset_split_files computes it
    first)."""
    if DATASET["name"] == "synthetic":
        return "dataset.json"  # generated by a job: its input dataset.json stands for its files
    key = (wildcards.split, wildcards.kind)
    if key not in _FINGERPRINTS:
        from pnoc.data.check_dataset import dataset_fingerprint

        _FINGERPRINTS[key] = dataset_fingerprint(DATASET["name"], DATASET["root"], *key,
                                                 record=dataset_checked_record(*key), **dataset_options())
    return _FINGERPRINTS[key]


def dataset_split_files(wildcards):
    """Input of the check_dataset job: none but the synthetic benchmark's dataset.json (a rule output that stands
    for its files). For any other dataset the job's ``params.fingerprint`` stands for its files; it is computed
    here, so a missing split list fails the dry run with its path and the fix."""
    if DATASET["name"] == "synthetic":
        return [f"{DATASET['root']}/dataset.json"]
    dataset_split_fingerprint(wildcards)
    return []


def labels_agree_with_masks():
    """The training split's masks check (it compares the labels with the masks, pnoc.data.check_dataset) as an
    input of the first training: a label file that disagrees with the masks stops the run before anything trains.
    ancient: a corrected mask of that split reruns its check, not the training."""
    return ancient(dataset_manifest(DATASET["train_split"], "masks"))


def split_needs_masks(split):
    """Evaluated splits need a ground-truth mask for every image; so does the train split of supervised DeepLab."""
    evaluated = {DATASET["eval_split"], DATASET["val_split"]}
    if config["segmentation"]["supervised"]:
        evaluated.add(DATASET["train_split"])
    return split in evaluated


def benchmark_tables():
    """The premises table of rule diagnose, which exists for the synthetic benchmark only (part maps)."""
    return [f"{RESULTS}/tables/benchmark.md"] if DATASET["name"] == "synthetic" else []


def state_dir(*parts):
    """Undeclared resume-state folder of a training job (Snakemake deletes declared outputs of failed jobs)."""
    return os.path.join(RESULTS, ".state", *map(str, parts))


def mem_infer(wildcards, attempt):
    return config["resources"]["infer_mem_mb"] * attempt


def runtime_train(wildcards, attempt):
    return config["resources"]["train_runtime_min"] * attempt


# ---------------------------------------------------------------------------------------------
# Time limits of the per-image rules, sized from the images they read. A rule that declares
# ``runtime=runtime_infer`` gets (Snakemake passes the rule's name as ``rulename``)
#
#   attempt x ceil(resources.infer_runtime_min
#                  + resources.runtime_margin x resources.cost_s_per_mpx[rule] x megapixels / 60)   minutes
#
# where megapixels are those of the images the job reads: the image count of its split(s) (of its shard with
# resources.shards > 1) x their mean size, read when the Snakefile is parsed (split_size).

# per-image rules that read other splits than their {split} wildcard (or have none)
PER_IMAGE_SPLITS = {
    "make_affinity_labels": lambda: [AFF_TRAIN_SPLIT],
    "walk_share": lambda: [DATASET["val_split"], DATASET["eval_split"]],
    "diagnose": lambda: [DATASET["val_split"]],
}
# per-image rules that run as resources.shards jobs per split (a `sharded()` output and a gather_* rule)
SHARDED_RULES = ("infer_cams", "infer_saliency", "infer_poolnet", "make_affinity_labels", "propagate",
                 "make_pseudo_masks", "infer_segmentation")
# images whose headers give a split's mean size (spread over its list)
SIZE_SAMPLE = 16


_SPLIT_SIZES = {}


def split_size(split):
    """(images, mean megapixels per image) of a split, read cheaply when the Snakefile is parsed.

    synthetic: ``dataset.synthetic`` n_train / n_val images of image_size² (the data is generated by a job). Any other
    dataset: the split's image list (its line count; a COCO split without a list: its folder's images), and the mean
    size of up to SIZE_SAMPLE images spread over the list, from their headers (no image is decoded; the dataset
    check's manifest may not exist yet). A list or image that cannot be read counts as nothing here: rule
    check_dataset stops the run with the reason.
    """
    if split in _SPLIT_SIZES:
        return _SPLIT_SIZES[split]
    if DATASET["name"] == "synthetic":
        syn = DATASET["synthetic"]
        n = {"train": syn["n_train"], "val": syn["n_val"]}.get(split, 0)
        out = (n, syn["image_size"] ** 2 / 1e6)
    else:
        from pnoc.data import open_dataset

        try:
            ds = open_dataset(DATASET["name"], DATASET["root"], split, **dataset_options())
            ids = ds.ids
        except Exception:  # missing list or folder: check_dataset names it
            ids = []
        step = max(1, len(ids) // SIZE_SAMPLE)
        sizes = []
        for image_id in ids[::step][:SIZE_SAMPLE]:
            try:
                h, w = ds.image_size(image_id)
            except Exception:
                continue
            sizes.append(h * w / 1e6)
        out = (len(ids), sum(sizes) / len(sizes) if sizes else 0.0)
    _SPLIT_SIZES[split] = out
    return out


def job_megapixels(rulename, wildcards):
    """Megapixels that one job of a per-image rule reads (its split or splits; with shards, the largest shard)."""
    splits = PER_IMAGE_SPLITS[rulename]() if rulename in PER_IMAGE_SPLITS else [wildcards.split]
    total = 0.0
    for split in dict.fromkeys(splits):
        n, mpx = split_size(split)
        if SHARDS > 1 and rulename in SHARDED_RULES:
            n = -(-n // SHARDS)
        total += n * mpx
    return total


def per_image_runtime(rulename, megapixels, attempt=1):
    """Time limit (minutes) of a per-image job reading ``megapixels``; see the formula above.

    Raises:
        WorkflowError: ``resources.cost_s_per_mpx`` has no entry for the rule.
    """
    res = config["resources"]
    costs = res["cost_s_per_mpx"]
    if rulename not in costs:
        raise WorkflowError(f"rule {rulename} declares runtime=runtime_infer, but resources.cost_s_per_mpx has no "
                            f"{rulename}: add its seconds per megapixel (benchmarks/rehearsal.py measures them)")
    scaled = res["runtime_margin"] * costs[rulename] * megapixels / 60
    return attempt * math.ceil(round(res["infer_runtime_min"] + scaled, 6))  # round: 0.2 Mpx x 1000 is not 200.0000001


def runtime_infer(wildcards, attempt, rulename):
    """``runtime`` of a per-image rule: sized from the images the job reads (per_image_runtime)."""
    return per_image_runtime(rulename, job_megapixels(rulename, wildcards), attempt)


GPU = config["resources"]["gpu"]
# Training jobs: N processes (one per GPU) in ONE task. torchrun starts the N ranks itself, so SLURM must
# start a single task: tasks_per_gpu=0 keeps the SLURM plugin from adding --ntasks-per-gpu (it maps a
# `tasks` resource to --ntasks-per-gpu on GPU jobs, which would start N copies of torchrun).
SYNC_BN = "true" if config["resources"]["sync_bn"] else "false"
# training rule -> its config section (the section's batch_size is the global batch of the rule's processes)
TRAIN_SECTIONS = {
    "pretrain_backbone": ("pretrain", config["pretrain"]),
    "train_classifier": ("classifier", config["classifier"]),
    "train_cam": ("cam", config["cam"]),
    "train_ccam": ("saliency.ccam", config["saliency"]["ccam"]),
    "train_poolnet": ("saliency.poolnet", config["saliency"]["poolnet"]),
    "train_affinity": ("affinity.train", config["affinity"]["train"]),
    "train_segmentation": ("segmentation", config["segmentation"]),
}


def gpus_per_job(rule):
    """Processes of a training rule: resources.gpus_per_rule[rule], else resources.gpus_per_job."""
    res = config["resources"]
    return res.get("gpus_per_rule", {}).get(rule, res["gpus_per_job"])


def launch(rule):
    """The launcher of a training rule's shell line: ``python``, or ``torchrun`` for N > 1 processes."""
    n = gpus_per_job(rule)
    return "python" if n == 1 else f"torchrun --standalone --nproc_per_node {n}"


def train_gpus(rule):
    """GPUs a training job asks for: its processes x resources.gpu (0 on a CPU-only cluster: gloo processes)."""
    return GPU * gpus_per_job(rule)


def mem_train(rule):
    """Memory request of a training job, e.g. ``mem_mb=mem_train("train_cam")``. Per process; grows per retry."""
    return lambda wildcards, attempt: config["resources"]["train_mem_mb"] * gpus_per_job(rule) * attempt


def check_global_batches():
    """Every training section's batch_size (the global batch) splits over resources.gpus_per_job processes.

    Raises:
        ValueError: naming the section's key and the value to change, when the Snakefile is parsed (before
            any job starts; the stages check it again for direct use).
    """
    pretrained = any(str(sec.get("weights")) == "generic" for _, sec in TRAIN_SECTIONS.values())
    for job, (name, section) in TRAIN_SECTIONS.items():
        if not pretrained and job == "pretrain_backbone":
            continue  # rule pretrain_backbone is not part of this workflow
        batch, n = section["batch_size"], gpus_per_job(job)
        if batch % n:
            key = f"resources.gpus_per_rule.{job}" if job in config["resources"].get("gpus_per_rule", {}) \
                else "resources.gpus_per_job"
            raise ValueError(
                f"{name}.batch_size={batch} is not divisible by {key}={n} (for {job}); batch_size is the "
                f"global batch of one step over all GPUs; make it a multiple of {n}, or give {job} another "
                f"count in resources.gpus_per_rule"
            )


# CPU threads of a compute-heavy job (torch intra-op threads, per-image worker processes)
THREADS = config["resources"]["threads"]


# ---------------------------------------------------------------------------------------------
# Sharded inference (resources.shards = K; pnoc/shards.py). With K = 1 the helpers below return their
# argument unchanged, so the rules, their outputs and their recorded params are those of an unsharded run.
# With K > 1 a per-image rule (infer_cams, ...) runs once per shard 1ofK .. KofK and its gather rule
# (gather_cams, ..., defined beside it under `if SHARDS > 1`) writes the folder the consumers read.

SHARDS = config["resources"]["shards"]


def sharded(path):
    """Output folder of a per-image rule: ``directory(path)``, or with K > 1 the shard folder
    ``<path>.shards/{shard}``, temporary (deleted once gathered: the gathered files are hard links)."""
    if SHARDS == 1:
        return directory(path)
    return temp(directory(f"{path}.shards/{{shard}}"))


def shard_dirs(path):
    """Input of a gather rule: the K shard folders of ``path`` (its other wildcards are the job's)."""
    return expand(f"{path}.shards/{{shard}}", shard=[f"{k}of{SHARDS}" for k in range(1, SHARDS + 1)],
                  allow_missing=True)


def sharded_log(path):
    """Log of a per-image rule: ``path``, or with K > 1 one log per shard (``<name>-{shard}.log``)."""
    if SHARDS == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}-{{shard}}{ext}"


def shard_args(args):
    """Flags of a per-image rule (a string or a function of the wildcards), with K > 1 plus ``--shard {shard}``."""
    if SHARDS == 1:
        return args
    return lambda wildcards: f"{args(wildcards) if callable(args) else args} --shard {wildcards.shard}"


def cam_model(wildcards):
    """Weights of the CAM generator of a variant (``classifier`` = the ordinary classifier)."""
    if wildcards.variant == "classifier":
        return f"{RESULTS}/classifier/seed{wildcards.seed}/model.pt"
    return f"{RESULTS}/cam/{wildcards.variant}/seed{wildcards.seed}/model.pt"


def prior_metrics(variants, split=None, seeds=None):
    split = split or DATASET["eval_split"]
    return [
        f"{RESULTS}/priors/{v}/seed{s}/{split}/metrics.json" for v in variants for s in (seeds or SEEDS)
    ]


def variant_strategy(variant):
    """``pnoc_ls`` -> ("pnoc", label smoothing alpha); ``poc`` -> ("poc", 0)."""
    if variant.endswith("_ls"):
        return variant[:-3], config["cam"]["label_smoothing"]
    return variant, 0.0


PRIOR_VARIANTS = list(dict.fromkeys([config["cam"]["baseline"], config["cam"]["variant"]]))


# ---------------------------------------------------------------------------------------------
# Saliency: hints, C2AM / C2AM-H, PoolNet (workflow/rules/saliency.smk)

SAL = config["saliency"]
SAL_PRIOR = config["cam"]["variant"]  # the chain's prior: source of hints and of CAM-combined scores


def saliency_maps(split, seed=None):
    """Folder of the chain's final saliency maps (PoolNet trained on ``saliency.method``'s pseudo masks).

    One 8-bit gray PNG per image of ``split`` (value/255 = saliency), written by rule infer_poolnet.
    """
    seed = SEED0 if seed is None else seed
    return f"{RESULTS}/saliency/{SAL['method']}/seed{seed}/{split}/poolnet"


def saliency_hints(wildcards):
    """Hints of the chain's prior on the training split (C2AM-H loss; C2AM direction evidence)."""
    return f"{RESULTS}/hints/{SAL_PRIOR}/seed{wildcards.seed}/{DATASET['train_split']}"


def saliency_classifier(section):
    """The ordinary classifier as the backbone source of a saliency network (``init: classifier``)."""
    if SAL[section]["init"] == "classifier":
        return f"{RESULTS}/classifier/seed{{seed}}/model.pt"
    return []


def saliency_classifier_flag(section):
    if SAL[section]["init"] == "classifier":
        return lambda w: f"--classifier {shlex.quote(f'{RESULTS}/classifier/seed{w.seed}/model.pt')}"
    return ""


def saliency_eval_maps(wildcards):
    """Maps scored by evaluate_saliency: raw C2AM maps for ``<method>_raw``, PoolNet maps for ``<method>``."""
    v = wildcards.variant
    method, kind = (v[: -len("_raw")], "raw") if v.endswith("_raw") else (v, "poolnet")
    return f"{RESULTS}/saliency/{method}/seed{wildcards.seed}/{wildcards.split}/{kind}"


def saliency_metrics(variants, split=None, seeds=None):
    """metrics.json of rule evaluate_saliency for variants (``c2amh``, ``c2amh_raw``, ...) × seeds."""
    split = split or DATASET["eval_split"]
    return [
        f"{RESULTS}/saliency_eval/{v}/seed{s}/{split}/metrics.json"
        for v in variants
        for s in (seeds or SEEDS)
    ]


# metrics.json files of later stages; each rule file appends its own evaluations
SUMMARY_EXTRA = []


def summary_inputs():
    """Every evaluation whose row goes into results/summary.json."""
    return prior_metrics(PRIOR_VARIANTS, seeds=[SEED0]) + SUMMARY_EXTRA


# ---------------------------------------------------------------------------------------------
# Segmentation (workflow/rules/segmentation.smk) and the HTML report (workflow/rules/report.smk)

from pathlib import PurePath

# Pseudo masks of the chain (stage 8). The affinity / random-walk stage's rule file sets
# PSEUDO_VARIANT (e.g. "rw") when it exists, and must then be included BEFORE segmentation.smk
# and report.smk in the Snakefile. Until then pseudo_masks_dir() FALLS BACK to the chain's
# prior masks (written by evaluate_priors), so segmentation runs end to end today.
PSEUDO_VARIANT = None


def prior_masks_dir(split, seed=None):
    """Index PNGs of the chain's prior (``cam.variant``) at its best threshold (rule evaluate_priors)."""
    seed = SEED0 if seed is None else seed
    return f"{RESULTS}/priors/{config['cam']['variant']}/seed{seed}/{split}/masks"


def pseudo_masks_dir(split):
    """Index PNGs the segmentation network trains on (the affinity stage switches these on)."""
    if PSEUDO_VARIANT is None:
        return prior_masks_dir(split)  # fallback until the affinity / random-walk stage exists
    return f"{RESULTS}/pseudo_masks/{PSEUDO_VARIANT}/seed{SEED0}/{split}/masks"


SEG = config["segmentation"]
# variants: <arch> trains on the pseudo masks; supervised[_<arch>] on the ground truth
SEGMENTATION_VARIANTS = r"supervised|(supervised_)?(deeplabv3plus|deeplabv2)"
SEG_INFER_KEYS = ("scales", "flip", "crf", "crf_t")


def segmentation_arch(variant):
    """``supervised`` -> the configured arch; ``supervised_deeplabv2`` / ``deeplabv2`` -> deeplabv2."""
    name = variant.removeprefix("supervised").lstrip("_")
    return name or SEG["arch"]


def segmentation_masks(wildcards):
    """Training masks of a variant: ``gt`` for the supervised upper bound, else the pseudo masks."""
    if wildcards.variant.startswith("supervised"):
        return "gt"
    return pseudo_masks_dir(DATASET["train_split"])


def segmentation_train_inputs(wildcards):
    """Named inputs of train_segmentation - the pseudo masks and, with ``init: classifier``, the classifier."""
    out = {}
    if not wildcards.variant.startswith("supervised"):
        out["masks"] = pseudo_masks_dir(DATASET["train_split"])
    if SEG["init"] == "classifier":
        out["classifier"] = f"{RESULTS}/classifier/seed{wildcards.seed}/model.pt"
    return out


def segmentation_dir(variant, split, seed=None):
    seed = SEED0 if seed is None else seed
    return f"{RESULTS}/segmentation/{variant}/seed{seed}/{split}"


def segmentation_metrics(variant, split, seed=None):
    return f"{segmentation_dir(variant, split, seed)}/metrics.json"


# report pages: the stage folder of an evaluation's metrics.json -> page name, category
REPORT_PAGES = {
    "priors": ("priors", "Priors"),
    "saliency_eval": ("saliency", "Saliency"),
    "pseudo_masks": ("pseudo_masks", "Pseudo masks"),
    "segmentation": ("segmentation", "Segmentation"),
}


def report_metrics():
    """(page, metrics.json) of every evaluation in the summary whose stage has a report page."""
    out = []
    for p in summary_inputs():
        stage = PurePath(p).relative_to(RESULTS).parts[0]
        if stage in REPORT_PAGES:
            out.append((REPORT_PAGES[stage][0], p))
    return out


def report_pages():
    """Page name -> category of the report's table pages (stages present in this run + fixed pages)."""
    pages = {page: cat for page, cat in REPORT_PAGES.values() if page in {p for p, _ in report_metrics()}}
    pages.update({"class_groups": "Class groups", "summary": "Summary"})
    return pages


GALLERY_SPLIT = config["report"]["gallery_split"] or DATASET["eval_split"]


def gallery_columns(split):
    """Gallery columns present in this workflow, in ``report.gallery_columns`` order: name -> (kind, folder).

    saliency needs the saliency stage (helper saliency_maps), pseudo_mask the affinity stage
    (PSEUDO_VARIANT); a column whose stage is absent is skipped.
    """
    avail = {
        "prior": ("masks", prior_masks_dir(split)),
        "prediction": ("masks", f"{segmentation_dir(SEG['arch'], split)}/masks"),
    }
    if "saliency_maps" in globals():
        avail["saliency"] = ("maps", saliency_maps(split))
    if PSEUDO_VARIANT is not None:
        avail["pseudo_mask"] = ("masks", pseudo_masks_dir(split))
    return {c: avail[c] for c in config["report"]["gallery_columns"] if c in avail}


def gallery_inputs(wildcards):
    return {name: folder for name, (_, folder) in gallery_columns(GALLERY_SPLIT).items()}


def gallery_args(wildcards):
    cols = gallery_columns(GALLERY_SPLIT)
    masks = " ".join(shlex.quote(f"{n}={f}") for n, (k, f) in cols.items() if k == "masks")
    maps = " ".join(shlex.quote(f"{n}={f}") for n, (k, f) in cols.items() if k == "maps")
    return (f"--columns {' '.join(map(shlex.quote, cols))}" + (f" --masks {masks}" if masks else "")
            + (f" --maps {maps}" if maps else ""))


def report_targets():
    """Outputs that exist only for the HTML report (rule all requests them, so --report finds them)."""
    return [f"{RESULTS}/report/tables/{p}.html" for p in report_pages()] + [f"{RESULTS}/report/gallery"]


# ---------------------------------------------------------------------------------------------
# Affinity labels, AffinityNet, random walk, pseudo masks (workflow/rules/affinity.smk)

AFF = config["affinity"]
AFF_TRAIN_SPLIT = DATASET["train_split"]
# chain = <prior variant>+<affinity-label method> (wildcard {chain}); the chain's own one:
CHAIN_MASKS = f"{config['cam']['variant']}+{AFF['method']}"


def walk_share_targets():
    """The walk's share of the chain's own masks (first seed): rule walk_share, a diagnostic of the benchmark."""
    return [f"{RESULTS}/walk_share/{CHAIN_MASKS}/seed{SEED0}/metrics.json"]


def diagnostic_targets():
    """The benchmark diagnostics, requested by ``snakemake diagnostics`` for any dataset: the walk's share
    (rule walk_share, four walks per image on two splits, ground-truth affinities included) and, for the
    synthetic benchmark, its premises (rule diagnose, which needs the generator's part maps)."""
    return benchmark_tables() + walk_share_targets()


def default_diagnostics():
    """Diagnostics in the default target: all of them for the synthetic benchmark (the demo reports them), none
    for voc12 / coco14 / custom, whose users want the chain's result (``snakemake diagnostics`` adds them)."""
    return diagnostic_targets() if DATASET["name"] == "synthetic" else []


def chain_prior(wildcards):
    return wildcards.chain.split("+")[0]


def chain_method(wildcards):
    return wildcards.chain.split("+")[1]


def chain_cams(split=None):
    """CAM folder of the chain's prior on ``split`` (default: the ``{split}`` wildcard)."""

    def inner(wildcards):
        s = split or wildcards.split
        return f"{RESULTS}/cams/{chain_prior(wildcards)}/seed{wildcards.seed}/{s}"

    return inner


def affinity_inputs(wildcards):
    """Named inputs of make_affinity_labels: the prior's train CAMs and, for saliency, the saliency maps."""
    out = {"cams": chain_cams(AFF_TRAIN_SPLIT)(wildcards)}
    if chain_method(wildcards) == "saliency":
        out["saliency"] = saliency_maps(AFF_TRAIN_SPLIT, wildcards.seed)
    return out


def pseudo_mask_inputs(wildcards):
    """Named inputs of make_pseudo_masks: the RW maps and, with ``affinity.masks.saliency_threshold``, the
    chain's saliency maps of the same split."""
    out = {"rw": f"{RESULTS}/rw/{wildcards.chain}/seed{wildcards.seed}/{wildcards.split}"}
    if AFF["masks"].get("saliency_threshold") is not None:
        out["saliency"] = saliency_maps(wildcards.split, wildcards.seed)
    return out


def affinity_source(wildcards):
    """Network whose backbone AffinityNet freezes: the ordinary classifier, the prior's CAM network, or none."""
    init = AFF["train"]["init"]
    if init == "classifier":
        return {"source": f"{RESULTS}/classifier/seed{wildcards.seed}/model.pt"}
    if init == "cam":
        prior = chain_prior(wildcards)
        if prior == "classifier":
            return {"source": f"{RESULTS}/classifier/seed{wildcards.seed}/model.pt"}
        return {"source": f"{RESULTS}/cam/{prior}/seed{wildcards.seed}/model.pt"}
    return {}


def mask_metrics(chains, splits=None, seeds=None):
    """metrics.json of rule evaluate_masks for every chain × split × seed."""
    splits = list(dict.fromkeys(splits or [DATASET["eval_split"], DATASET["val_split"]]))
    return [
        f"{RESULTS}/pseudo_masks/{c}/seed{s}/{sp}/metrics.json"
        for c in chains
        for sp in splits
        for s in (seeds or SEEDS)
    ]
