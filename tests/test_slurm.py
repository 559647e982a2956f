"""Workflows through a real single-node SLURM cluster and the real snakemake slurm executor plugin.

The cluster is started by ``tests/slurm/cluster.sh`` (root on Debian only; elsewhere these tests
are skipped with the reason printed; ``PNOC_SLURM_REQUIRED=1`` turns the skip into a failure).
Settings come from the test profile ``tests/slurm/profile/config.yaml``; helpers live in
``tests/slurm/util.py`` so other modules (the pipeline smoke DAG) can reuse them.

The node advertises TWO FAKE GPUS (GRES gpu:fake:2 backed by /dev/null device nodes): these tests
check that SLURM *schedules* GPU jobs (``--gpus=1`` accepted, ``CUDA_VISIBLE_DEVICES`` set,
``TresPerJob=gres:gpu:1``) -- not CUDA; ``torch.cuda.is_available()`` stays False inside the job.

Every snakemake run is wrapped in ``timeout -k 30 -s INT <limit>`` so that a hang fails the test.
Each SLURM job costs ~10-15 s (sbatch, snakemake starting twice inside the job, polling).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


def _load_util():
    name = "pnoc_slurm_testutil"
    if name not in sys.modules:  # one module object for every test module that loads it
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "slurm" / "util.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


slurm_util = _load_util()

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm_cluster():
    """The running test cluster (started here, stopped at module end unless it was already up)."""
    with slurm_util.slurm_cluster() as info:
        yield info


# A 3-rule throwaway workflow. Rule `train` stands in for a GPU training step: threads=2 and
# resources gpu=1 must become `--cpus-per-task=2` and `--gpus=1` on its sbatch line. It records what
# SLURM granted (from inside the job) into its output. With a file `slow` in the working directory it
# sleeps 300 s first (so a test can scancel it while it runs); `train.started` marks that it runs.
SNAKEFILE = textwrap.dedent(
    """
    rule all:
        input: "report.txt"

    rule prepare:
        output: "prepared.txt"
        shell: "echo prepared > {output}"

    rule train:
        input: "prepared.txt"
        output: "model.txt"
        threads: 2
        resources: gpu=1
        shell:
            "touch train.started; "
            "if [ -e slow ]; then sleep 300; fi; "
            "echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES > {output}; "
            "scontrol show job $SLURM_JOB_ID | tr ' ' '\\\\n' | grep -E '^(TresPerJob|NumCPUs|Partition)=' >> {output}"

    rule report:
        input: "model.txt"
        output: "report.txt"
        shell: "cat {input} > {output}"
    """
)


def _workflow(tmp_path: Path) -> Path:
    wd = tmp_path / "wf"
    wd.mkdir()
    (wd / "Snakefile").write_text(SNAKEFILE)
    return wd


def test_three_rule_workflow_runs_through_slurm(slurm_cluster, tmp_path):
    """a) all jobs go through sbatch; the GPU rule asks for --gpus=1 --cpus-per-task=2 and gets them."""
    wd = _workflow(tmp_path)
    run = slurm_util.run_snakemake_slurm(wd, [], timeout=300, log=tmp_path / "run.log")
    print(f"[slurm] 3-rule workflow: rc={run.returncode} in {run.elapsed:.1f}s "
          f"(cluster start {slurm_cluster.start_seconds:.1f}s); sbatch lines in {run.sbatch_file}:")
    for line in run.sbatch_lines:
        print("  sbatch call:", line.split(" --wrap=")[0])
    assert not run.timed_out, f"snakemake hung (timeout):\n{run.tail()}"
    assert run.returncode == 0, run.tail()

    for f in ("prepared.txt", "model.txt", "report.txt"):
        assert (wd / f).is_file(), f
    assert len(run.sbatch_lines) == 3, run.sbatch_lines

    train = [ln for ln in run.sbatch_lines if "--comment rule_train " in ln]
    assert len(train) == 1, run.sbatch_lines
    assert "--gpus=1" in train[0] and "--cpus-per-task=2" in train[0], train[0]
    for other in (ln for ln in run.sbatch_lines if ln not in train):
        assert "--gpus" not in other and "--cpus-per-task=1" in other, other
    assert all(" -p debug " in ln for ln in run.sbatch_lines), "profile default partition not used"

    # what the job saw: the fake GPU was allocated (scheduling, not CUDA)
    granted = (wd / "model.txt").read_text()
    print("[slurm] inside the train job:\n" + granted)
    assert "CUDA_VISIBLE_DEVICES=0" in granted
    assert "TresPerJob=gres:gpu:1" in granted
    assert "NumCPUs=2" in granted


def test_scancel_fails_run_then_rerun_completes(slurm_cluster, tmp_path):
    """b) scancel of the running training job fails the workflow; a plain rerun then completes."""
    wd = _workflow(tmp_path)
    (wd / "slow").touch()
    proc, log = slurm_util.start_snakemake_slurm(wd, [], timeout=300, log=tmp_path / "cancelled.log")
    try:
        jobid = slurm_util.wait_for_job("train", "RUNNING", timeout=180, marker=wd / "train.started")
    except TimeoutError:
        proc.send_signal(2)
        slurm_util.finish_run(proc, log, grace=90)
        raise
    t_cancel = time.monotonic()
    subprocess.run(["scancel", jobid], check=True, timeout=30)
    first = slurm_util.finish_run(proc, log)
    print(f"[slurm] scancel {jobid}: snakemake exited rc={first.returncode} "
          f"{time.monotonic() - t_cancel:.1f}s later (whole run {first.elapsed:.1f}s)")
    assert not first.timed_out, f"snakemake did not notice the cancelled job:\n{first.tail()}"
    assert first.returncode != 0, first.tail()
    assert not (wd / "model.txt").exists() and not (wd / "report.txt").exists()
    assert (wd / "prepared.txt").is_file()  # finished upstream work is kept

    (wd / "slow").unlink()
    second = slurm_util.run_snakemake_slurm(wd, [], timeout=300, log=tmp_path / "rerun.log")
    print(f"[slurm] rerun: rc={second.returncode} in {second.elapsed:.1f}s, "
          f"{len(second.sbatch_lines)} job(s) submitted")
    assert not second.timed_out, second.tail()
    assert second.returncode == 0, second.tail()
    assert (wd / "report.txt").is_file()
    rules = sorted(ln.split("--comment ")[1].split()[0] for ln in second.sbatch_lines)
    assert rules == ["rule_report", "rule_train"], rules  # `prepare` is not redone


def test_user_profile_places_gpu_rule(slurm_cluster, tmp_path):
    """c) the user-facing profile slurm/profile.yaml renders its YTE templates from PNOC_SLURM_* and
    puts the GPU training rule on its own partition/constraint/extra options.

    The test cluster has no accounting, so the run adds what that needs (squeue status polling,
    fast first poll) on the command line; PNOC_SLURM_ACCOUNT stays unset for the same reason.
    """
    wd = tmp_path / "wf"
    wd.mkdir()
    (wd / "Snakefile").write_text(textwrap.dedent(
        """
        rule all:
            input: "weights.txt"

        rule prepare:
            output: "prepared.txt"
            shell: "echo prepared > {output}"

        rule train_classifier:
            input: "prepared.txt"
            output: "weights.txt"
            threads: 2
            resources: gpu=1
            shell: "echo trained > {output}"
        """
    ))
    env = {
        "PNOC_SLURM_PARTITION": "debug",
        "PNOC_SLURM_GPU_PARTITION": "gpu",
        "PNOC_SLURM_GPU_CONSTRAINT": "fakegpu",
        "PNOC_SLURM_GPU_EXTRA": "--mail-type=NONE",
    }
    run = slurm_util.run_snakemake_slurm(
        wd,
        ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
         "--latency-wait", "5"],
        timeout=300, profile=slurm_util.REPO / "slurm", log=tmp_path / "user-profile.log", env=env,
    )
    for line in run.sbatch_lines:
        print("  sbatch call:", line.split(" --wrap=")[0])
    assert not run.timed_out, run.tail()
    assert run.returncode == 0, run.tail()
    assert (wd / "weights.txt").is_file()
    train = [ln for ln in run.sbatch_lines if "--comment rule_train_classifier " in ln]
    prep = [ln for ln in run.sbatch_lines if "--comment rule_prepare " in ln]
    assert len(train) == 1 and len(prep) == 1, run.sbatch_lines
    for opt in ("-p gpu", "-C fakegpu", "--mail-type=NONE", "--gpus=1", "--cpus-per-task=2",
                "--requeue", "-t 120"):
        assert opt in train[0], (opt, train[0])
    assert "-p debug" in prep[0] and "-C " not in prep[0] and "--mail-type" not in prep[0], prep[0]
    # the profile's log folder, relative to the working directory
    assert (wd / "logs" / "slurm").is_dir()
