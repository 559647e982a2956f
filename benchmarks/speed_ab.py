"""Benchmark: ms/iteration of the heavy train steps with and without each ``speed`` option, interleaved A/B.

For every stage of ``--stages`` (the train steps of :mod:`benchmarks.stages`: cam, pnoc, c2am_h, deeplab) and
every option of ``--options`` (keys of the config group ``speed``), two copies of the stage are built from the
same seed: A with every speed key off (the baseline), B with that one key on; ``--options all`` adds B = every
listed key on at once. After ``--warmup`` untimed units each, A and B run ``--pairs`` timed units in turn (the
order alternates, A B, B A, ...), so that a machine whose speed drifts (other jobs on a shared host) slows both
alike; a unit is ``accumulate`` iterations (cam/pnoc step the optimizer every ``accumulate`` iterations).

Reported per stage and option: the median ms/iteration of A and B, the median of the per-pair ratios B/A with
its quartiles (< 1: B is faster), and the largest relative difference of the loss between A and B over the
paired iterations: both start from the same weights and see the same batch, so it shows how far the option
moves the result (0 for a bit-identical option, float rounding otherwise).

``--optimizer-step`` adds rows "fused_optimizer (step)": the stage's optimizer step alone (f's optimizer for
cam/pnoc), loop (A) against fused (B), timed in turn on the gradients and state of a real iteration.

Usage::

    python benchmarks/speed_ab.py --tiny --device cpu --threads 1                       # a minute on a CPU
    python benchmarks/speed_ab.py --config config.yaml --backbone resnet18_w16 --size 112 --batch 8 --pairs 10
    python benchmarks/speed_ab.py --options compile --stages cam --warmup 2              # torch.compile (slow start)

Prints a markdown table and writes the figures to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("pnoc_bench_stages", ROOT / "benchmarks" / "stages.py")
stages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stages)

TRAIN_STAGES = ("cam", "pnoc", "c2am_h", "deeplab")
OPTIONS = ("channels_last", "fused_optimizer", "compile", "cudnn_benchmark")


def _quartiles(v: list[float]) -> tuple[float, float]:
    if len(v) < 2:
        return v[0], v[0]
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


def _rng() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def build(name: str, ctx, speed: dict):
    """Stage ``name`` built with the speed settings ``speed`` from seed 0 (A and B start from equal weights)."""
    ctx.speed = dict(speed)
    torch.manual_seed(0)
    return stages.BUILDERS[name](ctx)


def unit(st, n: int, dev, rng: dict) -> tuple[float, list[float]]:
    """Seconds of ``n`` iterations of ``st`` and their losses, from the RNG states ``rng`` (A and B draw the same
    dropout masks and P-NOC class samples)."""
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
    t0 = time.perf_counter()
    losses = [float((st.step() or {}).get("loss", float("nan"))) for _ in range(n)]
    stages.sync(dev)
    return time.perf_counter() - t0, losses


def compare(name: str, ctx, base: dict, variant: dict, warmup: int, pairs: int) -> dict:
    """Interleaved timing of stage ``name`` under ``base`` (A) and ``variant`` (B)."""
    dev = ctx.device
    a, b = build(name, ctx, base), build(name, ctx, variant)
    n = int(a.info.get("accumulate", 1))
    loss_diff = 0.0
    for _ in range(warmup):  # in lockstep: the losses of the same iteration are compared
        rng = _rng()
        _, la = unit(a, n, dev, rng)
        _, lb = unit(b, n, dev, rng)
        loss_diff = max([loss_diff] + [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb)])
    ta, tb = [], []
    for i in range(pairs):
        order = (("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))
        got, rng = {}, _rng()
        for key, st in order:
            got[key] = unit(st, n, dev, rng)
        ta.append(got["a"][0] / n)
        tb.append(got["b"][0] / n)
        loss_diff = max([loss_diff] + [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(got["a"][1], got["b"][1])])
    ratios = [y / x for x, y in zip(ta, tb)]
    q1, q3 = _quartiles(ratios)
    del a, b
    stages.free_memory(dev)
    return {"ms_a": 1000 * statistics.median(ta), "ms_b": 1000 * statistics.median(tb),
            "ratio_b_over_a": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3, "pairs": pairs,
            "iterations_per_unit": n, "max_rel_loss_diff": loss_diff}


def _optimizer(st):
    keep = st.info["_keep"]
    return keep.opt if hasattr(keep, "opt") else keep[1]  # CamTrainer, or (model, optimizer)


def optimizer_step_only(name: str, ctx, base: dict, warmup: int, pairs: int) -> dict:
    """``fused_optimizer`` on the optimizer step alone: the stage's optimizer (f's for cam/pnoc) after one real
    iteration (gradients and state in place), ``step()`` timed in turn, loop (A) against fused (B)."""
    dev = ctx.device
    a, b = build(name, ctx, base), build(name, ctx, {**base, "fused_optimizer": True})
    n = int(a.info.get("accumulate", 1))
    for st in (a, b):
        for _ in range(n * warmup):
            st.step()
    oa, ob = _optimizer(a), _optimizer(b)
    if not any(p.grad is not None for g in oa.param_groups for p in g["params"]):
        for opt in (oa, ob):  # the last iteration stepped and cleared them: the step needs gradients
            for g in opt.param_groups:
                for p in g["params"]:
                    p.grad = torch.full_like(p, 1e-3)
    ta, tb = [], []
    for i in range(pairs):
        for key, opt in ((("a", oa), ("b", ob)) if i % 2 == 0 else (("b", ob), ("a", oa))):
            t0 = time.perf_counter()
            opt.step()
            stages.sync(dev)
            (ta if key == "a" else tb).append(time.perf_counter() - t0)
    ratios = [y / x for x, y in zip(ta, tb)]
    q1, q3 = _quartiles(ratios)
    params = [p for g in oa.param_groups for p in g["params"]]
    del a, b
    stages.free_memory(dev)
    return {"ms_a": 1000 * statistics.median(ta), "ms_b": 1000 * statistics.median(tb),
            "ratio_b_over_a": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3, "pairs": pairs,
            "iterations_per_unit": 1, "max_rel_loss_diff": None, "optimizer": type(oa).__name__,
            "tensors": len(params), "parameters": sum(p.numel() for p in params)}


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"## speed options, interleaved A/B ({m['config']}, {m['backbone']}, {m['size']} px, batch {m['batch']})",
             "", f"device: **{m['device_name']}**; torch {m['torch']}; {m['pairs']} A/B pairs after "
                 f"{m['warmup']} warm-up units; A = every speed key off",
             "", "| stage | B | A ms/iteration | B ms/iteration | B/A (median of pairs) | quartiles | "
                 "max relative loss difference |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        diff = "n/a" if row["max_rel_loss_diff"] is None else f"{row['max_rel_loss_diff']:.2g}"
        lines.append(f"| {row['stage']} | {row['option']} | {row['ms_a']:.2f} | {row['ms_b']:.2f} | "
                     f"{row['ratio_b_over_a']:.3f} | {row['ratio_q1']:.3f}-{row['ratio_q3']:.3f} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--config", type=Path, default=ROOT / "config" / "voc12.yaml")
    ap.add_argument("--backbone", default=None, help="default resnest269 (--tiny: resnet18_w8)")
    ap.add_argument("--size", type=int, default=None, help="default 512 (--tiny: 64)")
    ap.add_argument("--batch", type=int, default=None, help="default: each section's batch_size (--tiny: 2)")
    ap.add_argument("--labels", type=int, default=2)
    ap.add_argument("--stages", default=",".join(TRAIN_STAGES))
    ap.add_argument("--options", default="channels_last,fused_optimizer,all",
                    help=f"comma-separated subset of {','.join(OPTIONS)}, and all (every listed key on at once)")
    ap.add_argument("--optimizer-step", action="store_true",
                    help="also time fused_optimizer on the optimizer step alone (rows 'fused_optimizer (step)')")
    ap.add_argument("--warmup", type=int, default=2, help="untimed units of A and B each")
    ap.add_argument("--pairs", type=int, default=20, help="timed A/B pairs")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="resnet18_w8, 64 px, batch 2 (explicit flags win)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    preset = ({"backbone": "resnet18_w8", "size": 64, "batch": 2} if args.tiny
              else {"backbone": "resnest269", "size": 512, "batch": None})
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = [s for s in args.stages.split(",") if s]
    options = [o for o in args.options.split(",") if o]
    bad = [s for s in names if s not in TRAIN_STAGES] + [o for o in options if o not in OPTIONS + ("all",)]
    if bad:
        ap.error(f"unknown stage or option {bad}")

    from pnoc.training import resolve_device, set_threads

    set_threads(args.threads)
    dev = resolve_device(args.device)
    config = stages.load_config(args.config)
    # the Context of stages.py: no CCAM crop of its own (--size), no --speed overrides (set per build)
    args.ccam_crop, args.speed = 0, []
    result = {"meta": {"device": str(dev), "device_name": stages.device_name(dev), "torch": torch.__version__,
                       "config": stages._shown(args.config), "backbone": args.backbone, "size": args.size,
                       "batch": args.batch, "warmup": args.warmup, "pairs": args.pairs,
                       "threads": torch.get_num_threads()}, "rows": []}
    keys = [o for o in options if o != "all"]
    base = {k: False for k in OPTIONS}
    variants = [(o, {**base, o: True}) for o in keys]
    if "all" in options and len(keys) > 1:
        variants.append(("+".join(keys), {**base, **{k: True for k in keys}}))
    with tempfile.TemporaryDirectory(prefix="pnoc-speed-") as d:
        ctx = stages.Context(args, config, dev, Path(d))
        for name in names:
            if name in ("cam", "pnoc"):
                ctx.classifier_artifact()
            for label, speed in variants:
                row = compare(name, ctx, base, speed, args.warmup, args.pairs)
                result["rows"].append({"stage": name, "option": label, **row})
                print(f"{name} {label}: A {row['ms_a']:.1f} ms, B {row['ms_b']:.1f} ms, "
                      f"B/A {row['ratio_b_over_a']:.3f}", file=sys.stderr, flush=True)
            if args.optimizer_step:
                row = optimizer_step_only(name, ctx, base, args.warmup, args.pairs)
                result["rows"].append({"stage": name, "option": "fused_optimizer (step)", **row})
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
