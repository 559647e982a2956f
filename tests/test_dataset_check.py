"""Your own data: the custom adapter, rule check_dataset and its manifest, the bad-input corpus
(tests/bad_inputs.py), the synthetic generator's own-folder rule, and the config overlays."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from bad_inputs import CUSTOM_CLASSES, FAULTS, Evil, make_custom_dataset
from conftest import ROOT, job_stats, snakemake, venv_env

from pnoc.data.check_dataset import (MAX_LISTED, check_split, checked_record, dataset_files, dataset_fingerprint,
                                     format_errors)
from pnoc.data.datasets import WSSSDataset, read_classes
from pnoc.io import DataError, load_label_dict

SNAKEFILE = str(ROOT / "Snakefile")
# a space and a quote in every path the workflow tests use: every rule must quote what it passes on
ODD = "my data 'set'"


@pytest.fixture(scope="module")
def custom_root(tmp_path_factory) -> Path:
    return make_custom_dataset(tmp_path_factory.mktemp("custom") / ODD)


def _copy(root: Path, tmp: Path) -> Path:
    dst = tmp / ODD
    shutil.copytree(root, dst)
    return dst


# ------------------------------------------------------------------------------ the adapter


def test_classes_file_background_first_or_implied(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("background\ncat\n\ndog\n")
    assert read_classes(p) == ["cat", "dog"]
    p.write_text("cat\ndog\n")
    assert read_classes(p) == ["cat", "dog"]
    p.write_text("cat\ncat\n")
    with pytest.raises(DataError, match=r"classes.txt: class names \['cat'\] appear more than once"):
        read_classes(p)
    with pytest.raises(DataError, match=r"missing\.txt: missing; a custom dataset lists its class names"):
        read_classes(tmp_path / "missing.txt")


@pytest.mark.parametrize("source,expected", [("npy", "cls_labels.npy"), ("xml", "Annotations"), ("masks", "masks")])
def test_custom_labels_agree_across_sources(tmp_path, source, expected):
    """cls_labels.npy, VOC XML and labels derived from the masks give the same labels; label_source says which."""
    ref = WSSSDataset("custom", make_custom_dataset(tmp_path / "ref", n_train=6, n_val=3), "train")
    ds = WSSSDataset("custom", make_custom_dataset(tmp_path / source, n_train=6, n_val=3, labels=source), "train")
    assert ds.classes == CUSTOM_CLASSES and ds.label_source == expected
    for i in ds.ids:
        np.testing.assert_array_equal(ds.labels(i), ref.labels(i))
    assert sum(ds.labels(i).sum() for i in ds.ids) >= len(ds.ids)


def test_voc_name_on_other_classes_names_file_and_fix(custom_root):
    """An 8-class dataset read as voc12 (20 classes): the error names cls_labels.npy and points to custom."""
    with pytest.raises(DataError) as e:
        WSSSDataset("voc12", custom_root, "train").labels("train_0000")
    msg = str(e.value)
    assert "cls_labels.npy" in msg and "3 entries" in msg and "20 classes" in msg and "dataset.name: custom" in msg


def test_label_pickle_is_read_without_running_code(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, {"a": np.array([0, 1], np.float32), "b": np.array([1, 0])})
    assert {k: v.tolist() for k, v in load_label_dict(good).items()} == {"a": [0.0, 1.0], "b": [1, 0]}
    bad = tmp_path / "bad.npy"
    sentinel = tmp_path / "PWNED"
    np.save(bad, np.array({"a": Evil(str(sentinel))}, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"bad\.npy: refused to load .*os\.makedirs|bad\.npy: refused to load"):
        load_label_dict(bad)
    assert not sentinel.exists(), "unpickling ran the file's code"


def test_wrong_size_mask_is_a_named_error_in_every_reader(custom_root, tmp_path):
    """Not only the check: a stage reading a mask of another size than its image names the mask (it used to be
    an IndexError deep in the evaluation)."""
    from pnoc.evaluation import evaluate_mask_folder

    root = _copy(custom_root, tmp_path)
    FAULTS["wrong_size_mask"].apply(root)
    ds = WSSSDataset("custom", root, "val")
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in ds.ids:
        shutil.copyfile(root / "SegmentationClass" / f"{i}.png", preds / f"{i}.png")
    with pytest.raises(DataError, match=r"val_0002\.png: mask size 64x72 differs from its image 56x72"):
        evaluate_mask_folder(ds, preds)


# ------------------------------------------------------------------------------ check_split


def test_check_split_sound_dataset_and_manifest(custom_root):
    images, errors = check_split("custom", custom_root, "val", "images")
    assert errors == []
    assert images["n_images"] == 8 and images["masks"] == 0 and images["label_source"] == "cls_labels.npy"
    assert images["classes"] == CUSTOM_CLASSES and sum(images["images_per_class"].values()) >= 8
    assert set(images["files"]) == {"ImageSets/Segmentation/val.txt", "classes.txt", "cls_labels.npy"} | {
        f"JPEGImages/val_{k:04d}.jpg" for k in range(8)}
    masks, errors = check_split("custom", custom_root, "val", "masks", need_masks=True)
    assert errors == [] and masks["masks"] == 8
    # the masks check compares each mask with the image's labels: the label file is one of its files too
    assert set(masks["files"]) == {"ImageSets/Segmentation/val.txt", "classes.txt", "cls_labels.npy"} | {
        f"{d}/val_{k:04d}.{e}" for k in range(8) for d, e in (("JPEGImages", "jpg"), ("SegmentationClass", "png"))}
    st = (custom_root / "JPEGImages" / "val_0000.jpg").stat()
    assert masks["files"]["JPEGImages/val_0000.jpg"] == [st.st_size, st.st_mtime_ns]
    # the DAG inputs of each check are exactly the files of its manifest
    for kind, manifest in (("images", images), ("masks", masks)):
        inputs = dataset_files("custom", custom_root, "val", kind)
        assert sorted(os.path.relpath(p, custom_root) for p in inputs) == sorted(manifest["files"])


def test_labels_from_masks_make_the_masks_inputs_of_the_images_check(tmp_path):
    root = make_custom_dataset(tmp_path / "m", n_train=4, n_val=3, labels="masks")
    images, errors = check_split("custom", root, "val", "images")
    assert errors == [] and images["label_source"] == "masks" and images["masks"] == 3
    assert sorted(os.path.relpath(p, root) for p in dataset_files("custom", root, "val")) == sorted(images["files"])


def test_fingerprint_changes_with_the_bytes_not_the_mtime(custom_root, tmp_path):
    """The check's params.fingerprint (what Snakemake reruns it on): other bytes, an added or a removed file change
    it; a file touched or copied back with the bytes the last check recorded does not, before and after the
    check that records the new time."""
    root = _copy(custom_root, tmp_path)
    record = tmp_path / "checked.json"

    def fp():
        return dataset_fingerprint("custom", root, "val", "masks", record)

    def check():  # what rule check_dataset records on success
        manifest, errors = check_split("custom", root, "val", "masks", need_masks=True)
        assert errors == []
        previous = json.loads(record.read_text())["files"] if record.exists() else None
        record.write_text(json.dumps(checked_record(root, manifest["files"], 1, previous)))
        return manifest

    first = fp()
    manifest = check()
    assert first == fp() and first.startswith(f"{len(manifest['files'])} files, sha256 ")
    mask = root / "SegmentationClass" / "val_0002.png"
    original = mask.read_bytes()
    os.utime(mask, ns=(1, 10**18))  # touched
    assert fp() == first
    mask.unlink()
    assert fp() != first  # removed
    mask.write_bytes(original)  # copied back: the same bytes, a new mtime
    assert fp() == first
    check()  # a check after the touch records the new time: still the fingerprint it ran with
    assert fp() == first
    from PIL import Image

    with Image.open(mask) as im:
        a, pal = np.array(im), im.getpalette()
    a[:2, :2] = 255
    corrected = Image.fromarray(a, mode="P")
    corrected.putpalette(pal)
    corrected.save(mask)  # other bytes
    assert fp() != first
    mask.write_bytes(original)
    assert fp() == first  # the check never ran on the other bytes: back to what it ran with
    corrected.save(mask)
    planned = fp()
    check()
    assert fp() == planned  # the fingerprint Snakemake ran the check with: nothing more to do
    mask.write_bytes(original)
    assert fp() not in (first, planned)  # ... and now the original bytes are other bytes
    back = fp()
    (root / "SegmentationClass" / "val_0099.png").write_bytes(original)
    assert fp() == back  # not a file of the split
    lst = root / "ImageSets" / "Segmentation" / "val.txt"
    lst.write_text(lst.read_text() + "train_0001\n")
    assert fp() != back  # added: an image and its mask


def test_masks_optional_where_the_split_is_not_evaluated(custom_root, tmp_path):
    root = _copy(custom_root, tmp_path)
    (root / "SegmentationClass" / "train_0001.png").unlink()
    assert check_split("custom", root, "train", "masks", need_masks=False)[1] == []
    _, errors = check_split("custom", root, "train", "masks", need_masks=True)
    assert len(errors) == 1 and "SegmentationClass/train_0001.png: ground-truth mask of train_0001 not found" in errors[0]


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_fault_is_named_by_check(custom_root, tmp_path, name):
    """Each fault of the corpus: the check lists an error naming the culprit file (accepted inputs: none);
    after the fix the split is sound again."""
    fault = FAULTS[name]
    root = _copy(custom_root, tmp_path)
    fault.apply(root)
    if fault.at_plan:
        with pytest.raises(DataError, match=re.escape(str(root / fault.culprit))):
            dataset_files("custom", root, fault.split, fault.kind)
    manifest, errors = check_split("custom", root, fault.split, fault.kind, need_masks=True, threads=1)
    if fault.accepted:
        assert errors == [], errors
    else:
        assert errors and any(str(root / fault.culprit) in e for e in errors), errors
        assert len(errors) == 1, errors  # one fault, one error (not one per image)
    assert not (root / "PWNED").exists()
    fault.fix(root)
    for kind in ("images", "masks"):
        assert check_split("custom", root, fault.split, kind, need_masks=True)[1] == []


def test_all_errors_listed_at_once(custom_root, tmp_path):
    root = _copy(custom_root, tmp_path)
    for name in ("truncated_jpeg", "duplicate_list_entry", "image_without_labels"):
        FAULTS[name].apply(root)
    _, errors = check_split("custom", root, "train")
    assert len(errors) == 3, errors
    many = [f"e{k}" for k in range(MAX_LISTED + 5)]
    text = format_errors(many, "dataset X split 'train'")
    assert text.startswith("dataset X split 'train': 25 problem(s); nothing was written, fix them and rerun:\n  - e0\n")
    assert text.endswith(f"  - e{MAX_LISTED - 1}\n  ... and 5 more")


def test_check_cli_fails_and_writes_nothing(custom_root, tmp_path):
    root = _copy(custom_root, tmp_path)
    FAULTS["wrong_size_mask"].apply(root)
    out = tmp_path / "res" / "val.json"
    p = subprocess.run([sys.executable, "-m", "pnoc.data.check_dataset", "--dataset", "custom", "--root", str(root),
                        "--split", "val", "--kind", "masks", "--need-masks", "true", "--out", str(out)],
                       capture_output=True, text=True, env=venv_env())
    assert p.returncode == 2 and "SegmentationClass/val_0002.png: mask size 64x72 differs from its image 56x72" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


# ------------------------------------------------------------------------------ the generator


def test_generator_refuses_a_folder_it_did_not_create(custom_root, tmp_path):
    root = _copy(custom_root, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    p = subprocess.run([sys.executable, "-m", "pnoc.data.make_dataset", "--out", str(root), "--n-train", "8",
                        "--n-val", "4", "--image-size", "48", "--n-classes", "4"],
                       capture_output=True, text=True, env=venv_env())
    assert p.returncode == 2 and "was not created by the synthetic generator" in p.stderr, p.stderr
    assert {q: q.stat().st_mtime_ns for q in root.rglob("*")} == before, "the user's folder was modified"


def test_generator_rewrites_its_own_folder(tmp_path):
    from pnoc.data.synthetic import OWNER_MARKER, SyntheticConfig, generate

    cfg = SyntheticConfig(n_train=8, n_val=4, image_size=48, n_classes=4)
    generate(tmp_path / "syn", cfg)
    generate(tmp_path / "syn", cfg)  # its own folder (the mark is there): regenerated
    assert (tmp_path / "syn" / OWNER_MARKER).is_file()
    assert read_classes(tmp_path / "syn" / "classes.txt") == cfg.classes
    # and the generated folder reads as a custom dataset too
    assert check_split("custom", tmp_path / "syn", "val", "masks", need_masks=True)[1] == []
    assert check_split("custom", tmp_path / "syn", "val", "images")[1] == []


# ------------------------------------------------------------------------------ config overlays


def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_cpu_overlay_is_the_demo_for_every_key_the_gpu_configs_set():
    base = dict(_leaves(yaml.safe_load((ROOT / "config.yaml").read_text())))
    cpu = dict(_leaves(yaml.safe_load((ROOT / "config" / "cpu.yaml").read_text())))
    assert cpu and all(base[k] == v for k, v in cpu.items()), {k: (base[k], v) for k, v in cpu.items() if base[k] != v}
    for name in ("voc12", "coco14", "custom"):
        gpu = dict(_leaves(yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())))
        missing = {k for k in gpu if k[0] not in ("dataset", "results")} - set(cpu)
        assert not missing, f"config/cpu.yaml does not shrink {sorted(missing)} of {name}.yaml"


def test_custom_config_is_voc12_below_the_dataset():
    voc = dict(_leaves(yaml.safe_load((ROOT / "config" / "voc12.yaml").read_text())))
    cus = dict(_leaves(yaml.safe_load((ROOT / "config" / "custom.yaml").read_text())))
    assert cus[("dataset", "name")] == "custom"
    own = {"dataset", "results", "seeds"}
    assert {k: v for k, v in cus.items() if k[0] not in own} == {k: v for k, v in voc.items() if k[0] not in own}


# ------------------------------------------------------------------------------ workflow level


def _config(tmp: Path, root: Path) -> Path:
    cfg = tmp / "paths.yaml"
    cfg.write_text(yaml.safe_dump({"results": str(tmp / f"res {ODD}"), "dataset": {"root": str(root)}}))
    return cfg


MANIFESTS = [f"{s}/{k}" for s in ("train", "val") for k in ("images", "masks")]


def _check_targets(tmp: Path, root: Path, cfg: Path, *extra) -> subprocess.CompletedProcess:
    res = tmp / f"res {ODD}"
    wd = tmp / "wd"
    wd.mkdir(exist_ok=True)
    targets = [str(res / "dataset" / "manifest" / f"{m}.json") for m in MANIFESTS]
    return snakemake([*targets, "--cores", "2", "--snakefile", SNAKEFILE, "--configfile",
                      str(ROOT / "config" / "custom.yaml"), str(ROOT / "config" / "cpu.yaml"), str(cfg), *extra],
                     cwd=wd, check=False, timeout=300)


def _ran(p: subprocess.CompletedProcess) -> set[str]:
    """Manifests ("<split>/<kind>") whose check job started in a snakemake run."""
    return {f"{s}/{k}" for s, k in re.findall(r"wildcards: split=(\w+), kind=(\w+)", p.stdout)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAULTS))
def test_fault_through_snakemake_then_fix_reruns_only_what_it_touched(custom_root, tmp_path, name):
    """Through snakemake: the fault fails the run (exit status, the culprit named in the output, no manifest
    or temporary file left for the failed check, manifests of untouched files kept); after the fix the rerun
    succeeds and rebuilds only manifests whose files the fault and fix touched; a third run does nothing."""
    fault = FAULTS[name]
    root = _copy(custom_root, tmp_path)
    cfg = _config(tmp_path, root)
    first = _check_targets(tmp_path, root, cfg)
    assert first.returncode == 0 and _ran(first) == set(MANIFESTS), first.stdout[-3000:]
    res = tmp_path / f"res {ODD}"
    man = {m: res / "dataset" / "manifest" / f"{m}.json" for m in MANIFESTS}
    kept = {m: man[m].stat().st_mtime_ns for m in MANIFESTS if m not in fault.reruns}

    fault.apply(root)
    run = _check_targets(tmp_path, root, cfg)
    if fault.accepted:
        assert run.returncode == 0, run.stdout[-3000:]
        assert _ran(run) == fault.reruns, run.stdout[-3000:]
    else:
        assert run.returncode != 0, run.stdout[-3000:]
        assert f"{root / fault.culprit}: " in run.stdout, run.stdout[-4000:]  # the message, not the input list
        if fault.at_plan:  # the dry run already fails: no job starts, so nothing is written or removed
            assert _ran(run) == set(), run.stdout[-4000:]
        else:  # snakemake stops at the first failed check; which of the affected ones runs first varies
            assert _ran(run) and _ran(run) <= fault.reruns, (_ran(run), run.stdout[-3000:])
            assert [m for m in _ran(run) if not man[m].exists()], "a manifest was left for a failed check"
        assert not [p for p in res.rglob("*") if ".tmp" in p.name], "a temporary file was left in results"
    assert {m: man[m].stat().st_mtime_ns for m in kept} == kept, "a manifest of untouched files was rebuilt"
    assert not (root / "PWNED").exists()

    fault.fix(root)
    rerun = _check_targets(tmp_path, root, cfg)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    # the fix puts the original bytes back. Snakemake compares the checksums of small inputs with those
    # recorded at the last run of each check: what ran on the broken file reruns (a failed check has no
    # manifest), a check that never saw the broken file does not
    assert _ran(rerun) == (fault.reruns if fault.accepted else _ran(run)), (_ran(run), _ran(rerun))
    assert {m: man[m].stat().st_mtime_ns for m in kept} == kept
    again = _check_targets(tmp_path, root, cfg)
    assert "Nothing to be done" in again.stdout and _ran(again) == set(), "an unchanged dataset reran the check"


# ------------------------------------------------------------------------------ the custom chain end to end


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """The whole chain on a custom dataset (VOC XML labels) at smoke size, with a space and a quote in the
    dataset root and in the results folder: config/custom.yaml + config/cpu.yaml + smoke sizes."""
    tmp = tmp_path_factory.mktemp("custom_chain")
    root = make_custom_dataset(tmp / ODD, n_train=48, n_val=16, labels="xml")
    smoke = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    smoke["results"] = str(tmp / f"res {ODD}")
    smoke["dataset"] = {"name": "custom", "root": str(root), "train_split": "train", "eval_split": "train",
                        "val_split": "val"}
    cfg = tmp / "sizes.yaml"
    cfg.write_text(yaml.safe_dump(smoke))
    args = ["--snakefile", SNAKEFILE, "--configfile", str(ROOT / "config" / "custom.yaml"),
            str(ROOT / "config" / "cpu.yaml"), str(cfg)]
    wd = tmp / "wd"
    wd.mkdir()
    p = snakemake(["--cores", "2", *args], cwd=wd, timeout=1500)
    return tmp / f"res {ODD}", root, args, wd, p


@pytest.mark.slow
def test_custom_chain_runs_end_to_end_with_odd_paths(custom_run):
    res, root, _, _, p = custom_run
    summary = json.loads((res / "summary.json").read_text())
    rows = {(r["stage"], r["variant"], r["split"]): r["miou"] for r in summary["rows"]}
    print("[custom chain] mIoU " + ", ".join(f"{'/'.join(k)} {100 * v:.1f}" for k, v in sorted(rows.items())))
    assert summary["dataset_root"] == str(root)
    assert any(k[0] == "priors" for k in rows) and any(k[0] == "segmentation" for k in rows)
    # three classes + background at smoke size: far above marking everything background (mIoU ~ 0.2), so
    # the chain learned from the custom labels
    prior = max(v for k, v in rows.items() if k[0] == "priors")
    assert prior > 0.30, rows
    manifest = json.loads((res / "dataset" / "manifest" / "train" / "images.json").read_text())
    assert manifest["label_source"] == "Annotations" and manifest["classes"] == CUSTOM_CLASSES
    assert "check_dataset" in p.stdout


@pytest.mark.slow
def test_corrected_val_mask_reruns_only_val_evaluations(custom_run, tmp_path):
    """A changed val mask (labels from a label file): snakemake -n plans the val masks check and the
    evaluations that read val masks (and the tables and reports built on them), no training and no
    inference; an unchanged (touched) file plans nothing."""
    res, root, args, wd, _ = custom_run
    assert "Nothing to be done" in snakemake(["-n", *args], cwd=wd).stdout
    mask = root / "SegmentationClass" / "val_0003.png"
    original = mask.read_bytes()
    os.utime(mask)  # same bytes, new mtime: the checksum says unchanged
    assert "Nothing to be done" in snakemake(["-n", *args], cwd=wd).stdout
    from PIL import Image

    try:
        with Image.open(mask) as im:
            a, pal = np.array(im), im.getpalette()
        a[:2, :2] = 255  # a corrected corner
        out = Image.fromarray(a, mode="P")
        out.putpalette(pal)
        out.save(mask)
        plan = job_stats(snakemake(["-n", *args], cwd=wd).stdout)
        print(f"[custom chain] a changed val mask plans {plan}")
        assert plan.get("check_dataset") == 1
        assert not [r for r in plan if r.startswith(("train_", "infer_", "pretrain", "propagate", "make_"))], plan
        assert {r for r in plan if r.startswith("evaluate_")} >= {"evaluate_priors", "evaluate_segmentation"}
    finally:
        mask.write_bytes(original)
