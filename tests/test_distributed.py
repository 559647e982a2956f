"""Data-parallel training (pnoc.distributed): the global batch, item seeds, and DDP on the CPU (gloo).

The process-level tests run the stages' real entry points under ``torchrun --standalone
--nproc_per_node 2`` (two ranks on the CPU with the gloo backend) and compare them with one process at
the same global batch. BatchNorm is frozen for those comparisons (tests/ddp_worker.py): SyncBatchNorm
needs CUDA, and unsynchronised BN statistics would differ by design.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures import make_voc
from pnoc.distributed import Distributed, GlobalBatchSampler, item_rng, item_seed, split_key
from pnoc.io import DataError
from pnoc.training import safe_load

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "ddp_worker.py"


# ---------------------------------------------------------------------------- pure functions
def test_global_batches_are_the_union_of_the_rank_slices():
    single = list(GlobalBatchSampler(10, 4, 0, 1, seed=3, epoch=1))
    r0 = list(GlobalBatchSampler(10, 4, 0, 2, seed=3, epoch=1))
    r1 = list(GlobalBatchSampler(10, 4, 1, 2, seed=3, epoch=1))
    assert len(single) == len(r0) == len(r1) == 2  # drop_last: 10 // 4
    for whole, a, b in zip(single, r0, r1):
        assert len(a) == len(b) == 2
        assert whole == a + b  # rank 0 takes the first half of each global batch, rank 1 the second
    g = torch.Generator()
    g.manual_seed(3 * 100003 + 1)
    order = torch.randperm(10, generator=g).tolist()
    assert [i for i, _ in single[0] + single[1]] == order[:8]
    # the item seed depends on (seed, epoch, index) only
    assert all(s == item_seed(3, 1, i) for i, s in single[0])
    assert item_seed(3, 1, 5) != item_seed(3, 2, 5) != item_seed(4, 1, 5)


def test_short_dataset_keeps_its_only_batch_split_evenly():
    ranks = [list(GlobalBatchSampler(5, 8, r, 2, seed=0, epoch=0)) for r in range(2)]
    assert [len(b[0]) for b in ranks] == [3, 2]
    assert sorted(i for b in ranks for i, _ in b[0]) == list(range(5))


def test_batch_not_divisible_names_the_key():
    with pytest.raises(DataError, match=r"batch_size=6 is not divisible by resources.gpus_per_job=4"):
        Distributed(world=4).per_rank(6)
    with pytest.raises(DataError, match="resources.gpus_per_job"):
        GlobalBatchSampler(10, 6, 0, 4, seed=0, epoch=0)


def test_item_rng_is_independent_of_what_ran_before():
    torch.manual_seed(1)
    with item_rng(42):
        a = torch.rand(3)
    torch.rand(100)  # other draws in between (another worker, another rank)
    with item_rng(42):
        b = torch.rand(3)
    assert torch.equal(a, b)
    before = torch.get_rng_state()
    with item_rng(7):
        torch.rand(5)
    assert torch.equal(before, torch.get_rng_state())  # the caller's stream is untouched
    assert split_key((4, 9)) == (4, 9) and split_key(4) == (4, None)


def test_shared_draws_do_not_depend_on_the_process_count():
    one = Distributed()
    two = [Distributed(rank=r, world=2) for r in range(2)]
    for d in (one, *two):
        d.shared.manual_seed(11)
    whole = one.shared_rand(4, 3)
    halves = torch.cat([d.shared_rand(2, 3) for d in two])
    assert torch.equal(whole, halves)


# ---------------------------------------------------------------------------- two processes (gloo)
def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(module: str, args: list[str], procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, str(WORKER), module, *args]
    torchrun = shutil.which("torchrun", path=_env()["PATH"])
    return [torchrun, "--standalone", "--nproc_per_node", str(procs), str(WORKER), module, *args]


def _run(module: str, args: list[str], procs: int, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(_launch(module, args, procs), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{module} with {procs} process(es) failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


TINY = ["--backbone", "resnet18_w8", "--output-stride", "8", "--crop", "32", "--resize-min", "28", "--resize-max",
        "40", "--batch-size", "4", "--lr", "0.05", "--threads", "1"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = make_voc(tmp_path_factory.mktemp("ddp") / "VOC2012", splits={"train": 12, "val": 4}, h=32, w=40)
    return ["--dataset", "voc12", "--root", str(root)]


def _classifier(tmp: Path, voc: list[str], procs: int, epochs: int = 2, tag: str = "") -> tuple[Path, dict]:
    out = tmp / f"classifier{procs}{tag}"
    _run("pnoc.cam.train_classifier", [*voc, *TINY, "--epochs", str(epochs), "--out", str(out / "model.pt"),
                                       "--metrics", str(out / "metrics.json"), "--state-dir", str(out / "state")],
         procs)
    return out / "model.pt", json.loads((out / "metrics.json").read_text())


EPOCHS = 3


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory, voc):
    """The classifier trained with 1 process and with 2 (same global batch, BN frozen), EPOCHS epochs each;
    shared by the equality, P-NOC and resume tests."""
    tmp = tmp_path_factory.mktemp("classifiers")
    return {procs: _classifier(tmp, voc, procs, epochs=EPOCHS) for procs in (1, 2)}


def _max_diff(a: Path, b: Path) -> float:
    sa, sb = safe_load(a)["model"], safe_load(b)["model"]
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())


@pytest.mark.slow
def test_classifier_two_processes_equal_one(classifiers):
    """Same global batch (4 = 2 ranks x 2): same losses and weights to float tolerance."""
    (m1, log1), (m2, log2) = classifiers[1], classifiers[2]
    assert log1["processes"] == 1 and log2["processes"] == 2
    for e1, e2 in zip(log1["epochs"], log2["epochs"]):
        assert e2["loss"] == pytest.approx(e1["loss"], rel=1e-4, abs=1e-6)
    diff = _max_diff(m1, m2)
    print(f"[ddp] classifier: max |w(1 process) - w(2 processes)| = {diff:.2e}; losses "
          f"{[round(e['loss'], 6) for e in log1['epochs']]} vs {[round(e['loss'], 6) for e in log2['epochs']]}")
    assert diff < 1e-4


@pytest.mark.slow
def test_pnoc_two_processes_equal_one(tmp_path, voc, classifiers):
    """P-NOC: f (Puzzle + CSE through noc) and noc's own hard-masked step, 1 process vs 2 ranks."""
    clf, _ = classifiers[1]
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"pnoc{procs}"
        _run("pnoc.cam.train_cam", [*voc, *TINY, "--classifier", str(clf), "--strategy", "pnoc", "--label-smoothing",
                                    "0.1", "--epochs", "2", "--epoch-eval-images", "4", "--out", str(out / "model.pt"),
                                    "--metrics", str(out / "metrics.json"), "--state-dir", str(out / "state")], procs)
        outs[procs] = out
    logs = {p: json.loads((o / "metrics.json").read_text())["epochs"] for p, o in outs.items()}
    for e1, e2 in zip(logs[1], logs[2]):
        for k in ("loss", "cls", "re", "cse", "noc"):
            assert e2[k] == pytest.approx(e1[k], rel=1e-4, abs=1e-6), k
    f_diff = _max_diff(outs[1] / "model.pt", outs[2] / "model.pt")
    noc_diff = _max_diff(outs[1] / "noc.pt", outs[2] / "noc.pt")
    print(f"[ddp] pnoc: max |f1 - f2| = {f_diff:.2e}, max |noc1 - noc2| = {noc_diff:.2e}")
    assert f_diff < 1e-4 and noc_diff < 1e-4
    # noc moved (it is trained), so the comparison is not of two untouched copies
    assert _max_diff(clf, outs[2] / "noc.pt") > 1e-4


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            child = int(stat.parent.name)
            out += [child, *_children(child)]
    return out


@pytest.mark.slow
def test_killed_two_process_run_resumes_exactly(tmp_path, voc, classifiers):
    """SIGKILL of torchrun and both ranks after the first epoch's checkpoint; the rerun resumes from it and
    ends with the weights of an uninterrupted two-process run."""
    epochs = EPOCHS
    ref, _ = classifiers[2]
    out = tmp_path / "killed"
    args = [*voc, *TINY, "--epochs", str(epochs), "--out", str(out / "model.pt"), "--metrics",
            str(out / "metrics.json"), "--state-dir", str(out / "state")]
    proc = subprocess.Popen(_launch("pnoc.cam.train_classifier", args, 2), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    state = out / "state" / "last.pt"
    deadline = time.time() + 240
    try:
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
    finally:
        victims = _children(proc.pid) + [proc.pid]  # torchrun starts each rank in its own session
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        for pid in victims:  # reap-free wait until the ranks are gone
            for _ in range(200):
                if not Path(f"/proc/{pid}").exists() or "zombie" in _status(pid):
                    break
                time.sleep(0.05)
    assert state.exists(), f"no checkpoint before the kill:\n{proc.stderr.read()[-3000:]}"
    assert not (out / "model.pt").exists(), "the run finished before the kill; make the epochs longer"
    _run("pnoc.cam.train_classifier", args, 2)
    resumed = json.loads((out / "metrics.json").read_text())
    assert 1 <= resumed["resumed_from_epoch"] < epochs
    diff = _max_diff(ref, out / "model.pt")
    print(f"[ddp] resumed after epoch {resumed['resumed_from_epoch']}: max |w - w(uninterrupted)| = {diff:.2e}")
    assert diff == 0.0


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return ""


def test_more_processes_than_visible_gpus_fails_before_the_process_group(monkeypatch):
    """What a torchrun rank sees in a SLURM job that granted one GPU for two processes."""
    from pnoc.distributed import setup

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(DataError, match=r"resources.gpus_per_job=2 processes but only 1 GPU\(s\) are visible"):
        setup("auto")
    assert not torch.distributed.is_initialized()


def test_global_batch_not_divisible_fails_before_training(monkeypatch):
    """start_training checks the stage's batch_size against the process count before any model exists."""
    from dataclasses import dataclass

    import pnoc.distributed as d
    from pnoc.training import Runtime, Solver, start_training

    @dataclass
    class Cfg(Solver, Runtime):
        pass

    # a rank of a 2-process run, without starting the process group
    monkeypatch.setattr(d, "setup", lambda device: Distributed(world=2))
    with pytest.raises(DataError, match=r"batch_size=3 is not divisible by resources.gpus_per_job=2"):
        start_training(Cfg(batch_size=3))
    assert start_training(Cfg(batch_size=4)).per_rank(4) == 2
