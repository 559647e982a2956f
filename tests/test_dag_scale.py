"""benchmarks/dag_scale.py (issue 25: orchestration at COCO's size) at a tiny scale: its trees are datasets in the
peers' structures that the check passes, and its Snakemake phases run, plan what they should and report it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

from pnoc.data.check_dataset import check_split

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "dag_scale.py"


def _module():
    return load_script(SCRIPT, "dag_scale")


def test_trees_are_the_peers_layouts_and_pass_the_check(tmp_path):
    mod = _module()
    coco = mod.build("coco14", tmp_path / "coco14", 0.0003, (48, 64))
    assert coco["counts"] == {"train2014": 25, "val2014": 12}
    voc = mod.build("voc12", tmp_path / "voc12", 0.002, (48, 64))
    assert voc["counts"] == {"train_aug": 21, "train": 3, "val": 3}
    expected = {
        ("coco14", "train2014"): ("train2014/", "coco_seg_anno/"), ("coco14", "val2014"): ("val2014/", "coco_seg_anno/"),
        ("voc12", "train_aug"): ("JPEGImages/", "SegmentationClassAug/"), ("voc12", "train"): ("JPEGImages/", "SegmentationClass/"),
        ("voc12", "val"): ("JPEGImages/", "SegmentationClass/"),
    }
    for (name, split), (images, masks) in expected.items():
        root = tmp_path / name
        for kind in ("images", "masks"):
            manifest, errors = check_split(name, root, split, kind, need_masks=True)
            assert errors == [], (name, split, kind, errors[:3])
        assert manifest["layout"]["images"].startswith(images.replace("train2014/", "{folder}/").replace(
            "val2014/", "{folder}/")), manifest["layout"]
        assert manifest["layout"]["masks"].startswith(masks), manifest["layout"]
        assert manifest["label_mask_agreement"]["disagree"] == 0
    assert "int" in check_split("coco14", tmp_path / "coco14", "val2014")[0]["layout"]["labels"]
    assert "IRN's format" in check_split("voc12", tmp_path / "voc12", "val")[0]["layout"]["labels"]
    # one file's bytes, linked: the tree costs little disk
    assert os.stat(tmp_path / "coco14" / "train2014" / "COCO_train2014_000000000001.jpg").st_nlink > 10
    # a tree of the same settings is reused, one of other settings rebuilt; a folder of someone else's is refused
    assert mod.build("coco14", tmp_path / "coco14", 0.0003, (48, 64)) == coco
    assert mod.build("coco14", tmp_path / "coco14", 0.0004, (48, 64))["counts"]["train2014"] == 33
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="not a tree of this script"):
        mod.build("voc12", tmp_path / "mine", 0.002, (48, 64))
    assert (tmp_path / "mine" / "keep.txt").is_file()
    # VOC with XML annotations instead of IRN's label file
    mod.build("voc12", tmp_path / "xml", 0.002, (48, 64), "xml")
    manifest, errors = check_split("voc12", tmp_path / "xml", "train_aug", "images")
    assert errors == [] and manifest["label_source"] == "Annotations"


def test_links_past_the_filesystem_limit_copy_the_file(tmp_path, monkeypatch):
    mod = _module()
    monkeypatch.setattr(mod, "LINKS_PER_INODE", 3)
    src = tmp_path / "src"
    src.write_bytes(b"x")
    for k in range(7):
        mod._link(src, tmp_path / f"l{k}")
    assert all((tmp_path / f"l{k}").read_bytes() == b"x" for k in range(7))
    assert {os.stat(tmp_path / f"l{k}").st_nlink for k in range(7)} <= {2, 3}


@pytest.mark.slow
def test_dag_scale_runs_at_tiny_scale(tmp_path):
    """The whole benchmark on a tiny COCO (37 images): every phase plans what it should (the script checks it
    and fails otherwise), and the table and JSON report each phase."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(SCRIPT), "--work", str(tmp_path / "w"), "--scale", "0.0003", "--datasets", "coco14",
           "--repeats", "1", "--image-size", "48x64", "--out", str(out)]
    here = tmp_path / "cwd"  # the folder it is started in: it must write nothing there (all goes under --work)
    here.mkdir()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=here, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert list(here.iterdir()) == [], sorted(map(str, here.rglob("*")))
    # the stand-in of the ImageNet weights (a relative output, weights/<file>) lies in snakemake's working folder
    assert {p.name for p in (tmp_path / "w" / "this-coco14" / "weights").iterdir()} >= {"resnest269-0cc87c48.pth"}
    r = json.loads(out.read_text())
    (run,) = r["results"]
    phases = run["phases"]
    assert list(phases) == ["dry run", "check", "up-to-date dry run", "up-to-date run", "changed val mask: dry run",
                            "touched val mask: dry run", "touched label file: dry run"]
    assert run["manifests"] == [f"{s}/{k}" for s in ("train2014", "val2014") for k in ("images", "masks")]
    assert phases["dry run"]["jobs"]["check_dataset"] == 4 and run["dag_jobs"] > 100  # the chain, 8 shards a rule
    assert phases["check"]["jobs"] == {"check_dataset": 4}
    assert phases["up-to-date dry run"]["nothing_to_do"] and phases["touched val mask: dry run"]["nothing_to_do"]
    assert phases["touched label file: dry run"]["nothing_to_do"]
    assert phases["changed val mask: dry run"]["jobs"] == {"check_dataset": 1, **run["val_mask_readers"]}
    for p in phases.values():
        assert p["s"] > 0 and p["cpu_s"] > 0 and p["rss_mb"] > 0 and p["tree_rss_mb"] > 0
    assert phases["dry run"]["target_s"] == 60 and phases["check"]["target_s"] == 600
    assert "| this coco14: check |" in res.stdout and "| ≤ 60 s |" in res.stdout
