"""The whole-chain rehearsal (benchmarks/rehearsal.py) at its tiny CPU preset; the default target of each dataset
(benchmark diagnostics only for the synthetic benchmark); the per-image rules' time limits sized from the split."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, job_stats, load_script, smoke_config, snakemake, venv_env
from PIL import Image

SCRIPT = ROOT / "benchmarks" / "rehearsal.py"
SNAKEFILE = str(ROOT / "Snakefile")
# the rules of the VOC chain's default target (config/voc12.yaml: no diagnose, no walk_share)
VOC_CHAIN = {
    "check_dataset", "train_classifier", "train_cam", "infer_cams", "evaluate_priors", "extract_hints", "train_ccam",
    "infer_saliency", "train_poolnet", "infer_poolnet", "evaluate_saliency", "make_affinity_labels", "train_affinity",
    "propagate", "make_pseudo_masks", "evaluate_masks", "train_segmentation", "infer_segmentation",
    "evaluate_segmentation", "summary", "report_tables", "gallery",
}


def _rehearsal():
    return load_script(SCRIPT, "rehearsal")


# ------------------------------------------------------------------------------------ the tiny rehearsal
@pytest.mark.slow
def test_tiny_rehearsal_runs_every_rule_of_the_voc_chain(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--cores", "2", "--work", str(tmp_path / "w"),
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=venv_env(), check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    meta, jobs = r["meta"], r["jobs"]
    assert meta["device"] == "cpu" and meta["tiny"] and meta["splits"] == {"train_aug": 21, "train": 3, "val": 3}
    assert {j["rule"] for j in jobs} == VOC_CHAIN  # every rule ran, and no diagnostic
    assert sum(j["rule"] == "infer_cams" for j in jobs) == 4
    assert sum(j["rule"] == "train_segmentation" for j in jobs) == 2
    for j in jobs:
        assert j["wall_s"] > 0 and 0 <= j["loop_s"] <= j["wall_s"] and j["declared_runtime_min"] >= 1, j
        assert j["peak_gpu_mib"] is None  # CPU: the stages write None
        for target in ("voc12", "coco14"):
            e = j[target]
            assert e["one_gpu_s"] >= j["overhead_s"] and e["node4_s"] > 0 and e["limit_min"] >= 1, (target, j)
        if j["rule"].startswith("train_"):
            assert j["loop_source"] == "epoch_seconds" and j["passes"] == 1 and j["images"] == 21, j
            assert j["voc12"]["images"] == 10_582 and j["coco14"]["images"] == 82_783
        if j["rule"].startswith("infer_") or j["rule"] == "propagate":
            assert j["loop_source"] == "seconds" and j["images_per_s"] > 0, j
    # the VOC chain's jobs on train (eval split) and on val are one COCO job on val2014
    dup = [j for j in jobs if j["coco14"]["duplicate"]]
    assert dup and all(j["splits"] in (["train"], ["val"]) for j in dup)
    t = r["totals"]
    assert t["rehearsal_s"] > 0 and t["voc12"]["one_gpu_s"] > t["voc12"]["node4_s"] > 0
    assert t["coco14"]["one_gpu_s"] > t["voc12"]["one_gpu_s"]
    assert set(r["costs"]) >= {"infer_cams", "propagate", "infer_segmentation", "check_dataset"}
    md = r["markdown"]
    assert "| rule | job |" in md and "| time to result |" in md and "| per-image rule |" in md
    assert all(f"| {rule} |" in md for rule in VOC_CHAIN)
    assert md in res.stdout
    overlay = yaml.safe_load((tmp_path / "w" / "rehearsal.yaml").read_text())
    assert overlay["classifier"]["weights"] == "none" and overlay["segmentation"]["epochs"] == 1
    voc = tmp_path / "w" / "VOC2012"
    xml = (voc / "Annotations" / "2012_000000.xml").read_text()
    assert "<name>" in xml and (voc / "ImageSets" / "Segmentation" / "train_aug.txt").is_file()
    with Image.open(voc / "SegmentationClass" / "2012_000000.png") as m:
        assert m.mode == "P" and 255 in np.unique(np.array(m))  # palette mask with VOC's void band


def test_rehearsal_dataset_is_voc_shaped(tmp_path):
    reh = _rehearsal()
    data = reh.write_voc(tmp_path, 40, tiny=False)
    assert data["splits"] == reh.split_counts(40) == {"train_aug": 35, "train": 5, "val": 5}
    lists = {s: (tmp_path / "ImageSets" / "Segmentation" / f"{s}.txt").read_text().split() for s in data["splits"]}
    assert set(lists["train"]) < set(lists["train_aug"]) and not set(lists["val"]) & set(lists["train_aug"])
    assert 0.12 < data["mean_mpx"]["train_aug"] < 0.25  # VOC-like sizes
    for i in lists["val"]:
        with Image.open(tmp_path / "JPEGImages" / f"{i}.jpg") as im, \
                Image.open(tmp_path / "SegmentationClass" / f"{i}.png") as m:
            assert im.size == m.size and max(im.size) <= 500 and m.mode == "P"
            mask = np.array(m)
        named = re.findall(r"<name>(\w+)</name>", (tmp_path / "Annotations" / f"{i}.xml").read_text())
        present = {int(v) for v in np.unique(mask)} - {0, 255}
        assert named and {reh.VOC_CLASSES.index(n) + 1 for n in named} == present


# ------------------------------------------------------------------------------------ default targets, time limits
H, W = 400, 500  # 0.2 Mpx, every image
COUNTS = {"train_aug": 1000, "train": 150, "val": 120}
COSTS = {"infer_cams": 2.0, "check_dataset": 0.5, "walk_share": 4.0, "make_affinity_labels": 1.0}


@pytest.fixture(scope="module")
def uniform_voc(tmp_path_factory):
    """A VOC folder of 1,000 + 120 images of 400x500 (hard links of one image, mask and annotation)."""
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    mask = np.zeros((H, W), np.uint8)
    mask[100:300, 100:400] = 12  # dog
    Image.fromarray(np.full((H, W, 3), 120, np.uint8)).save(root / "one.jpg")
    Image.fromarray(mask, mode="P").save(root / "one.png")
    (root / "one.xml").write_text("<annotation><object><name>dog</name></object></annotation>")
    aug = [f"2012_{k:06d}" for k in range(COUNTS["train_aug"])]
    val = [f"2012_{k:06d}" for k in range(COUNTS["train_aug"], COUNTS["train_aug"] + COUNTS["val"])]
    for i in aug + val:
        os.link(root / "one.jpg", root / "JPEGImages" / f"{i}.jpg")
        os.link(root / "one.png", root / "SegmentationClass" / f"{i}.png")
        os.link(root / "one.xml", root / "Annotations" / f"{i}.xml")
    lists = {"train_aug": aug, "train": aug[: COUNTS["train"]], "val": val}
    for name, ids in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def _voc_dry_run(tmp: Path, root: Path, *targets, **resources) -> str:
    cfg = tmp / "voc.yaml"
    res = {"infer_runtime_min": 5, "runtime_margin": 2, "cost_s_per_mpx": COSTS, **resources}
    cfg.write_text(yaml.safe_dump({"results": str(tmp / "res"), "dataset": {"root": str(root)}, "resources": res}))
    wd = tmp / "wd"
    wd.mkdir(exist_ok=True)
    p = snakemake(["-n", *targets, "--snakefile", SNAKEFILE, "--configfile", str(ROOT / "config" / "voc12.yaml"),
                   str(cfg)], cwd=wd)
    return p.stdout


def _runtimes(dry_run: str) -> dict[tuple[str, str], int]:
    """(rule, wildcards) -> the declared runtime (minutes) of every job of a dry run."""
    out, rule, wc = {}, None, ""
    for ln in dry_run.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", ln)
        if m:
            rule, wc = m.group(1), ""
        elif rule and ln.strip().startswith("wildcards: "):
            wc = ln.strip()[len("wildcards: "):]
        elif rule and ln.strip().startswith("resources: "):
            m = re.search(r"\bruntime=(\d+)", ln)
            if m:
                out[(rule, wc)] = int(m.group(1))
        elif not ln.strip():
            rule = None
    return out


def test_voc_default_target_runs_no_diagnostic_and_sizes_per_image_limits(tmp_path, uniform_voc):
    """voc12's default target has no walk_share / diagnose job; each per-image job's limit is
    ceil(infer_runtime_min + runtime_margin x cost x megapixels / 60) from the split's image count x 0.2 Mpx."""
    out = _voc_dry_run(tmp_path, uniform_voc)
    stats = job_stats(out)
    assert "walk_share" not in stats and "diagnose" not in stats and stats["infer_cams"] == 4, stats
    rt = _runtimes(out)
    assert rt[("infer_cams", "variant=pnoc_ls, seed=0, split=train_aug")] == 19  # ceil(5 + 2 * 2 * 200 / 60)
    assert rt[("infer_cams", "variant=pnoc_ls, seed=0, split=val")] == 7  # ceil(5 + 2 * 2 * 24 / 60)
    assert rt[("check_dataset", "split=val, kind=masks")] == 6  # ceil(5 + 2 * 0.5 * 24 / 60)
    assert rt[("make_affinity_labels", "chain=pnoc_ls+saliency, seed=0")] == 12  # train_aug: ceil(5 + 6.67)
    assert rt[("train_cam", "variant=pnoc_ls, seed=0")] == 1440  # training: train_runtime_min (voc12.yaml)
    # the rehearsal computes the full chains' limits with the same formula
    reh = _rehearsal()
    res = {"infer_runtime_min": 5, "runtime_margin": 2, "cost_s_per_mpx": COSTS}
    assert reh.per_image_runtime(res, "infer_cams", 1000 * 0.2) == 19
    assert reh.per_image_runtime(res, "infer_cams", 1000 * 0.2, attempt=2) == 38
    assert reh.per_image_runtime(res, "check_dataset", 120 * 0.2) == 6

    diag = _voc_dry_run(tmp_path, uniform_voc, "diagnostics")
    assert job_stats(diag).get("walk_share") == 1 and "diagnose" not in job_stats(diag)
    # walk_share reads val and the evaluated split (train): (120 + 150) x 0.2 Mpx
    assert _runtimes(diag)[("walk_share", "chain=pnoc_ls+saliency, seed=0")] == 13  # ceil(5 + 2 * 4 * 54 / 60)


def test_sharded_per_image_limits_count_the_largest_shard(tmp_path, uniform_voc):
    rt = _runtimes(_voc_dry_run(tmp_path, uniform_voc, shards=3))
    # 1000 images in 3 shards: 334 + 333 + 333; ceil(5 + 2 * 2 * 334 * 0.2 / 60) = ceil(9.45)
    limits = {v for (rule, wc), v in rt.items() if rule == "infer_cams" and "split=train_aug" in wc}
    assert limits == {10}
    assert rt[("check_dataset", "split=train_aug, kind=images")] == math.ceil(5 + 2 * 0.5 * 200 / 60)  # not sharded


def test_synthetic_default_target_keeps_the_diagnostics(tmp_path):
    p = snakemake(["-n", "--configfile", str(smoke_config(tmp_path))], cwd=tmp_path)
    stats = job_stats(p.stdout)
    assert stats.get("walk_share") == 1 and stats.get("diagnose") == 1, stats
    smoke = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    mpx = smoke["dataset"]["synthetic"]["n_train"] * smoke["dataset"]["synthetic"]["image_size"] ** 2 / 1e6
    res = yaml.safe_load((ROOT / "config.yaml").read_text())["resources"]
    want = math.ceil(round(res["infer_runtime_min"] + res["runtime_margin"] * res["cost_s_per_mpx"]["infer_cams"]
                           * mpx / 60, 6))
    assert _runtimes(p.stdout)[("infer_cams", "variant=pnoc_ls, seed=0, split=train")] == want
