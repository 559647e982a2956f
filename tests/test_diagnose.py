"""rule diagnose: the benchmark's premise measurements (pure parts exact, the stage on a tiny dataset)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pnoc.cam import diagnose
from pnoc.data.synthetic import SyntheticConfig, generate
from pnoc.io import DataError
from pnoc.models.classifier import create_classifier
from pnoc.training import save_weights


def test_class_regions_take_the_adjacent_ignore_band():
    m = np.array([[0, 255, 1, 1, 255, 0, 0],
                  [0, 255, 1, 1, 255, 255, 2]], np.uint8)
    r = diagnose.class_regions(m, 1, ignore_width=1)
    assert r.astype(int).tolist() == [[0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0]]
    r2 = diagnose.class_regions(m, 2, ignore_width=1)
    assert r2.astype(int).tolist() == [[0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1]]


class _Constant(torch.nn.Module):
    """A classifier that ignores its input: every class scores sigmoid(+5) (``yes``) or sigmoid(-5)."""

    def __init__(self, n_classes: int, yes: bool):
        super().__init__()
        self.n, self.value = n_classes, 5.0 if yes else -5.0

    def forward(self, x):
        b, _, h, w = x.shape
        cam = torch.full((b, self.n, h // 8, w // 8), self.value)
        return cam.mean((2, 3)), cam


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    generate(root / "ds", SyntheticConfig(n_train=4, n_val=6, image_size=64, n_classes=4, seed=1))
    model = create_classifier("resnet18_w8", 4, 8, "none")
    save_weights(root / "clf.pt", {"arch": {"backbone": "resnet18_w8", "n_classes": 4, "output_stride": 8},
                                   "model": model.state_dict()})
    return root


def _cfg(root, **kw):
    return diagnose.Config(dataset="synthetic", root=root / "ds", split="val", classifier=root / "clf.pt",
                           out=root / "b.json", table=root / "b.md", threads=1, **kw)


def test_stage_writes_the_premises_table(tiny):
    out = diagnose.run(_cfg(tiny))
    saved = json.loads((tiny / "b.json").read_text())
    assert saved["images"] == 6 and saved["positives"] == out["positives"] > 0
    for v in [*out["recall"].values(), *out["tiles"].values(), out["cam"]["head_recall"], out["cam"]["body_recall"]]:
        assert v is None or 0.0 <= v <= 1.0
    assert out["recall_trials"]["object_erased"] == out["positives"]
    table = (tiny / "b.md").read_text()
    assert "whole object erased (context only)" in table and "tiles holding body only" in table
    assert 0.0 < out["object_pixels_near_edge"] <= 1.0 and "one stride-4 cell" in table


@pytest.mark.parametrize("yes, expect", [(True, 1.0), (False, 0.0)])
def test_recalls_count_positive_classes(tiny, monkeypatch, yes, expect):
    """A classifier that always (never) fires recalls every (no) class intact, erased and per tile."""
    monkeypatch.setattr(diagnose, "classifier_from_artifact", lambda state: _Constant(4, yes))
    out = diagnose.run(_cfg(tiny))
    assert set(out["recall"].values()) == {expect}
    assert out["body_minus_context"] == 0.0
    assert out["tiles"]["any"] == expect


def test_no_part_maps_is_a_named_error(tiny, tmp_path):
    ds = tmp_path / "ds"
    generate(ds, SyntheticConfig(n_train=2, n_val=2, image_size=48, n_classes=3, write_parts=False))
    cfg = diagnose.Config(dataset="synthetic", root=ds, split="val", classifier=tiny / "clf.pt",
                          out=tmp_path / "b.json", table=tmp_path / "b.md", threads=1)
    with pytest.raises(DataError, match="SegmentationPart.*write_parts"):
        diagnose.run(cfg)
    assert not (tmp_path / "b.json").exists()
