import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

# Every process this test session starts inherits this variable: subprocesses copy os.environ, SLURM
# jobs get the environment of the snakemake that submits them, slurmd and its slurmstepd that of
# tests/slurm/cluster.sh. At the end of the session no live process may carry it (no_leftover_processes).
SESSION_MARK = "PNOC_TEST_SESSION"
os.environ[SESSION_MARK] = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
# daemons that PNOC_SLURM_KEEP=1 leaves running on purpose (tests/slurm/util.py)
KEPT_DAEMONS = {"munged", "slurmctld", "slurmscriptd", "slurmd"}


def session_processes() -> dict[int, str]:
    """Live processes started by this session, other than pytest itself: pid -> "ppid=N <command line>".

    A process counts when its environment holds this session's SESSION_MARK, or when it descends from
    pytest (whatever its environment). Zombies have ended already and do not count. Linux only (/proc);
    processes whose environment cannot be read (another user's, without root) are not seen.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return {}
    me = os.getpid()
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    kept = KEPT_DAEMONS if os.environ.get("PNOC_SLURM_KEEP") == "1" else set()
    parent, marked, desc = {}, set(), {}
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        pid = int(d.name)
        try:
            stat = (d / "stat").read_text()
            comm = (d / "comm").read_text().strip()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended meanwhile
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z" or comm in kept:
            continue
        parent[pid] = int(ppid)
        desc[pid] = f"ppid={ppid} {cmd or '[' + comm + ']'}"
        try:
            if mark in (d / "environ").read_bytes().split(b"\0"):
                marked.add(pid)
        except OSError:
            pass

    def descends_from_me(pid: int) -> bool:
        seen = set()
        while pid in parent and pid not in seen:
            seen.add(pid)
            pid = parent[pid]
            if pid == me:
                return True
        return False

    return {pid: desc[pid] for pid in sorted(parent) if pid in marked or descends_from_me(pid)}


# The modules whose tests use the one SLURM test cluster of tests/slurm/cluster.sh (its daemons, ports and state
# are the machine's: one cluster at a time).
SLURM_MODULES = ("tests/test_hpc.py", "tests/test_slurm.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs the suite in two pytest-xdist workers (`-n 2 --dist loadgroup`): every test of
    SLURM_MODULES in one worker, one after another, as one work unit; every other test is its own unit.

    The SLURM tests spend most of their time waiting for the scheduler (the executor plugin polls every 11 s), so
    the other worker runs the rest meanwhile. xdist's own `xdist_group` marks cannot form the group under
    pytest 9 (xdist 3.8 appends the group to `item._nodeid`, which pytest 9 no longer reads), hence a scheduler
    that groups by module. The unit with the most tests is handed out first, so the SLURM group (about 18 of the
    suite's 40 single-process minutes) starts at once instead of becoming the tail.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SlurmTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "slurm" if nodeid.split("::")[0] in SLURM_MODULES else nodeid

    return SlurmTestsTogether(config, log)


def pytest_collection_modifyitems(config, items):
    """A test that needs the SLURM cluster must live in SLURM_MODULES, or a second worker would start a second
    cluster beside the first."""
    stray = [item.nodeid for item in items
             if item.get_closest_marker("slurm") and item.nodeid.split("::")[0] not in SLURM_MODULES]
    if stray:
        raise pytest.UsageError(f"tests marked slurm outside {', '.join(SLURM_MODULES)} (conftest.SLURM_MODULES): "
                                f"{', '.join(stray)}; move them there or add their module")


@pytest.fixture(scope="session", autouse=True)
def no_leftover_processes():
    """The suite leaves no process running: at the end of the session (after every other fixture's
    teardown: SLURM clusters stopped, runs finished) nothing that the session started may be alive.

    Stragglers get 30 s to end (a job step finishing after scancel, a daemon shutting down); what is
    still there is listed with pid and command line, killed, and fails the session.
    """
    yield
    deadline = time.monotonic() + 30
    left = session_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = session_processes()
    if not left:
        return
    report = "\n".join(f"  pid {pid} {d}" for pid, d in left.items())
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in session_processes():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while session_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_processes():
            break
    pytest.fail(f"{len(left)} process(es) started by the test session still ran at its end (now killed):\n"
                f"{report}", pytrace=False)


def load_script(path: Path, name: str):
    """A script that is not a package module (``benchmarks/*.py``), loaded from its path as module ``name``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def venv_env() -> dict:
    """Environment whose PATH starts with the interpreter's bin folder (snakemake, python of the venv)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if shutil.which("scontrol") and not _slurm_controller_up():
        # Importing the SLURM executor plugin runs `scontrol show config`, which waits ~10 s for a controller
        # when the SLURM client is installed (the suite installs it) but no slurmctld runs: ~9 s more per
        # snakemake call. Without a config file scontrol fails at once and the plugin falls back to defaults.
        env["SLURM_CONF"] = os.devnull
    return env


def _slurm_controller_up() -> bool:
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "slurmctld":
                return True
        except OSError:  # the process ended meanwhile
            continue
    return False


def snakemake(args, cwd=ROOT, timeout=1200, check=True, env=None, executable=None):
    """Run snakemake from the repository root; returns the CompletedProcess (stdout+stderr merged)."""
    exe = executable or shutil.which("snakemake", path=venv_env()["PATH"])
    if Path(cwd).resolve() != ROOT.resolve() and "--snakefile" not in args and "-s" not in args:
        args = [*args, "--snakefile", str(ROOT / "Snakefile")]
    p = subprocess.run([exe, *args], cwd=cwd, env=env or venv_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-6000:]}")
    return p


def job_stats(output: str) -> dict[str, int]:
    """The first "Job stats:" table of a snakemake run or dry run: rule -> job count (no ``total``)."""
    lines = output.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == "Job stats:")
    except StopIteration:
        return {}
    counts = {}
    for ln in lines[start + 3:]:  # header, rule line
        m = re.match(r"^(\w+)\s+(\d+)$", ln.strip())
        if not m:
            break
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def smoke_config(tmp: Path, **overrides) -> Path:
    """config/smoke.yaml with results (and the generated dataset) under ``tmp``."""
    cfg = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    cfg["results"] = str(tmp / "results")
    cfg["dataset"]["root"] = str(tmp / "results" / "dataset" / "synthetic")
    for k, v in overrides.items():
        cfg[k] = v
    path = tmp / "smoke.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The whole smoke DAG run once through snakemake (shared by the workflow tests)."""
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = smoke_config(tmp)
    p = snakemake(["--cores", "2", "--configfile", str(cfg)], timeout=1500, cwd=smoke_workdir(tmp))
    return tmp, cfg, p


def smoke_workdir(tmp: Path) -> Path:
    """The smoke run's own snakemake working folder (its .snakemake: metadata, locks, incomplete markers), so
    no test reads or writes the .snakemake of the checkout it runs in; snakemake() adds --snakefile."""
    wd = tmp / "wd"
    wd.mkdir(exist_ok=True)
    return wd
