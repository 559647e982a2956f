"""Model artifacts and resume states are read with ``torch.load(weights_only=True)`` (issue 14).

A crafted .pt file whose unpickling would run code is refused with a DataError naming the file,
and its code does not run; everything pnoc writes (artifacts, resume states with optimizer,
scheduler, GradScaler and RNG states) loads under weights_only=True and round-trips exactly.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT, venv_env
from fixtures import make_voc
from pnoc.io import DataError
from pnoc.models.backbones import create_backbone, load_backbone_weights
from pnoc.training import (Checkpointer, EpochRunner, load_weights, poly_scheduler, resave_trusted, safe_load,
                           save_weights)


class _Payload:
    """Unpickling this runs ``touch <sentinel>``: what a malicious checkpoint would do."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.sentinel))}",)


def _malicious(path: Path, sentinel: Path, **plain) -> Path:
    """A torch.save file that looks like a pnoc file (``plain`` keys) but carries the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**plain, "model": {"weight": torch.zeros(2)}, "extra": _Payload(sentinel)}, path)
    return path


def test_crafted_file_really_runs_code_when_fully_unpickled(tmp_path):
    """Control: the payload is live, so the refusals below are not vacuous."""
    sentinel = tmp_path / "ran"
    path = _malicious(tmp_path / "evil.pt", sentinel)
    torch.load(path, weights_only=False)
    assert sentinel.exists()


def test_load_weights_refuses_crafted_file_without_running_it(tmp_path):
    sentinel = tmp_path / "ran"
    path = _malicious(tmp_path / "model.pt", sentinel, arch={"backbone": "resnet18"})
    with pytest.raises(DataError) as err:
        load_weights(path)
    msg = str(err.value)
    assert msg.startswith(str(path))
    assert "refused to load" in msg and "tensors and plain metadata" in msg
    assert "system" in msg  # the short reason names what the file tried to call
    assert "rule that produces it" in msg
    assert not sentinel.exists()


def test_missing_model_file_message_kept(tmp_path):
    with pytest.raises(DataError, match="model file not found"):
        load_weights(tmp_path / "nope.pt")


def test_resume_state_refused_by_checkpointer_and_runner(tmp_path):
    sentinel = tmp_path / "ran"
    state_dir = tmp_path / "state"
    path = _malicious(state_dir / "last.pt", sentinel, _epoch=0, _config={})
    model = nn.Linear(2, 2)
    with pytest.raises(DataError) as err:
        Checkpointer(state_dir).restore(model=model)
    assert str(path) in str(err.value) and f"delete {state_dir}" in str(err.value)
    # the runner peeks at the state (mmap) before restoring: that read is safe too
    runner = EpochRunner(state_dir, {"epochs": "1"}, 1, 0, model=model)
    with pytest.raises(DataError, match=str(path)):
        next(iter(runner))
    assert not sentinel.exists()


def test_backbone_weights_file_refused(tmp_path):
    sentinel = tmp_path / "ran"
    path = _malicious(tmp_path / "imagenet.pth", sentinel)
    with pytest.raises(DataError, match=str(path)):
        load_backbone_weights(create_backbone("resnet18", 16, "none"), path)
    assert not sentinel.exists()


def test_truncated_file_named(tmp_path):
    path = tmp_path / "model.pt"
    save_weights(path, {"model": {"w": torch.zeros(1000)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable model file"):
        load_weights(path)


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), np.random.randn(3).tolist(), torch.rand(3).tolist()


def _tiny(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = poly_scheduler(opt, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    return model, opt, sched, scaler


def test_checkpoint_round_trip_under_weights_only(tmp_path):
    model, opt, sched, scaler = _tiny(0)
    for _ in range(2):
        loss = model(torch.randn(5, 3)).square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    random.seed(1)
    np.random.seed(1)
    np.random.randn(1)  # leaves a cached gaussian in numpy's state: that field must survive too
    torch.manual_seed(1)
    # values the stages really pass: a Path in the config, numpy scalars in the history
    config = {"epochs": "3", "root": tmp_path / "data"}
    history = [{"epoch": 1, "loss": np.float32(0.25), "n": np.int64(5), "ok": np.bool_(True)}]
    Checkpointer(tmp_path / "state", config).save(1, extra={"history": history},
                                                  model=model, opt=opt, sched=sched, scaler=scaler)
    expected = _draws()

    raw = torch.load(tmp_path / "state" / "last.pt", weights_only=True)  # the file itself is safe
    assert raw["_extra"]["history"] == [{"epoch": 1, "loss": 0.25, "n": 5, "ok": True}]
    assert type(raw["_extra"]["history"][0]["loss"]) is float

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    model2, opt2, sched2, scaler2 = _tiny(5)
    nxt, extra = Checkpointer(tmp_path / "state", config).restore(model=model2, opt=opt2, sched=sched2,
                                                                  scaler=scaler2)
    assert nxt == 2
    assert extra["history"] == [{"epoch": 1, "loss": 0.25, "n": 5, "ok": True}]
    assert _draws() == expected
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert sched2.state_dict() == sched.state_dict()
    assert scaler2.state_dict() == scaler.state_dict()


def test_artifact_metadata_made_plain(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    path = tmp_path / "model.pt"
    save_weights(path, {
        "arch": {"backbone": "resnet18", "n_classes": np.int64(3), "output_stride": 16,
                 "widths": {"aspp_rates": (6, 12, 18), "dropout": np.float32(0.5)}},
        "model": model.state_dict(), "classes": ["cat", "dog"], "masks_dir": tmp_path / "masks",
        "direction": {"flip": np.bool_(False), "correlation": np.float64(-0.25), "n_images": np.int64(4)},
        "histogram": np.arange(3, dtype=np.int32), "names": np.array(["a", "b"]), "source_model": None,
        "per_class": defaultdict(float, {np.int64(1): np.float64(0.5)}),
    })
    state = torch.load(path, weights_only=True)
    assert state["masks_dir"] == str(tmp_path / "masks") and type(state["masks_dir"]) is str
    assert type(state["arch"]["n_classes"]) is int and state["arch"]["n_classes"] == 3
    assert state["arch"]["widths"] == {"aspp_rates": (6, 12, 18), "dropout": 0.5}
    assert state["direction"] == {"flip": False, "correlation": -0.25, "n_images": 4}
    assert type(state["direction"]["flip"]) is bool
    assert torch.equal(state["histogram"], torch.arange(3, dtype=torch.int32))
    assert state["names"] == ["a", "b"]
    assert state["per_class"] == {1: 0.5} and type(state["per_class"]) is dict  # keys made plain too
    assert type(next(iter(state["per_class"]))) is int
    # the state dict keeps its per-module versions, and loads strictly
    assert state["model"]._metadata == model.state_dict()._metadata
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    fresh.load_state_dict(load_weights(path)["model"], strict=True)
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_unstorable_metadata_refused_at_save_time(tmp_path):
    """A custom object would make the artifact unloadable: refused before anything is written."""
    path = tmp_path / "model.pt"
    with pytest.raises(TypeError, match=r"\['arch'\]\['norm'\]"):
        save_weights(path, {"arch": {"norm": nn.BatchNorm2d}, "model": {}})
    assert not path.exists()


def test_old_resume_state_refused_then_converted(tmp_path):
    """A state of the previous format (numpy's RNG tuple holds an ndarray) is refused, with the fix that works."""
    model, opt, _, _ = _tiny(0)
    np.random.seed(3)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "_epoch": 0,
                "_rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                "_config": {"a": "1"}, "_extra": {"history": [{"loss": np.float64(1.5)}]}}, state_dir / "last.pt")
    expected = np.random.rand(2).tolist()
    with pytest.raises(DataError, match="resave_trusted") as err:
        Checkpointer(state_dir, {"a": "1"}).restore(model=model)
    assert "numpy" in str(err.value)  # the reason names the refused global

    resave_trusted(state_dir / "last.pt")
    np.random.seed(7)
    nxt, extra = Checkpointer(state_dir, {"a": "1"}).restore(model=model, opt=opt)
    assert nxt == 1 and extra == {"history": [{"loss": 1.5}]}
    assert np.random.rand(2).tolist() == expected


def test_safe_load_reads_plain_state_dicts(tmp_path):
    """Third-party weights (a bare state dict) pass unchanged."""
    sd = nn.Linear(2, 3).state_dict()
    torch.save(sd, tmp_path / "w.pth")
    out = safe_load(tmp_path / "w.pth", "weights file")
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


def test_stage_cli_refuses_crafted_model(tmp_path):
    """``python -m pnoc.cam.infer_cams`` on a crafted model: exit 2, the file named on stderr, no traceback."""
    root = make_voc(tmp_path / "VOC2012", n=2)
    sentinel = tmp_path / "ran"
    evil = _malicious(tmp_path / "classifier" / "model.pt", sentinel, arch={"backbone": "resnet18", "n_classes": 20})
    p = subprocess.run([sys.executable, "-m", "pnoc.cam.infer_cams", "--dataset", "voc12", "--root", str(root),
                        "--split", "train", "--model", str(evil), "--out-dir", str(tmp_path / "cams"),
                        "--device", "cpu", "--threads", "1"],
                       check=False, cwd=ROOT, env=venv_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert str(evil) in p.stderr and "refused to load" in p.stderr
    assert "Traceback" not in p.stderr
    assert not sentinel.exists()
    assert not (tmp_path / "cams").exists()
