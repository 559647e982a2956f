"""ImageNet weights: fetched once by the local rule fetch_weights (offline here: a loopback server or file://),
hash-checked, a corrupted file refused, an unreachable host told what to place where; the state dicts users
hold (torchvision, timm, zhanghang1989's ResNeSt releases, safetensors) load; and no training job downloads."""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, job_stats, snakemake, venv_env
from offline_weights import hub_name, offline_env, resnet18_release_bytes, serve, torch_bytes, weights_config

from pnoc.io import DataError
from pnoc.models.backbones import create_backbone, load_backbone_weights
from pnoc.models.pretrained import fetch, sidecar, verify

SNAKEFILE = str(ROOT / "Snakefile")


@pytest.fixture(scope="module")
def resnet18_release():
    return resnet18_release_bytes()


# ------------------------------------------------------------------------------ fetch and verify


def test_fetch_from_loopback_verifies_and_records(tmp_path, resnet18_release):
    name, data = resnet18_release
    out = tmp_path / "weights" / name
    with serve({"missing.pth": b"", "r18.pth": data}) as srv:
        info = fetch([srv.url("nothing-here.pth"), srv.url("r18.pth")], out)
    assert out.read_bytes() == data and info["url"].endswith("/r18.pth")
    digest = hashlib.sha256(data).hexdigest()
    assert sidecar(out).read_text() == f"{digest}  {name}\n" and info["sha256"] == digest
    assert sorted(p.name for p in out.parent.iterdir()) == [name, f"{name}.sha256"]  # no .part left
    assert verify(out) == digest


def test_fetch_by_file_url(tmp_path, resnet18_release):
    name, data = resnet18_release
    src = tmp_path / "mirror" / "r18.pth"
    src.parent.mkdir()
    src.write_bytes(data)
    info = fetch([src.as_uri()], tmp_path / "w" / name)
    assert info["url"] == src.as_uri() and (tmp_path / "w" / name).read_bytes() == data


def test_corrupted_download_refused_and_nothing_written(tmp_path, resnet18_release):
    name, data = resnet18_release
    out = tmp_path / "weights" / name
    bad = data[:-100] + b"\0" * 100
    with serve({"r18.pth": bad}) as srv:
        with pytest.raises(DataError) as e:
            fetch([srv.url("r18.pth")], out)
    msg = str(e.value)
    assert f"{srv.url('r18.pth')}: downloaded, but its sha256 {hashlib.sha256(bad).hexdigest()} does not match " \
           f"{name.split('-')[1][:8]}" in msg
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_unreachable_host_told_which_file_to_place_where(tmp_path, resnet18_release):
    name, data = resnet18_release
    out = tmp_path / "weights" / name
    with serve({}) as srv:
        url = srv.url(name)
    with pytest.raises(DataError) as e:  # the server is gone: connection refused
        fetch([url, "https://download.invalid/x.pth"], out, timeout=5)
    msg = str(e.value)
    assert url in msg and "download.invalid" in msg
    assert f"place the file by hand as\n  {out.resolve()}" in msg and f"file name {name} in folder {out.parent}" in msg
    # placed by hand: checked, recorded, not downloaded
    out.write_bytes(data)
    info = fetch([url], out)
    assert info["url"] == "placed by hand" and sidecar(out).is_file()
    out.write_bytes(data[:-1])
    sidecar(out).unlink()
    with pytest.raises(DataError, match=rf"{name}: sha256 \w+ does not match"):
        fetch([url], out)


def test_configured_full_sha256_wins_over_the_name(tmp_path):
    data = b"not a hub name"
    out = tmp_path / "plain.pth"
    out.write_bytes(data)
    assert verify(out) is None  # nothing says what it should be
    with pytest.raises(DataError, match="configured sha256"):
        verify(out, "0" * 64)
    assert verify(out, hashlib.sha256(data).hexdigest()) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ the state dicts users hold


def test_torchvision_release_loads_and_is_hash_checked(tmp_path, resnet18_release):
    name, data = resnet18_release
    path = tmp_path / name
    path.write_bytes(data)
    bb = create_backbone("resnet18", 16, path)
    ref = torch.load(io.BytesIO(data), weights_only=True)
    assert torch.equal(bb.net.conv1.weight, ref["conv1.weight"])
    assert torch.equal(bb.net.layer4[1].bn2.running_var, ref["layer4.1.bn2.running_var"])
    tampered = tmp_path / name.replace("resnet18", "copy")
    tampered.write_bytes(data[:-10] + b"\0" * 10)
    with pytest.raises(DataError, match="does not match"):
        load_backbone_weights(create_backbone("resnet18", 16, "none"), tampered)


def test_timm_safetensors_loads(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(1)
    sd = timm.create_model("resnet18").state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"))
    bb = create_backbone("resnet18", 8, tmp_path / "model.safetensors")
    assert torch.equal(bb.net.layer2[0].downsample[0].weight, sd["layer2.0.downsample.0.weight"])


def test_resnest_release_loads(tmp_path):
    """zhanghang1989's ResNeSt release files hold the key names of timm's resnest*e models (timm once loaded
    resnest269-0cc87c48.pth as its pretrained file, unfiltered): deep stem conv1.0..6, split-attention conv2.fc1,
    avg-down downsample.1/.2, and fc. A resnest50 state dict in that form loads into pnoc's resnest50."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    sd = timm.create_model("resnest50d").state_dict()
    assert {"conv1.0.weight", "conv1.6.weight", "layer1.0.conv2.fc1.weight", "layer2.0.downsample.1.weight",
            "fc.weight"} <= set(sd)
    data = torch_bytes(sd)
    path = tmp_path / hub_name("resnest50", data)
    path.write_bytes(data)
    bb = create_backbone("resnest50", 16, path)
    assert torch.equal(bb.net.layer3[2].conv2.fc2.weight, sd["layer3.2.conv2.fc2.weight"])


# ------------------------------------------------------------------------------ the workflow


def test_voc_dry_run_plans_weights_first_and_every_training_reads_the_file(tmp_path):
    """config/voc12.yaml on a tiny VOC folder: one local fetch_weights job per backbone (ResNeSt-269, PoolNet's
    ResNet-50), planned before any training, and every training rule reads its file (no job says imagenet)."""
    from fixtures import make_voc

    root = make_voc(tmp_path / "VOC2012", splits={"train_aug": 4, "train": 3, "val": 3})
    ov = tmp_path / "ov.yaml"
    ov.write_text(yaml.safe_dump({"results": str(tmp_path / "res"), "dataset": {"root": str(root)}}))
    p = snakemake(["-n", "-p", "--snakefile", SNAKEFILE, "--directory", str(tmp_path),
                   "--configfile", str(ROOT / "config" / "voc12.yaml"), str(ov)])
    assert job_stats(p.stdout)["fetch_weights"] == 2
    planned = re.findall(r"^(?:local)?rule (\w+):", p.stdout, re.M)
    first_training = min(planned.index(r) for r in planned if r.startswith("train_"))
    assert set(planned[:first_training]) >= {"fetch_weights"}, planned
    shells = [ln for ln in p.stdout.splitlines() if " -m pnoc." in ln]
    assert "--weights imagenet" not in p.stdout
    for module in ("cam.train_classifier", "saliency.train_ccam", "affinity.train_affinity",
                   "segmentation.train_segmentation", "saliency.train_poolnet"):
        lines = [ln for ln in shells if f"-m pnoc.{module} " in ln]
        file = "resnet50-0676ba61.pth" if "poolnet" in module else "resnest269-0cc87c48.pth"
        assert lines and all(f"--weights weights/{file}" in ln for ln in lines), (module, lines)
    fetch = [ln for ln in shells if "pnoc.data.fetch_weights" in ln]
    assert any("https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/resnest269-0cc87c48.pth"
               in ln for ln in fetch)


@pytest.mark.slow
def test_weights_fetched_once_then_no_job_downloads(smoke_run, tmp_path, resnet18_release):
    """The local run: fetch_weights downloads the file from a server that then closes; train_classifier reads it
    (nothing else could have served it), and the hub caches stay empty. Without the server, the run stops before
    training with the URL, the file name and the folder."""
    tmp, _, _ = smoke_run
    data_root = str(tmp / "results" / "dataset" / "synthetic")
    name, data = resnet18_release
    env = offline_env(tmp_path)
    with serve({"r18.pth": data}) as srv:
        url = srv.url("r18.pth")
    cfg = weights_config(tmp_path, data_root, name, url)
    target = str(tmp_path / "res" / "classifier" / "seed0" / "model.pt")
    p = snakemake([target, "--cores", "2", "--snakefile", SNAKEFILE, "--directory", str(tmp_path),
                   "--configfile", str(cfg)], env=env, check=False)
    assert p.returncode != 0 and "train_classifier" not in re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", p.stdout)
    log = (tmp_path / "res" / "logs" / "fetch_weights" / f"{name}.log").read_text()
    assert url in log and f"file name {name} in folder {tmp_path / 'weights'}" in log
    with serve({"r18.pth": data}, max_requests=1) as srv:
        cfg = weights_config(tmp_path, data_root, name, srv.url("r18.pth"))
        p = snakemake([target, "--cores", "2", "--snakefile", SNAKEFILE, "--directory", str(tmp_path),
                       "--configfile", str(cfg)], env=env)
        assert srv.requests == ["/r18.pth"]
    stats = job_stats(p.stdout)
    assert stats["fetch_weights"] == 1 and stats["train_classifier"] == 1
    assert "loaded backbone weights from " + str(tmp_path / "weights" / name) in \
        (tmp_path / "res" / "logs" / "train_classifier" / "seed0.log").read_text()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert (tmp_path / "weights" / f"{name}.sha256").is_file()


def test_rules_run_pnoc_with_the_python_that_runs_snakemake(tmp_path):
    """`.venv/bin/snakemake` without the venv on PATH (no `python` with torch there): the rules still run pnoc."""
    from fixtures import make_voc

    root = make_voc(tmp_path / "VOC2012", splits={"train": 2, "val": 2})
    ov = tmp_path / "ov.yaml"
    ov.write_text(yaml.safe_dump({"results": str(tmp_path / "res"), "dataset": {"name": "voc12", "root": str(root)}}))
    env = {k: v for k, v in venv_env().items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin"
    exe = Path(sys.executable).parent / "snakemake"  # the venv's own script, its shebang the venv's python
    target = str(tmp_path / "res" / "dataset" / "manifest" / "val" / "masks.json")
    p = snakemake([target, "--cores", "1", "--snakefile", SNAKEFILE, "--directory", str(tmp_path),
                   "--configfile", str(ov)], env=env, executable=str(exe))
    assert job_stats(p.stdout)["check_dataset"] == 1 and Path(target).is_file()


def test_snakemake_without_torch_stops_before_any_job(tmp_path):
    """An interpreter that cannot import torch: the Snakefile stops at parse time and says to activate the venv."""
    shadow = tmp_path / "shadow"
    (shadow / "torch").mkdir(parents=True)
    (shadow / "torch" / "__init__.py").write_text("raise ImportError('No module named torch (shadowed by the test)')\n")
    env = venv_env()
    env["PYTHONPATH"] = str(shadow) + os.pathsep + env.get("PYTHONPATH", "")
    p = snakemake(["-n", "--snakefile", SNAKEFILE, "--directory", str(tmp_path)], env=env, check=False)
    assert p.returncode != 0
    assert "cannot import torch" in p.stdout and "source .venv/bin/activate" in p.stdout, p.stdout[-3000:]
