import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def venv_env() -> dict:
    """Environment whose PATH starts with the interpreter's bin folder (snakemake, python of the venv)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def snakemake(args, cwd=ROOT, timeout=1200, check=True, env=None):
    """Run snakemake from the repository root; returns the CompletedProcess (stdout+stderr merged)."""
    exe = shutil.which("snakemake", path=venv_env()["PATH"])
    p = subprocess.run([exe, *args], cwd=cwd, env=env or venv_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-6000:]}")
    return p


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
    p = snakemake(["--cores", "2", "--configfile", str(cfg)], timeout=1500)
    return tmp, cfg, p
