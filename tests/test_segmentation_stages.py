"""Stage 9 (segmentation train / infer / evaluate), evaluate_mask_folder, the gallery and the HTML report."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smoke_workdir, snakemake
from fixtures import make_voc
from PIL import Image

from pnoc.data import open_dataset
from pnoc.evaluation import evaluate_mask_folder
from pnoc.io import DataError, read_mask, voc_palette, write_gray, write_mask
from pnoc.models.classifier import create_classifier
from pnoc.models.deeplab import build_segmenter, segmenter_from_artifact
from pnoc.report import gallery, report_tables
from pnoc.segmentation import evaluate_segmentation, infer_segmentation, train_segmentation
from pnoc.training import save_weights

TINY = dict(backbone="resnet18_w8", aspp_channels=16, decoder_low_channels=8, decoder_channels=16, epochs=1,
            batch_size=2, crop=32, resize_min=24, resize_max=40, device="cpu", threads=1)


# ---------------------------------------------------------------------------- evaluate_mask_folder
def test_evaluate_mask_folder_exact(tmp_path):
    root = make_voc(tmp_path / "VOC2012", splits={"val": 2})  # 24 x 32 images
    ds = open_dataset("voc12", root, "val")
    a, b = ds.ids
    gt1 = np.zeros((24, 32), np.uint8)
    gt1[0:4, 0:4] = 1
    gt1[23, :] = 255  # void row: never scored, whatever is predicted there
    gt2 = np.zeros((24, 32), np.uint8)
    gt2[5:9, 5:9] = 2
    write_mask(ds.mask_path(a), gt1)
    write_mask(ds.mask_path(b), gt2)
    pred = tmp_path / "pred"
    p1 = np.zeros((24, 32), np.uint8)
    p1[0:4, 0:2] = 1          # half of class 1 found
    p1[10:12, 10:14] = 2      # 8 false-positive class-2 pixels
    p1[23, :] = 255
    write_mask(pred / f"{a}.png", p1, palette=False)
    p2 = np.zeros((12, 16), np.uint8)  # half size: resized to the GT with nearest neighbour
    p2[2:4, 2:4] = 2          # -> [4:8, 4:8], 9 of its 16 pixels on the class-2 square [5:9, 5:9]
    p2[10, 10] = 255          # "unsure" -> background (4 pixels after resizing), on GT background
    write_mask(pred / f"{b}.png", p2)

    s = evaluate_mask_folder(ds, pred)
    bg_tp = (720 - 8) + (752 - 7)
    iou_bg = bg_tp / (1472 + 1472 - bg_tp)
    assert s["per_class_iou"]["background"] == pytest.approx(iou_bg)
    assert s["per_class_iou"]["aeroplane"] == pytest.approx(8 / 16)
    assert s["per_class_iou"]["bicycle"] == pytest.approx(9 / (16 + 24 - 9))
    assert s["miou"] == pytest.approx((iou_bg + 0.5 + 9 / 31) / 21)
    assert len(s["per_class_iou"]) == 21 and list(s["per_class_iou"])[0] == "background"
    assert s["per_class_fn"]["aeroplane"] == pytest.approx(0.5)
    assert s["per_class_fp"]["bicycle"] == pytest.approx(15 / 31)
    assert s["confusion"].sum() == 736 + 768
    assert s["pred_ignored_pixels"] == 32 + 4
    assert s["images"] == 2

    with pytest.raises(DataError, match="holds ignore"):
        evaluate_mask_folder(ds, pred, pred_ignore_as=None)
    (pred / f"{b}.png").unlink()
    with pytest.raises(DataError, match="prediction missing"):
        evaluate_mask_folder(ds, pred)


def test_evaluate_mask_folder_rejects_unknown_class(tmp_path):
    root = make_voc(tmp_path / "VOC2012", splits={"val": 1})
    ds = open_dataset("voc12", root, "val")
    write_mask(tmp_path / "p" / f"{ds.ids[0]}.png", np.full((24, 32), 30, np.uint8))
    with pytest.raises(DataError, match="exceeds"):
        evaluate_mask_folder(ds, tmp_path / "p")


# ---------------------------------------------------------------------------- train -> infer -> evaluate
def _pseudo_masks(ds, folder):
    """Ground truth with the void border turned into background, as stand-in pseudo masks."""
    for i in ds.ids:
        m = ds.read_mask(i)
        write_mask(folder / f"{i}.png", np.where(m == 255, 0, m))
    return folder


def test_train_infer_evaluate_roundtrip(tmp_path):
    root = make_voc(tmp_path / "VOC2012", splits={"train": 4, "val": 3})
    train = open_dataset("voc12", root, "train")
    masks = _pseudo_masks(train, tmp_path / "pseudo")
    # init: classifier — a classifier artifact with the same backbone
    torch.manual_seed(0)
    clf = create_classifier("resnet18_w8", 20, 8)
    save_weights(tmp_path / "clf.pt", {"arch": {"backbone": "resnet18_w8", "n_classes": 20, "output_stride": 8},
                                       "model": clf.state_dict()})
    cfg = train_segmentation.Config(dataset="voc12", root=root, masks_dir=str(masks), out=tmp_path / "seg" / "model.pt",
                                    metrics=tmp_path / "seg" / "metrics.json", state_dir=tmp_path / "state",
                                    classifier=str(tmp_path / "clf.pt"), agreement_images=2, **TINY)
    m = train_segmentation.run(cfg)
    assert m["stage"] == "train_segmentation" and len(m["epochs"]) == 1
    row = m["epochs"][0]
    assert np.isfinite(row["loss"]) and 0 <= row["agreement_miou"] <= 1
    assert "last epoch" in m["model_selection"]
    state = torch.load(cfg.out, weights_only=True)
    assert state["arch"]["n_classes"] == 21
    # the backbone starts from the classifier's (one training step moved it only slightly)
    w = "net.conv1.weight"
    init = build_segmenter(state["arch"])
    train_segmentation.init_from_classifier(init, tmp_path / "clf.pt", "resnet18_w8")
    assert all(torch.equal(v, clf.backbone.state_dict()[k]) for k, v in init.backbone.state_dict().items())
    delta = (state["model"]["backbone." + w] - clf.backbone.state_dict()[w]).abs().max()
    assert 0 < delta < 0.1
    # rerun: the finished state is restored, no epoch trains again
    m2 = train_segmentation.run(cfg)
    assert m2["resumed_from_epoch"] == 1

    info = infer_segmentation.run(infer_segmentation.Config(
        dataset="voc12", root=root, split="val", model=cfg.out, out_dir=tmp_path / "val" / "masks",
        scales=[1.0, 0.5], device="cpu"))
    assert info["images"] == 3 and info["submission"] is None
    val = open_dataset("voc12", root, "val")
    for i in val.ids:
        with Image.open(tmp_path / "val" / "masks" / f"{i}.png") as im:
            assert im.mode == "L" and im.size == (32, 24)
    assert not (tmp_path / "val" / "masks" / "submission").exists()

    out = tmp_path / "val" / "metrics.json"
    met = evaluate_segmentation.run(evaluate_segmentation.Config(
        dataset="voc12", root=root, split="val", masks_dir=tmp_path / "val" / "masks", out=out, variant="deeplabv3plus"))
    disk = json.loads(out.read_text())
    assert disk["stage"] == "segmentation" and disk["variant"] == "deeplabv3plus" and disk["split"] == "val"
    assert 0.0 <= disk["miou"] <= 1.0 and disk["miou"] == pytest.approx(met["miou"])
    assert list(disk["per_class_iou"])[:2] == ["background", "aeroplane"] and len(disk["per_class_iou"]) == 21
    assert disk["masks"] == str(tmp_path / "val" / "masks")
    assert disk["class_groups"][0]["group"] == "overall"
    assert "| background |" in out.with_suffix(".md").read_text()


def test_train_refuses_mismatched_classifier_and_missing_masks(tmp_path):
    root = make_voc(tmp_path / "VOC2012", splits={"train": 2})
    clf = create_classifier("resnet18_w16", 20, 8)
    save_weights(tmp_path / "clf.pt", {"arch": {"backbone": "resnet18_w16"}, "model": clf.state_dict()})
    base = dict(dataset="voc12", root=root, out=tmp_path / "m.pt", metrics=tmp_path / "m.json",
                state_dir=tmp_path / "s", **TINY)
    with pytest.raises(DataError, match="backbone"):
        train_segmentation.run(train_segmentation.Config(masks_dir="gt", classifier=str(tmp_path / "clf.pt"), **base))
    with pytest.raises(DataError, match="not found"):
        train_segmentation.run(train_segmentation.Config(masks_dir=str(tmp_path / "nope"), **base))


def test_adamw_and_custom_aspp_rates_roundtrip(tmp_path):
    """optimizer: adamw trains, custom ASPP rates are stored in the artifact and rebuilt; a wrong
    optimizer name is refused before training."""
    root = make_voc(tmp_path / "VOC2012", splits={"train": 2})
    base = dict(dataset="voc12", root=root, masks_dir="gt", out=tmp_path / "m.pt", metrics=tmp_path / "m.json",
                state_dir=tmp_path / "s", agreement_images=0, norm="bn", **TINY)
    m = train_segmentation.run(train_segmentation.Config(optimizer="adamw", aspp_rates=[2, 4, 6], **base))
    assert np.isfinite(m["final"]["loss"])
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert tuple(state["arch"]["widths"]["aspp_rates"]) == (2, 4, 6)
    model = segmenter_from_artifact(state)
    convs = [mod.dilation[0] for mod in model.aspp.modules()
             if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert convs == [2, 4, 6]
    with pytest.raises(DataError, match="optimizer"):
        train_segmentation.run(train_segmentation.Config(optimizer="lamb", **{**base, "state_dir": tmp_path / "s2"}))


def test_supervised_deeplabv2_and_test_split_submission(tmp_path):
    root = make_voc(tmp_path / "VOC2012", splits={"train": 2, "test": 2})
    test = open_dataset("voc12", root, "test")
    for i in test.ids:  # like VOC's test set: no annotation, no ground truth
        (root / "Annotations" / f"{i}.xml").unlink()
        test.mask_path(i).unlink()
    cfg = train_segmentation.Config(dataset="voc12", root=root, masks_dir="gt", out=tmp_path / "m.pt",
                                    metrics=tmp_path / "m.json", state_dir=tmp_path / "s", arch="deeplabv2",
                                    variant="supervised_deeplabv2", agreement_images=0, **TINY)
    m = train_segmentation.run(cfg)
    assert m["masks"] == "gt" and "agreement_miou" not in m["final"]
    out = tmp_path / "test" / "masks"
    info = infer_segmentation.run(infer_segmentation.Config(
        dataset="voc12", root=root, split="test", model=cfg.out, out_dir=out, scales=[1.0], crf=True, crf_t=2,
        device="cpu"))
    assert info["submission"] == infer_segmentation.SUBMISSION_SUBDIR
    pal = voc_palette().reshape(-1)
    for i in test.ids:
        with Image.open(out / f"{i}.png") as raw, Image.open(out / infer_segmentation.SUBMISSION_SUBDIR / f"{i}.png") as sub:
            assert raw.mode == "L" and sub.mode == "P"
            assert np.array_equal(np.asarray(raw), np.asarray(sub))  # palette index = class index
            assert list(sub.getpalette()[:30]) == pal[:30].tolist()
        assert read_mask(out / infer_segmentation.SUBMISSION_SUBDIR / f"{i}.png").max() <= 20


# ---------------------------------------------------------------------------- gallery and report pages
def test_gallery_panels(tmp_path):
    root = make_voc(tmp_path / "VOC2012", splits={"train": 5})
    ds = open_dataset("voc12", root, "train")
    prior = _pseudo_masks(ds, tmp_path / "prior")
    for i in ds.ids:
        write_gray(tmp_path / "sal" / f"{i}.png", np.linspace(0, 1, 24 * 32).reshape(24, 32))
    info = gallery.run(gallery.Config(dataset="voc12", root=root, split="train", out_dir=tmp_path / "g",
                                      masks=[f"prior={prior}", f"prediction={prior}"], maps=[f"saliency={tmp_path / 'sal'}"],
                                      columns=["prior", "saliency", "prediction"], images=3, cell=32))
    assert info["panels"] == ["prior.png", "saliency.png", "prediction.png", "all.png"]
    assert len(info["images"]) == 3 and info["images"][0] == ds.ids[0] and info["images"][-1] == ds.ids[-1]
    with Image.open(tmp_path / "g" / "prior.png") as p, Image.open(tmp_path / "g" / "all.png") as a:
        assert a.size[0] > p.size[0]  # more columns (heights differ by the wrapped legend)
    with pytest.raises(DataError, match="no prior output"):
        shutil.rmtree(prior)
        gallery.run(gallery.Config(dataset="voc12", root=root, split="train", out_dir=tmp_path / "g2",
                                   masks=[f"prior={prior}"], images=2))


def test_report_tables_pages(tmp_path):
    md = tmp_path / "a" / "metrics.md"
    md.parent.mkdir()
    md.write_text("# Title `x`\n\nmIoU **0.5**\n\n| class | iou |\n|---|---|\n| background | 0.900 |\n")
    (tmp_path / "a" / "metrics.json").write_text(json.dumps(
        {"stage": "priors", "variant": "cam", "split": "train", "miou": 0.5,
         "class_groups": [{"group": "overall", "classes": "all", "miou": 0.5},
                          {"group": "correlation ρ(IoU, size)", "classes": "-", "miou": 0.25}]}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.json").write_text(json.dumps(
        {"stage": "pseudo_masks", "variant": "rw", "split": "val", "miou": 0.25, "per_class_iou": {"background": 0.5}}))
    (tmp_path / "summary.md").write_text("# pnoc results\n\n| stage | mIoU (%) |\n|---|---|\n| priors | 50.00 |\n")
    report_tables.run(report_tables.Config(out_dir=tmp_path / "out", summary=tmp_path / "summary.md", metrics=[
        f"priors={tmp_path / 'a' / 'metrics.json'}", f"pseudo_masks={tmp_path / 'b' / 'metrics.json'}"]))
    priors = (tmp_path / "out" / "priors.html").read_text()
    assert "<h1>Title <code>x</code></h1>" in priors and "<td>background</td><td>0.900</td>" in priors
    assert "<td>background</td><td>0.500</td>" in (tmp_path / "out" / "pseudo_masks.html").read_text()
    groups = (tmp_path / "out" / "class_groups.html").read_text()
    assert "<th>priors cam train</th>" in groups and "<td>50.00</td>" in groups and "<td>0.250</td>" in groups
    assert "<td>50.00</td>" in (tmp_path / "out" / "summary.html").read_text()


# ---------------------------------------------------------------------------- workflow
def _report_results(html: str) -> dict[str, bytes]:
    """file name -> decoded content of every result embedded in a Snakemake HTML report."""
    out = {}
    for m in re.finditer(r"data:([\w/+.-]+);charset=[\w-]+;filename=([^;]+);base64,([A-Za-z0-9+/=]+)", html):
        out[m.group(2)] = base64.b64decode(m.group(3))
    return out


@pytest.mark.slow
def test_smoke_segmentation_and_report(smoke_run):
    tmp, cfg, _ = smoke_run
    res = tmp / "results"
    summary = json.loads((res / "summary.json").read_text())
    seg = {(r["variant"], r["split"]): r for r in summary["rows"] if r["stage"] == "segmentation"}
    assert set(seg) == {("deeplabv3plus", "val"), ("deeplabv3plus", "train"), ("supervised", "val")}
    for r in seg.values():
        assert 0 <= r["miou"] <= 1 and any(Path(r["masks"]).glob("*.png"))
    trained = json.loads((res / "segmentation" / "deeplabv3plus" / "seed0" / "metrics.json").read_text())
    assert trained["masks"] != "gt" and "masks" in trained["masks"]

    report = tmp / "report.html"
    snakemake(["--configfile", str(cfg), "--report", str(report)], timeout=600, cwd=smoke_workdir(tmp))
    files = _report_results(report.read_text())
    for page in ("priors", "saliency", "pseudo_masks", "segmentation", "class_groups", "summary"):
        assert f"{page}.html" in files, sorted(files)
        assert b"<table>" in files[f"{page}.html"], page
    assert b"<h1>Segmentation <code>deeplabv3plus</code> on synthetic/val</h1>" in files["segmentation.html"]
    assert b"Class groups" in files["class_groups.html"]
    assert "summary.md" in files and "all.png" in files and "prediction.png" in files
    assert files["all.png"].startswith(b"\x89PNG")
