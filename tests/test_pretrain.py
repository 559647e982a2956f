"""The generic pretraining corpus (pnoc/data/generic.py), rule pretrain_backbone and ``weights: generic``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, snakemake

from pnoc.cam import pretrain_backbone
from pnoc.data.generic import (
    CATEGORIES,
    HUES,
    N_CATEGORIES,
    SHAPES,
    TEXTURES,
    GenericConfig,
    GenericSet,
    render_generic,
)
from pnoc.data.synthetic import CLASS_NAMES, CLASS_SHAPES
from pnoc.models.backbones import create_backbone

SMOKE = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())


# ---------------------------------------------------------------------------- the corpus
def test_categories_are_shapes_textures_hues_disjoint_from_the_benchmark():
    assert CATEGORIES == ([f"shape:{s}" for s in SHAPES] + [f"texture:{t}" for t in TEXTURES]
                          + [f"hue:{h}" for h in HUES])
    assert N_CATEGORIES == len(CATEGORIES) == 22 and len(set(CATEGORIES)) == 22
    assert not {s.lower() for s in SHAPES} & {s.lower() for s in CLASS_SHAPES}
    names = {c.split(":")[1] for c in CATEGORIES}
    assert not names & set(CLASS_NAMES) and not names & set(CLASS_SHAPES)


def test_rendering_is_a_function_of_seed_split_and_index():
    cfg = GenericConfig(seed=3, n_train=10, n_val=5, image_size=64)
    img, y = render_generic(cfg, "train", 7)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert y.shape == (N_CATEGORIES,) and y.dtype == np.float32
    img2, y2 = render_generic(cfg, "train", 7)
    assert np.array_equal(img, img2) and np.array_equal(y, y2)
    # the corpus size does not change an image (a smaller corpus is a prefix of a larger one)
    big = dataclasses.replace(cfg, n_train=1000, n_val=1000)
    assert np.array_equal(render_generic(big, "train", 7)[0], img)
    # another index, split or seed is another image
    for other in (render_generic(cfg, "train", 8), render_generic(cfg, "val", 7),
                  render_generic(dataclasses.replace(cfg, seed=4), "train", 7)):
        assert not np.array_equal(other[0], img)
    with pytest.raises(ValueError, match="split"):
        render_generic(cfg, "test", 0)


def test_labels_cover_every_category_and_each_object_gives_one_of_each_group():
    cfg = GenericConfig(image_size=112)
    ys = np.stack([render_generic(cfg, "train", i)[1] for i in range(200)])
    assert set(np.unique(ys)) <= {0.0, 1.0}
    n_shape, n_tex = len(SHAPES), len(TEXTURES)
    shapes, textures, hues = ys[:, :n_shape], ys[:, n_shape:n_shape + n_tex], ys[:, n_shape + n_tex:]
    # every labelled object sets one shape, one texture and one hue: each group has 1..max_objects labels
    for group in (shapes, textures, hues):
        assert (group.sum(1) >= 1).all() and (group.sum(1) <= cfg.max_objects).all()
    counts = ys.sum(0)
    assert (counts >= 10).all(), dict(zip(CATEGORIES, counts))  # every category occurs, none is rare


def test_hue_label_is_the_hue_of_the_saturated_pixels():
    """Single-object images: the object's saturated pixels (its dominant colour; the background is
    muted and the partner colour near-grey) fall in the labelled hue bin."""
    cfg = GenericConfig(image_size=96, min_objects=1, max_objects=1)
    hue0 = len(SHAPES) + len(TEXTURES)
    for i in range(30):
        img, y = render_generic(cfg, "val", i)
        assert y.sum() == 3
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL).reshape(-1, 3).astype(np.float64)
        sat = hsv[(hsv[:, 1] > 0.5 * 255) & (hsv[:, 2] > 0.4 * 255)]
        assert len(sat) > 50, i
        bins = np.floor(((sat[:, 0] * 360 / 256) + 30) % 360 / 60).astype(int)  # bin k centred on 60k degrees
        assert np.bincount(bins, minlength=6).argmax() == int(np.argmax(y[hue0:])), i


def test_dataset_items_cache_and_flip():
    cfg = GenericConfig(n_train=6, n_val=3, image_size=48)
    plain, cached = GenericSet(cfg, "val"), GenericSet(cfg, "val", cache=True)
    assert len(plain) == 3 and plain.classes == CATEGORIES
    for i in range(3):
        x, y, j = plain[i]
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and y.shape == (N_CATEGORIES,) and j == i
        x2, y2, _ = cached[i]
        x3, _, _ = cached[i]  # from the cache
        assert torch.equal(x, x2) and torch.equal(x, x3) and torch.equal(y, y2)
    with pytest.raises(IndexError):
        plain[3]


# ---------------------------------------------------------------------------- the stage
def _cfg(tmp_path, **kw) -> pretrain_backbone.Config:
    base = dict(out=tmp_path / "pretrain" / "backbone.pth", metrics=tmp_path / "pretrain" / "metrics.json",
                state_dir=tmp_path / "state", backbone="resnet18_w8", output_stride=8, n_train=64, n_val=32,
                image_size=48, crop=48, resize_min=0, resize_max=0, epochs=2, batch_size=16, lr=0.05,
                device="cpu", threads=1)
    base.update(kw)
    return pretrain_backbone.Config(**base)


def test_tiny_pretraining_writes_backbone_weights_that_create_backbone_loads(tmp_path):
    cfg = _cfg(tmp_path)
    m = pretrain_backbone.run(cfg)
    assert m["stage"] == "pretrain_backbone" and len(m["epochs"]) == 2 and m["resumed_from_epoch"] == 0
    assert m["categories"] == CATEGORIES and m["corpus"]["image_size"] == 48
    for k in ("precision", "recall", "f1", "f1_shape", "f1_texture", "f1_hue"):
        assert 0.0 <= m["val"][k] <= 1.0
    assert m["train_images_per_s"] > 0 and m["wall_s"] > 0
    assert json.loads(cfg.metrics.read_text())["val"] == m["val"]
    assert cfg.metrics.with_suffix(".csv").is_file()
    # a plain state dict of tensors (weights_only loading) in Backbone.net's own key format
    sd = torch.load(cfg.out, map_location="cpu", weights_only=True)
    torch.manual_seed(1)
    fresh = create_backbone("resnet18_w8", 8, "none")
    assert set(sd) == set(fresh.net.state_dict()) and all(isinstance(v, torch.Tensor) for v in sd.values())
    loaded = create_backbone("resnet18_w8", 8, weights=cfg.out)
    for k, v in loaded.net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # trained: every conv differs from a random init, and BN statistics moved off their 0/1 start
    convs = [k for k in sd if k.endswith(("conv1.weight", "conv2.weight"))]
    assert convs and all(not torch.equal(sd[k], fresh.net.state_dict()[k]) for k in convs)
    assert not torch.equal(sd["bn1.running_mean"], torch.zeros_like(sd["bn1.running_mean"]))
    # the weight shapes do not depend on the stride: another output stride loads them too
    create_backbone("resnet18_w8", 32, weights=cfg.out)
    with pytest.raises(ValueError, match="does not fit"):
        create_backbone("resnet18_w16", 8, weights=cfg.out)


def test_pretraining_resumes_after_a_stop_exactly(tmp_path, monkeypatch):
    """A stop request during epoch 1 ends the run after its checkpoint (exit 75, no weights); the rerun
    resumes at epoch 2 and ends with the per-epoch losses and weights of an uninterrupted run."""
    ref = pretrain_backbone.run(_cfg(tmp_path / "a"))

    cfg = _cfg(tmp_path / "b")
    real_scores = pretrain_backbone.generic_scores

    def stop_after_training_epoch(*args, **kwargs):  # as SLURM's SIGUSR1 before the time limit
        os.kill(os.getpid(), signal.SIGUSR1)
        return real_scores(*args, **kwargs)

    monkeypatch.setattr(pretrain_backbone, "generic_scores", stop_after_training_epoch)
    with pytest.raises(SystemExit) as stop:
        pretrain_backbone.run(cfg)
    assert stop.value.code == 75 and not cfg.out.exists()
    assert torch.load(cfg.state_dir / "last.pt", weights_only=True)["_epoch"] == 0
    monkeypatch.setattr(pretrain_backbone, "generic_scores", real_scores)

    resumed = pretrain_backbone.run(cfg)
    assert resumed["resumed_from_epoch"] == 1
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in ref["epochs"]]
    a = torch.load(tmp_path / "a" / "pretrain" / "backbone.pth", weights_only=True)
    b = torch.load(cfg.out, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a rerun of the finished training restores it: resumed at epoch 2, nothing left to train
    again = pretrain_backbone.run(cfg)
    assert again["resumed_from_epoch"] == 2 and again["val"] == resumed["val"]


def test_geometry_that_cuts_objects_is_refused(tmp_path):
    with pytest.raises(ValueError, match="crop"):
        pretrain_backbone.run(_cfg(tmp_path, crop=40))
    with pytest.raises(ValueError, match="resize_max"):
        pretrain_backbone.run(_cfg(tmp_path, resize_min=40, resize_max=56))


# ---------------------------------------------------------------------------- config and workflow
def test_pretrain_section_embeds_the_solver_with_config_defaults():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    node, values = schema["properties"]["pretrain"], cfg["pretrain"]
    assert node["$ref"] == "#/$defs/solver" and node["unevaluatedProperties"] is False
    for key in schema["$defs"]["solver"]["properties"]:
        assert set(node["properties"][key]) <= {"default", "minimum", "multipleOf"}, key
        assert values[key] == node["properties"][key]["default"], key
    # every flag of the section is a field of the stage (the rule passes them all through flags())
    fields = {f.name for f in dataclasses.fields(pretrain_backbone.Config)}
    assert set(values) <= fields and set(SMOKE["pretrain"]) <= fields
    assert list(cfg)[list(cfg).index("pretrain") + 1] == "classifier"


def _dry_run(tmp_path, classifier: dict, check=True):
    """Dry run of the classifier target under config.yaml with ``classifier`` merged in, results under tmp."""
    res = tmp_path / "results"
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"results": str(res), "dataset": {"root": f"{res}/dataset/synthetic"},
                                    "classifier": classifier}))
    # targets first: --configfile takes every later word
    return snakemake(["-n", "-p", f"{res}/classifier/seed0/model.pt", "--configfile", str(over)], check=check)


def test_weights_generic_puts_pretrain_backbone_in_the_dag(tmp_path):
    defaults = yaml.safe_load((ROOT / "config.yaml").read_text())["pretrain"]
    weights = f"{tmp_path}/results/pretrain/backbone.pth"
    p = _dry_run(tmp_path, {"weights": "generic"})
    assert re.search(r"^pretrain_backbone\s+1$", p.stdout, re.M), p.stdout[-3000:]
    assert f"--out {weights}" in p.stdout and f"--weights {weights}" in p.stdout
    assert f"--n-train {defaults['n_train']} " in p.stdout  # the pretrain section reaches the stage

    p = _dry_run(tmp_path, {"weights": "none"})
    assert "pretrain_backbone" not in p.stdout and "--weights none" in p.stdout


def test_weights_generic_with_another_backbone_is_refused_before_any_job(tmp_path):
    p = _dry_run(tmp_path, {"weights": "generic", "backbone": "resnet18_w4"}, check=False)
    assert p.returncode != 0 and "pretrain.backbone" in p.stdout and "resnet18_w4" in p.stdout


def test_default_chain_starts_every_network_from_generic_weights_and_v1_from_none(tmp_path):
    """config.yaml: the classifier, CAM nets, C2AM, PoolNet, AffinityNet and DeepLab depend on pretrain_backbone;
    the benchmark-v1 overlay (config/synthetic_v1.yaml) plans the whole chain without it."""
    res = tmp_path / "results"
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"results": str(res), "dataset": {"root": f"{res}/dataset/synthetic"}}))
    weights = f"{res}/pretrain/backbone.pth"
    p = snakemake(["-n", "-p", "--configfile", str(ROOT / "config.yaml"), str(over)])
    assert re.search(r"^pretrain_backbone\s+1$", p.stdout, re.M), p.stdout[-3000:]
    for module in ("cam.train_classifier", "cam.train_cam", "saliency.train_ccam", "saliency.train_poolnet",
                   "affinity.train_affinity", "segmentation.train_segmentation"):
        lines = [ln for ln in p.stdout.splitlines() if f"python -m pnoc.{module} " in ln]
        assert lines and all(f"--weights {weights}" in ln for ln in lines), module
    p = snakemake(["-n", "-p", "--configfile", str(ROOT / "config.yaml"), str(ROOT / "config" / "synthetic_v1.yaml"),
                   str(over)])
    assert "pretrain_backbone" not in p.stdout and re.search(r"^train_cam\s+2$", p.stdout, re.M)
