"""Workflow-level tests: lint, dry runs, config validation, the smoke DAG end to end, resume after kill."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, snakemake, venv_env


def test_lint_is_clean():
    p = snakemake(["--lint"], check=False)
    assert p.returncode == 0, p.stdout[-4000:]


def test_dry_run_default_and_tables(tmp_path):
    # an empty results folder: a checkout that already ran the demo would otherwise plan nothing
    res = tmp_path / "results"
    over = ["--config", f"results={res}", f"dataset={{'root': '{res}/dataset/synthetic'}}"]
    p = snakemake(["-n", "--quiet", "rules", *over], check=True)
    for rule in ("make_dataset", "train_classifier", "train_cam", "infer_cams", "evaluate_priors", "summary"):
        assert rule in p.stdout
    snakemake(["-n", "priors_table", *over])


def _default_mismatches(cfg: dict, schema: dict, path: str = "") -> list[str]:
    out = []
    props = schema.get("properties", {})
    for key, value in cfg.items():
        if key not in props:
            out.append(f"{path}{key}: not in the schema")
        elif isinstance(value, dict) and "properties" in props[key]:
            out += _default_mismatches(value, props[key], f"{path}{key}.")
        elif props[key].get("default") != value:
            out.append(f"{path}{key}: config.yaml {value!r}, schema default {props[key].get('default')!r}")
    out += [f"{path}{key}: in the schema, not in config.yaml" for key in props if key not in cfg]
    return out


def test_config_yaml_and_schema_defaults_agree():
    """One source of truth: every config.yaml value is its schema default, so a run from a working
    directory without config.yaml (e.g. ``snakemake -d elsewhere``, SLURM test dirs) computes the same."""
    import yaml
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    assert _default_mismatches(cfg, schema) == []


PAPER_SETTINGS = {  # keys the demo tunes away from the reference; VOC/COCO must pin the reference value
    "affinity.labels.classic.fg_threshold": 0.30, "affinity.labels.classic.bg_threshold": 0.05,
    "affinity.train.output_stride": 16, "affinity.train.radius": 10, "affinity.train.epochs": 3,
    "affinity.train.momentum": 0.0, "affinity.rw.exp_times": 8, "affinity.masks.bg_threshold": 0.30,
    "affinity.masks.crf_t": 1, "affinity.masks.crf_gt_prob": 0.9, "segmentation.optimizer": "sgd",
    "segmentation.aspp_rates": [], "segmentation.norm": "gn", "segmentation.dropout": 0.5,
    "segmentation.label_smoothing": 0.1, "segmentation.augment": "colorjitter", "segmentation.head_lr_mult": 10.0,
    "segmentation.scales": [0.5, 1.0, 1.5, 2.0], "saliency.method": "c2amh", "cam.accumulate_loss": "sum",
    "affinity.labels.saliency.salient_threshold": None, "affinity.masks.saliency_threshold": None,
    "cam.re_max": 4.0, "classifier.weights": "imagenet", "saliency.ccam.weights": "imagenet",
    "saliency.poolnet.weights": "imagenet", "affinity.train.weights": "imagenet", "segmentation.weights": "imagenet",
}


@pytest.mark.parametrize("name", ["voc12", "coco14"])
def test_paper_configs_pin_the_reference_where_the_demo_differs(name):
    """``--configfile config/voc12.yaml`` is merged onto config.yaml: every demo-tuned key must be set back."""
    import yaml
    from snakemake.utils import update_config  # the merge Snakemake applies to each --configfile

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    update_config(cfg, yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text()))
    for path, want in PAPER_SETTINGS.items():
        node = cfg
        for part in path.split("."):
            node = node[part]
        assert node == want, (name, path, node, want)


def test_invalid_config_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("classifier:\n  epochz: 3\n")
    p = snakemake(["-n", "--configfile", str(bad)], check=False)
    assert p.returncode != 0
    assert "epochz" in p.stdout


@pytest.mark.parametrize("text, key", [
    ("classifier:\n  label_smoothing: 2.0\n", "label_smoothing"),
    ("resources:\n  shards: 0\n", "shards"),  # sharded inference needs at least one job
    ("resources:\n  gpus_per_job: 0\n", "gpus_per_job"),
    ("resources:\n  gpus_per_rule: {train_cams: 2}\n", "train_cams"),  # not a training rule
])
def test_out_of_range_config_value_is_rejected(tmp_path, text, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    p = snakemake(["-n", "--configfile", str(bad)], check=False)
    assert p.returncode != 0 and key in p.stdout


@pytest.mark.slow
def test_smoke_dag_end_to_end(smoke_run):
    tmp, _, p = smoke_run
    summary = json.loads((tmp / "results" / "summary.json").read_text())
    assert Path(summary["dataset_root"], "JPEGImages").is_dir()
    stages = {(r["stage"], r["variant"]) for r in summary["rows"]}
    assert ("priors", "cam") in stages and ("priors", "pnoc_ls") in stages
    for r in summary["rows"]:
        assert 0.0 <= r["miou"] <= 1.0
        if "masks" in r:
            assert any(Path(r["masks"]).glob("*.png"))
    assert "pnoc results" in p.stdout  # the summary table is printed


def _train_cmd(tmp, root, out, state, epochs=3):
    return [sys.executable, "-m", "pnoc.cam.train_classifier", "--dataset", "synthetic", "--root", str(root),
            "--out", str(out / "model.pt"), "--metrics", str(out / "metrics.json"), "--state-dir", str(state),
            "--backbone", "resnet18_w8", "--epochs", str(epochs), "--batch-size", "8", "--crop", "64",
            "--resize-min", "56", "--resize-max", "72", "--threads", "1", "--seed", "3"]


@pytest.mark.slow
def test_classifier_resumes_after_kill_exactly(tmp_path):
    from pnoc.data.synthetic import SyntheticConfig, generate

    root = tmp_path / "data"
    generate(root, SyntheticConfig(n_train=32, n_val=8, image_size=64, n_classes=4))
    env = venv_env()
    # uninterrupted run
    subprocess.run(_train_cmd(tmp_path, root, tmp_path / "a", tmp_path / "sa"), check=True, env=env,
                   cwd=ROOT, capture_output=True)
    # killed run: SIGKILL as soon as the first epoch's checkpoint exists, then rerun
    proc = subprocess.Popen(_train_cmd(tmp_path, root, tmp_path / "b", tmp_path / "sb"), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "sb" / "last.pt"
    t0 = time.time()
    while not state.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "model.pt").exists(), "killed before the end: no final model"
    killed_at = torch.load(state, weights_only=True)["_epoch"] + 1
    assert killed_at < 3
    subprocess.run(_train_cmd(tmp_path, root, tmp_path / "b", tmp_path / "sb"), check=True, env=env,
                   cwd=ROOT, capture_output=True)
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert mb["resumed_from_epoch"] == killed_at
    assert [e["loss"] for e in mb["epochs"]] == [e["loss"] for e in ma["epochs"]]
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
