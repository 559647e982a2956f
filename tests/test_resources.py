"""Running out of memory or disk, and the per-epoch evaluation of data-parallel runs (issue 25).

* Memory: the projection and verdict by hand; the budget's sources (a fake cgroup tree, SLURM's variables, the
  ``PNOC_MEM_LIMIT_MB`` override); a training stage whose step does not fit stops before training with a message
  naming the keys, and the check leaves a training that fits bit-identical; the watchdog; ``benchmarks/stages.py``.
* Disk: a tmpfs of a few MiB (mounted here; root only, skipped elsewhere) filled while ``infer_cams`` writes its
  folder and while a training writes its resume state: the message names the folder and the space, nothing is
  half-written, the last state survives, and after space is freed the rerun finishes (resuming exactly).
* Rank 0: ``Distributed.on_main`` over two gloo processes, and a two-process training that evaluates on rank 0
  only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from fixtures import make_voc
from pnoc import memory
from pnoc.io import DiskFullError, free_space, write_text
from pnoc.memory import Budget, MemoryLimitError, MemoryWatch, judge, project, too_big
from pnoc.training import EpochRunner, safe_load, save_weights

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
TINY = dict(backbone="resnet18_w8", output_stride=8, crop=32, resize_min=28, resize_max=40, batch_size=4, lr=0.05,
            threads=1)


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("res") / "VOC2012", splits={"train": 12, "val": 4}, h=32, w=40)


def _classifier_cfg(voc, out: Path, epochs: int = 2, state_dir: Path | None = None, **over):
    from pnoc.cam.train_classifier import Config

    return Config(dataset="voc12", root=voc, out=out / "model.pt", metrics=out / "metrics.json",
                  state_dir=state_dir or out / "state", epochs=epochs, **{**TINY, **over})


def _max_diff(a: Path, b: Path) -> float:
    sa, sb = safe_load(a)["model"], safe_load(b)["model"]
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())


# ---------------------------------------------------------------------------- memory: pure
def test_projection_verdict_and_message_by_hand():
    p = project([(4, 4200 * MiB), (1, 1200 * MiB)], 16)  # 1000 MiB per image on 200 MiB fixed
    assert p.per_image == pytest.approx(1000 * MiB) and p.fixed == pytest.approx(200 * MiB)
    assert p.growth == pytest.approx(16200 * MiB)
    assert p.at_most(10200 * MiB) == 10 and p.at_most(100 * MiB) == 0
    # one process, 12 GiB free on the host: 16 images do not fit, 11 would (room = 12 GiB - 5 % reserve)
    b = Budget("cpu", 2 * 2**30, 12 * 2**30, "MemAvailable of the machine (/proc/meminfo)",
               "free memory on the machine, or run on one with more", True)
    v = judge([p], [b])
    assert not v.fits and v.needed == pytest.approx(p.growth)
    assert v.room == pytest.approx(12 * 2**30 - 0.05 * 14 * 2**30)
    assert v.at_most == 11
    msg = too_big("train_cam", v, p, "cam.batch_size", 16, 1, "cam.crop")
    assert msg.startswith("train_cam: one training step at cam.batch_size=16 needs about 15.82 GiB more host memory")
    assert "Lower cam.batch_size to at most 11, or lower cam.crop; or free memory on the machine" in msg
    assert "the kernel would kill the process" in msg and "MemAvailable" in msg
    # two processes on one host share it: 2 x 8 images = the same need; at most 5 per process -> 10 in all
    half = project([(1, 1200 * MiB), (4, 4200 * MiB)], 8)
    v2 = judge([half, half], [b, b])
    assert not v2.fits and v2.needed == pytest.approx(2 * half.growth) and v2.at_most == 5
    msg2 = too_big("train_cam", v2, half, "cam.batch_size", 16, 2, "cam.crop")
    assert "16, 8 per process x 2 processes" in msg2 and "at most 10" in msg2
    # GPUs are per process: each rank's 8 images against its own 12 GiB fit
    g = Budget("cuda:0", 0, 12 * 2**30, "cuda:0", "split the batch over more GPUs (resources.gpus_per_job)", False)
    assert judge([half, half], [g, g]).fits
    tight = too_big("x", judge([p], [Budget("cuda:0", 0, 100 * MiB, "cuda:0", "", False)]), p, "k.batch_size", 16,
                    1, "k.crop")
    assert "Not even one image per process fits: lower k.crop" in tight and "out-of-memory error" in tight
    # noise: a second measurement that did not grow is no negative slope
    flat = project([(1, 50 * MiB), (4, 40 * MiB)], 16)
    assert flat.per_image == 0 and flat.growth == pytest.approx(50 * MiB)


def test_cgroup_limits_v1_and_v2_from_a_fake_tree(tmp_path):
    # v2: the tightest of the process's cgroup and its parent; inactive page cache is not counted as used
    (tmp_path / "v2" / "job" / "step").mkdir(parents=True)
    (tmp_path / "v2" / "job" / "memory.max").write_text(f"{4 * 2**30}\n")
    (tmp_path / "v2" / "job" / "memory.current").write_text(f"{3 * 2**30}\n")
    (tmp_path / "v2" / "job" / "memory.stat").write_text(f"anon 1\ninactive_file {2**30}\n")
    (tmp_path / "v2" / "job" / "step" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup_v2"
    proc.write_text("0::/job/step\n")
    limit, used, where = memory.cgroup_limit(proc, tmp_path / "v2")
    assert (limit, used) == (4 * 2**30, 2 * 2**30) and where.endswith("job/memory.max")
    # v1, seen from inside a cgroup namespace (the mount's root is the process's cgroup); "no limit" is huge
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{600 * MiB}\n")
    (v1 / "memory.stat").write_text(f"total_inactive_file {100 * MiB}\n")
    proc1 = tmp_path / "cgroup_v1"
    proc1.write_text("4:memory:/somewhere/else\n1:cpu:/x\n")
    assert memory.cgroup_limit(proc1, tmp_path / "v1")[:2] == (2**30, 500 * MiB)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert memory.cgroup_limit(proc1, tmp_path / "v1") is None
    assert memory.cgroup_limit(tmp_path / "missing", tmp_path) is None


def test_budget_sources_slurm_and_override(monkeypatch):
    monkeypatch.delenv(memory.ENV, raising=False)
    now = memory.rss()
    # a SLURM job whose memory is this process's RSS + 100 MiB: tighter than the machine's MemAvailable here
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_MEM_PER_NODE", str(now // MiB + 100))
    b = memory.memory_budget("cpu")
    assert "SLURM_MEM_PER_NODE" in b.source and "resources.train_mem_mb" in b.fix and b.shared
    assert 50 * MiB < b.headroom < 110 * MiB
    monkeypatch.delenv("SLURM_MEM_PER_NODE")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", str(now // MiB // 2 + 100))
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "2")
    assert "SLURM_MEM_PER_CPU" in memory.memory_budget("cpu").source
    # the override replaces every source, per process
    monkeypatch.setenv(memory.ENV, str(now // MiB + 300))
    b = memory.memory_budget("cpu")
    assert b.source.startswith(f"{memory.ENV}=") and not b.shared and 250 * MiB < b.headroom < 310 * MiB
    monkeypatch.setenv(memory.ENV, "lots")
    with pytest.raises(Exception, match=rf"{memory.ENV}='lots': not a number of MiB"):
        memory.memory_budget("cpu")


# ---------------------------------------------------------------------------- memory: a training stage
def test_memory_check_leaves_a_fitting_training_unchanged(tmp_path, voc, monkeypatch, caplog):
    """The check runs the real step on sub-batches and restores everything: the weights and the logged
    metrics are those of a run without it, to the bit."""
    from pnoc.cam.train_classifier import run

    monkeypatch.delenv(memory.ENV, raising=False)
    caplog.set_level("INFO", logger="pnoc.memory")
    checked = run(_classifier_cfg(voc, tmp_path / "checked"))
    assert "train_classifier: a step of 4 image(s) per process adds about" in caplog.text
    with monkeypatch.context() as m:
        m.setattr(EpochRunner, "guard_memory", lambda self, *a, **k: None)
        plain = run(_classifier_cfg(voc, tmp_path / "plain"))
    assert _max_diff(tmp_path / "checked" / "model.pt", tmp_path / "plain" / "model.pt") == 0.0
    for a, b in zip(checked["epochs"], plain["epochs"]):
        assert {k: v for k, v in a.items() if k != "images_per_s"} == {k: v for k, v in b.items()
                                                                       if k != "images_per_s"}


def _limit_leaving(room: float, in_use: float) -> int:
    """The PNOC_MEM_LIMIT_MB that leaves ``room`` bytes after the reserve (5 % of the limit, at least 64 MiB) to a
    process holding ``in_use`` bytes."""
    limit = (in_use + room) / (1 - memory.RESERVE_FRACTION)
    if memory.RESERVE_FRACTION * limit < memory.RESERVE_MIN:
        limit = in_use + memory.RESERVE_MIN + room
    return int(limit // MiB)


def _train_classifier_process(voc, out: Path, limit_mb: int) -> subprocess.CompletedProcess:
    """``python -m pnoc.cam.train_classifier`` (a fresh process, so that what it holds at the check is the same
    from run to run) with ``PNOC_MEM_LIMIT_MB=limit_mb``: a 12-image batch at 128 px."""
    env = {**os.environ, memory.ENV: str(limit_mb),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pnoc.cam.train_classifier", "--dataset", "voc12", "--root", str(voc), "--out",
           str(out / "model.pt"), "--metrics", str(out / "metrics.json"), "--state-dir", str(out / "state"),
           "--backbone", "resnet18_w24", "--crop", "128", "--resize-min", "0", "--batch-size", "12", "--epochs", "1",
           "--threads", "1"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_training_that_does_not_fit_stops_before_it_starts(tmp_path, voc):
    """A step measured at 1 and 4 images and projected to 12; with a limit that holds about half of that, the
    stage (through its entry point) stops before training with exit code 2, naming the batch that fits."""
    import re

    p = _train_classifier_process(voc, tmp_path / "fits", memory.rss() // MiB + 8192)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"a step of 12 image\(s\) per process adds about ([\d.]+) MiB .*; ([\d.]+) (MiB|GiB) in use\)",
                  p.stderr)
    growth, in_use = float(m.group(1)) * MiB, float(m.group(2)) * (MiB if m.group(3) == "MiB" else 2**30)
    assert growth > 32 * MiB
    out = tmp_path / "tight"
    p = _train_classifier_process(voc, out, _limit_leaving(0.6 * growth, in_use))
    assert p.returncode == 2, p.stderr[-3000:]
    msg = p.stderr.strip().splitlines()[-1]
    m = re.search(r"pnoc: train_classifier: one training step at classifier.batch_size=12 needs about ([\d.]+) MiB "
                  r"more host memory \(measured on 1 image .*Lower classifier.batch_size to at most (\d+), or lower "
                  r"classifier.crop; or raise PNOC_MEM_LIMIT_MB$", msg)
    assert m, msg
    # the larger measuring step may be cut to what the limit holds: the projection is then an upper bound
    assert growth * 0.7 < float(m.group(1)) * MiB < growth * 3, (growth, msg)
    assert 1 <= int(m.group(2)) < 12
    assert "Traceback" not in p.stderr
    assert not (out / "model.pt").exists() and not (out / "state" / "last.pt").exists()


def test_training_without_any_room_stops_through_the_entry_point(tmp_path, voc, monkeypatch):
    """A limit below what the process already holds: no measuring step runs; the entry point ends with exit
    code 2 and the message (no traceback), and nothing was trained."""
    from pnoc import cli
    from pnoc.cam.train_classifier import Config, run

    monkeypatch.setenv(memory.ENV, str(memory.rss() // MiB + 32))
    out = tmp_path / "none"
    with pytest.raises(MemoryLimitError, match=r"^train_classifier: no host memory left for a training step at "
                                               r"classifier.batch_size=4: .* available \(PNOC_MEM_LIMIT_MB=\d+\), .* in "
                                               r"use already .*; lower classifier.crop or classifier.batch_size, or "
                                               r"use a smaller backbone; or raise PNOC_MEM_LIMIT_MB$"):
        run(_classifier_cfg(voc, out))
    argv = ["--dataset", "voc12", "--root", str(voc), "--out", str(out / "model.pt"), "--metrics",
            str(out / "metrics.json"), "--state-dir", str(out / "state"), "--backbone", "resnet18_w8", "--crop", "32",
            "--batch-size", "4", "--threads", "1", "--epochs", "1"]
    with pytest.raises(SystemExit) as ex:
        cli.main(run, Config, argv)
    assert ex.value.code == 2
    assert not (out / "model.pt").exists() and not (out / "state" / "last.pt").exists()


def test_measuring_steps_stay_within_the_room():
    """The larger measuring step is cut to what the room holds (the smaller one's growth counted per image),
    and left out when not even one image more fits."""
    held, sizes = [], []

    def step(b):
        sizes.append(b)
        held.append(np.ones(b * 8 * MiB // 8))  # 8 MiB an image, touched
        held.pop()

    cpu = torch.device("cpu")
    pts = memory.measure_steps(cpu, step, 16, room=None)
    assert sizes == [1, 1, 4] and [b for b, _ in pts] == [1, 4] and pts[1][1] > 3 * 8 * MiB
    sizes.clear()
    pts = memory.measure_steps(cpu, step, 16, room=lambda: 20 * MiB)  # 8 MiB at 1 image: at most 2 fit
    assert sizes == [1, 1, 2] and [b for b, _ in pts] == [1, 2]
    sizes.clear()
    pts = memory.measure_steps(cpu, step, 16, room=lambda: 10 * MiB)  # not even 2
    assert sizes == [1, 1] and [b for b, _ in pts] == [1]
    assert project(pts, 16).growth >= 16 * 7 * MiB  # the one point scaled: an upper bound


def test_watch_stops_the_main_thread_before_the_limit(monkeypatch):
    """Memory that grows past the limit during training (not the step the check measured): the watch raises
    in the main thread with the advice, long before the allocation reaches the limit."""
    import signal

    before = signal.getsignal(signal.SIGUSR2)
    monkeypatch.setenv(memory.ENV, str(memory.rss() // MiB + 200))
    held = []
    with pytest.raises(MemoryLimitError, match=r"memory nearly exhausted: .* left \(PNOC_MEM_LIMIT_MB=\d+\), this "
                                               r"process holds .*; lower cam.batch_size or cam.crop; or raise "):
        with MemoryWatch("lower cam.batch_size or cam.crop", interval=0.01):
            for _ in range(400):  # up to 400 MiB, 1 MiB at a time: the watch trips at ~170 MiB
                held.append(np.ones(MiB // 8))
                time.sleep(0.002)
    assert len(held) < 400
    assert signal.getsignal(signal.SIGUSR2) == before  # the previous handler is back


def test_stages_benchmark_skips_a_stage_that_does_not_fit(monkeypatch):
    """benchmarks/stages.py: measured at 1 and 4 images and projected; with a limit at half of what deeplab's
    iteration needs, deeplab is reported as not fitting (the key to lower named) and not run."""
    mod = load_script(ROOT / "benchmarks" / "stages.py", "bench_stages_mem")
    args = ["--tiny", "--device", "cpu", "--stages", "deeplab", "--no-disk", "--size", "96", "--threads", "1",
            "--peak-tflops", "1"]
    monkeypatch.setenv(memory.ENV, str(memory.rss() // MiB + 4096))
    free = mod.main(args + ["--batch", "8"])["stages"]["deeplab"]
    assert "error" not in free and free["images_per_s"] > 0
    need = free["memory_projected_bytes"]
    # the projection is of the right size: within a factor 2 of the measured peak of the timed run
    assert free["peak_memory_bytes"] / 2 < need < 2 * free["peak_memory_bytes"] + 32 * MiB
    # a limit that leaves half of that after the reserve (5 % of the limit, at least 64 MiB)
    limit = (memory.rss() + need / 2) / (1 - memory.RESERVE_FRACTION)
    if memory.RESERVE_FRACTION * limit < memory.RESERVE_MIN:
        limit = memory.rss() + memory.RESERVE_MIN + need / 2
    monkeypatch.setenv(memory.ENV, str(int(limit // MiB)))
    row = mod.main(args + ["--batch", "8"])["stages"]["deeplab"]
    assert row["error"] == "does not fit in memory" and row["images_per_s"] is None
    assert row["detail"].startswith("deeplab: one iteration (build + step) at --batch=8 needs about")
    assert "Lower --batch to at most" in row["detail"] and "or raise PNOC_MEM_LIMIT_MB" in row["detail"]
    # without --batch (and without --tiny, whose preset sets it) the message names the config's key
    monkeypatch.setenv(memory.ENV, str(memory.rss() // MiB + 16))
    row = mod.main(["--device", "cpu", "--stages", "deeplab", "--no-disk", "--backbone", "resnet18_w8", "--size", "64",
                    "--warmup", "0", "--iters", "1", "--threads", "1", "--peak-tflops", "1"])["stages"]["deeplab"]
    assert row["detail"].startswith("deeplab: no host memory left for one iteration at segmentation.batch_size=16: ")
    assert row["detail"].endswith("lower --size (or give a smaller --batch) or segmentation.batch_size, or use a "
                                  "smaller backbone; or raise PNOC_MEM_LIMIT_MB")


# ---------------------------------------------------------------------------- disk
@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (unmounted afterwards); skips where it cannot be mounted (not root)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``folder``'s filesystem."""
    filler = folder / "filler.bin"
    free = free_space(folder)[0]
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def _leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of atomic writers (dot-prefixed) anywhere under ``folder``."""
    return [str(p) for p in folder.rglob(".*")]


def test_atomic_writers_on_a_full_disk(tmp_path):
    with tmpfs(tmp_path / "small", "1m") as small:
        write_text(small / "a.txt", "old")
        with pytest.raises(DiskFullError) as e:
            write_text(small / "a.txt", "x" * (2 * MiB))
        msg = str(e.value)
        assert msg.startswith(f"{small / 'a.txt'}: no space left on the device in {small} after writing")
        assert "the partial file was removed; the previous a.txt is intact" in msg
        assert "free space on that filesystem (or set the config key `results`" in msg
        assert (small / "a.txt").read_text() == "old" and not _leftovers(small)
        # torch.save through save_weights: the size it needed is named
        with pytest.raises(DiskFullError, match=r"m\.pt: no space left on the device in .* about 2\.3 MiB needed"):
            save_weights(small / "m.pt", {"w": torch.zeros(600_000)})
        assert not (small / "m.pt").exists() and not _leftovers(small)


def test_infer_cams_on_a_disk_that_fills(tmp_path, voc, capsys):
    """A CAM folder written while the disk fills: the stage stops naming the folder and the space the folder
    needs, the previous complete folder is intact and no partial one is left; freed space, the rerun finishes."""
    from pnoc import cli
    from pnoc.cam.infer_cams import Config, run
    from pnoc.models.classifier import create_classifier

    torch.manual_seed(0)
    model = tmp_path / "classifier.pt"
    save_weights(model, {"arch": {"backbone": "resnet18_w8", "n_classes": 20, "output_stride": 8},
                         "model": create_classifier("resnet18_w8", 20, 8, "none").state_dict()})
    with tmpfs(tmp_path / "results", "2m") as results:
        out = results / "cams" / "train"
        cfg = Config("voc12", voc, split="train", model=model, out_dir=out, scales=[1.0, 2.0], threads=1)
        run(cfg)
        first = {p.name: p.read_bytes() for p in out.iterdir()}
        assert len(first) == 13  # 12 images + _info.json
        largest = max(len(v) for k, v in first.items() if k.endswith(".npz"))
        # room for two CAM files (a tmpfs takes whole 4 KiB pages), not for the folder
        filler = fill(results, 2 * (-(-largest // 4096) * 4096) + 2048)
        argv = ["--dataset", "voc12", "--root", str(voc), "--split", "train", "--model", str(model), "--out-dir",
                str(out), "--scales", "1.0", "2.0", "--threads", "1"]
        with pytest.raises(SystemExit) as e:
            cli.main(run, Config, argv)
        assert e.value.code == 2
        msg = capsys.readouterr().err
        assert f"{out}: no space left on the device in {out.parent} after " in msg
        assert "files need about" in msg and "free of 2.0 MiB there now" in msg
        assert "the partial folder was removed; the previous train is intact" in msg
        assert {p.name: p.read_bytes() for p in out.iterdir()} == first and not _leftovers(results)
        filler.unlink()
        info = run(cfg)
        assert info["images"] == 12 and len(list(out.glob("*.npz"))) == 12 and not _leftovers(results)


def test_checkpoint_on_a_full_disk_keeps_the_last_state_and_resumes(tmp_path, voc, monkeypatch):
    """The disk fills after epoch 1's resume state: epoch 2's state does not fit. The run stops naming the
    state folder, the space it needed and the state that survives; after space is freed the rerun resumes
    from epoch 1 and ends with the weights of an uninterrupted run."""
    from pnoc.cam.train_classifier import run
    from pnoc.training import Checkpointer

    monkeypatch.delenv(memory.ENV, raising=False)
    run(_classifier_cfg(voc, tmp_path / "reference", epochs=3))
    with tmpfs(tmp_path / "state_fs", "8m") as fs:
        state = fs / "state"
        saves = []
        real_save = Checkpointer.save

        def save_then_fill(self, epoch, *a, **k):
            real_save(self, epoch, *a, **k)
            saves.append(epoch)
            if len(saves) == 1:  # another job takes the disk after the first state
                fill(fs, 64 * 1024)

        with monkeypatch.context() as m:
            m.setattr(Checkpointer, "save", save_then_fill)
            with pytest.raises(DiskFullError) as e:
                run(_classifier_cfg(voc, tmp_path / "full", epochs=3, state_dir=state))
        msg = str(e.value)
        assert msg.startswith(f"{state}: no space left on the device while writing the resume state of epoch 2 "
                              f"(about ")
        assert f"the partial file was removed and {state / 'last.pt'} of epoch 1 is intact, so a rerun resumes" in msg
        assert saves == [0] and not _leftovers(fs)
        assert safe_load(state / "last.pt")["_epoch"] == 0
        assert not (tmp_path / "full" / "model.pt").exists()
        (fs / "filler.bin").unlink()
        resumed = run(_classifier_cfg(voc, tmp_path / "full", epochs=3, state_dir=state))
        assert resumed["resumed_from_epoch"] == 1
    assert _max_diff(tmp_path / "reference" / "model.pt", tmp_path / "full" / "model.pt") == 0.0


# ---------------------------------------------------------------------------- rank 0
ON_MAIN = """
import json, sys
from pathlib import Path
import torch.distributed as tdist
from pnoc.distributed import Distributed
from pnoc.io import DataError

rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
d = Distributed(rank=rank, world=2)
calls = []

def score(x):
    calls.append(rank)
    return {"miou": x * 2.0, "rank": rank}

got = d.on_main(score, 0.25)

def broken():
    raise DataError("val/123.png: corrupt mask")

try:
    d.on_main(broken)
    error = None
except DataError as e:
    error = str(e)
d.barrier()
tdist.destroy_process_group()
Path(out, f"{rank}.json").write_text(json.dumps({"got": got, "calls": calls, "error": error}))
"""


def test_on_main_runs_once_and_hands_result_and_error_to_every_rank(tmp_path):
    script = tmp_path / "on_main.py"
    script.write_text(ON_MAIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    init = f"file://{tmp_path / 'store'}"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path)], env=env,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for pr in procs:
        _, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err[-3000:]
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["got"] == r1["got"] == {"miou": 0.5, "rank": 0}
    assert r0["calls"] == [0] and r1["calls"] == []  # evaluated on rank 0 only
    assert r0["error"] == r1["error"] == "val/123.png: corrupt mask"  # rank 1 does not wait forever


WORKER = '''
import sys
from pathlib import Path
import pnoc.cam.train_classifier as stage
from pnoc import cli

real = stage.classification_scores

def counted(*args, **kwargs):
    import os
    with open(sys.argv[1], "a") as f:
        f.write(os.environ.get("RANK", "0") + "\\n")
    return real(*args, **kwargs)

stage.classification_scores = counted
cli.main(stage.run, stage.Config, sys.argv[2:])
'''


def _torchrun(script: Path, args: list[str], env_extra: dict | None = None, timeout: int = 300):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
              memory.ENV):
        env.pop(k, None)
    env.update(env_extra or {})
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_process_training_evaluates_on_rank_0_and_stops_together(tmp_path, voc):
    """train_classifier under torchrun (2 gloo ranks): val F1 is computed once per epoch, by rank 0, and every
    rank logs it; a step that does not fit stops both ranks with the message (no rank left waiting)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    calls = tmp_path / "calls.txt"
    out = tmp_path / "ddp"
    args = [str(calls), "--dataset", "voc12", "--root", str(voc), "--out", str(out / "model.pt"), "--metrics",
            str(out / "metrics.json"), "--state-dir", str(out / "state"), "--backbone", "resnet18_w8", "--crop", "32",
            "--batch-size", "4", "--threads", "2", "--epochs", "2"]
    p = _torchrun(script, args)
    assert p.returncode == 0, p.stderr[-4000:]
    assert calls.read_text().split() == ["0", "0"]  # two epochs, rank 0 only
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and all("val_f1" in e for e in metrics["epochs"])
    assert "[rank 1/2] pnoc.training: epoch 2:" in p.stderr and "val_f1=" in p.stderr
    # too little memory: both ranks stop at the check with the message, exit code 2
    tight = tmp_path / "tight"
    args = [str(calls), *args[1:]]
    args[args.index("--state-dir") + 1] = str(tight / "state")
    p = _torchrun(script, args, {memory.ENV: "64"}, timeout=180)
    assert p.returncode != 0
    for rank in (0, 1):
        assert (f"[rank {rank}/2] pnoc: train_classifier: no host memory left for a training step at "
                f"classifier.batch_size=4") in p.stderr, p.stderr[-4000:]
    assert not (tight / "state" / "last.pt").exists()
