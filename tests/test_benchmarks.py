"""benchmarks/stages.py (issue 13's throughput benchmark) runs on CPU at its tiny preset and reports every stage."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "stages.py"
STAGES = ("cam", "pnoc", "c2am_h", "deeplab", "tta", "walk")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _no_nan(token):
    raise AssertionError(f"non-finite number {token} in the JSON")


def test_stages_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--threads", "2", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text(), parse_constant=_no_nan)

    meta = r["meta"]
    assert meta["device"] == "cpu" and meta["tiny"] and meta["torch"]
    assert meta["device_name"] and meta["amp_available"] is False
    assert set(r["stages"]) == set(STAGES)
    for name, s in r["stages"].items():
        assert "error" not in s, (name, s)
        assert _finite(s["images_per_s"]) and s["images_per_s"] > 0, (name, s)
        assert _finite(s["ms_per_iteration"]) and s["ms_per_iteration"] > 0, (name, s)
        assert s["iters"] == 2 and s["batch"] == 2 and s["size"] == 64, (name, s)
        assert s["amp_bf16"] is False  # autocast is CUDA-only
        assert _finite(s["peak_memory_bytes"]) and s["peak_memory_bytes"] >= 0, (name, s)
        assert s["peak_memory_kind"].startswith("cpu RSS delta"), (name, s)
        for k, v in s.items():
            if isinstance(v, float):
                assert math.isfinite(v), (name, k, v)
    assert r["stages"]["pnoc"]["strategy"] == "pnoc" and r["stages"]["cam"]["strategy"] == "cam"
    assert r["stages"]["walk"]["exp_times"] == 8 and r["stages"]["walk"]["walk_ms"] > 0  # config/voc12.yaml
    assert r["stages"]["tta"]["scales"] == [0.5, 1.0, 1.5, 2.0] and r["stages"]["tta"]["flip"] is True

    d = r["disk_budget"]
    assert d["size"] == 64
    assert set(d["per_classes"]) == {"1", "2", "3"}
    for k, v in d["per_classes"].items():
        assert _finite(v["bytes_mean"]) and v["bytes_mean"] > 0
        # smooth CAM-like maps compress better than white noise of the same shape
        assert v["bytes_mean"] < d["white_noise_per_classes"][k]["bytes_mean"]
    assert d["datasets"]["coco14_train"]["images"] == 82_783
    assert d["datasets"]["voc12_train_aug"]["images"] == 10_582
    for v in d["datasets"].values():
        assert _finite(v["total_gib"]) and v["total_gib"] > 0 and _finite(v["bytes_per_image"])

    # the markdown table on stdout names the device, torch and AMP
    assert "| stage |" in res.stdout and "torch " in res.stdout and "AMP" in res.stdout
    assert all(f"| {s} |" in res.stdout for s in STAGES)


def test_stages_benchmark_rejects_unknown_stage(capsys):
    spec = importlib.util.spec_from_file_location("bench_stages", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        mod.main(["--tiny", "--device", "cpu", "--stages", "cam,bogus"])
    assert e.value.code == 2
    assert "bogus" in capsys.readouterr().err
