"""First contact: the label files, lists, mask folders and mask encodings that the peers' repositories ship
read as they are (tests/peer_formats.py builds each at tiny size), the loader stays safe, and mismatches are
caught by the dataset check before anything trains."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from peer_formats import COCO_LAYOUTS, gray_png, make_coco, make_irn_voc, palette_png, save_protocol2
from PIL import Image

from pnoc.data.check_dataset import check_split
from pnoc.data.datasets import COCO_CATEGORY_IDS, COCO_CLASSES, VOC_CLASSES, WSSSDataset
from pnoc.io import DataError, decode_mask, load_label_dict, voc_palette


@pytest.fixture(scope="module")
def irn_voc(tmp_path_factory):
    return make_irn_voc(tmp_path_factory.mktemp("irn") / "VOC2012",
                        two_column_lists=tmp_path_factory.mktemp("seam") / "lists")


# ------------------------------------------------------------------------------ label files


def test_irn_label_file_reads_as_is(irn_voc):
    """IRN's cls_labels.npy (numpy.int32 keys 2007000032, pickle protocol 2 with _codecs.encode for the array bytes,
    numpy 1.x's numpy.core names) gives every image its labels, without numpy's deprecation warning."""
    root = irn_voc["root"]
    data = (root / "cls_labels.npy").read_bytes()
    assert b"\x80\x02" in data[:200] and b"_codecs\nencode\n" in data and b"numpy.core.multiarray\n" in data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = load_label_dict(root / "cls_labels.npy")
    assert {type(k) for k in raw} == {np.int32} and np.int32(2008000000) in raw
    ds = WSSSDataset("voc12", root, "train_aug")
    assert ds.label_source == "cls_labels.npy"
    for image_id in ds.ids:
        np.testing.assert_array_equal(ds.labels(image_id), irn_voc["labels"][image_id])
    assert "IRN's format" in ds.describe()["labels"] and "numpy.int32" in ds.describe()["labels"]


def test_protocol2_loader_stays_safe(tmp_path):
    """_codecs.encode is allowed as the latin-1 bytes of an array only; other globals and codecs are refused."""
    class Evil:
        def __reduce__(self):
            import codecs

            return codecs.encode, ("payload", "rot13")

    path = tmp_path / "codec.npy"
    save_protocol2(path, {"a": Evil()})
    with pytest.raises(DataError, match=r"codec.npy: refused to load .*rot13"):
        load_label_dict(path)

    class System:
        def __reduce__(self):
            import os

            return os.system, ("touch " + str(tmp_path / "PWNED"),)

    path = tmp_path / "system.npy"
    save_protocol2(path, {"a": System()})
    with pytest.raises(DataError, match="refused global (posix|os).system"):
        load_label_dict(path)
    assert not (tmp_path / "PWNED").exists()
    # a pickle of protocol 2 stores an empty bytes object as builtins.bytes(): harmless, allowed
    path = tmp_path / "empty.npy"
    save_protocol2(path, {"a": np.zeros(0, np.float32), "b": b""})
    assert load_label_dict(path)["b"] == b""


@pytest.mark.parametrize("spelling", ["str", "digits", "int", "numpy"])
def test_voc_label_keys_every_spelling(tmp_path, spelling):
    data = make_irn_voc(tmp_path / "VOC2012", n_train_aug=4, n_train=2, n_val=2)
    key = {"str": lambda i: i, "digits": lambda i: i.replace("_", ""), "int": lambda i: int(i.replace("_", "")),
           "numpy": lambda i: np.int64(int(i.replace("_", "")))}[spelling]
    np.save(tmp_path / "VOC2012" / "cls_labels.npy", {key(i): v for i, v in data["labels"].items()}, allow_pickle=True)
    ds = WSSSDataset("voc12", tmp_path / "VOC2012", "val")
    assert [ds.labels(i).tolist() for i in ds.ids] == [data["labels"][i].tolist() for i in ds.ids]


@pytest.mark.parametrize("spelling", ["int", "numpy", "num12", "full", "full.jpg"])
def test_coco_label_keys_every_spelling(tmp_path, spelling):
    data = make_coco(tmp_path / "coco", "pnoc", n_train=3, n_val=2)
    num = {i: int(i.rsplit("_", 1)[1]) for i in data["labels"]}
    key = {"int": lambda i: num[i], "numpy": lambda i: np.int32(num[i]), "num12": lambda i: f"{num[i]:012d}",
           "full": lambda i: i, "full.jpg": lambda i: f"{i}.jpg"}[spelling]
    np.save(tmp_path / "coco" / "cls_labels_coco.npy", {key(i): v for i, v in data["labels"].items()}, allow_pickle=True)
    ds = WSSSDataset("coco14", tmp_path / "coco", "val2014")
    assert [ds.labels(i).tolist() for i in ds.ids] == [data["labels"][i].tolist() for i in ds.ids]


def test_two_spellings_of_one_image_that_disagree_are_refused(tmp_path):
    data = make_coco(tmp_path / "coco", "pnoc", n_train=2, n_val=1)
    i = next(iter(data["labels"]))
    num = int(i.rsplit("_", 1)[1])
    np.save(tmp_path / "coco" / "cls_labels_coco.npy", {num: data["labels"][i], i: 1 - data["labels"][i]},
            allow_pickle=True)
    with pytest.raises(DataError, match=rf"cls_labels_coco.npy: two entries for image {num}"):
        WSSSDataset("coco14", tmp_path / "coco", "train2014").labels(i)


def test_label_file_from_another_folder(irn_voc, tmp_path):
    """dataset.label_file names a file outside the root (IRN's voc12/ where it was cloned)."""
    other = tmp_path / "irn" / "voc12" / "cls_labels.npy"
    other.parent.mkdir(parents=True)
    other.write_bytes((irn_voc["root"] / "cls_labels.npy").read_bytes())
    ds = WSSSDataset("voc12", irn_voc["root"], "val", label_file=other)
    assert ds.label_source == str(other) and ds.labels(ds.ids[0]).tolist() == irn_voc["labels"][ds.ids[0]].tolist()
    with pytest.raises(DataError, match=r"missing.npy: label file not found \(dataset.label_file\)"):
        WSSSDataset("voc12", irn_voc["root"], "val", label_file="missing.npy").labels(ds.ids[0])


def test_rib_voc_labels_in_a_coco_folder_named(tmp_path):
    """RIB's coco14/cls_labels.npy is VOC's (20 entries): beside cls_labels_coco.npy it is not read; alone, the
    check names the trap."""
    data = make_coco(tmp_path / "coco", "rib", n_train=3, n_val=2)
    assert WSSSDataset("coco14", data["root"], "train2014").label_source == "cls_labels_coco.npy"
    (data["root"] / "cls_labels_coco.npy").unlink()
    _, errors = check_split("coco14", data["root"], "train2014", "images")
    assert len(errors) == 1 and "cls_labels.npy: label vectors have 20 entries" in errors[0]
    assert "PASCAL VOC's label file (RIB ships it as coco14/cls_labels.npy)" in errors[0]


# ------------------------------------------------------------------------------ lists


def test_two_column_lists_read_as_ids(irn_voc):
    lists = irn_voc["lists"]
    ds = WSSSDataset("voc12", irn_voc["root"], "train_aug", list_dir=lists)
    assert ds.ids == irn_voc["ids"]["train_aug"]
    assert "two columns" in ds.describe()["list"]
    manifest, errors = check_split("voc12", irn_voc["root"], "train_aug", "images", list_dir=lists)
    assert errors == [] and manifest["n_images"] == len(irn_voc["ids"]["train_aug"])


def test_coco_list_entry_that_is_no_id_is_named(tmp_path):
    data = make_coco(tmp_path / "coco", "rib", n_train=2, n_val=1)
    (data["root"] / "val2014.txt").write_text("000000500000\nnot-an-id\n")
    with pytest.raises(DataError, match=r"val2014.txt: line 2 'not-an-id' is not a COCO image id"):
        WSSSDataset("coco14", data["root"], "val2014")


# ------------------------------------------------------------------------------ masks


def test_voc_masks_from_sbd_folder_per_split(irn_voc):
    """No merge: train_aug reads SBD's SegmentationClassAug/, train and val VOC's SegmentationClass/; the masks and
    the manifest say which, and every split's masks are the ground truth."""
    root = irn_voc["root"]
    expect = {"train_aug": "SegmentationClassAug", "train": "SegmentationClass", "val": "SegmentationClass"}
    for split, folder in expect.items():
        ds = WSSSDataset("voc12", root, split)
        assert ds.mask_path(ds.ids[0]).parent.name == folder
        for i in ds.ids:
            assert np.array_equal(ds.read_mask(i), irn_voc["masks"][i]), i
        manifest, errors = check_split("voc12", root, split, "masks", need_masks=True)
        assert errors == [] and manifest["layout"]["masks"].startswith(f"{folder}/")
        assert manifest["masks"] == len(ds.ids)
        assert manifest["mask_encodings"] == {"gray" if folder.endswith("Aug") else "palette": len(ds.ids)}
        assert manifest["label_mask_agreement"]["disagree"] == 0


def test_missing_mask_of_an_evaluated_split_names_where_it_is(irn_voc, tmp_path):
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(irn_voc["root"], root)
    val = irn_voc["ids"]["val"]
    # each folder misses two val masks (a tie: the first folder, SegmentationClass/, is the split's)
    (root / "SegmentationClassAug" / f"{val[3]}.png").unlink()
    (root / "SegmentationClass" / f"{val[5]}.png").unlink()  # still in SBD's folder
    (root / "SegmentationClassAug" / f"{val[6]}.png").unlink()
    (root / "SegmentationClass" / f"{val[6]}.png").unlink()  # nowhere
    _, errors = check_split("voc12", root, "val", "masks", need_masks=True)
    assert len(errors) == 2
    assert f"SegmentationClass/{val[5]}.png: ground-truth mask of {val[5]} not found; it lies in" in errors[0]
    assert "SegmentationClassAug/ instead" in errors[0] and "keep every mask of a split in one folder" in errors[0]
    assert "looked in SegmentationClassAug/ too" in errors[1]


@pytest.mark.parametrize("layout", sorted(COCO_LAYOUTS))
def test_coco_layout_reads_as_is(tmp_path, layout):
    """Each COCO layout: images, masks (values mapped to 0..80 / 255), labels and lists, through the check."""
    data = make_coco(tmp_path / layout, layout, n_train=6, n_val=4)
    for split, ids in data["splits"].items():
        ds = WSSSDataset("coco14", data["root"], split)
        assert ds.ids == ids
        for i in ids:
            assert np.array_equal(ds.read_mask(i), data["masks"][i]), (layout, i)
            assert ds.labels(i).tolist() == data["labels"][i].tolist()
        for kind in ("images", "masks"):
            manifest, errors = check_split("coco14", data["root"], split, kind, need_masks=True)
            assert errors == [], errors
        assert manifest["layout"]["masks"].startswith(COCO_LAYOUTS[layout].masks.split("/")[0])
        assert manifest["label_mask_agreement"]["disagree"] == 0 and manifest["masks"] == len(ids)


def test_coco_values_that_fit_neither_convention(tmp_path):
    data = make_coco(tmp_path / "coco", "pnoc", n_train=2, n_val=1)
    i = data["splits"]["val2014"][0]
    ds = WSSSDataset("coco14", data["root"], "val2014")
    m = data["masks"][i].copy()
    m[5, 5] = 88  # a category id (toothbrush 90 -> 80 is the last; 88 = teddy bear's id) in a 0..80 folder
    gray_png(ds.mask_path(i), m)
    with pytest.raises(DataError, match=r"values \[88\] exceed COCO's class indices.*coco_mask_values: category_ids"):
        ds.read_mask(i)
    ds = WSSSDataset("coco14", data["root"], "val2014", coco_mask_values="category_ids")
    assert ds.read_mask(i)[5, 5] == COCO_CATEGORY_IDS.index(88) + 1
    data = make_coco(tmp_path / "c2v", "coco2voc", n_train=2, n_val=1)
    i = data["splits"]["val2014"][0]
    ds = WSSSDataset("coco14", data["root"], "val2014")
    m = np.asarray(Image.open(ds.mask_path(i))).copy()
    m[5, 5] = 12  # not a category id
    gray_png(ds.mask_path(i), m)
    with pytest.raises(DataError, match=r"values \[12\] are not COCO category ids.*coco_mask_values: contiguous"):
        ds.read_mask(i)


def test_mask_encodings_give_the_same_indices(tmp_path):
    """Palette, gray, 16-bit gray, gray+alpha, RGB/RGBA with equal channels and VOC colours: the same indices;
    gray levels that are VOC palette colours themselves are read as colours."""
    idx = np.array([[0, 1, 2], [15, 20, 255]], np.uint8)
    palette_png(tmp_path / "p.png", idx)
    gray_png(tmp_path / "l.png", idx)
    gray_png(tmp_path / "rgb.png", idx, "RGB")
    gray_png(tmp_path / "rgba.png", idx, "RGBA")
    Image.fromarray(idx.astype(np.uint16)).save(tmp_path / "i16.png")
    Image.fromarray(np.stack([idx, np.full_like(idx, 255)], -1), mode="LA").save(tmp_path / "la.png")
    pal = voc_palette()
    Image.fromarray(pal[idx]).save(tmp_path / "colour.png")
    Image.fromarray(np.dstack([pal[idx], np.full(idx.shape, 255, np.uint8)]), mode="RGBA").save(tmp_path / "colour4.png")
    want = {"p": "palette", "l": "gray", "rgb": "rgb-gray", "rgba": "rgba-gray", "i16": "gray16", "la": "gray+alpha",
            "colour": "rgb-palette", "colour4": "rgba-palette"}
    for name, encoding in want.items():
        m, enc = decode_mask(tmp_path / f"{name}.png")
        assert enc == encoding and m.tolist() == idx.tolist(), name
    cat = np.array([[0, 7], [7, 0]], np.uint8)  # VOC's cat is (128, 128, 128): a gray colour
    Image.fromarray(pal[cat]).save(tmp_path / "cat.png")
    m, enc = decode_mask(tmp_path / "cat.png")
    assert enc == "rgb-palette" and m.tolist() == cat.tolist()
    Image.fromarray(np.full((2, 2), 300, np.uint16)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match="16-bit mask with value 300"):
        decode_mask(tmp_path / "big.png")


# ------------------------------------------------------------------------------ labels against masks


def test_labels_that_disagree_with_masks_counted_then_refused(irn_voc, tmp_path):
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(irn_voc["root"], root)
    labels = dict(irn_voc["labels"])
    val = irn_voc["ids"]["val"]
    first = val[0]
    wrong = labels[first].copy()
    wrong[np.flatnonzero(wrong)[0]] = 0
    wrong[19] = 1  # tvmonitor: labelled, not in the mask; the first class of the mask: not labelled
    labels[first] = wrong
    save_protocol2(root / "cls_labels.npy", {np.int32(int(i.replace("_", ""))): v for i, v in labels.items()})
    manifest, errors = check_split("voc12", root, "val", "masks", need_masks=True, max_label_mismatch=0.2)
    agreement = manifest["label_mask_agreement"]
    assert errors == [] and agreement["disagree"] == 1 and agreement["images_compared"] == len(val)
    assert agreement["examples"][0].startswith(f"{first}: in the mask only [") and "['tvmonitor']" in agreement["examples"][0]
    # a label file of another class order: every image disagrees
    shifted = {np.int32(int(i.replace("_", ""))): np.roll(v, 1) for i, v in irn_voc["labels"].items()}
    save_protocol2(root / "cls_labels.npy", shifted)
    _, errors = check_split("voc12", root, "val", "masks", need_masks=True, max_label_mismatch=0.05)
    assert len(errors) == 1 and f"the labels of {len(val)} of {len(val)} images (100.0 %) disagree" in errors[0]
    assert "dataset.max_label_mismatch = 5 %" in errors[0] and "cls_labels.npy" in errors[0]


def test_class_counts_of_the_other_dataset_named(tmp_path):
    data = make_irn_voc(tmp_path / "VOC2012", n_train_aug=3, n_train=1, n_val=1)
    np.save(data["root"] / "cls_labels.npy", {i: np.zeros(len(COCO_CLASSES)) for i in data["labels"]}, allow_pickle=True)
    _, errors = check_split("voc12", data["root"], "val", "images")
    assert "label vectors have 80 entries" in errors[0] and "this is COCO's label file" in errors[0]
    np.save(data["root"] / "cls_labels.npy", {i: np.ones(len(VOC_CLASSES) + 1) for i in data["labels"]}, allow_pickle=True)
    _, errors = check_split("voc12", data["root"], "val", "images")
    assert "21 entries" in errors[0] and "a background entry?" in errors[0]


def test_all_zero_label_rows_named_then_dropped_on_request(tmp_path):
    """PNOC's and RIB's cls_labels_coco.npy have all-zero rows (COCO images without objects): the check names them
    and the fix; with dataset.drop_unlabelled every stage reads the split without them, and the check says so."""
    data = make_coco(tmp_path / "coco", "pnoc", n_train=6, n_val=2)
    labels = np.load(data["root"] / "cls_labels_coco.npy", allow_pickle=True).item()
    empty = data["splits"]["train2014"][1:3]
    for i in empty:
        labels[np.int64(int(i.rsplit("_", 1)[1]))] = np.zeros(len(COCO_CLASSES), np.float32)
    np.save(data["root"] / "cls_labels_coco.npy", labels, allow_pickle=True)
    _, errors = check_split("coco14", data["root"], "train2014", "images")
    assert len(errors) == 2 and f"image {empty[0]} has no labels" in errors[0]
    assert "set dataset.drop_unlabelled: true" in errors[0]
    manifest, errors = check_split("coco14", data["root"], "train2014", "images", drop_unlabelled=True)
    assert errors == [] and manifest["n_images"] == 4
    assert manifest["layout"]["dropped"].startswith("2 listed image(s) whose labels are all zeros left out")
    ds = WSSSDataset("coco14", data["root"], "train2014", drop_unlabelled=True)
    assert ds.dropped == empty and not set(empty) & set(ds.ids)


# ------------------------------------------------------------------------------ the chain on the peers' folders

CHAINS = {
    # config, dataset keys, builder: VOC as IRN's users hold it, COCO in RIB's and in PNOC's layout
    "voc_irn_sbd": ("voc12", {"train_split": "train_aug", "eval_split": "train", "val_split": "val"},
                    lambda root: make_irn_voc(root / "VOC2012", n_train_aug=32, n_train=12, n_val=12)),
    "coco_rib": ("coco14", {"train_split": "train2014", "eval_split": "val2014", "val_split": "val2014"},
                 lambda root: make_coco(root / "coco14", "rib", n_train=32, n_val=12)),
    "coco_pnoc": ("coco14", {"train_split": "train2014", "eval_split": "val2014", "val_split": "val2014"},
                  lambda root: make_coco(root / "coco14", "pnoc", n_train=32, n_val=12)),
}


@pytest.fixture(scope="module", params=sorted(CHAINS))
def peer_chain(request, tmp_path_factory):
    """`snakemake --configfile config/<voc12|coco14>.yaml config/cpu.yaml <smoke sizes>` on a folder in a peer's
    layout, to the end."""
    import yaml
    from conftest import ROOT, snakemake

    name = request.param
    config, splits, build = CHAINS[name]
    tmp = tmp_path_factory.mktemp(name)
    data = build(tmp)
    smoke = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    smoke["results"] = str(tmp / "results")
    smoke["dataset"] = {"name": config, "root": str(data["root"]), **splits}
    overlay = tmp / "sizes.yaml"
    overlay.write_text(yaml.safe_dump(smoke))
    wd = tmp / "wd"
    wd.mkdir()
    p = snakemake(["--cores", "2", "--snakefile", str(ROOT / "Snakefile"), "--configfile",
                   str(ROOT / "config" / f"{config}.yaml"), str(ROOT / "config" / "cpu.yaml"), str(overlay)],
                  cwd=wd, timeout=1500)
    return name, data, tmp / "results", p


@pytest.mark.slow
def test_chain_runs_to_the_end_on_the_peers_folders(peer_chain):
    """Every stage runs on the folder as the peer ships it, and the check records how it read it. The evaluations
    of the end of the chain read exactly the ground truth the folder holds: the confusion matrix of the segmentation
    on the val split has, per class, the pixel count of the masks written there (SBD's folder for VOC's train_aug,
    PNOC's void 81 read as ignore, every image found)."""
    import json

    from conftest import job_stats

    name, data, res, p = peer_chain
    stats = job_stats(p.stdout)
    assert {"check_dataset", "train_classifier", "train_cam", "train_ccam", "train_affinity", "make_pseudo_masks",
            "train_segmentation", "summary"} <= set(stats), stats
    rows = {(r["stage"], r["variant"], r["split"]): r["miou"] for r in json.loads((res / "summary.json").read_text())["rows"]}
    print(f"[{name} chain] mIoU " + ", ".join(f"{'/'.join(k)} {100 * v:.1f}" for k, v in sorted(rows.items())))
    for stage in ("priors", "pseudo_masks", "segmentation"):
        assert any(k[0] == stage for k in rows), (stage, rows)
    voc = name.startswith("voc")
    train_split = "train_aug" if voc else "train2014"
    manifest = json.loads((res / "dataset" / "manifest" / train_split / "masks.json").read_text())
    expected = {"voc_irn_sbd": "SegmentationClassAug/", "coco_rib": "coco_seg_anno/", "coco_pnoc": "coco_seg_anno/"}
    assert manifest["layout"]["masks"].startswith(expected[name])
    assert manifest["label_mask_agreement"]["disagree"] == 0
    log = (res / "logs" / "check_dataset" / f"{train_split}-masks.log").read_text()
    assert f"masks: {expected[name]}" in log and "labels vs masks: 0 of" in log
    val, val_ids = ("val", data["ids"]["val"]) if voc else ("val2014", data["splits"]["val2014"])
    n = 21 if voc else 81
    gt_pixels = sum(np.bincount(m[m != 255].ravel(), minlength=n) for m in (data["masks"][i] for i in val_ids))
    for variant in ("supervised", "deeplabv3plus"):
        metrics = json.loads((res / "segmentation" / variant / "seed0" / val / "metrics.json").read_text())
        assert metrics["images"] == len(val_ids)
        assert np.asarray(metrics["confusion"]).sum(axis=1).tolist() == gt_pixels.tolist(), variant
