"""The house rules of the package layout (docs/architecture.md), checked by reading the code."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PKG = ROOT / "pnoc"
# Wings in DAG order: a wing may import the wings before it, never one after it.
WINGS = ["cam", "saliency", "affinity", "segmentation", "report"]
# Shared machinery below the wings: it imports no wing at all.
SHARED = ["cli", "crf", "distributed", "evaluation", "io", "memory", "parallel", "training", "data", "models",
          "shards"]
TRAINING_STAGES = ["pnoc.cam.pretrain_backbone", "pnoc.cam.train_classifier", "pnoc.cam.train_cam", "pnoc.saliency.train_ccam",
                   "pnoc.saliency.train_poolnet", "pnoc.affinity.train_affinity",
                   "pnoc.segmentation.train_segmentation"]
SOLVER_SECTIONS = ["pretrain", "classifier", "cam", "saliency.ccam", "saliency.poolnet", "affinity.train", "segmentation"]


def _room(module: str) -> str:
    """``pnoc.cam.tta`` -> ``cam``; ``pnoc.io`` -> ``io``."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    """Absolute ``pnoc.*`` modules a file imports (relative imports resolved against its package)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "pnoc":  # from pnoc import cli, ...
                out |= {f"pnoc.{a.name}" for a in node.names}
            elif mod.startswith("pnoc."):
                out.add(mod)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pnoc.")}
    return out


def _layout_violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        if rel == Path("__init__.py"):
            continue
        room = rel.parts[0].removesuffix(".py")
        if room not in WINGS and room not in SHARED:
            bad.append(f"{rel}: in no wing and not shared machinery (add it to docs/architecture.md and this test)")
            continue
        for target in _imports(path):
            to = _room(target)
            if to not in WINGS:
                continue
            if room in SHARED:
                bad.append(f"{rel} imports {target}: shared machinery must not import a wing")
            elif WINGS.index(to) > WINGS.index(room):
                bad.append(f"{rel} imports {target}: the {room} wing may import only earlier wings")
    return bad


def test_wings_import_only_earlier_wings_and_shared_machinery():
    assert _layout_violations() == []


def test_import_direction_check_catches_a_backward_import(tmp_path, monkeypatch):
    """The checker itself: a cam module importing the affinity wing is reported."""
    fake = tmp_path / "pnoc"
    (fake / "cam").mkdir(parents=True)
    (fake / "affinity").mkdir()
    (fake / "cam" / "bad.py").write_text("from pnoc.affinity.random_walk import random_walk\n")
    (fake / "affinity" / "ok.py").write_text("from pnoc.cam.tta import tta_maps\nfrom ..io import DataError\n")
    (fake / "io.py").write_text("from .segmentation import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    found = _layout_violations()
    assert "cam/bad.py imports pnoc.affinity.random_walk: the cam wing may import only earlier wings" in found
    assert "io.py imports pnoc.segmentation: shared machinery must not import a wing" in found
    assert not any(f.startswith("affinity/ok.py") for f in found)


def _rule_modules() -> dict[str, str]:
    """rule name -> the module its shell line runs (``python -m pnoc.<wing>.<stage>``)."""
    out = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for rule, body in re.findall(r"^ *rule (\w+):\n(.*?)(?=^ *rule |\Z)", smk.read_text(), re.M | re.S):
            # training rules start with {params.launch}: python, or torchrun with resources.gpus_per_job > 1
            m = re.search(r"(?:python|\{params\.launch\}) -m (pnoc[\w.]*)", body)
            if m:
                out[rule] = m.group(1)
    return out


def test_every_rule_runs_a_stage_module_of_its_own_wing():
    """``rule X`` in ``workflow/rules/<file>.smk`` runs ``python -m pnoc.<wing>.X`` (summary: report wing;
    make_dataset: the data machinery; the gather_* rules of sharded inference: the shared pnoc.shards), and
    that module exists."""
    wing_of_file = {"cam": "cam", "saliency": "saliency", "affinity": "affinity", "segmentation": "segmentation",
                    "report": "report", "summary": "report", "dataset": "data"}
    mods = _rule_modules()
    assert len(mods) >= 25, mods
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        for rule in re.findall(r"^ *rule (\w+):", smk.read_text(), re.M):
            if rule not in mods:
                assert rule in ("all",), f"{smk.name}: rule {rule} runs no pnoc module"
                continue
            if rule.startswith("gather_"):
                assert mods[rule] == "pnoc.shards", (smk.name, rule, mods[rule])
                continue
            assert mods[rule] == f"pnoc.{wing_of_file[smk.stem]}.{rule}", (smk.name, rule, mods[rule])
            assert importlib.util.find_spec(mods[rule]) is not None, mods[rule]


@pytest.mark.parametrize("module", TRAINING_STAGES)
def test_training_stages_take_the_one_solver(module):
    from pnoc.training import Runtime, Solver

    cfg = importlib.import_module(module).Config
    assert issubclass(cfg, Solver) and issubclass(cfg, Runtime)
    # no stage re-declares a solver key (the PoolNet default optimizer is the one override)
    src = Path(importlib.import_module(module).__file__).read_text()
    body = src[src.index("class Config("):].split("\n\n\n")[0]
    redeclared = [k.name for k in dataclasses.fields(Solver) if re.search(rf"^    {k.name}: ", body, re.M)]
    assert redeclared in ([], ["optimizer"]), (module, redeclared)


def test_schema_describes_the_solver_once_and_every_training_section_embeds_it():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    solver = schema["$defs"]["solver"]["properties"]
    from pnoc.training import Solver
    assert set(solver) == {f.name for f in dataclasses.fields(Solver)}
    assert all("description" in v and "type" in v for v in solver.values())
    for section in SOLVER_SECTIONS:
        node, values = schema, cfg
        for part in section.split("."):
            node, values = node["properties"][part], values[part]
        assert node["$ref"] == "#/$defs/solver" and node["unevaluatedProperties"] is False, section
        for key in solver:  # per-section default only; the description lives in $defs
            assert set(node["properties"][key]) <= {"default", "minimum", "multipleOf"}, (section, key)
            assert key in values, (section, key)


# Placeholders of a shell command that are flag strings built (and quoted) by common.smk's helpers
PREFORMATTED_PARAMS = {"args", "arch", "classifier", "columns", "data", "hints", "init", "launch", "pages", "saliency",
                      "source", "speed"}


def _shell_lines(text: str) -> list[str]:
    """The string literals of every ``shell:`` block of a rule file."""
    out, inside = [], False
    for ln in text.splitlines():
        stripped = ln.strip()
        if stripped == "shell:":
            inside = True
            continue
        if inside:
            if stripped.startswith(('"', 'f"')):
                out.append(stripped)
            else:
                inside = False
    return out


def test_every_path_placeholder_in_a_shell_command_is_quoted():
    """{input.x}, {output.x}, {log}, {wildcards.x} and every plain {params.x} carry :q (shlex quoting),
    so a dataset root or results folder with a space or a quote works; flag-string params (built with
    shlex.quote in common.smk) are the only exception. tests/test_dataset_check.py runs such a chain."""
    unquoted = []
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for line in _shell_lines(smk.read_text()):
            for m in re.finditer(r"\{(input|output|log|wildcards|params)(?:\.(\w+))?(:q)?\}", line):
                kind, name, q = m.groups()
                if q is None and not (kind == "params" and name in PREFORMATTED_PARAMS):
                    unquoted.append(f"{smk.name}: {m.group(0)} in {line}")
    assert not unquoted, "\n".join(unquoted)
    n = sum(len(_shell_lines(p.read_text())) for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    assert n > 40, "the shell-line reader found too few lines"


def test_quote_check_catches_an_unquoted_path():
    line = '"python -m pnoc.x --out {output.model} --log {log:q}"'
    assert re.search(r"\{output\.model\}", line)
    assert _shell_lines(f"rule x:\n    shell:\n        {line}\n") == [line]
