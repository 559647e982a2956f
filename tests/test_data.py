import numpy as np
import pytest
import torch
from fixtures import make_coco, make_voc
from PIL import Image

from pnoc.data import open_dataset
from pnoc.data.loaders import ClassificationSet
from pnoc.data.transforms import AugmentConfig, Augmenter
from pnoc.io import DataError, load_maps, read_mask, save_maps, write_mask


def test_voc_layout_labels_and_masks(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    ds = open_dataset("voc12", root, "train")
    assert len(ds) == 4 and ds.n_classes == 20
    for i in ds.ids:
        img = ds.read_image(i)
        m = ds.read_mask(i, img.shape[:2])
        present = set(np.unique(m).tolist()) - {0, 255}
        assert present == {int(c) + 1 for c in np.flatnonzero(ds.labels(i))}


def test_voc_labels_from_cls_labels_npy(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    ds = open_dataset("voc12", root, "train")
    expected = {i: ds.labels(i) for i in ds.ids}
    np.save(root / "cls_labels.npy", expected, allow_pickle=True)
    for p in (root / "Annotations").glob("*.xml"):
        p.unlink()
    ds2 = open_dataset("voc12", root, "train")
    assert all((ds2.labels(i) == expected[i]).all() for i in ds.ids)


def test_coco_layout(tmp_path):
    root = make_coco(tmp_path / "coco14")
    tr = open_dataset("coco14", root, "train2014")
    va = open_dataset("coco14", root, "val2014")
    assert len(tr) == 3 and len(va) == 3 and tr.n_classes == 80
    i = va.ids[0]
    assert i.startswith("COCO_val2014_")
    m = va.read_mask(i, va.read_image(i).shape[:2])
    assert set(np.unique(m).tolist()) - {0, 255} == {int(c) + 1 for c in np.flatnonzero(va.labels(i))}


def test_corrupt_and_truncated_images_named(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    ds = open_dataset("voc12", root, "train")
    bad = ds.image_path(ds.ids[0])
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=bad.name):
        ds.read_image(ds.ids[0])
    trunc = ds.image_path(ds.ids[1])
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated"):
        ds.read_image(ds.ids[1])


def test_missing_mask_and_wrong_size(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    ds = open_dataset("voc12", root, "train")
    ds.mask_path(ds.ids[0]).unlink()
    with pytest.raises(DataError, match="mask not found"):
        ds.read_mask(ds.ids[0])
    write_mask(ds.mask_path(ds.ids[1]), np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match="differs from its image"):
        ds.read_mask(ds.ids[1], ds.image_size(ds.ids[1]))


def test_list_entry_without_image(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    lst = root / "ImageSets" / "Segmentation" / "train.txt"
    lst.write_text(lst.read_text() + "2099_999999\n")
    ds = open_dataset("voc12", root, "train")
    with pytest.raises(DataError, match="2099_999999"):
        ds.validate()


def test_image_without_labels(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    ds = open_dataset("voc12", root, "train")
    (root / "Annotations" / f"{ds.ids[2]}.xml").write_text("<annotation></annotation>")
    with pytest.raises(DataError, match="no labels"):
        ClassificationSet(ds, Augmenter(AugmentConfig(crop=16)))


def test_label_list_not_matching_images(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    ds = open_dataset("voc12", root, "train")
    np.save(root / "cls_labels.npy", {ds.ids[0]: ds.labels(ds.ids[0])}, allow_pickle=True)
    ds2 = open_dataset("voc12", root, "train")
    with pytest.raises(DataError, match=r"cls_labels.npy: no labels for image .*; add its entry to this file or remove"):
        ds2.validate()


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DataError, match="config.yaml"):
        open_dataset("pascal", tmp_path, "train")


def test_rgb_mask_decoded_and_off_palette_rejected(tmp_path):
    from pnoc.io import voc_palette

    pal = voc_palette()
    idx = np.array([[0, 1], [15, 255]], np.uint8)
    Image.fromarray(pal[idx]).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == idx.tolist()
    rgb = pal[idx].copy()
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match="outside the VOC palette"):
        read_mask(tmp_path / "bad.png")


def test_maps_roundtrip_float16(tmp_path):
    maps = np.random.default_rng(0).random((2, 5, 6)).astype(np.float32)
    save_maps(tmp_path / "a.npz", maps, np.array([3, 7]), lr=maps[:, ::2, ::2])
    z = load_maps(tmp_path / "a.npz")
    assert z["keys"].tolist() == [3, 7]
    assert np.abs(z["maps"] - maps).max() < 1e-3  # float16 storage
    assert z["lr"].shape == (2, 3, 3)
    assert not list(tmp_path.glob(".*tmp*"))


def test_augmenter_joint_geometry():
    torch.manual_seed(0)
    aug = Augmenter(AugmentConfig(crop=20, resize_long=(10, 12), hflip=True))
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    mask = torch.zeros(16, 16, dtype=torch.uint8)
    mask[:, :8] = 1
    img[:, :, :8] = 255
    x, (m,) = aug(img, [mask])
    assert x.shape == (3, 20, 20) and m.shape == (20, 20)
    # padding is ignore (255) in the mask and zero in the normalised image
    assert (m == 255).any()
    assert torch.all(x[:, m == 255] == 0)
    bright = x[0] > 1.0
    assert torch.equal(bright, m == 1)


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    """Artifacts are readable by colleagues (mkstemp alone would leave them owner-only, 0600)."""
    import os

    from pnoc.io import write_json

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o644
