# Helper functions shared by the rule files (and nothing else lives here).

import shlex

RESULTS = config["results"]
DATASET = config["dataset"]
SEEDS = config["seeds"]
SEED0 = SEEDS[0]
ENV = "../../envs/pnoc.yaml"


wildcard_constraints:
    seed=r"\d+",
    split=r"[A-Za-z0-9_]+",
    variant=r"[a-z0-9_]+",


def flags(section, exclude=()):
    """Turn a config section into ``--key value`` command-line flags (lists become repeated values)."""
    out = []
    for key, value in section.items():
        if key in exclude or isinstance(value, dict):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, (list, tuple)):
            out.append(flag + " " + " ".join(shlex.quote(str(v)) for v in value))
        elif isinstance(value, bool):
            out.append(f"{flag} {'true' if value else 'false'}")
        else:
            out.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(out)


def dataset_args():
    return f"--dataset {DATASET['name']} --root {shlex.quote(DATASET['root'])}"


def dataset_marker():
    """The dataset as a DAG input: the generated marker for synthetic, nothing for VOC/COCO."""
    if DATASET["name"] == "synthetic":
        return f"{DATASET['root']}/dataset.json"
    return []


def state_dir(*parts):
    """Undeclared resume-state folder of a training job (Snakemake deletes declared outputs of failed jobs)."""
    return "/".join([RESULTS, ".state", *map(str, parts)])


def mem_train(wildcards, attempt):
    return config["resources"]["train_mem_mb"] * attempt


def mem_infer(wildcards, attempt):
    return config["resources"]["infer_mem_mb"] * attempt


def runtime_train(wildcards, attempt):
    return config["resources"]["train_runtime_min"] * attempt


def runtime_infer(wildcards, attempt):
    return 30 * attempt


GPU = config["resources"]["gpu"]


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


# metrics.json files of later stages; each rule file appends its own evaluations
SUMMARY_EXTRA = []


def summary_inputs():
    """Every evaluation whose row goes into results/summary.json."""
    return prior_metrics(PRIOR_VARIANTS, seeds=[SEED0]) + SUMMARY_EXTRA
