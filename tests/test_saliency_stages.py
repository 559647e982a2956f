"""Saliency stages (issue 4): hints, C²AM/C²AM-H training and direction, inference, PoolNet, evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_voc

from pnoc.io import DataError, read_gray, read_mask, save_maps, write_gray, write_mask
from pnoc.models.ccam import create_ccam
from pnoc.saliency import evaluate_saliency, extract_hints, infer_poolnet, infer_saliency, train_ccam, train_poolnet
from pnoc.training import load_weights, save_weights

H, W = 24, 32
VALID = H * W - W  # row 0 is 255 (ignore)


def _one_image_voc(root: Path, classes=(1, 2)):
    """A one-image VOC split 'train' with a hand-made mask.

    Mask: row 0 = 255; rows 4..11 × cols 8..15 = classes[0]; rows 4..11 × cols 16..23 = classes[1]
    (or classes[0] when only one class); 0 elsewhere.
    """
    make_voc(root, splits={"train": 1}, h=H, w=W)
    image_id = "2007_000000"
    m = np.zeros((H, W), np.uint8)
    m[0] = 255
    m[4:12, 8:16] = classes[0]
    m[4:12, 16:24] = classes[-1]
    write_mask(root / "SegmentationClass" / f"{image_id}.png", m)
    from pnoc.data.datasets import VOC_CLASSES

    objs = "".join(f"<object><name>{VOC_CLASSES[c - 1]}</name></object>" for c in sorted(set(classes)))
    (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objs}</annotation>")
    return image_id


# ------------------------------------------------------------------------------------------- hints
def test_extract_hints_exact(tmp_path):
    root = tmp_path / "voc"
    image_id = _one_image_voc(root, classes=(1,))
    cams = tmp_path / "cams"
    a = np.zeros((H, W), np.float32)
    a[4:12, 8:16] = 0.92                      # 64 object pixels, strong
    b = np.full((H, W), 0.05, np.float32)
    b[16:18, :] = 0.63                        # 64 background pixels, strong (false hints)
    b[4:12, 16:24] = 0.3                      # 64 object pixels, in between
    save_maps(cams / f"{image_id}.npz", np.stack([a, b]), np.array([1, 3]))
    out = tmp_path / "hints"
    s = extract_hints.run(extract_hints.Config("voc12", root, "train", cams, out, 0.4, 0.1))
    # hint = max over classes: 0.92 (64 obj), 0.63 (64 bg), 0.3 (64 obj), 0.05 elsewhere (576)
    assert s["fg_coverage"] == pytest.approx(128 / (H * W))
    assert s["bg_coverage"] == pytest.approx(576 / (H * W))
    assert s["fg_precision"] == pytest.approx(64 / 128)
    assert s["fg_recall"] == pytest.approx(64 / 128)
    assert s["bg_precision"] == pytest.approx(1.0)   # the 544 valid ≤ 0.1 pixels are all background
    assert s["gt_images"] == 1
    assert json.loads((out / "summary.json").read_text())["fg_precision"] == pytest.approx(0.5)
    hint = read_gray(out / f"{image_id}.png")
    expect = np.maximum(a, b)
    assert np.abs(hint - expect).max() <= 0.5 / 255 + 1e-6


def test_extract_hints_missing_cam_names_file(tmp_path):
    root = tmp_path / "voc"
    image_id = _one_image_voc(root)
    (tmp_path / "cams").mkdir()
    with pytest.raises(DataError, match=f"{image_id}.npz"):
        extract_hints.run(extract_hints.Config("voc12", root, "train", tmp_path / "cams", tmp_path / "hints"))
    assert not (tmp_path / "hints").exists()


# ------------------------------------------------------------------------------------------- evaluation
def test_evaluate_saliency_exact(tmp_path):
    root = tmp_path / "voc"
    image_id = _one_image_voc(root, classes=(1, 2))
    sal = np.zeros((H, W), np.float32)
    sal[4:12, 8:16] = 0.92        # class-1 object (64 px)
    sal[16:18, :] = 0.92          # background (64 px): false positives
    sal[4:12, 16:24] = 0.63       # class-2 object (64 px), weaker: salient only for t ≤ 0.60
    maps = tmp_path / "poolnet"
    write_gray(maps / f"{image_id}.png", sal)
    cams = tmp_path / "cams"
    ca = np.full((H, W), 0.9, np.float32)
    cb = np.zeros((H, W), np.float32)
    cb[:, 20:] = 1.0              # CAM argmax: class 1 on cols 0..19, class 2 on cols 20..31
    save_maps(cams / f"{image_id}.npz", np.stack([ca, cb]), np.array([1, 2]))
    m = evaluate_saliency.run(evaluate_saliency.Config(
        "voc12", root, "train", maps, tmp_path / "ev" / "metrics.json", tmp_path / "ev" / "masks", variant="c2amh",
        maps_format="png", cams_dir=cams, cam_variant="pnoc_ls"))
    bg_valid = VALID - 128  # 608 true background pixels
    # (a) binary, best t = 0.05: 192 predicted fg = 128 objects + 64 background
    iou_fg, iou_bg = 128 / 192, 544 / bg_valid
    assert m["stage"] == "saliency" and m["variant"] == "c2amh" and m["split"] == "train"
    assert m["threshold"] == pytest.approx(0.05)
    assert m["per_class_iou"]["foreground"] == pytest.approx(iou_fg)
    assert m["per_class_iou"]["background"] == pytest.approx(iou_bg)
    assert m["miou"] == pytest.approx((iou_fg + iou_bg) / 2)
    sweep = {r["threshold"]: r["miou"] for r in m["sweep"]}
    assert sweep[0.7] == pytest.approx((64 / 192 + 544 / 672) / 2)   # only the 0.92 regions left
    mask = read_mask(Path(m["masks"]) / f"{image_id}.png")
    assert set(np.unique(mask)) == {0, 1} and int(mask.sum()) == 192
    # (b) saliency + CAM priors at t = 0.05 (21 classes; 18 absent ones score 0 and count)
    cc = m["cam_combined"]
    a_iou, b_iou = 64 / 136, 32 / 88
    assert cc["threshold"] == pytest.approx(0.05) and cc["prior"] == "pnoc_ls"
    assert cc["per_class_iou"]["aeroplane"] == pytest.approx(a_iou)
    assert cc["per_class_iou"]["bicycle"] == pytest.approx(b_iou)
    assert cc["per_class_iou"]["background"] == pytest.approx(iou_bg)
    assert cc["miou"] == pytest.approx((a_iou + b_iou + iou_bg) / 21)
    # (c) GT priors: salient pixels take the nearest object's class -> 32 FP for each class
    gp = m["gt_priors"]
    assert gp["per_class_iou"]["aeroplane"] == pytest.approx(64 / 96)
    assert gp["per_class_iou"]["bicycle"] == pytest.approx(64 / 96)
    assert gp["miou"] == pytest.approx((2 * 64 / 96 + iou_bg) / 21)
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["miou"] == pytest.approx(m["miou"])


def test_evaluate_saliency_missing_map_raises(tmp_path):
    root = tmp_path / "voc"
    image_id = _one_image_voc(root)
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match=f"{image_id}.npz"):
        evaluate_saliency.run(evaluate_saliency.Config("voc12", root, "train", tmp_path / "raw", tmp_path / "m.json",
                                                       tmp_path / "masks", maps_format="npz"))


# ------------------------------------------------------------------------------------------- C²AM training
def _tiny_voc(root: Path, n=4):
    make_voc(root, splits={"train": n}, h=H, w=W)
    from pnoc.data import open_dataset

    return open_dataset("voc12", root, "train")


def _hints_from_gt(ds, out: Path, value=None):
    for i in ds.ids:
        gt = ds.read_mask(i)
        h = ((gt > 0) & (gt != 255)).astype(np.float32) if value is None else np.full(gt.shape, value, np.float32)
        write_gray(out / f"{i}.png", h)
    return out


def _ccam_cfg(tmp, root, method, hints, **kw):
    base = dict(dataset="voc12", root=root, out=tmp / method / "model.pt", metrics=tmp / method / "metrics.json",
                state_dir=tmp / "state" / method, method=method, hints=hints, init="backbone",
                backbone="resnet18_w4", output_stride=8, epochs=1, batch_size=4, lr=0.01, crop=32,
                resize_min=28, resize_max=36, direction_images=0, epoch_eval_images=0, device="cpu", threads=1)
    base.update(kw)
    return train_ccam.Config(**base)


def test_train_ccam_empty_hint_batches_stay_finite(tmp_path):
    ds = _tiny_voc(tmp_path / "voc")
    hints = _hints_from_gt(ds, tmp_path / "hints", value=0.0)  # no pixel reaches δ_fg
    m = train_ccam.run(_ccam_cfg(tmp_path, tmp_path / "voc", "c2amh", hints, epochs=2))
    for e in m["epochs"]:
        assert np.isfinite(e["loss"]) and e["hint"] == 0.0 and e["hint_fraction"] == 0.0
    assert m["direction"]["flip"] is False and m["direction"]["method"] == "hint-anchored"
    state = load_weights(tmp_path / "c2amh" / "model.pt")
    assert state["direction"] == m["direction"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_train_ccam_resumes_from_state(tmp_path):
    ds = _tiny_voc(tmp_path / "voc")
    hints = _hints_from_gt(ds, tmp_path / "hints")
    cfg = _ccam_cfg(tmp_path, tmp_path / "voc", "c2amh", hints, epochs=2)
    first = train_ccam.run(cfg)
    again = train_ccam.run(cfg)  # state of epoch 2 exists: nothing left to train
    assert again["resumed_from_epoch"] == 2
    assert [e["loss"] for e in again["epochs"]] == [e["loss"] for e in first["epochs"]]


class _StubCCAM(torch.nn.Module):
    """z = +/- the image brightness (normalised mean over channels): a known partition."""

    def __init__(self, sign):
        super().__init__()
        self.sign = sign

    def forward(self, x):
        z = self.sign * x.mean(1, keepdim=True)
        return z, None, None


def test_direction_decision_from_hints_and_border(tmp_path):
    from pnoc.data import open_dataset
    from pnoc.io import write_image

    root = tmp_path / "voc"
    _tiny_voc(root, n=3)
    ds = open_dataset("voc12", root, "train")
    hints = tmp_path / "hints"
    for i in ds.ids:  # bright object in the centre, hints on it
        img = np.full((H, W, 3), 20, np.uint8)
        img[6:18, 8:24] = 230
        write_image(root / "JPEGImages" / f"{i}.jpg", img)
        write_gray(hints / f"{i}.png", (img[..., 0] > 128).astype(np.float32))
    inverted = train_ccam.direction_evidence(_StubCCAM(-1.0), ds, ds.ids, "cpu", hints, 0.1)
    assert inverted["flip"] is True and inverted["method"] == "hints" and inverted["correlation"] < 0
    upright = train_ccam.direction_evidence(_StubCCAM(1.0), ds, ds.ids, "cpu", hints, 0.1)
    assert upright["flip"] is False and upright["correlation"] > 0
    border = train_ccam.direction_evidence(_StubCCAM(-1.0), ds, ds.ids, "cpu", None, 0.1)
    assert border["flip"] is True and border["method"] == "border" and border["border_on_fraction"] > 0.5


def test_c2am_direction_recorded_and_applied(tmp_path):
    ds = _tiny_voc(tmp_path / "voc")
    hints = _hints_from_gt(ds, tmp_path / "hints")
    m = train_ccam.run(_ccam_cfg(tmp_path, tmp_path / "voc", "c2am", hints))
    state = load_weights(tmp_path / "c2am" / "model.pt")
    d = state["direction"]
    assert d == m["direction"] and d["method"] == "hints"
    assert d["flip"] == (d["correlation"] < 0)
    # the same weights with both decisions: inference applies the stored flip (σ(−z) = 1 − σ(z))
    maps = {}
    for flip in (False, True):
        path = tmp_path / f"flip{flip}.pt"
        save_weights(path, {**state, "direction": {"flip": flip, "method": "test"}})
        out = tmp_path / f"sal{flip}"
        info = infer_saliency.run(infer_saliency.Config(
            "voc12", tmp_path / "voc", "train", path, out / "raw", out / "pseudo", scales=[1.0], flip=True,
            activation="sigmoid", crf_t=0, device="cpu", threads=1))
        assert info["direction"]["flip"] is flip
        maps[flip] = np.stack([evaluate_saliency.read_saliency(out / "raw", i, ds.image_size(i)) for i in ds.ids])
        pseudo = read_mask(out / "pseudo" / f"{ds.ids[0]}.png")
        assert set(np.unique(pseudo)) <= {0, 255}
    np.testing.assert_allclose(maps[True], 1.0 - maps[False], atol=2e-3)
    # relu activation: flipped maps live on the complementary support, each max-normalised
    out = tmp_path / "relu"
    infer_saliency.run(infer_saliency.Config("voc12", tmp_path / "voc", "train", tmp_path / "flipTrue.pt",
                                             out / "raw", out / "pseudo", scales=[1.0, 1.5], crf_t=0,
                                             device="cpu", threads=1))
    r = evaluate_saliency.read_saliency(out / "raw", ds.ids[0], ds.image_size(ds.ids[0]))
    assert r.min() >= 0 and r.max() == pytest.approx(1.0, abs=1e-3)


def test_infer_saliency_pseudo_masks_with_crf(tmp_path):
    ds = _tiny_voc(tmp_path / "voc", n=2)
    model = create_ccam("resnet18_w4", 8)
    path = tmp_path / "m.pt"
    save_weights(path, {"arch": {"backbone": "resnet18_w4", "output_stride": 8}, "model": model.state_dict(),
                        "direction": {"flip": False, "method": "hint-anchored"}})
    info = infer_saliency.run(infer_saliency.Config("voc12", tmp_path / "voc", "train", path, tmp_path / "raw",
                                                    tmp_path / "pseudo", scales=[1.0], crf_t=3, device="cpu"))
    assert info["images"] == 2
    for i in ds.ids:
        p = read_mask(tmp_path / "pseudo" / f"{i}.png")
        assert p.shape == (H, W) and set(np.unique(p)) <= {0, 255}


# ------------------------------------------------------------------------------------------- PoolNet
def test_poolnet_train_and_infer(tmp_path):
    ds = _tiny_voc(tmp_path / "voc")
    masks = tmp_path / "pseudo"
    for i in ds.ids:
        gt = ds.read_mask(i)
        write_mask(masks / f"{i}.png", (((gt > 0) & (gt != 255)) * 255).astype(np.uint8), palette=False)
    cfg = train_poolnet.Config("voc12", tmp_path / "voc", masks, tmp_path / "pn" / "model.pt",
                               tmp_path / "pn" / "metrics.json", tmp_path / "state", init="backbone",
                               backbone="resnet18_w4", width=8, epochs=2, batch_size=2, lr=1e-3, crop=32,
                               resize_min=0, device="cpu", threads=1)
    m = train_poolnet.run(cfg)
    assert len(m["epochs"]) == 2 and all(np.isfinite(e["loss"]) for e in m["epochs"])
    info = infer_poolnet.run(infer_poolnet.Config("voc12", tmp_path / "voc", "train", tmp_path / "pn" / "model.pt",
                                                  tmp_path / "maps", flip=True, device="cpu"))
    assert info["images"] == len(ds)
    for i in ds.ids:
        s = read_gray(tmp_path / "maps" / f"{i}.png")
        assert s.shape == (H, W) and 0 <= s.min() <= s.max() <= 1
    # a missing pseudo mask is an error naming the file, not a skipped image
    (masks / f"{ds.ids[1]}.png").unlink()
    cfg.state_dir, cfg.out = tmp_path / "state2", tmp_path / "pn2" / "model.pt"
    with pytest.raises(DataError, match=f"{ds.ids[1]}.png"):
        train_poolnet.run(cfg)


def test_masked_bce_ignores_padding():
    logits = torch.tensor([[[[0.0, 5.0], [-5.0, 100.0]]]])
    target = torch.tensor([[[1, 1], [0, 255]]])
    expect = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([0.0, 5.0, -5.0]),
                                                                  torch.tensor([1.0, 1.0, 0.0]))
    assert train_poolnet.masked_bce(logits, target).item() == pytest.approx(expect.item())
    assert train_poolnet.masked_bce(logits, torch.full((1, 2, 2), 255)).item() == 0.0


# ------------------------------------------------------------------------------------------- workflow
@pytest.mark.slow
def test_saliency_rules_smoke(smoke_run):
    """The saliency_table target on the smoke run (reusing its dataset, classifier and priors)."""
    from conftest import smoke_workdir, snakemake

    tmp, cfg, _ = smoke_run
    p = snakemake(["saliency_table", "--cores", "2", "--configfile", str(cfg)], timeout=1500, cwd=smoke_workdir(tmp))
    res = tmp / "results"
    assert "Saliency from weak supervision" in p.stdout
    assert (res / "tables" / "saliency.md").is_file() and (res / "tables" / "saliency.csv").is_file()
    for v in ("c2am", "c2amh", "c2am_raw", "c2amh_raw"):
        m = json.loads((res / "saliency_eval" / v / "seed0" / "train" / "metrics.json").read_text())
        assert m["stage"] == "saliency" and m["variant"] == v
        assert 0 <= m["miou"] <= 1 and 0 <= m["cam_combined"]["miou"] <= 1 and 0 <= m["gt_priors"]["miou"] <= 1
        assert any(Path(m["masks"]).glob("*.png"))
    for method in ("c2am", "c2amh"):
        d = json.loads((res / "ccam" / method / "seed0" / "metrics.json").read_text())["direction"]
        assert isinstance(d["flip"], bool)
        assert any((res / "saliency" / method / "seed0" / "train" / "poolnet").glob("*.png"))
    hints = json.loads((res / "hints" / "pnoc_ls" / "seed0" / "train" / "summary.json").read_text())
    assert 0 <= hints["fg_precision"] <= 1
    # the chain's saliency is in the summary
    summary = json.loads((res / "summary.json").read_text())
    import yaml
    from conftest import ROOT
    chain = yaml.safe_load((ROOT / "config.yaml").read_text())["saliency"]["method"]  # smoke.yaml keeps it
    rows = {(r["stage"], r["variant"]) for r in summary["rows"]}
    assert {("saliency", chain), ("saliency", f"{chain}_raw")} <= rows, rows


def test_background_hint_loss_exact_and_empty():
    z = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]], requires_grad=True)
    hint = torch.tensor([[[[0.05, 0.5], [0.1, 0.0]]]])
    loss, n = train_ccam.background_hint_loss(z, hint, bg_thr=0.1, smoothing=0.1)
    # pixels with hint <= 0.1: z = 0, -1, 3; target ε/2 = 0.05
    expect = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([0.0, -1.0, 3.0]),
                                                                  torch.full((3,), 0.05))
    assert n == 3 and loss.item() == pytest.approx(expect.item(), rel=1e-5)
    empty, n0 = train_ccam.background_hint_loss(z, torch.ones_like(hint), bg_thr=0.1)
    assert n0 == 0 and empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(z.grad).all()


def test_train_ccam_with_background_hints(tmp_path):
    ds = _tiny_voc(tmp_path / "voc")
    hints = _hints_from_gt(ds, tmp_path / "hints")
    m = train_ccam.run(_ccam_cfg(tmp_path, tmp_path / "voc", "c2amh", hints, bg_hint_weight=1.0, epoch_eval_images=2))
    e = m["epochs"][0]
    assert np.isfinite(e["loss"]) and e["bg_hint"] > 0 and 0 < e["bg_hint_fraction"] < 1
    assert 0 <= e["binary_miou_no_tta"] <= 1
