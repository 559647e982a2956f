"""benchmarks/stages.py (issue 13's throughput benchmark) runs on CPU at its tiny preset and reports every stage."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

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
    # FLOPs and fraction of peak: on the CPU the peak is a timed fp32 matmul at the same thread count
    peak = meta["peak_tflops"]
    assert peak["source"] == "measured" and _finite(peak["fp32"]) and peak["fp32"] > 0
    for name, s in r["stages"].items():
        assert isinstance(s["flops_per_iteration"], int) and s["flops_per_iteration"] > 0, (name, s)
        assert _finite(s["gflop_per_image"]) and s["gflop_per_image"] > 0, (name, s)
        assert math.isclose(s["gflop_per_image"] * 1e9 * s["batch"], s["flops_per_iteration"], rel_tol=1e-9)
        assert _finite(s["achieved_tflops"]) and s["achieved_tflops"] > 0, (name, s)
        assert s["peak_precision"] == "fp32" and s["peak_tflops"] == peak["fp32"], (name, s)
        assert _finite(s["fraction_of_peak"]) and 0 < s["fraction_of_peak"] <= 1.5, (name, s)
        assert sum(s["flops_by_op"].values()) == s["flops_per_iteration"], (name, s)
    # train steps count their backward (about twice the forward); inference stages count none
    for name in ("cam", "pnoc", "c2am_h", "deeplab"):
        assert r["stages"][name]["flops_by_op"].get("aten.convolution_backward", 0) > 0, name
    assert "aten.convolution_backward" not in r["stages"]["tta"]["flops_by_op"]
    walk = r["stages"]["walk"]
    assert "sparse" in walk["flops_note"] and walk["flops_by_op"].get("aten.mm", 0) > 0
    # the walk's operator counted by its stored entries, far below the dense (n, n) product of every step
    n = 2 * walk["grid"][0] * walk["grid"][1]
    assert walk["flops_by_op"]["aten.mm"] < 2 * n * n * walk["seed_classes"] * 2 ** walk["exp_times"] / 4
    assert "| stage | GFLOP/image |" in res.stdout and "fraction of peak" in res.stdout
    import yaml

    assert meta["speed"] == yaml.safe_load((ROOT / "config.yaml").read_text())["speed"]  # as the rules run
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


def _stages_module():
    return load_script(SCRIPT, "bench_stages")


def test_stages_benchmark_rejects_unknown_stage(capsys):
    mod = _stages_module()
    with pytest.raises(SystemExit) as e:
        mod.main(["--tiny", "--device", "cpu", "--stages", "cam,bogus"])
    assert e.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_flop_count_of_sparse_and_dense_products():
    """A sparse operand counts 2 FLOPs per stored entry and column (torch's own formula would count it dense)."""
    import warnings

    import torch

    mod = _stages_module()
    n, k = 50, 3
    a = torch.zeros(n, n)
    a[torch.arange(n), torch.arange(n)] = 1.0
    a[torch.arange(n - 1), torch.arange(1, n)] = 0.5  # 2n - 1 entries
    x = torch.randn(n, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        operands = (a.to_sparse_csr(), a.to_sparse())
    for sparse in operands:
        total, by_op = mod.count_flops(lambda: sparse @ x)
        assert total == 2 * (2 * n - 1) * k, (sparse.layout, total, by_op)
    total, _ = mod.count_flops(lambda: a @ x)
    assert total == 2 * n * n * k
    total, _ = mod.count_flops(lambda: torch.addmm(torch.zeros(n, k), a, x))
    assert total == 2 * n * n * k


@pytest.mark.parametrize("name,row", [
    ("NVIDIA H100 80GB HBM3", "H100 (SXM)"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200 (SXM)"),
    ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100"), ("Tesla V100-SXM2-32GB", "V100 (SXM2)"),
    ("Tesla V100-PCIE-16GB", "V100 PCIe"), ("NVIDIA L40S", "L40S"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce GTX 1080", None)])
def test_gpu_peak_rows(name, row):
    peak = _stages_module().gpu_peak(name)
    assert (peak and peak["row"]) == row
    if peak:
        assert 0 < peak["fp32"] < peak["bf16"]  # the tensor cores' dense rate is above the CUDA cores' fp32


def test_speed_ab_runs_interleaved_pairs(tmp_path):
    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed_ab.py"), "--tiny", "--device", "cpu", "--threads", "1",
           "--stages", "c2am_h", "--options", "channels_last,fused_optimizer,all", "--warmup", "1", "--pairs", "2",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [row["option"] for row in r["rows"]] == ["channels_last", "fused_optimizer",
                                                     "channels_last+fused_optimizer"]
    for row in r["rows"]:
        assert row["pairs"] == 2 and row["ms_a"] > 0 and row["ms_b"] > 0 and row["ratio_b_over_a"] > 0
    fused = r["rows"][1]
    assert fused["max_rel_loss_diff"] < 1e-6  # SGD's fused update is bit-identical (the loss sum may round)
    assert r["rows"][0]["max_rel_loss_diff"] < 1e-3
    assert "| c2am_h | channels_last |" in res.stdout
