"""Helpers for tests that run snakemake workflows through a real (single-node) SLURM cluster.

Reusable by any test module (e.g. the pipeline's smoke DAG)::

    import importlib.util, sys
    from pathlib import Path

    def _load_util():  # tests/ is not a package; load by path, once (sys.modules entry needed
        name = "pnoc_slurm_testutil"  # before exec: dataclasses look the module up there)
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "slurm" / "util.py")
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
        return sys.modules[name]

    slurm_util = _load_util()

    @pytest.fixture(scope="module")
    def slurm_cluster():
        with slurm_util.slurm_cluster() as info:
            yield info

    def test_smoke(slurm_cluster, tmp_path):
        run = slurm_util.run_snakemake_slurm(workdir, ["--snakefile", ..., "--configfile", ...], timeout=900)
        assert run.returncode == 0, run.tail()

The cluster comes from ``tests/slurm/cluster.sh`` (root + Debian only; anything else is a skip), the
snakemake settings from the test profile ``tests/slurm/profile/config.yaml``. Every snakemake run is
wrapped in ``timeout -k 30 -s INT <limit>``: SIGINT makes the slurm plugin scancel its jobs and release
the lock, so a hang becomes a failed run instead of a stuck test session.

Fake GRES: the node advertises one fake GPU, so these tests check SLURM *scheduling* of GPU jobs
(``--gpus=1`` accepted, ``CUDA_VISIBLE_DEVICES`` set, ``TresPerJob=gres:gpu:1``), never CUDA.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
PROFILE = REPO / "tests" / "slurm" / "profile"

#: exit code of cluster.sh for "cannot run here" (not root, not Debian, packages not installable)
SKIP_RC = 2


def snakemake_exe() -> str:
    """The snakemake next to the running interpreter (the project's venv), else the one on PATH."""
    cand = Path(sys.executable).parent / "snakemake"
    if cand.exists():
        return str(cand)
    found = shutil.which("snakemake")
    if not found:
        raise FileNotFoundError("snakemake not found next to sys.executable nor on PATH")
    return found


def cluster(cmd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``tests/slurm/cluster.sh <cmd>`` (start|stop|status); output captured, never raises on rc."""
    return subprocess.run(
        ["bash", str(CLUSTER_SH), cmd], capture_output=True, text=True, timeout=timeout
    )


@dataclass
class ClusterInfo:
    started_here: bool  # False when the cluster was already running before (then it is left running)
    start_seconds: float
    start_output: str


@contextlib.contextmanager
def slurm_cluster() -> Iterator[ClusterInfo]:
    """Start the test cluster for the duration of the block; skip the caller's tests if impossible.

    - cluster.sh exits 2 (not root / not Debian / apt failed): ``pytest.skip`` with its reason printed,
      unless ``PNOC_SLURM_REQUIRED=1`` (a CI job dedicated to SLURM), which turns it into a failure.
    - any other non-zero exit (installed, but the daemons do not come up): ``pytest.fail`` with the log.
    - on exit: jobs are cancelled and the daemons stopped, but only if this block started them
      (a cluster someone started by hand stays up), and not with ``PNOC_SLURM_KEEP=1``. A job
      process that outlives the cluster (``cluster.sh stop`` rc 3: it names and kills it) fails
      the teardown.
    """
    import pytest

    was_running = cluster("status", timeout=60).returncode == 0
    t0 = time.monotonic()
    res = cluster("start")
    elapsed = time.monotonic() - t0
    out = (res.stdout + res.stderr).strip()
    print(f"[slurm] cluster.sh start: rc={res.returncode} in {elapsed:.1f}s\n{out}")
    if res.returncode != 0:
        msg = f"single-node SLURM not available (cluster.sh start rc={res.returncode}): {out.splitlines()[-1] if out else ''}"
        if res.returncode == SKIP_RC and os.environ.get("PNOC_SLURM_REQUIRED") != "1":
            pytest.skip(msg)
        pytest.fail(msg + "\n" + out)
    info = ClusterInfo(started_here=not was_running, start_seconds=elapsed, start_output=out)
    try:
        yield info
    finally:
        cancel_all_jobs()
        if info.started_here and os.environ.get("PNOC_SLURM_KEEP") != "1":
            res = cluster("stop", timeout=180)
            out = (res.stdout + res.stderr).strip()
            print(f"[slurm] cluster.sh stop: rc={res.returncode}\n{out}")
            # rc 3: processes of the jobs outlived the cluster (cluster.sh lists and kills them)
            if res.returncode != 0:
                pytest.fail(f"cluster.sh stop failed (rc={res.returncode}):\n{out}", pytrace=False)


def squeue(fmt: str = "%i|%k|%T", states: str = "all") -> list[list[str]]:
    """Rows of ``squeue -h -t <states> -o <fmt>`` split on '|' (default: id, comment (= rule_<name>), state)."""
    res = subprocess.run(
        ["squeue", "-h", "-t", states, "-o", fmt], capture_output=True, text=True, timeout=30
    )
    return [line.split("|") for line in res.stdout.splitlines() if line.strip()]


def wait_for_job(rule: str, state: str = "RUNNING", timeout: float = 120, marker: Path | None = None) -> str:
    """Wait until a job of ``rule`` is in ``state`` (and ``marker`` exists, if given); return its job id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for jobid, comment, st in squeue():
            if comment == f"rule_{rule}" and st == state and (marker is None or marker.exists()):
                return jobid
        time.sleep(0.5)
    raise TimeoutError(f"no {state} job for rule {rule} after {timeout}s; squeue: {squeue()}")


def cancel_all_jobs() -> None:
    """scancel every job still pending/running on the test cluster (leftovers of a killed snakemake)."""
    if shutil.which("squeue") is None:
        return
    ids = [row[0] for row in squeue("%i", "PENDING,RUNNING,SUSPENDED,COMPLETING")]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


@dataclass
class SnakemakeRun:
    cmd: list[str]
    returncode: int
    elapsed: float
    log: Path  # combined stdout+stderr of the snakemake run
    sbatch_file: Path  # the "sbatch call: ..." lines, one per submitted job
    output: str = ""
    sbatch_lines: list[str] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        # timeout(1): 124 = limit reached and the command exited after SIGINT, 137 = needed SIGKILL
        return self.returncode in (124, 137)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def snakemake_cmd(args: Sequence[str], timeout: float, profile: Path | str = PROFILE, verbose: bool = True) -> list[str]:
    """``timeout -k 30 -s INT <timeout> snakemake --profile <profile> [--verbose] <args>``."""
    cmd = ["timeout", "-k", "30", "-s", "INT", str(int(timeout)), snakemake_exe(), "--profile", str(profile)]
    if verbose:  # needed for the "sbatch call: ..." lines (a dry run never prints them)
        cmd.append("--verbose")
    return cmd + list(args)


def start_snakemake_slurm(
    workdir: Path | str,
    args: Sequence[str] = (),
    timeout: float = 600,
    *,
    profile: Path | str = PROFILE,
    log: Path | str | None = None,
    env: dict | None = None,
) -> tuple[subprocess.Popen, Path]:
    """Start snakemake in the background (for tests that act on the cluster meanwhile).

    Returns ``(process, log_path)``; finish it with :func:`finish_run`.
    """
    workdir = Path(workdir)
    log = Path(log) if log else workdir / "snakemake-slurm.log"
    cmd = snakemake_cmd(args, timeout, profile)
    fh = open(log, "w")
    fh.write("$ " + " ".join(cmd) + "\n")
    fh.flush()
    proc = subprocess.Popen(
        cmd, cwd=workdir, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    fh.close()
    proc._pnoc_t0 = time.monotonic()  # type: ignore[attr-defined]
    proc._pnoc_cmd = cmd  # type: ignore[attr-defined]
    proc._pnoc_timeout = timeout  # type: ignore[attr-defined]
    return proc, log


def finish_run(proc: subprocess.Popen, log: Path, grace: float | None = None) -> SnakemakeRun:
    """Wait for a run from :func:`start_snakemake_slurm`; collect its log and sbatch lines."""
    cmd = proc._pnoc_cmd  # type: ignore[attr-defined]
    # timeout(1) itself ends snakemake by limit + 30 s; this is only a backstop
    limit = proc._pnoc_timeout + 60 if grace is None else grace  # type: ignore[attr-defined]
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    elapsed = time.monotonic() - proc._pnoc_t0  # type: ignore[attr-defined]
    output = Path(log).read_text(errors="replace")
    lines = [ln.split("sbatch call: ", 1)[1] for ln in output.splitlines() if "sbatch call: " in ln]
    sbatch_file = Path(log).with_name(Path(log).stem + ".sbatch.txt")
    sbatch_file.write_text("".join(f"sbatch call: {ln}\n" for ln in lines))
    return SnakemakeRun(cmd, rc, elapsed, Path(log), sbatch_file, output, lines)


def run_snakemake_slurm(
    workdir: Path | str,
    args: Sequence[str] = (),
    timeout: float = 600,
    *,
    profile: Path | str = PROFILE,
    log: Path | str | None = None,
    env: dict | None = None,
) -> SnakemakeRun:
    """Run ``snakemake --profile tests/slurm/profile --verbose <args>`` in ``workdir`` under SLURM.

    ``timeout`` (seconds) is enforced by ``timeout -k 30 -s INT``: on expiry snakemake gets SIGINT
    (the plugin scancels its jobs, releases the lock), then SIGKILL 30 s later; ``run.timed_out``
    tells. Output goes to ``log`` (default ``<workdir>/snakemake-slurm.log``), the sbatch lines to
    ``<log stem>.sbatch.txt`` beside it. Never raises on a failed run: assert on ``run.returncode``.
    """
    proc, log_path = start_snakemake_slurm(workdir, args, timeout, profile=profile, log=log, env=env)
    run = finish_run(proc, log_path)
    if run.timed_out:
        cancel_all_jobs()  # SIGKILL leaves orphans; SIGINT should not, but be sure
    return run
