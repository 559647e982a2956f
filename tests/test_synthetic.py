"""The embedded synthetic benchmark: layout, formats, determinism and the designed statistics."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pnoc import cli
from pnoc.data.datasets import WSSSDataset
from pnoc.data.make_dataset import Config, run
from pnoc.data.synthetic import (
    CLASS_BODIES,
    CLASS_NAMES,
    CONTEXT_TEXTURES,
    PART_VALUES,
    SyntheticConfig,
    generate,
    image_id,
    render_image,
)
from pnoc.io import read_image, read_mask

SMALL = dict(image_size=64, n_classes=5, seed=3)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, SyntheticConfig, dict]:
    root = tmp_path_factory.mktemp("syn")
    cfg = SyntheticConfig(n_train=16, n_val=6, **SMALL)
    stats = generate(root, cfg)
    return root, cfg, stats


def test_layout(small_dataset):
    root, cfg, stats = small_dataset
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        assert (root / sub).is_dir()
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["name"] == "synthetic"
    assert meta["classes"] == CLASS_NAMES[:5]
    assert meta["config"]["n_train"] == 16 and meta["stats"] == json.loads(json.dumps(stats))
    train = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert train == [image_id("train", i) for i in range(16)] and train[0] == "syn_train_000001"
    assert len(val) == 6 and stats["splits"] == {"train": 16, "val": 6}
    assert set(stats["per_class"]) == set(meta["classes"])
    for key in ("mean_labels_per_image", "multi_class_fraction", "ignore_fraction", "head_fraction_of_foreground"):
        assert 0 < stats[key]


def test_masks_and_annotations(small_dataset):
    root, cfg, _ = small_dataset
    classes = CLASS_NAMES[: cfg.n_classes]
    ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    ids += (root / "ImageSets/Segmentation/val.txt").read_text().split()
    for i in ids:
        with Image.open(root / "SegmentationClass" / f"{i}.png") as im:
            assert im.mode == "P"
        img = read_image(root / "JPEGImages" / f"{i}.jpg")
        m = read_mask(root / "SegmentationClass" / f"{i}.png", img.shape[:2])
        assert img.shape == (cfg.image_size, cfg.image_size, 3)
        values = set(np.unique(m).tolist())
        assert values <= set(range(cfg.n_classes + 1)) | {255}
        assert 255 in values and 0 in values  # the ignore band exists
        names = [o.findtext("name") for o in ET.parse(root / "Annotations" / f"{i}.xml").getroot().iter("object")]
        assert len(names) >= 1
        assert {classes.index(n) + 1 for n in names} == values - {0, 255}
    # the dataset interface of the pipeline reads it
    ds = WSSSDataset("synthetic", root, "train")
    ds.validate(need_labels=True, need_masks=True)
    y = ds.labels(ids[0])
    assert y.shape == (cfg.n_classes,) and y.sum() >= 1


def test_determinism_and_prefix(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, SyntheticConfig(n_train=7, n_val=2, **SMALL))
    generate(b, SyntheticConfig(n_train=4, n_val=3, **SMALL))
    for split, n in (("train", 4), ("val", 2)):
        for k in range(n):
            i = image_id(split, k)
            ma = read_mask(a / "SegmentationClass" / f"{i}.png")
            mb = read_mask(b / "SegmentationClass" / f"{i}.png")
            assert ma.tobytes() == mb.tobytes()
            assert (a / "JPEGImages" / f"{i}.jpg").read_bytes() == (b / "JPEGImages" / f"{i}.jpg").read_bytes()
            assert (a / "Annotations" / f"{i}.xml").read_text() == (b / "Annotations" / f"{i}.xml").read_text()
    # a different seed gives different images
    other = render_image(SyntheticConfig(**{**SMALL, "seed": 4}), "train", 0)
    assert other.mask.tobytes() != read_mask(a / "SegmentationClass" / "syn_train_000001.png").tobytes()
    # train and val streams differ
    assert render_image(SyntheticConfig(**SMALL), "val", 0).mask.tobytes() != \
        render_image(SyntheticConfig(**SMALL), "train", 0).mask.tobytes()


def test_design_statistics():
    """Context co-occurrence, headless fraction, visibility and label cardinality match the config."""
    cfg = SyntheticConfig(image_size=64, n_classes=8, seed=0)
    n = 240
    K = cfg.context_classes
    with_cls = np.zeros((K, 2))   # [images with band, images] among images holding the class
    without = np.zeros((K, 2))
    headless = expected = 0.0
    n_obj = multi = 0
    for k in range(n):
        s = render_image(cfg, "train", k)
        assert s.objects and s.labels
        multi += len(s.labels) > 1
        for o in s.objects:
            assert o["area"] >= cfg.min_visible * cfg.image_size ** 2
            headless += o["headless"]
            expected += cfg.context_headless_prob if o["class"] <= K else cfg.headless_prob
            n_obj += 1
            if not o["headless"]:
                assert o["head_area"] > 0
        for c in range(K):
            row = with_cls if (c + 1) in s.labels else without
            row[c] += (CONTEXT_TEXTURES[c] in s.bands, 1)
    p_with = with_cls[:, 0].sum() / with_cls[:, 1].sum()
    p_without = without[:, 0].sum() / without[:, 1].sum()
    assert abs(p_with - cfg.context_prob) < 0.08, p_with
    assert abs(p_without - cfg.context_alone_prob) < 0.05, p_without
    assert abs(headless / n_obj - expected / n_obj) < 0.07
    assert 0.15 <= headless / n_obj <= 0.3
    assert 0.35 <= multi / n <= 0.65


def test_head_fraction_and_shared_head():
    cfg = SyntheticConfig(image_size=96, seed=1)
    assert cfg.head_of(0) == cfg.head_of(1)  # two context classes share a head
    assert SyntheticConfig(shared_context_head=False).head_of(0) != SyntheticConfig(shared_context_head=False).head_of(1)
    ratios = [o["head_area"] / o["area"] for k in range(40) for o in render_image(cfg, "train", k).objects
              if not o["headless"]]
    assert 0.12 <= float(np.median(ratios)) <= 0.28


def test_stage_cli(tmp_path):
    out = tmp_path / "ds"
    cfg = cli.parse(Config, ["--out", str(out), "--n-train", "4", "--n-val", "2", "--image-size", "48",
                             "--n-classes", "3", "--shared-context-head", "false"])
    assert isinstance(cfg, Config) and cfg.shared_context_head is False and cfg.n_classes == 3
    stats = run(cfg)
    assert (out / "dataset.json").is_file() and stats["n_images"] == 6
    assert json.loads((out / "dataset.json").read_text())["classes"] == CLASS_NAMES[:3]


def test_part_maps_agree_with_masks(small_dataset):
    """Heads and bodies lie on their object's pixels, context and clutter on background; heads match head_area."""
    root, cfg, _ = small_dataset
    for k in range(16):
        s = render_image(cfg, "train", k)
        part = read_mask(root / "SegmentationPart" / f"{image_id('train', k)}.png")
        assert (part == s.parts).all()
        on_object = np.isin(s.parts, [PART_VALUES["head"], PART_VALUES["body"]])
        labelled = (s.mask > 0) & (s.mask != 255)
        assert not (labelled & ~on_object).any()         # every labelled pixel is head or body
        assert not (on_object & (s.mask == 0)).any()     # no head/body pixel is labelled background
        assert (s.parts == PART_VALUES["head"]).sum() == sum(o["head_area"] for o in s.objects)
        assert set(np.unique(s.parts).tolist()) <= set(PART_VALUES.values())


def _mean_body_colour(cfg: SyntheticConfig, n: int) -> dict[int, np.ndarray]:
    sums: dict[int, list] = {}
    for k in range(n):
        s = render_image(cfg, "train", k)
        body = s.parts == PART_VALUES["body"]
        for c in s.labels:
            px = s.image[body & (s.mask == c)]
            if len(px):
                sums.setdefault(c, []).append(px.mean(0))
    return {c: np.mean(v, 0) for c, v in sums.items()}


def test_body_cue_makes_bodies_class_specific():
    """v2: each class's mean body colour is nearest its own CLASS_BODIES colour; v1 (body_cue 0) is not."""
    def nearest_own(body_cue: float) -> float:
        means = _mean_body_colour(SyntheticConfig(image_size=64, n_classes=8, seed=0, body_cue=body_cue), 160)
        ref = np.array([CLASS_BODIES[c][0] for c in range(8)], np.float32)
        hits = [int(np.argmin(np.linalg.norm(ref - m, axis=1))) == c - 1 for c, m in means.items()]
        return float(np.mean(hits))

    assert nearest_own(1.0) == 1.0
    assert nearest_own(0.0) <= 0.5


def test_body_cue_zero_draws_as_v1():
    """With body_cue 0 the v2 keys draw nothing from the image's random stream (the v1 images stay as they were)."""
    a = render_image(SyntheticConfig(image_size=64, seed=2, body_cue=0.0, body_cue_jitter=0.1), "train", 3)
    b = render_image(SyntheticConfig(image_size=64, seed=2, body_cue=0.0, body_cue_jitter=0.5), "train", 3)
    c = render_image(SyntheticConfig(image_size=64, seed=2, body_cue=0.6), "train", 3)
    assert (a.image == b.image).all() and (a.mask == b.mask).all()
    assert not (a.image == c.image).all()


def test_invalid_config():
    with pytest.raises(ValueError, match="n_classes"):
        SyntheticConfig(n_classes=13).validate()
    with pytest.raises(ValueError, match="context_classes"):
        SyntheticConfig(n_classes=2, context_classes=3).validate()
    with pytest.raises(ValueError, match="body_cue"):
        SyntheticConfig(body_cue=1.5).validate()
