"""Stages of issue 5: affinity labels, AffinityNet training, random walk, pseudo masks, evaluation, table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pnoc.affinity import (evaluate_masks, make_affinity_labels, make_pseudo_masks, masks_table, propagate,
                           train_affinity, walk_share)
from pnoc.affinity.random_walk import propagate_cams
from pnoc.data.transforms import normalize, to_tensor_image
from pnoc.io import DataError, load_maps, read_mask, save_maps, write_gray, write_image, write_json, write_mask
from pnoc.models.affinitynet import affinitynet_from_artifact
from pnoc.training import save_weights

H = W = 32
CLASSES = ["a", "b"]


def make_mini(root: Path, masks: dict[str, np.ndarray], labels: dict[str, list[int]], split="train", seed=0) -> Path:
    """A synthetic-layout dataset with two classes; ``labels`` are 1-based class ids per image."""
    rng = np.random.default_rng(seed)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    for image_id, m in masks.items():
        img = rng.integers(0, 255, (*m.shape, 3), dtype=np.uint8)
        img[m == 1] = (200, 30, 30)
        img[m == 2] = (30, 200, 30)
        write_image(root / "JPEGImages" / f"{image_id}.jpg", img)
        write_mask(root / "SegmentationClass" / f"{image_id}.png", m)
        objs = "".join(f"<object><name>{CLASSES[c - 1]}</name></object>" for c in labels[image_id])
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objs}</annotation>")
    lst = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    lst.write_text("\n".join(masks) + "\n")
    return root


def gt_masks() -> tuple[dict, dict]:
    m0 = np.zeros((H, W), np.uint8)
    m0[4:16, 4:16] = 1
    m1 = np.zeros((H, W), np.uint8)
    m1[8:24, 10:26] = 2
    m1[0:4, 0:4] = 1
    m1[31, :] = 255
    return {"img0": m0, "img1": m1}, {"img0": [1], "img1": [1, 2]}


@pytest.fixture
def mini(tmp_path):
    masks, labels = gt_masks()
    return make_mini(tmp_path / "ds", masks, labels)


def write_cams(folder: Path, image_id: str, maps: np.ndarray, keys) -> None:
    lr = F.interpolate(torch.from_numpy(maps)[None], size=(H // 4, W // 4), mode="bilinear", align_corners=False)[0]
    save_maps(folder / f"{image_id}.npz", maps, np.asarray(keys), lr=lr.numpy())


# ------------------------------------------------------------------------------ affinity labels
def hand_cams(tmp_path: Path) -> Path:
    """img0: class 1 strong (0.5) in rows 0-9, weak (0.2) in rows 10-19, faint (0.01) below."""
    cams = tmp_path / "cams"
    c0 = np.full((1, H, W), 0.01, np.float32)
    c0[0, :10] = 0.5
    c0[0, 10:20] = 0.2
    write_cams(cams, "img0", c0, [1])
    c1 = np.zeros((2, H, W), np.float32)
    c1[0, :, :16] = 0.9  # class 1 left, class 2 right
    c1[1, :, 16:] = 0.35  # above the classic fg threshold, below the saliency one
    write_cams(cams, "img1", c1, [1, 2])
    return cams


def test_affinity_labels_classic_exact(tmp_path, mini):
    cams = hand_cams(tmp_path)
    out = tmp_path / "labels"
    make_affinity_labels.run(make_affinity_labels.Config(
        "synthetic", mini, "train", cams, out, method="classic", crf=False))
    e0 = np.zeros((H, W), np.uint8)
    e0[:10] = 1
    e0[10:20] = 255  # bg under the high plane (0.30), fg under the low one (0.05)
    e1 = np.zeros((H, W), np.uint8)
    e1[:, :16] = 1
    e1[:, 16:] = 2
    np.testing.assert_array_equal(read_mask(out / "img0.png"), e0)
    np.testing.assert_array_equal(read_mask(out / "img1.png"), e1)
    summary = json.loads((out / "summary.json").read_text())
    n = 2 * H * W
    assert summary["fraction_uncertain"] == pytest.approx(10 * W / n)
    assert summary["fraction_bg"] == pytest.approx(12 * W / n)
    assert summary["fraction_fg"] == pytest.approx((10 * W + H * W) / n)
    # precision against the mini ground truth, void row 31 of img1 excluded
    masks, _ = gt_masks()
    g0, g1 = masks["img0"], masks["img1"]
    bg_ok = ((e0 == 0) & (g0 == 0)).sum()
    bg_all = (e0 == 0).sum()
    valid1 = g1 != 255
    fg_ok = ((e0 == 1) & (g0 == 1)).sum() + ((e1 == g1) & valid1).sum()
    fg_all = (e0 == 1).sum() + valid1.sum()
    assert summary["precision_bg"] == pytest.approx(bg_ok / bg_all)
    assert summary["precision_fg"] == pytest.approx(fg_ok / fg_all)
    assert summary["precision_confident"] == pytest.approx((bg_ok + fg_ok) / (bg_all + fg_all))


def write_saliency(folder: Path) -> None:
    s0 = np.zeros((H, W), np.float32)
    s0[:20, :16] = 1.0  # salient: rows 0-19, left half
    write_gray(folder / "img0.png", s0)
    s1 = np.ones((H, W), np.float32)
    s1[:, 28:] = 0.05  # below bg_threshold 0.10 -> background
    write_gray(folder / "img1.png", s1)


def test_affinity_labels_saliency_exact(tmp_path, mini):
    cams = hand_cams(tmp_path)
    sal = tmp_path / "sal"
    write_saliency(sal)
    out = tmp_path / "labels"
    make_affinity_labels.run(make_affinity_labels.Config(
        "synthetic", mini, "train", cams, out, method="saliency", saliency_dir=sal, crf=False))
    e0 = np.zeros((H, W), np.uint8)
    e0[:10, :16] = 1       # salient, CAM 0.5 > 0.40
    e0[10:20, :16] = 255   # salient, CAM 0.2: uncertain
    e1 = np.zeros((H, W), np.uint8)
    e1[:, :16] = 1
    e1[:, 16:28] = 255     # salient, class-2 CAM 0.35 < 0.40
    np.testing.assert_array_equal(read_mask(out / "img0.png"), e0)
    np.testing.assert_array_equal(read_mask(out / "img1.png"), e1)


def test_affinity_labels_with_crf_in_worker_processes(tmp_path, mini):
    cams = hand_cams(tmp_path)
    sal = tmp_path / "sal"
    write_saliency(sal)
    out = tmp_path / "labels"
    s = make_affinity_labels.run(make_affinity_labels.Config(
        "synthetic", mini, "train", cams, out, method="saliency", saliency_dir=sal, crf=True, threads=2))
    for image_id in ("img0", "img1"):
        v = set(np.unique(read_mask(out / f"{image_id}.png")).tolist())
        assert v <= {0, 1, 2, 255}
    assert s["fraction_bg"] + s["fraction_fg"] + s["fraction_uncertain"] == pytest.approx(1.0)


def test_missing_saliency_or_cam_names_the_image(tmp_path, mini):
    cams = hand_cams(tmp_path)
    sal = tmp_path / "sal"
    write_saliency(sal)
    (sal / "img1.png").unlink()
    with pytest.raises(DataError, match="img1"):
        make_affinity_labels.run(make_affinity_labels.Config(
            "synthetic", mini, "train", cams, tmp_path / "l1", method="saliency", saliency_dir=sal, crf=False))
    assert not (tmp_path / "l1").exists()  # atomic folder: nothing half-written
    (cams / "img0.npz").unlink()
    with pytest.raises(DataError, match="img0"):
        make_affinity_labels.run(make_affinity_labels.Config(
            "synthetic", mini, "train", cams, tmp_path / "l2", method="classic", crf=False))


# ------------------------------------------------------------------------------ AffinityNet + RW
def tiny_affinitynet(path: Path, seed=0):
    torch.manual_seed(seed)
    model, arch = train_affinity.build_model("backbone", None, "resnet18_w8", "none", 16, 8)
    save_weights(path, {"arch": arch, "model": model.state_dict()})
    return model


def test_train_affinity_runs_and_learns_from_labels(tmp_path, mini):
    cams = hand_cams(tmp_path)
    labels = tmp_path / "labels"
    make_affinity_labels.run(make_affinity_labels.Config("synthetic", mini, "train", cams, labels,
                                                         method="classic", crf=False))
    m = train_affinity.run(train_affinity.Config(
        "synthetic", mini, labels, tmp_path / "aff.pt", tmp_path / "aff.json", tmp_path / "state",
        init="backbone", backbone="resnet18_w8", branch_channels=8, epochs=2, batch_size=2, crop=32,
        resize_min=28, resize_max=36, device="cpu"))
    assert len(m["epochs"]) == 2 and all(np.isfinite(r["loss"]) for r in m["epochs"])
    assert m["epochs"][0]["pairs_neg_per_image"] > 0 and m["epochs"][0]["pairs_fg_pos_per_image"] > 0
    model = affinitynet_from_artifact(torch.load(tmp_path / "aff.pt", weights_only=True))
    assert model.boundary(torch.zeros(1, 3, 32, 32)).shape == (1, 1, 8, 8)


def test_propagate_equals_propagate_cams(tmp_path, mini):
    cams = hand_cams(tmp_path)
    model = tiny_affinitynet(tmp_path / "aff.pt").eval()
    out = tmp_path / "rw"
    propagate.run(propagate.Config("synthetic", mini, "train", tmp_path / "aff.pt", cams, out,
                                   radius=3, beta=4, exp_times=3, batch_size=2, device="cpu"))
    from pnoc.data import open_dataset

    ds = open_dataset("synthetic", mini, "train")
    for image_id in ds.ids:
        z = load_maps(cams / f"{image_id}.npz")
        x = normalize(to_tensor_image(ds.read_image(image_id)))[None]
        bnd = model.boundary(x, flip=True)[0, 0]
        rw = propagate_cams(torch.from_numpy(z["lr"]), bnd, radius=3, beta=4, exp_times=3, normalise=False)
        up = F.interpolate(rw[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :H, :W]
        expected = (up / up.max()).numpy()
        got = load_maps(out / f"{image_id}.npz")
        np.testing.assert_array_equal(got["keys"], z["keys"])
        assert got["maps"].shape == (len(z["keys"]), H, W)
        np.testing.assert_allclose(got["maps"], expected, atol=2e-3)  # float16 storage
        np.testing.assert_allclose(got["boundary"], bnd.numpy(), atol=2e-3)
        assert got["maps"].max() == pytest.approx(1.0, abs=1e-3)


def test_propagate_without_seed_mask_walks_the_cams_themselves(tmp_path, mini):
    """seed_mask false: the seeds are the CAMs, not CAMs × (1 − boundary); the graph is the same."""
    from pnoc.affinity.random_walk import random_walk
    from pnoc.data import open_dataset

    cams = hand_cams(tmp_path)
    tiny_affinitynet(tmp_path / "aff.pt")  # writes the model file
    runs = {}
    for mask in (True, False):
        runs[mask] = tmp_path / f"rw_{mask}"
        propagate.run(propagate.Config("synthetic", mini, "train", tmp_path / "aff.pt", cams, runs[mask], radius=3,
                                       beta=4, exp_times=3, seed_mask=mask, batch_size=2, device="cpu"))
    ds = open_dataset("synthetic", mini, "train")
    for image_id in ds.ids:
        z = load_maps(cams / f"{image_id}.npz")
        out = load_maps(runs[False] / f"{image_id}.npz")
        bnd = torch.from_numpy(out["boundary"]).float()
        rw = random_walk(torch.from_numpy(z["lr"]).float(), bnd, radius=3, beta=4, exp_times=3)
        up = F.interpolate(rw[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :H, :W]
        got = out["maps"]
        np.testing.assert_allclose(got, (up / up.max()).numpy(), atol=2e-3)  # float16 storage
        assert np.abs(got - load_maps(runs[True] / f"{image_id}.npz")["maps"]).max() > 1e-2


def test_propagate_missing_cam_names_the_image(tmp_path, mini):
    cams = hand_cams(tmp_path)
    tiny_affinitynet(tmp_path / "aff.pt")
    (cams / "img1.npz").unlink()
    with pytest.raises(DataError, match="img1"):
        propagate.run(propagate.Config("synthetic", mini, "train", tmp_path / "aff.pt", cams, tmp_path / "rw",
                                       device="cpu"))


# ------------------------------------------------------------------------------ pseudo masks + evaluation
def test_pseudo_masks_exact(tmp_path, mini):
    rw = tmp_path / "rw"
    r0 = np.zeros((1, H, W), np.float32)
    r0[0, :8] = 0.9
    r0[0, 8:16] = 0.25  # a tie with the background plane (0.25, exact in float16) goes to the background
    r0[0, 16:24] = 0.26
    save_maps(rw / "img0.npz", r0, np.array([2]))
    r1 = np.zeros((2, H, W), np.float32)
    r1[0, :, :10] = 0.6
    r1[1, :, 5:20] = 0.7  # overlaps class 1 on columns 5-9 and wins there
    save_maps(rw / "img1.npz", r1, np.array([1, 2]))
    out = tmp_path / "masks"
    info = make_pseudo_masks.run(make_pseudo_masks.Config("synthetic", mini, "train", rw, out, bg_threshold=0.25,
                                                          crf=False))
    e0 = np.zeros((H, W), np.uint8)
    e0[:8] = 2
    e0[16:24] = 2
    e1 = np.zeros((H, W), np.uint8)
    e1[:, :5] = 1
    e1[:, 5:20] = 2
    np.testing.assert_array_equal(read_mask(out / "img0.png"), e0)
    np.testing.assert_array_equal(read_mask(out / "img1.png"), e1)
    assert info["fraction_bg"] == pytest.approx(((e0 == 0).sum() + (e1 == 0).sum()) / (2 * H * W))
    # no classes -> all background; with the CRF the values stay class ids
    save_maps(rw / "img0.npz", np.zeros((0, H, W), np.float32), np.zeros(0, np.int64))
    make_pseudo_masks.run(make_pseudo_masks.Config("synthetic", mini, "train", rw, out, crf=True))
    assert not read_mask(out / "img0.png").any()
    assert set(np.unique(read_mask(out / "img1.png")).tolist()) <= {0, 1, 2}
    (rw / "img1.npz").unlink()
    with pytest.raises(DataError, match="img1"):
        make_pseudo_masks.run(make_pseudo_masks.Config("synthetic", mini, "train", rw, out, crf=False))


def test_pseudo_masks_saliency_gate_exact(tmp_path, mini):
    """Pixels whose saliency is at most the threshold become background; a missing map names the image."""
    rw = tmp_path / "rw"
    r0 = np.zeros((1, H, W), np.float32)
    r0[0, :16] = 0.9
    save_maps(rw / "img0.npz", r0, np.array([1]))
    r1 = np.full((2, H, W), 0.1, np.float32)
    r1[1, :, 16:] = 0.8
    r1[0, :, :16] = 0.8
    save_maps(rw / "img1.npz", r1, np.array([1, 2]))
    sal = tmp_path / "sal"
    s0 = np.full((H, W), 255, np.uint8)
    s0[:, :8] = 166          # 166 / 255 = 0.651 > 0.65: kept
    s0[:, 8:12] = 165        # 0.647 <= 0.65: background
    s0[:4] = 0
    write_gray(sal / "img0.png", s0 / 255.0)
    s1 = np.zeros((H, W), np.uint8)
    s1[10:20, 5:25] = 255
    write_gray(sal / "img1.png", s1 / 255.0)
    out = tmp_path / "masks"
    info = make_pseudo_masks.run(make_pseudo_masks.Config("synthetic", mini, "train", rw, out, bg_threshold=0.25,
                                                          crf=False, saliency_dir=sal, saliency_threshold=0.65))
    e0 = np.zeros((H, W), np.uint8)
    e0[4:16] = 1
    e0[4:16, 8:12] = 0
    e1 = np.zeros((H, W), np.uint8)
    e1[10:20, 5:16] = 1
    e1[10:20, 16:25] = 2
    np.testing.assert_array_equal(read_mask(out / "img0.png"), e0)
    np.testing.assert_array_equal(read_mask(out / "img1.png"), e1)
    assert info["saliency_threshold"] == 0.65 and info["saliency"] == str(sal)
    # the same maps without the gate: the reference rule
    make_pseudo_masks.run(make_pseudo_masks.Config("synthetic", mini, "train", rw, out, bg_threshold=0.25, crf=False))
    np.testing.assert_array_equal(read_mask(out / "img0.png"), np.where(np.arange(H)[:, None] < 16, 1, 0)
                                  * np.ones((1, W), np.uint8))
    (sal / "img1.png").unlink()
    with pytest.raises(DataError, match="img1"):
        make_pseudo_masks.run(make_pseudo_masks.Config("synthetic", mini, "train", rw, out, crf=False,
                                                       saliency_dir=sal, saliency_threshold=0.65))
    with pytest.raises(DataError, match="saliency-dir"):
        make_pseudo_masks.run(make_pseudo_masks.Config("synthetic", mini, "train", rw, out, saliency_threshold=0.5))


def test_evaluate_masks_exact(tmp_path, mini):
    masks, _ = gt_masks()
    pred = tmp_path / "masks"
    p0 = masks["img0"].copy()
    p0[4:6, 4:16] = 0        # 24 class-1 pixels missed
    p1 = masks["img1"].copy()
    p1[31, :] = 2            # void ground truth: not scored
    p1[0:2, 28:32] = 255     # unsure prediction counts as background (correct here)
    write_mask(pred / "img0.png", p0)
    write_mask(pred / "img1.png", p1)
    prior = tmp_path / "prior.json"
    write_json(prior, {"stage": "priors", "miou": 0.5, "threshold": 0.25})
    out = tmp_path / "m" / "metrics.json"
    m = evaluate_masks.run(evaluate_masks.Config("synthetic", mini, "train", pred, out, variant="pnoc_ls+classic",
                                                 prior_metrics=prior))
    # class 1: img0 144 GT, 120 hit; img1 16 GT, all hit. class 2: 256, all hit. background: the rest.
    tp1, gt1 = 120 + 16, 144 + 16
    bg_gt = (H * W - 144) + (H * W - W - 256 - 16)
    iou_bg = bg_gt / (bg_gt + 24)
    iou_1 = tp1 / gt1
    assert m["per_class_iou"] == pytest.approx({"background": iou_bg, "a": iou_1, "b": 1.0})
    assert m["miou"] == pytest.approx((iou_bg + iou_1 + 1.0) / 3)
    assert m["stage"] == "pseudo_masks" and m["variant"] == "pnoc_ls+classic" and m["split"] == "train"
    assert m["prior_variant"] == "pnoc_ls" and m["affinity_method"] == "classic"
    assert m["prior_miou"] == 0.5 and m["masks"] == str(pred)
    assert json.loads(out.read_text())["miou"] == pytest.approx(m["miou"])
    assert out.with_suffix(".md").is_file()


def test_masks_table(tmp_path):
    paths = []
    for prior, method, split, miou, pm in [("poc", "classic", "train", 0.5, 0.4), ("poc", "classic", "val", 0.45, 0.4),
                                           ("pnoc_ls", "saliency", "train", 0.7, 0.5),
                                           ("pnoc_ls", "saliency", "val", 0.6, 0.5)]:
        p = tmp_path / f"{prior}+{method}" / split / "metrics.json"
        write_json(p, {"stage": "pseudo_masks", "variant": f"{prior}+{method}", "split": split, "miou": miou,
                       "prior_miou": pm})
        paths.append(p)
    out = tmp_path / "masks.md"
    masks_table.run(masks_table.Config(out, paths))
    md = out.read_text()
    assert "70.00" in md and "+20.00" in md and "P-NOC" in md and "saliency (C²AM-H)" in md
    csv = out.with_suffix(".csv").read_text().splitlines()
    assert csv[0].startswith("prior,method,prior_miou_train,miou_train,gain_train")
    assert csv[2].startswith("pnoc_ls,saliency,0.5,0.7,0.2")
    assert "≤" not in md  # no saliency gate
    masks_table.run(masks_table.Config(out, paths, saliency_method="c2am", saliency_gate=0.65))
    md = out.read_text()
    assert "saliency (C²AM)" in md and "C²AM-H" not in md and "saliency is ≤ 0.65" in md


# ------------------------------------------------------------------------------ workflow
@pytest.mark.slow
def test_affinity_rules_smoke(smoke_run):
    from conftest import smoke_workdir, snakemake

    # reuses the session's smoke results: only the classic chain and the table are new
    tmp, cfg, _ = smoke_run
    snakemake(["masks_table", "--cores", "2", "--configfile", str(cfg)], timeout=2400, cwd=smoke_workdir(tmp))
    res = tmp / "results"
    md = (res / "tables" / "masks.md").read_text()
    assert "pnoc_ls" in md and "classic" in md and "saliency" in md
    for method in ("classic", "saliency"):
        for split in ("train", "val"):
            m = json.loads((res / "pseudo_masks" / f"pnoc_ls+{method}" / "seed0" / split / "metrics.json").read_text())
            assert 0.0 < m["miou"] <= 1.0 and "prior_miou" in m
        assert (res / "affinity_labels" / f"pnoc_ls+{method}" / "seed0" / "train" / "summary.json").is_file()


# ------------------------------------------------------------------------------ the walk's share
def test_gt_boundary_exact():
    """A stride-4 cell is boundary when its 4×4 block holds two labels; void counts as background."""
    gt = np.zeros((10, 12), np.uint8)
    gt[0:4, 4:8] = 1      # fills cell (0, 1) exactly: no boundary
    gt[4:6, 0:12] = 2     # half of row 1 of cells: boundary everywhere in that row
    gt[8:10, 8:12] = 255  # void in the padded last row: background, no boundary
    b = walk_share.gt_boundary(gt, (3, 3))
    assert b.dtype == np.float32
    assert b.tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
    gt[9, 0] = 1          # one pixel of class 1 in the padded last row of cells
    assert walk_share.gt_boundary(gt, (3, 3))[2].tolist() == [1, 0, 0]


def test_cell_labels_exact():
    """A cell's label is its block's most frequent non-void label; an all-void cell is background."""
    gt = np.zeros((10, 12), np.uint8)
    gt[0:4, 4:8] = 1       # cell (0, 1): all class 1
    gt[4:7, 0:4] = 2       # cell (1, 0): 12 of 16 pixels class 2
    gt[4:6, 4:8] = 2       # cell (1, 1): 8 / 8, a tie: the smaller id (0) wins
    gt[0:4, 8:12] = 255    # cell (0, 2): all void -> background
    gt[4:8, 8:12] = 255
    gt[7, 11] = 1          # cell (1, 2): one class-1 pixel among 15 void ones
    gt[8:10, 0:4] = 2      # cell (2, 0): rows 8-9 of class 2, padded with the edge row (2) to 16 of 16
    lab = walk_share.cell_labels(gt, (3, 3))
    assert lab.dtype == np.int64
    assert lab.tolist() == [[0, 1, 0], [2, 0, 1], [2, 0, 0]]


def test_walk_share_exact(tmp_path, mini):
    """Prior vs RW, thresholds chosen on val: exact mIoUs without the dCRF, the chosen thresholds, the share."""
    masks, labels = gt_masks()
    make_mini(mini, masks, labels, split="val")  # val = the same two images (same drawing seed)
    prior, rw = tmp_path / "prior", tmp_path / "rw"
    p0 = np.zeros((1, H, W), np.float32)
    p0[0, 4:10, 4:16] = 0.6  # the prior finds the top half of the object
    r0 = np.full((1, H, W), 0.1, np.float32)
    r0[0, 4:16, 4:16] = 1.0  # the walk fills it; background at 0.1
    exact = np.zeros((2, H, W), np.float32)
    exact[0][masks["img1"] == 1] = 0.9
    exact[1][masks["img1"] == 2] = 0.9
    for folder, m0 in ((prior, p0), (rw, r0)):
        write_cams(folder, "img0", m0, [1])
        write_cams(folder, "img1", exact, [1, 2])
    out = tmp_path / "share" / "metrics.json"
    m = walk_share.run(walk_share.Config("synthetic", mini, "val", "train", prior, prior, rw, rw, out,
                                         crf_t=1, threads=1))
    cells = {(c["maps"], c["dcrf"]): c for c in m["cells"]}
    # prior: 72 of img0's 144 class-1 pixels missed; every threshold below 0.6 ties, the first (0.05) is kept
    bg_gt = (H * W - 144) + (H * W - W - 256 - 16)
    prior_miou = (bg_gt / (bg_gt + 72) + (72 + 16) / (144 + 16) + 1.0) / 3
    assert cells["prior", False]["threshold"] == pytest.approx(0.05)
    assert cells["prior", False]["val_miou"] == pytest.approx(prior_miou)
    assert cells["prior", False]["train_miou"] == pytest.approx(prior_miou)
    # RW: perfect from the threshold 0.1 on (a tie at 0.1 goes to the background)
    assert cells["rw", False]["threshold"] == pytest.approx(0.1)
    assert cells["rw", False]["train_miou"] == pytest.approx(1.0)
    assert m["share"]["rw_minus_prior"] == pytest.approx(1.0 - prior_miou)
    assert m["share"]["rw_crf_minus_prior_crf"] == pytest.approx(
        cells["rw", True]["train_miou"] - cells["prior", True]["train_miou"])
    assert len(cells["rw", True]["sweep"]) == 16 and 0 < cells["rw", True]["train_miou"] <= 1
    assert json.loads(out.read_text())["stage"] == "walk_share" and out.with_suffix(".md").is_file()
    # the walk over the ground-truth boundary: present, scored, and its share reported
    assert 0 < cells["rw_gt_boundary", False]["train_miou"] <= 1
    assert m["share"]["gt_boundary_rw_minus_prior"] == pytest.approx(
        cells["rw_gt_boundary", False]["train_miou"] - prior_miou)
    # over the ground-truth affinities the prior's top half of img0 spreads over the whole object;
    # over the ground-truth boundary map these 3-4 cell wide objects lose their edge cells' seeds
    gt_aff = cells["rw_gt_affinity", False]["train_miou"]
    assert gt_aff > prior_miou + 0.05 and gt_aff > cells["rw_gt_boundary", False]["train_miou"] + 0.5
    assert m["share"]["gt_affinity_rw_minus_prior"] == pytest.approx(gt_aff - prior_miou)
    assert m["share"]["gt_affinity_rw_crf_minus_prior_crf"] == pytest.approx(
        cells["rw_gt_affinity", True]["train_miou"] - cells["prior", True]["train_miou"])
    (rw / "img1.npz").unlink()
    with pytest.raises(DataError, match="img1.*random-walk maps missing"):
        walk_share.run(walk_share.Config("synthetic", mini, "val", "train", prior, prior, rw, rw, out, threads=1))
