"""HPC behaviour of the workflow: the smoke DAG through a real single-node SLURM cluster, resume after
scancel / kill -9, regeneration of one artifact, parameter-change reruns, and dry runs of the
user-facing SLURM profile and of the paper's VOC12 / COCO14 configs.

Tests marked ``slurm`` start the throwaway cluster of ``tests/slurm/cluster.sh`` (root + Debian;
anything else skips them unless ``PNOC_SLURM_REQUIRED=1``). The ``slow`` ones run snakemake for
real; most of them reuse the session ``smoke_run`` results (tests/conftest.py) instead of running
the smoke DAG again.

Runs that must not disturb the repository's own ``.snakemake`` folder (locks, incomplete markers,
SLURM logs) start snakemake in their own working directory with ``--snakefile <repo>/Snakefile``;
every path of their config is absolute.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, job_stats, smoke_config, smoke_workdir, snakemake, venv_env


def _load_util():
    name = "pnoc_slurm_testutil"
    if name not in sys.modules:  # one module object for every test module that loads it
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "slurm" / "util.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


slurm_util = _load_util()

SNAKEFILE = str(ROOT / "Snakefile")
SMOKE = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())


@pytest.fixture(scope="module")
def slurm_cluster():
    """The running test cluster (started here, stopped at module end unless it was already up)."""
    with slurm_util.slurm_cluster() as info:
        yield info


# ----------------------------------------------------------------------------------------- helpers
def finished_rules(output: str) -> list[str]:
    """Rules of the jobs a run finished ("Finished jobid: N (Rule: name)"), in order."""
    return re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", output)


def nothing_to_do(output: str) -> bool:
    return "Nothing to be done" in output


def summary_mious(results: Path) -> dict[tuple, float]:
    """(stage, variant, split, seed) -> mIoU of every row of summary.json."""
    rows = json.loads((results / "summary.json").read_text())["rows"]
    out = {}
    for r in rows:
        key = (r["stage"], r["variant"], r.get("split"), r.get("seed"))
        assert key not in out, key
        out[key] = r["miou"]
    return out


def stat_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def tree_stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): stat_of(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def workdir(tmp: Path) -> Path:
    """A private snakemake working directory (own .snakemake: locks, incomplete markers, logs)."""
    wd = tmp / "wd"
    wd.mkdir(parents=True, exist_ok=True)
    return wd


def smoke_dataset(smoke_run) -> str:
    """The session smoke run's generated dataset (read-only reuse: no make_dataset job)."""
    tmp, _, _ = smoke_run
    return str(tmp / "results" / "dataset" / "synthetic")


def derived_config(tmp: Path, name: str, results: Path, dataset_root: str | None = None, **sections) -> Path:
    """config/smoke.yaml with ``results`` (and optionally the dataset root) moved and sections merged."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["results"] = str(results)
    cfg["dataset"]["root"] = dataset_root or str(results / "dataset" / "synthetic")
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def classifier_epochs(metrics: Path) -> list[dict]:
    """Per-epoch training metrics without wall-clock fields (images/s differs between runs)."""
    epochs = json.loads(metrics.read_text())["epochs"]
    return [{k: v for k, v in e.items() if k != "images_per_s"} for e in epochs]


def assert_same_weights(a: Path, b: Path) -> None:
    wa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    wb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weights differ: {k}"


def training_processes(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains ``marker`` (orphaned job steps)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and "pnoc." in cmd:
            pids.append(int(d.name))
    return pids


def wait_gone(marker: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while training_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not training_processes(marker), f"processes of {marker} still running after {timeout}s"


def sbatch_rule(line: str) -> str:
    """``rule_train_classifier_wildcards_0`` -> ``train_classifier`` (the --comment of an sbatch line)."""
    comment = line.split("--comment ", 1)[1].split()[0]
    return re.sub(r"_wildcards_.*$", "", comment.removeprefix("rule_"))


# ------------------------------------------------------------------------- (a) smoke DAG on SLURM
@pytest.mark.slurm
@pytest.mark.slow
def test_smoke_dag_through_slurm_equals_local(slurm_cluster, smoke_run, tmp_path):
    """The whole smoke DAG through `snakemake --profile tests/slurm/profile` (real sbatch/srun/squeue):
    every job is submitted, the GPU training rule asks SLURM for its GPU/CPUs/memory/time, and
    summary.json equals the local run's row by row (same seed, same threads: bitwise on CPU)."""
    local_tmp, local_cfg, _ = smoke_run
    # resources.gpu: 1 -> the GPU rules request the node's fake GPU (--gpus=1); CUDA stays unavailable,
    # so the jobs compute on the CPU exactly as the local run does. Resources never change outputs.
    cfg = smoke_config(tmp_path, resources={**SMOKE["resources"], "gpu": 1})
    mine, theirs = yaml.safe_load(cfg.read_text()), yaml.safe_load(Path(local_cfg).read_text())
    for c in (mine, theirs):
        c.pop("results"), c["dataset"].pop("root"), c.pop("resources")
    assert mine == theirs, "the local smoke run used another configuration: its results cannot be reused"

    wd = workdir(tmp_path)
    run = slurm_util.run_snakemake_slurm(
        wd, ["--snakefile", SNAKEFILE, "--configfile", str(cfg)], timeout=1500, log=tmp_path / "slurm-smoke.log",
        env=venv_env(),  # --export=ALL: the jobs' `python` must be the venv's, as in the local run
    )
    print(f"[slurm] smoke DAG: rc={run.returncode} in {run.elapsed:.0f} s, {len(run.sbatch_lines)} sbatch "
          f"jobs (cluster start {slurm_cluster.start_seconds:.1f} s); log {run.log}")
    assert not run.timed_out, f"snakemake hung (timeout):\n{run.tail()}"
    assert run.returncode == 0, run.tail(80)

    # every job of the DAG (but the input-only target rule `all`) went through sbatch, one per job
    planned = job_stats(run.output)
    submitted: dict[str, int] = {}
    for line in run.sbatch_lines:
        submitted[sbatch_rule(line)] = submitted.get(sbatch_rule(line), 0) + 1
    assert submitted == {r: n for r, n in planned.items() if r != "all"}, (planned, submitted)

    train = [ln.split(" --wrap=")[0] for ln in run.sbatch_lines if "--comment rule_train_classifier" in ln]
    out = tmp_path / "sbatch_train_classifier.txt"
    out.write_text("".join(f"sbatch call: {ln}\n" for ln in train))
    print("[slurm] sbatch line(s) of the GPU training rule train_classifier (also in %s):" % out)
    for ln in train:
        print("  sbatch call:", ln)
    assert len(train) == 1
    res = SMOKE["resources"]
    for opt in ("--gpus=1", "--cpus-per-task=2", f"--mem {res['train_mem_mb']}",
                f"-t {res['train_runtime_min']}", "-p debug"):
        assert opt in train[0], (opt, train[0])
    # CPU-only rules ask for no GPU
    for line in run.sbatch_lines:
        if sbatch_rule(line).startswith("evaluate_"):
            assert "--gpus" not in line, line

    slurm = summary_mious(tmp_path / "results")
    local = summary_mious(local_tmp / "results")
    print("[slurm] summary mIoU, SLURM vs local:")
    for key in sorted(local):
        print(f"  {key}: {slurm.get(key)!r} vs {local[key]!r}")
    assert slurm == local
    assert classifier_epochs(tmp_path / "results/classifier/seed0/metrics.json") == \
        classifier_epochs(local_tmp / "results/classifier/seed0/metrics.json")


# -------------------------------------------------------------- (b) scancel of a training job
@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_of_training_job_resumes_exactly(slurm_cluster, smoke_run, tmp_path):
    """scancel the running train_classifier job after its first epoch checkpoint; the rerun resumes
    from the checkpoint (resumed_from_epoch >= 1) and ends with the per-epoch metrics and weights of
    an uninterrupted local run."""
    epochs = 5
    data = smoke_dataset(smoke_run)
    over = {"classifier": {"epochs": epochs}, "resources": {"gpu": 1}}
    res_s, res_l = tmp_path / "slurm", tmp_path / "local"
    cfg_s = derived_config(tmp_path, "slurm.yaml", res_s, data, **over)
    cfg_l = derived_config(tmp_path, "local.yaml", res_l, data, **over)
    target_s = str(res_s / "classifier/seed0/metrics.json")
    state = res_s / ".state/classifier/seed0/last.pt"
    wd = workdir(tmp_path)
    # targets first: --configfile takes every following word as another config file
    args = [target_s, "--snakefile", SNAKEFILE, "--configfile", str(cfg_s)]

    proc, log = slurm_util.start_snakemake_slurm(wd, args, timeout=600, log=tmp_path / "cancelled.log",
                                                 env=venv_env())
    try:
        # wait for the first epoch checkpoint of the running job (its --comment is
        # rule_<rule>_wildcards_<wildcard values>)
        deadline = time.monotonic() + 400
        while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert state.exists(), "no epoch checkpoint appeared:\n" + log.read_text()[-3000:]
        jobid = slurm_util.wait_for_job("train_classifier_wildcards_0", "RUNNING", timeout=10)
    except BaseException:
        proc.send_signal(signal.SIGINT)
        slurm_util.finish_run(proc, log, grace=120)
        raise
    done_at_kill = torch.load(state, map_location="cpu", weights_only=True)["_epoch"] + 1
    subprocess.run(["scancel", jobid], check=True, timeout=30)
    t_cancel = time.monotonic()
    first = slurm_util.finish_run(proc, log)
    print(f"[slurm] scancel {jobid} during epoch {done_at_kill + 1}/{epochs} ({done_at_kill} epoch(s) "
          f"checkpointed): snakemake rc={first.returncode} {time.monotonic() - t_cancel:.1f} s later")
    assert not first.timed_out, first.tail()
    assert first.returncode != 0, "the cancelled run must fail"
    assert not Path(target_s).exists() and not (res_s / "classifier/seed0/model.pt").exists()
    # the trainer catches SIGTERM to finish its epoch, but its shell dies: the test cluster's
    # proctrack/pgid SIGKILLs it when the step ends (tests/slurm/cluster.sh)
    wait_gone(str(res_s))
    checkpointed = torch.load(state, map_location="cpu", weights_only=True)["_epoch"] + 1
    assert 1 <= checkpointed < epochs

    second = slurm_util.run_snakemake_slurm(wd, args, timeout=600, log=tmp_path / "rerun.log", env=venv_env())
    print(f"[slurm] rerun: rc={second.returncode} in {second.elapsed:.0f} s, "
          f"jobs {[sbatch_rule(ln) for ln in second.sbatch_lines]}")
    assert not second.timed_out, second.tail()
    assert second.returncode == 0, second.tail(80)
    assert [sbatch_rule(ln) for ln in second.sbatch_lines] == ["train_classifier"]
    resumed = json.loads(Path(target_s).read_text())["resumed_from_epoch"]

    # the uninterrupted reference: same config and seed, local executor, same threads (2)
    snakemake([str(res_l / "classifier/seed0/metrics.json"), "--cores", "2", "--snakefile", SNAKEFILE,
               "--configfile", str(cfg_l)], cwd=wd)
    ref = json.loads((res_l / "classifier/seed0/metrics.json").read_text())
    assert ref["resumed_from_epoch"] == 0
    same_metrics = classifier_epochs(Path(target_s)) == classifier_epochs(res_l / "classifier/seed0/metrics.json")
    print(f"[resume] epochs={epochs}: killed in epoch {done_at_kill + 1} (checkpoint after epoch "
          f"{done_at_kill}), resumed_from_epoch={resumed}; final per-epoch metrics identical to the "
          f"uninterrupted run: {same_metrics}")
    assert resumed == checkpointed >= 1
    assert same_metrics
    assert_same_weights(res_s / "classifier/seed0/model.pt", res_l / "classifier/seed0/model.pt")


# ------------------------------------- (b2) a 2-GPU training job and a sharded inference step on SLURM
@pytest.mark.slurm
@pytest.mark.slow
def test_two_gpu_training_is_one_task_and_shards_are_separate_jobs(slurm_cluster, smoke_run, tmp_path):
    """resources.gpus_per_job: 2 -> each training rule is ONE sbatch job asking for 2 GPUs with no task
    geometry (one task runs torchrun, which starts both ranks: both ranks' log lines are there);
    resources.shards: 3 -> CAM inference is 3 sbatch jobs, gathered locally into the usual folder."""
    data = smoke_dataset(smoke_run)
    res = tmp_path / "results"
    # weights: none keeps rule pretrain_backbone (another 2-GPU job, same mechanics) out of this test's DAG
    cfg = derived_config(tmp_path, "g2.yaml", res, data, resources={"gpu": 1, "gpus_per_job": 2, "shards": 3},
                         classifier={"weights": "none"})
    target = res / "cams/classifier/seed0/train"
    run = slurm_util.run_snakemake_slurm(
        workdir(tmp_path), [str(target), "--snakefile", SNAKEFILE, "--configfile", str(cfg)], timeout=900,
        log=tmp_path / "g2.log", env=venv_env())
    assert not run.timed_out, run.tail()
    assert run.returncode == 0, run.tail(80)
    jobs = [sbatch_rule(ln) for ln in run.sbatch_lines]
    train = [ln.split(" --wrap=")[0] for ln in run.sbatch_lines if sbatch_rule(ln) == "train_classifier"]
    shards = [ln.split(" --wrap=")[0] for ln in run.sbatch_lines if sbatch_rule(ln) == "infer_cams"]
    out = tmp_path / "sbatch_lines.txt"
    out.write_text("".join(f"sbatch call: {ln}\n" for ln in train + shards))
    print(f"[slurm] 2-GPU training + 3 shards: rc={run.returncode} in {run.elapsed:.0f} s, jobs {jobs}")
    for ln in train + shards:
        print("  sbatch call:", ln)
    assert len(train) == 1 and "pretrain_backbone" not in jobs
    assert "--gpus=2" in train[0] and "--ntasks-per-gpu" not in train[0], train[0]
    assert not re.search(r"--ntasks[= ](?!1\b)", train[0]), train[0]
    assert len(shards) == 3 and all("--gpus=1" in ln for ln in shards), shards
    assert "gather_cams" not in jobs  # a local rule: no SLURM job for moving files

    log = (res / "logs/train_classifier/seed0.log").read_text()
    ranks = sorted(set(re.findall(r"\[rank (\d)/2\]", log)))
    step = re.findall(r"rank \d/2 on \S+ \(gloo backend; SLURM job \d+, step tasks (\S+)\)", log)
    print(f"[slurm] train_classifier log: rank prefixes {ranks}, step task counts seen by the ranks {step}")
    assert ranks == ["0", "1"]
    assert step == ["1", "1"], step  # one task (torchrun) in the step, two ranks inside it
    metrics = json.loads((res / "classifier/seed0/metrics.json").read_text())
    assert metrics["processes"] == 2
    from pnoc.data import open_dataset

    assert len(list(target.glob("*.npz"))) == len(open_dataset("synthetic", data, "train"))


# ------------------------------- (b3) ImageNet weights fetched on the submit host, the training job offline
@pytest.mark.slurm
@pytest.mark.slow
def test_training_job_runs_offline_on_weights_fetched_by_the_submit_host(slurm_cluster, smoke_run, tmp_path):
    """weights: imagenet -> the local rule fetch_weights downloads the file where snakemake runs (no sbatch job),
    from a server that closes after that one request; the training job then runs on the cluster with every route
    to a download closed (proxies to a closed port, HF offline, empty hub caches) and reads the file."""
    from offline_weights import offline_env, resnet18_release_bytes, serve, weights_config

    name, data = resnet18_release_bytes()
    env = offline_env(tmp_path)
    with serve({"r18.pth": data}, max_requests=1) as srv:
        cfg = weights_config(tmp_path, smoke_dataset(smoke_run), name, srv.url("r18.pth"))
        target = tmp_path / "res" / "classifier" / "seed0" / "model.pt"
        run = slurm_util.run_snakemake_slurm(
            workdir(tmp_path), [str(target), "--snakefile", SNAKEFILE, "--configfile", str(cfg)], timeout=900,
            log=tmp_path / "offline.log", env=env)
        requests = list(srv.requests)
    assert not run.timed_out, run.tail()
    assert run.returncode == 0, run.tail(80)
    jobs = [sbatch_rule(ln) for ln in run.sbatch_lines]
    print(f"[slurm] offline training: sbatch jobs {jobs}, weight requests {requests}")
    assert "train_classifier" in jobs and "fetch_weights" not in jobs  # fetched locally, trained on the cluster
    assert requests == ["/r18.pth"]
    log = (tmp_path / "res" / "logs" / "train_classifier" / "seed0.log").read_text()
    assert f"loaded backbone weights from {tmp_path / 'weights' / name}" in log
    assert json.loads((tmp_path / "res" / "classifier" / "seed0" / "metrics.json").read_text())["epochs"]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


# ------------------------------------------------------- (c) kill -9 of the snakemake controller
@pytest.mark.slow
def test_controller_kill9_then_rerun_incomplete_finishes_rest(smoke_run, tmp_path):
    """SIGKILL of snakemake (local executor) after train_classifier finished but mid-DAG: the
    working directory stays locked; after --unlock, --rerun-incomplete finishes the rest without
    retraining the classifier (its model file keeps inode and mtime)."""
    res = tmp_path / "results"
    cfg = derived_config(tmp_path, "cfg.yaml", res, smoke_dataset(smoke_run))
    target = str(res / "priors/pnoc_ls/seed0/train/metrics.json")  # classifier -> cam -> CAMs -> priors
    wd = workdir(tmp_path)
    # targets go first: --configfile takes every following word as another config file
    base = ["--cores", "2", "--snakefile", SNAKEFILE, "--configfile", str(cfg)]
    log = tmp_path / "killed.log"
    exe = shutil.which("snakemake", path=venv_env()["PATH"])
    with open(log, "w") as fh:
        proc = subprocess.Popen([exe, target, *base], cwd=wd, env=venv_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    model = res / "classifier/seed0/model.pt"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if "train_classifier" in finished_rules(log.read_text()):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "snakemake ended before it could be killed:\n" + log.read_text()[-3000:]
    assert model.is_file()
    os.kill(proc.pid, signal.SIGKILL)  # the controller only ...
    proc.wait()
    # ... its running job (train_cam) would go on as an orphan: kill it as a lost login node would
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in training_processes(str(res)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(str(res), timeout=60)
    before = stat_of(model)
    killed_log = log.read_text()
    assert not Path(target).exists(), "the DAG had finished before the kill"

    locked = snakemake([target, *base], cwd=wd, check=False)
    assert locked.returncode != 0 and "cannot be locked" in locked.stdout, locked.stdout[-3000:]
    snakemake([*base, "--unlock"], cwd=wd)
    rerun = snakemake([target, "--rerun-incomplete", *base], cwd=wd)
    (tmp_path / "rerun.log").write_text(rerun.stdout)
    print(f"[kill -9] finished before the kill: {finished_rules(killed_log)}; "
          f"rerun planned {job_stats(rerun.stdout)}, finished {finished_rules(rerun.stdout)}")
    assert Path(target).is_file()
    assert "train_classifier" not in job_stats(rerun.stdout)
    assert "rule train_classifier:" not in rerun.stdout
    assert "train_classifier" not in finished_rules(rerun.stdout)
    assert {"train_cam", "infer_cams", "evaluate_priors"} <= set(finished_rules(rerun.stdout))
    assert stat_of(model) == before, "the classifier model was rewritten"
    assert nothing_to_do(snakemake([target, "-n", *base], cwd=wd).stdout)


# ----------------------------------------------------------- (d) regenerate one artifact with -f
@pytest.mark.slow
def test_force_regenerates_only_the_requested_artifact(smoke_run, tmp_path):
    """`-f <CAM folder of the val split>` on a copy of the smoke results reruns that one infer_cams
    job, touches no upstream model, and reproduces the same CAM files byte for byte."""
    src_tmp, _, _ = smoke_run
    res = tmp_path / "results"
    # a copy (mtimes preserved) keeps the session's results untouched for the other tests
    shutil.copytree(src_tmp / "results", res, symlinks=True, ignore=shutil.ignore_patterns(".state"))
    cfg = derived_config(tmp_path, "cfg.yaml", res, smoke_dataset(smoke_run))
    wd = workdir(tmp_path)
    base = ["--cores", "2", "--snakefile", SNAKEFILE, "--configfile", str(cfg)]
    assert nothing_to_do(snakemake([*base, "-n"], cwd=wd).stdout), "the copied results are not complete"

    variant = SMOKE["cam"].get("variant", "pnoc_ls")
    cams = res / f"cams/{variant}/seed0/val"
    assert cams.is_dir()
    models = {p: stat_of(p) for p in res.glob("**/model.pt")}
    others = {k: v for k, v in tree_stats(res).items() if not k.startswith(f"cams/{variant}/seed0/val/")
              and not k.startswith("logs/")}
    old = {p.name: p.read_bytes() for p in cams.glob("*.npz")}
    assert old

    run = snakemake(["-f", str(cams), *base], cwd=wd)
    print(f"[-f] planned {job_stats(run.stdout)}, finished {finished_rules(run.stdout)}")
    assert job_stats(run.stdout) == {"infer_cams": 1}
    assert finished_rules(run.stdout) == ["infer_cams"]
    assert {p: stat_of(p) for p in res.glob("**/model.pt")} == models, "an upstream model was rewritten"
    after = {k: v for k, v in tree_stats(res).items() if not k.startswith(f"cams/{variant}/seed0/val/")
             and not k.startswith("logs/")}
    assert after == others, "files outside the regenerated folder changed"
    new = {p.name: p.read_bytes() for p in cams.glob("*.npz")}
    assert new.keys() == old.keys() and all(new[k] == old[k] for k in old), "regenerated CAMs differ"


# ------------------------------------------------- (e) a parameter change reruns rule + descendants
def _dry_rules(args, cwd=ROOT):
    p = snakemake(["-n", "--quiet", "rules", "--rerun-triggers", "params", *args], cwd=cwd)
    return job_stats(p.stdout), p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("section,key,value,rule", [
    ("priors", "th_step", 0.1, "evaluate_priors"),
    ("inference", "scales", [1.0], "infer_cams"),
])
def test_param_change_reruns_exactly_rule_and_descendants(smoke_run, tmp_path, section, key, value, rule):
    """On the completed smoke results, changing one rule's parameters in the config makes
    `snakemake -n` list exactly that rule's jobs and their descendants (= `-R <rule>`), nothing upstream."""
    smoke_tmp, cfg, _ = smoke_run
    wd = smoke_workdir(smoke_tmp)  # the smoke run's metadata (parameters of its jobs) lives there
    unchanged, out = _dry_rules(["--configfile", str(cfg)], cwd=wd)
    assert unchanged == {}, f"smoke results not complete:\n{out[-3000:]}"

    c = yaml.safe_load(Path(cfg).read_text())
    default = yaml.safe_load((ROOT / "config.yaml").read_text())[section][key]
    assert c.setdefault(section, {}).get(key, default) != value
    c[section][key] = value
    changed_cfg = tmp_path / "changed.yaml"
    changed_cfg.write_text(yaml.safe_dump(c))
    changed, out = _dry_rules(["--configfile", str(changed_cfg)], cwd=wd)
    forced, _ = _dry_rules(["--configfile", str(cfg), "-R", rule], cwd=wd)
    print(f"[params] {section}.{key} -> {value!r}: snakemake -n lists {changed}")
    assert changed == forced, (changed, forced)
    assert rule in changed and "summary" in changed
    # the jobs triggered by the change itself (not by an updated input) are exactly the rule's
    m = re.search(r"params have changed since last execution:\n\s+(.+)\n", out)
    assert m and {r.strip() for r in m.group(1).split(",")} == {rule}, out[-3000:]
    upstream = {"make_dataset", "train_classifier", "train_cam"}
    if rule == "evaluate_priors":
        upstream |= {"infer_cams", "train_ccam", "train_affinity"}
    assert not upstream & set(changed), changed


# --------------------------------------------------------------------------- (f) fast dry runs
SLURM_ENV = {
    "PNOC_SLURM_ACCOUNT": "my_project",
    "PNOC_SLURM_PARTITION": "cpu",
    "PNOC_SLURM_GPU_PARTITION": "gpu",
    "PNOC_SLURM_GPU_CONSTRAINT": "a100",
    "PNOC_SLURM_GPU_EXTRA": "--exclusive",
}


def _job_blocks(output: str) -> dict[str, list[str]]:
    """rule -> the dry run's job blocks (lines from "rule X:" up to the next blank line)."""
    blocks: dict[str, list[str]] = {}
    cur = None
    for ln in output.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", ln)
        if m:
            cur = m.group(1)
            blocks.setdefault(cur, []).append("")
        elif cur and ln.strip():
            blocks[cur][-1] += ln + "\n"
        else:
            cur = None
    return blocks


@pytest.mark.parametrize("with_env", [True, False], ids=["env-set", "env-unset"])
def test_user_slurm_profile_dry_run(with_env, tmp_path):
    """`snakemake -n --profile slurm` on the default config, with the PNOC_SLURM_* variables set to
    example values and unset: the YTE profile renders and every rule gets its site resources.

    Started in the repository root (so `--profile slurm` is found by name, as the README says), but
    with a private working directory (``--directory``): the default config's relative ``results``
    and dataset root resolve there, so a finished demo in the checkout (``results/`` complete: the
    dry run would say "Nothing to be done" and list no job) or a stale ``.snakemake/`` cannot change
    the plan, and the dry run writes nothing into the checkout. The Snakefile finds its config.yaml
    beside itself, so the default config applies there too.
    """
    env = {k: v for k, v in venv_env().items() if not k.startswith("PNOC_SLURM_")}
    if with_env:
        env.update(SLURM_ENV)
    wd = tmp_path / "wd"
    p = snakemake(["-n", "--profile", "slurm", "--directory", str(wd)], env=env)
    assert re.search(r"Using profiles? slurm", p.stdout), p.stdout[-3000:]
    assert not nothing_to_do(p.stdout), p.stdout[-3000:]
    assert not (wd / "results").exists()  # a dry run
    blocks = _job_blocks(p.stdout)
    assert "train_classifier" in blocks and "evaluate_priors" in blocks, p.stdout[-3000:]
    train = blocks["train_classifier"][0]
    evalp = blocks["evaluate_priors"][0]
    assert "gpu=1" in train and "runtime=120" in train, train
    if with_env:
        assert "slurm_partition=gpu" in train and "constraint=a100" in train, train
        assert "slurm_extra=--exclusive" in train and "slurm_account=my_project" in train, train
        assert "slurm_partition=cpu" in evalp and "constraint" not in evalp, evalp
    else:
        assert "slurm_partition" not in p.stdout and "constraint" not in p.stdout
        assert "slurm_account" not in p.stdout


def _dataset_splits(name: str, root: Path) -> set[str]:
    if name == "voc12":
        return {p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt")}
    return {p.name for p in root.iterdir() if p.is_dir() and p.name.endswith("2014")}


@pytest.mark.parametrize("name", ["voc12", "coco14"])
def test_paper_config_dry_run(name, tmp_path):
    """`snakemake -n --configfile config/<dataset>.yaml` with dataset.root at a tiny dataset in the
    real layout: the config validates, the whole DAG builds, and every split it uses exists."""
    from fixtures import make_coco, make_voc

    if name == "voc12":
        root = make_voc(tmp_path / "VOCdevkit" / "VOC2012", splits={"train_aug": 4, "train": 3, "val": 3})
    else:
        root = make_coco(tmp_path / "coco14")
    cfg = yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "dataset": {"root": str(root)}}))
    p = snakemake(["-n", "-p", "--configfile", str(ROOT / "config" / f"{name}.yaml"), str(override)])
    stats = job_stats(p.stdout)
    for rule in ("train_classifier", "train_cam", "infer_cams", "train_ccam", "train_affinity",
                 "train_segmentation", "summary"):
        assert rule in stats, (rule, stats)
    assert "make_dataset" not in stats
    used = set(re.findall(r"split=(\w+)", p.stdout))
    assert used and used <= _dataset_splits(name, root), (used, _dataset_splits(name, root))
    assert {cfg["dataset"][k] for k in ("train_split", "eval_split", "val_split")} <= used
    assert str(root) in p.stdout and str(tmp_path / "results") in p.stdout


@pytest.mark.parametrize("name", ["voc12", "coco14"])
def test_paper_config_on_four_gpus_dry_run(name, tmp_path):
    """config/gpus4.yaml on top of a paper config: every training job runs torchrun with 4 processes (PoolNet
    2) in one job asking for 4 (2) GPUs, inference stays `python`, and the per-image stages are 8 shard jobs."""
    from fixtures import make_coco, make_voc

    if name == "voc12":
        root = make_voc(tmp_path / "VOCdevkit" / "VOC2012", splits={"train_aug": 9, "train": 9, "val": 9})
    else:
        root = make_coco(tmp_path / "coco14", n=9)
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "dataset": {"root": str(root)}}))
    p = snakemake(["-n", "-p", "--configfile", str(ROOT / "config" / f"{name}.yaml"), str(ROOT / "config/gpus4.yaml"),
                   str(override)])
    stats = job_stats(p.stdout)
    by_module = {m: l for l, m in re.findall(r"(torchrun --standalone --nproc_per_node \d|python) -m (pnoc\.\w+\.\w+)",
                                             p.stdout)}
    for module in ("pnoc.cam.train_classifier", "pnoc.cam.train_cam", "pnoc.saliency.train_ccam",
                   "pnoc.affinity.train_affinity", "pnoc.segmentation.train_segmentation"):
        assert by_module[module] == "torchrun --standalone --nproc_per_node 4", (module, by_module.get(module))
    assert by_module["pnoc.saliency.train_poolnet"] == "torchrun --standalone --nproc_per_node 2"
    assert by_module["pnoc.cam.infer_cams"] == "python"
    assert stats["infer_cams"] == 8 * stats["gather_cams"], stats
    gpus = dict(re.findall(r"rule (train_\w+):.*?resources: [^\n]*?gpu=(\d+)", p.stdout, re.S))
    assert gpus.get("train_classifier") == "4" and gpus.get("train_poolnet") == "2", gpus


def test_global_batch_that_does_not_split_fails_the_dry_run(tmp_path):
    over = tmp_path / "g3.yaml"
    over.write_text(yaml.safe_dump({"results": str(tmp_path / "results"), "resources": {"gpus_per_job": 4},
                                    "classifier": {"batch_size": 18}}))
    p = snakemake(["-n", "--configfile", str(over)], check=False)
    assert p.returncode != 0
    assert ("classifier.batch_size=18 is not divisible by resources.gpus_per_job=4 (for train_classifier)"
            in p.stdout), p.stdout[-2000:]


# ---------------------------------------- a config change reruns a finished training from scratch
def test_changed_config_retrains_instead_of_refusing_finished_state(tmp_path):
    """Snakemake reruns a training rule whose parameters changed: the finished resume state of the
    old configuration must give way (train from scratch); an unfinished one is still refused, and a
    finished one of the same configuration is restored (nothing left to train)."""
    from pnoc.training import EpochRunner

    def train(config, epochs):
        model = torch.nn.Linear(2, 1)
        runner = EpochRunner(tmp_path / "state", config, epochs, seed=0, model=model)
        ran = []
        for epoch in runner:
            ran.append(epoch)
            runner.log(epoch, {"loss": float(epoch)})
        return runner.start_epoch, ran

    assert train({"epochs": "2", "lr": "0.1"}, 2) == (0, [0, 1])
    assert train({"epochs": "2", "lr": "0.1"}, 2) == (2, [])        # same config: restored, finished
    assert train({"epochs": "2", "lr": "0.2"}, 2) == (0, [0, 1])    # changed config: from scratch
    # an unfinished state (killed after epoch 1 of 3) of another configuration is refused
    runner = EpochRunner(tmp_path / "state2", {"epochs": "3", "lr": "0.1"}, 3, seed=0, model=torch.nn.Linear(2, 1))
    for epoch in runner:
        if epoch == 1:  # killed during epoch 2: the checkpoint of epoch 1 exists
            break
        runner.log(epoch, {"loss": 0.0})
    assert (tmp_path / "state2" / "last.pt").is_file()
    with pytest.raises(RuntimeError, match="different configuration"):
        list(EpochRunner(tmp_path / "state2", {"epochs": "3", "lr": "0.2"}, 3, seed=0, model=torch.nn.Linear(2, 1)))


def test_changed_inputs_retrain_instead_of_restoring_finished_state(tmp_path):
    """Snakemake reruns a training whose input artifacts changed under the same parameters
    (regenerated pseudo masks, affinity labels, classifier): the finished state of the old inputs
    must not be restored (it was, and the rerun silently kept the stale model)."""
    from pnoc.training import EpochRunner, input_fingerprint

    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "a.png").write_bytes(b"1")
    model_file = tmp_path / "classifier.pt"
    model_file.write_bytes(b"m")

    def train(epochs=2):
        runner = EpochRunner(tmp_path / "state", {"epochs": str(epochs)}, epochs, seed=0,
                             inputs=(masks, model_file, None, tmp_path / "absent"), model=torch.nn.Linear(2, 1))
        ran = [epoch for epoch in runner]
        return runner.start_epoch, ran

    fp = input_fingerprint([masks, model_file, None, tmp_path / "absent"])
    assert sorted(fp) == sorted([str(masks), str(model_file)])
    assert train() == (0, [0, 1])
    assert train() == (2, [])                      # same inputs: restored, nothing to train
    (masks / "b.png").write_bytes(b"2")            # a new file in an input folder
    assert train() == (0, [0, 1])
    assert train() == (2, [])
    st = model_file.stat()
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten input file
    assert input_fingerprint([model_file]) != {str(model_file): fp[str(model_file)]}
    assert train() == (0, [0, 1])
    # an unfinished state of other inputs is refused, naming what changed
    runner = EpochRunner(tmp_path / "s3", {"epochs": "3"}, 3, seed=0, inputs=(masks,), model=torch.nn.Linear(2, 1))
    for epoch in runner:
        if epoch == 1:
            break
    (masks / "a.png").write_bytes(b"11")
    with pytest.raises(RuntimeError, match="_inputs"):
        list(EpochRunner(tmp_path / "s3", {"epochs": "3"}, 3, seed=0, inputs=(masks,), model=torch.nn.Linear(2, 1)))
