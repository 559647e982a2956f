"""Sharded inference (issue 13): shard slices, the gather, byte-identity with the unsharded stages, the DAG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import job_stats, snakemake
from fixtures import make_voc

from pnoc.affinity import make_affinity_labels, make_pseudo_masks, propagate, train_affinity
from pnoc.cam import infer_cams
from pnoc.io import DataError, write_image, write_json, write_mask
from pnoc.models.ccam import create_ccam
from pnoc.models.classifier import create_classifier
from pnoc.models.deeplab import build_segmenter
from pnoc.models.poolnet import create_poolnet
from pnoc.saliency import infer_poolnet, infer_saliency
from pnoc.segmentation import infer_segmentation
from pnoc.shards import gather, merge_info, parse_shard, shard_ids
from pnoc.training import save_weights

# every stage's Config field and Snakemake's shard wildcard: see workflow/rules/common.smk
SHARDED_STAGES = [infer_cams, infer_saliency, infer_poolnet, make_affinity_labels, propagate, make_pseudo_masks,
                  infer_segmentation]


# ------------------------------------------------------------------------------------------- shard_ids
def test_shard_ids_are_contiguous_balanced_slices_in_order():
    ids = [f"img{i}" for i in range(10)]
    parts = [shard_ids(ids, f"{k}of3") for k in (1, 2, 3)]
    assert parts == [ids[0:4], ids[4:7], ids[7:10]]
    assert shard_ids(ids, "1of1") == ids and shard_ids(ids) == ids
    for n in range(0, 12):
        for n_shards in range(1, 6):
            parts = [shard_ids(ids[:n], f"{k}of{n_shards}") for k in range(1, n_shards + 1)]
            assert sum(parts, []) == ids[:n]  # contiguous, in order, nothing lost or repeated
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert [shard_ids(["a", "b"], f"{k}of3") for k in (1, 2, 3)] == [["a"], ["b"], []]


@pytest.mark.parametrize("bad", ["0of3", "4of3", "3", "2/3", "of3", "1of0", "", "-1of2", "1 of 2", "aofb"])
def test_bad_shard_names_the_value_and_the_fix(bad):
    with pytest.raises(DataError) as e:
        shard_ids(["a"], bad)
    assert repr(bad) in str(e.value) and "kofK" in str(e.value) and "resources.shards" in str(e.value)


def test_every_per_image_stage_takes_a_shard():
    import dataclasses

    for stage in SHARDED_STAGES:
        field = {f.name: f for f in dataclasses.fields(stage.Config)}["shard"]
        assert field.default == "1of1", stage.__name__
    assert parse_shard(" 2of3 ") == (2, 3)


# ------------------------------------------------------------------------------------------- gather
def _shard(root: Path, name: str, files: dict[str, bytes], info: dict | None = None) -> Path:
    d = root / "x.shards" / name
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    if info is not None:
        write_json(d / "_info.json", info)
    return d


def test_gather_links_files_and_merges_summaries(tmp_path):
    info = {"stage": "s", "images": 2, "scales": [1.0], "seconds": 2.0, "walk_seconds": 1.0, "images_per_s": 1.0,
            "bytes_per_image": 10.0, "device": "cuda", "peak_gpu_allocated_mib": 100.0, "peak_gpu_reserved_mib": None}
    d1 = _shard(tmp_path, "1of2", {"a.npz": b"A", "b.npz": b"B", "sub/a.png": b"a"}, info)
    d2 = _shard(tmp_path, "2of2", {"c.npz": b"C", ".snakemake_timestamp": b"", "sub/c.png": b"c"},
                {**info, "images": 1, "seconds": 4.0, "walk_seconds": 0.5, "bytes_per_image": 40.0, "device": "cpu",
                 "peak_gpu_allocated_mib": 250.0})
    (d2 / ".c.npz.tmp.npz").write_bytes(b"half-written")  # hidden files are not gathered
    out = tmp_path / "x"
    res = gather(out, [d2, d1])  # any order
    assert res == {"shards": 2, "files": 5, "summaries": ["_info.json"]}
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    merged = json.loads(got.pop("_info.json"))
    assert got == {"a.npz": b"A", "b.npz": b"B", "c.npz": b"C", "sub/a.png": b"a", "sub/c.png": b"c"}
    assert (out / "a.npz").stat().st_ino == (d1 / "a.npz").stat().st_ino  # a hard link, no copy
    assert list(merged) == list(info)
    assert merged["images"] == 3 and merged["seconds"] == 6.0 and merged["walk_seconds"] == 1.5
    assert merged["images_per_s"] == pytest.approx(0.5)
    assert merged["bytes_per_image"] == pytest.approx(20.0)  # (2 * 10 + 1 * 40) / 3
    assert merged["scales"] == [1.0] and merged["stage"] == "s" and merged["device"] == ["cuda", "cpu"]
    assert merged["peak_gpu_allocated_mib"] == 250.0 and merged["peak_gpu_reserved_mib"] is None  # peaks: the largest


def test_merge_recomputes_ratios_from_summed_counts():
    spec = {"fraction_bg": ["bg", "pixels"], "precision": ["correct", "scored"]}
    a = {"images": 1, "fraction_bg": 0.5, "precision": None, "counts": {"bg": 1, "pixels": 2, "correct": 0, "scored": 0},
         "ratios": spec}
    b = {"images": 3, "fraction_bg": 0.25, "precision": 0.5, "counts": {"bg": 2, "pixels": 8, "correct": 1, "scored": 2},
         "ratios": spec}
    m = merge_info([a, b])
    assert m["counts"] == {"bg": 3, "pixels": 10, "correct": 1, "scored": 2}
    assert m["fraction_bg"] == 3 / 10 and m["precision"] == 1 / 2 and m["images"] == 4


def test_gather_refuses_overlap_missing_and_misnamed_shards(tmp_path):
    d1 = _shard(tmp_path, "1of3", {"a.png": b"1"})
    d2 = _shard(tmp_path, "2of3", {"a.png": b"2"})
    d3 = _shard(tmp_path, "3of3", {"c.png": b"3"})
    out = tmp_path / "x"
    with pytest.raises(DataError, match=r"a\.png is in shard folders .*1of3 and .*2of3"):
        gather(out, [d1, d2, d3])
    assert not out.exists()  # nothing half-gathered
    (d2 / "a.png").rename(d2 / "b.png")
    with pytest.raises(DataError, match=r"missing \['2of3'\]"):
        gather(out, [d1, d3])
    with pytest.raises(DataError, match="not a shard folder"):
        gather(out, [d1, d2, tmp_path / "x.shards"])
    with pytest.raises(DataError, match="different shard counts"):
        gather(out, [d1, d2, d3, _shard(tmp_path, "1of1", {})])
    d3.rename(tmp_path / "gone")
    with pytest.raises(DataError, match="3of3: shard folder missing"):
        gather(out, [d1, d2, d3])
    (tmp_path / "gone").rename(d3)
    write_json(d1 / "summary.json", {"images": 1})
    with pytest.raises(DataError, match="summary.json is in 1 of the 3 shard folders"):
        gather(out, [d1, d2, d3])
    (d1 / "summary.json").unlink()
    assert gather(out, [d1, d2, d3])["files"] == 3


def test_gather_command_line(tmp_path):
    d1 = _shard(tmp_path, "1of2", {"a.png": b"1"})
    d2 = _shard(tmp_path, "2of2", {"b.png": b"2"})
    cmd = [sys.executable, "-m", "pnoc.shards", "--out", str(tmp_path / "x"), "--shards"]
    p = subprocess.run([*cmd, str(d1), str(d2)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "x").iterdir()) == ["a.png", "b.png"]
    p = subprocess.run([*cmd, str(d1)], capture_output=True, text=True)
    assert p.returncode == 2 and "missing ['2of2']" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------------------- byte identity
K = 3
N_IMAGES = 7  # 3 shards of 3, 2, 2 images
BIG = {2, 5}  # images of a second size (32x32): batches of one size split differently by the shards


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A 7-image VOC split in two image sizes, with labels and masks."""
    root = make_voc(tmp_path_factory.mktemp("voc") / "VOC2012", splits={"train": N_IMAGES}, h=24, w=32)
    rng = np.random.default_rng(1)
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for i in BIG:
        write_image(root / "JPEGImages" / f"{ids[i]}.jpg", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        m = np.zeros((32, 32), np.uint8)
        m[4:20, 6:24] = 1 + i  # VOC class ids; the labels come from the XML (make_voc), masks are scored only
        write_mask(root / "SegmentationClass" / f"{ids[i]}.png", m)
    return root, ids


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sharded_vs_whole(run, make_cfg, tmp: Path, outputs=("out",)) -> dict:
    """Run a stage once unsharded and as K shards + gather; assert every per-image file is byte-identical.

    ``make_cfg(dirs, shard)`` builds the stage's Config writing to ``dirs`` (name -> folder).
    Returns {output name: (unsharded summaries, gathered summaries)}, JSON files of the folder by name.
    """
    whole = {o: tmp / "whole" / o for o in outputs}
    run(make_cfg(whole, "1of1"))
    shards = {o: [tmp / "sharded" / f"{o}.shards" / f"{k}of{K}" for k in range(1, K + 1)] for o in outputs}
    for k in range(K):
        run(make_cfg({o: shards[o][k] for o in outputs}, f"{k + 1}of{K}"))
    summaries = {}
    for o in outputs:
        gathered = tmp / "sharded" / o
        gather(gathered, shards[o])
        a, b = _tree(whole[o]), _tree(gathered)
        assert sorted(a) == sorted(b), (o, sorted(a), sorted(b))
        images = [n for n in a if not n.endswith(".json")]
        assert len(images) >= N_IMAGES, images
        diff = [n for n in images if a[n] != b[n]]
        assert not diff, f"{o}: sharded output differs from the unsharded one in {diff}"
        summaries[o] = ({n: json.loads(v) for n, v in a.items() if n.endswith(".json")},
                        {n: json.loads(v) for n, v in b.items() if n.endswith(".json")})
    return summaries


TIMINGS = ("seconds", "images_per_s")


def _assert_same_summary(whole: dict, gathered: dict) -> None:
    assert list(whole) == list(gathered)
    for key, value in whole.items():
        if key.endswith(TIMINGS) or key.startswith("peak_"):  # wall-clock and peak GPU memory differ between runs
            continue
        if isinstance(value, float):
            assert gathered[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert gathered[key] == value, key


@pytest.fixture(scope="module")
def cams(voc, tmp_path_factory):
    """CAMs of a tiny random classifier: unsharded vs sharded + gathered (byte-compared), the gathered folder."""
    root, _ = voc
    tmp = tmp_path_factory.mktemp("cams")
    torch.manual_seed(0)
    save_weights(tmp / "clf.pt", {"arch": {"backbone": "resnet18_w4", "n_classes": 20, "output_stride": 16},
                                  "model": create_classifier("resnet18_w4", 20, 16).state_dict()})
    summaries = _sharded_vs_whole(infer_cams.run, lambda d, shard: infer_cams.Config(
        "voc12", root, "train", tmp / "clf.pt", d["out"], scales=[1.0, 0.5], batch_size=3, device="cpu", threads=1,
        shard=shard), tmp)
    return tmp / "sharded" / "out", summaries["out"]


def test_infer_cams_sharded_is_byte_identical(cams):
    _, (whole, gathered) = cams
    _assert_same_summary(whole["_info.json"], gathered["_info.json"])
    assert gathered["_info.json"]["images"] == N_IMAGES


@pytest.fixture(scope="module")
def rw(voc, cams, tmp_path_factory):
    """Random-walk maps from the gathered CAMs and a tiny random AffinityNet, sharded vs unsharded."""
    root, _ = voc
    tmp = tmp_path_factory.mktemp("rw")
    torch.manual_seed(0)
    model, arch = train_affinity.build_model("backbone", None, "resnet18_w8", "none", 16, 8)
    save_weights(tmp / "aff.pt", {"arch": arch, "model": model.state_dict()})
    summaries = _sharded_vs_whole(propagate.run, lambda d, shard: propagate.Config(
        "voc12", root, "train", tmp / "aff.pt", cams[0], d["out"], radius=3, beta=4, exp_times=4, batch_size=3,
        device="cpu", threads=1, shard=shard), tmp)
    return tmp / "sharded" / "out", summaries["out"]


def test_random_walk_sharded_is_byte_identical(rw):
    _, (whole, gathered) = rw
    _assert_same_summary(whole["_info.json"], gathered["_info.json"])


def test_pseudo_masks_sharded_are_byte_identical(voc, rw, tmp_path):
    root, _ = voc
    summaries = _sharded_vs_whole(make_pseudo_masks.run, lambda d, shard: make_pseudo_masks.Config(
        "voc12", root, "train", rw[0], d["out"], crf=True, threads=1, shard=shard), tmp_path)
    assert summaries["out"] == ({}, {})


def test_affinity_labels_sharded_are_byte_identical_and_summary_equal(voc, cams, tmp_path):
    root, _ = voc
    summaries = _sharded_vs_whole(make_affinity_labels.run, lambda d, shard: make_affinity_labels.Config(
        "voc12", root, "train", cams[0], d["out"], method="classic", crf=True, crf_t=2, threads=1, shard=shard),
        tmp_path)
    whole, gathered = summaries["out"]
    _assert_same_summary(whole["summary.json"], gathered["summary.json"])  # the same but for the seconds it took
    assert whole["summary.json"]["precision_confident"] is not None


def test_saliency_poolnet_and_segmentation_sharded_are_byte_identical(voc, tmp_path):
    root, _ = voc
    torch.manual_seed(0)
    save_weights(tmp_path / "ccam.pt", {"arch": {"backbone": "resnet18_w4", "output_stride": 16},
                                        "model": create_ccam("resnet18_w4", 16).state_dict(),
                                        "direction": {"flip": False, "method": "test"}})
    s = _sharded_vs_whole(infer_saliency.run, lambda d, shard: infer_saliency.Config(
        "voc12", root, "train", tmp_path / "ccam.pt", d["raw"], d["pseudo"], scales=[1.0, 0.5], batch_size=3,
        crf_t=2, device="cpu", threads=1, shard=shard), tmp_path / "sal", outputs=("raw", "pseudo"))
    for o in ("raw", "pseudo"):
        _assert_same_summary(s[o][0]["_info.json"], s[o][1]["_info.json"])

    save_weights(tmp_path / "pn.pt", {"arch": {"backbone": "resnet18_w4", "output_stride": 16, "width": 8},
                                      "model": create_poolnet("resnet18_w4", 16, "none", 8).state_dict()})
    s = _sharded_vs_whole(infer_poolnet.run, lambda d, shard: infer_poolnet.Config(
        "voc12", root, "train", tmp_path / "pn.pt", d["out"], batch_size=3, flip=True, device="cpu", threads=1,
        shard=shard), tmp_path / "pn")
    _assert_same_summary(s["out"][0]["_info.json"], s["out"][1]["_info.json"])

    spec = {"arch": "deeplabv3plus", "backbone": "resnet18_w4", "n_classes": 21, "output_stride": 16,
            "widths": {"aspp_channels": 16, "decoder_low_channels": 8, "decoder_channels": 16}}
    save_weights(tmp_path / "seg.pt", {"arch": spec, "model": build_segmenter(spec).state_dict()})
    s = _sharded_vs_whole(infer_segmentation.run, lambda d, shard: infer_segmentation.Config(
        "voc12", root, "train", tmp_path / "seg.pt", d["out"], scales=[1.0, 0.5], submission=True, device="cpu",
        threads=1, shard=shard), tmp_path / "seg")
    _assert_same_summary(s["out"][0]["_info.json"], s["out"][1]["_info.json"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cams_and_walk_sharded_on_gpu_are_byte_identical(voc, tmp_path):
    """On a GPU the kernels may depend on the batch size; the shards' batches differ from the unsharded run's."""
    root, _ = voc
    torch.manual_seed(0)
    save_weights(tmp_path / "clf.pt", {"arch": {"backbone": "resnet18_w4", "n_classes": 20, "output_stride": 16},
                                       "model": create_classifier("resnet18_w4", 20, 16).state_dict()})
    _sharded_vs_whole(infer_cams.run, lambda d, shard: infer_cams.Config(
        "voc12", root, "train", tmp_path / "clf.pt", d["out"], scales=[1.0, 0.5], batch_size=3, device="cuda",
        shard=shard), tmp_path / "cams")
    model, arch = train_affinity.build_model("backbone", None, "resnet18_w8", "none", 16, 8)
    save_weights(tmp_path / "aff.pt", {"arch": arch, "model": model.state_dict()})
    _sharded_vs_whole(propagate.run, lambda d, shard: propagate.Config(
        "voc12", root, "train", tmp_path / "aff.pt", tmp_path / "cams" / "sharded" / "out", d["out"], batch_size=3,
        device="cuda", shard=shard), tmp_path / "rw")


# ------------------------------------------------------------------------------------------- the workflow
def _dry_run(tmp_path: Path, shards: int) -> tuple[dict, str]:
    res = tmp_path / "results"
    overlay = tmp_path / f"shards{shards}.yaml"
    overlay.write_text(yaml.safe_dump({"results": str(res), "dataset": {"root": f"{res}/dataset/synthetic"},
                                       "resources": {"shards": shards}}))
    p = snakemake(["-n", "-p", "--configfile", str(overlay)])
    return job_stats(p.stdout), p.stdout


STAGE_OF_GATHER = {"gather_cams": "infer_cams", "gather_saliency_raw": "infer_saliency",
                   "gather_saliency_pseudo": "infer_saliency", "gather_poolnet": "infer_poolnet",
                   "gather_affinity_labels": "make_affinity_labels", "gather_rw": "propagate",
                   "gather_pseudo_masks": "make_pseudo_masks", "gather_segmentation": "infer_segmentation"}


def test_dry_run_with_three_shards_plans_three_jobs_and_a_gather_per_folder(tmp_path):
    one, out1 = _dry_run(tmp_path, 1)
    assert not any(r.startswith("gather_") for r in one), one
    assert "--shard" not in out1 and ".shards/" not in out1
    three, out3 = _dry_run(tmp_path, 3)
    assert three["infer_cams"] == 3 * one["infer_cams"] and three["gather_cams"] == one["infer_cams"]
    for gather_rule, stage in STAGE_OF_GATHER.items():
        assert three[stage] == 3 * one[stage], (stage, one, three)
        assert three[gather_rule] == one[stage], (gather_rule, one, three)
    assert {r: n for r, n in three.items() if r not in STAGE_OF_GATHER and r not in STAGE_OF_GATHER.values()} == \
        {r: n for r, n in one.items() if r not in STAGE_OF_GATHER.values()}
    cams = f"{tmp_path}/results/cams/cam/seed0/train"
    for k in (1, 2, 3):
        assert f"--out-dir {cams}.shards/{k}of3 " in out3 and f"--shard {k}of3 2>" in out3
    assert f"python -m pnoc.shards --out {cams} --shards {cams}.shards/1of3 {cams}.shards/2of3 {cams}.shards/3of3" \
        in out3


@pytest.mark.slow
def test_snakemake_runs_the_shard_jobs_and_the_gather(tmp_path):
    """infer_cams in 3 shard jobs + gather_cams through Snakemake (upstream files made by hand, other rules
    not allowed): the CAM folder equals an unsharded run byte for byte, and the shard folders are gone."""
    root = make_voc(tmp_path / "voc", splits={"train": 7, "val": 2})
    res = tmp_path / "results"
    torch.manual_seed(0)
    save_weights(res / "classifier" / "seed0" / "model.pt", {
        "arch": {"backbone": "resnet18_w4", "n_classes": 20, "output_stride": 16},
        "model": create_classifier("resnet18_w4", 20, 16).state_dict()})
    write_json(res / "dataset" / "manifest" / "train" / "images.json", {})
    overlay = tmp_path / "over.yaml"
    overlay.write_text(yaml.safe_dump({"results": str(res), "dataset": {"name": "voc12", "root": str(root)},
                                       "resources": {"shards": 3, "threads": 1},
                                       "inference": {"scales": [1.0, 0.5], "batch_size": 3}}))
    cams = res / "cams" / "classifier" / "seed0" / "train"
    p = snakemake([str(cams), "--cores", "2", "--configfile", str(overlay), "--allowed-rules", "infer_cams",
                   "gather_cams"], cwd=tmp_path)
    assert job_stats(p.stdout) == {"infer_cams": 3, "gather_cams": 1}, p.stdout[-3000:]
    assert not (cams.parent / "train.shards").exists() or not any((cams.parent / "train.shards").iterdir())
    infer_cams.run(infer_cams.Config("voc12", root, "train", res / "classifier" / "seed0" / "model.pt",
                                     tmp_path / "whole", scales=[1.0, 0.5], batch_size=3, device="cpu", threads=1))
    got = {n: b for n, b in _tree(cams).items() if not n.startswith(".")}
    want = _tree(tmp_path / "whole")
    assert sorted(got) == sorted(want) and len(want) == 8
    assert all(got[n] == want[n] for n in want if n.endswith(".npz"))
    assert json.loads(got["_info.json"])["images"] == 7
