import numpy as np
import pytest

from pnoc.evaluation import (ThresholdSweep, class_groups, class_statistics, confusion, group_table, prior_prediction,
                             scores)


def test_confusion_and_miou_by_hand():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    conf = confusion(pred, gt, 3)
    # rows = gt, cols = pred; the 255 pixel is ignored
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    s = scores(conf)
    # IoU bg = 1/(2+2-1)=1/3, cls1 = 2/(2+3-2)=2/3, cls2 = 0/(1+0-0)=0
    assert s["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert s["miou"] == pytest.approx(1 / 3)
    assert s["miou_fg"] == pytest.approx(1 / 3)
    # FP ratio class1 = 1/3, FN ratio class2 = 1
    assert s["fp_per_class"][1] == pytest.approx(1 / 3)
    assert s["fn_per_class"][2] == pytest.approx(1.0)


def test_absent_class_counts_as_zero():
    gt = np.zeros((2, 2), int)
    s = scores(confusion(gt, gt, 3))
    assert s["iou"].tolist() == [1.0, 0.0, 0.0]
    assert s["miou"] == pytest.approx(1 / 3)


def test_confusion_rejects_out_of_range():
    with pytest.raises(ValueError):
        confusion(np.array([5]), np.array([0]), 3)


def test_prior_prediction_threshold_and_ties():
    maps = np.array([[[0.1, 0.5], [0.3, 0.9]], [[0.2, 0.4], [0.3, 0.1]]], np.float32)
    keys = np.array([2, 5])
    pred = prior_prediction(maps, keys, 0.3)
    # pixel (1,0): max 0.3 == threshold -> background
    assert pred.tolist() == [[0, 2], [0, 2]]
    assert prior_prediction(maps[:0], keys[:0], 0.3).tolist() == [[0, 0], [0, 0]]


def test_sweep_equals_separate_evaluation():
    rng = np.random.default_rng(0)
    ths = [0.05 * i for i in range(1, 17)]
    sweep = ThresholdSweep(6, ths)
    per_t = {t: np.zeros((6, 6), np.int64) for t in ths}
    for _ in range(5):
        k = rng.integers(0, 3)
        keys = np.sort(rng.choice(np.arange(1, 6), size=k, replace=False))
        maps = rng.random((k, 9, 11)).astype(np.float32)
        maps[:, 0, 0] = 0.25  # exactly on a threshold
        gt = rng.integers(0, 6, (9, 11))
        gt[0, 1] = 255
        sweep.update(maps, keys, gt)
        for t in ths:
            per_t[t] += confusion(prior_prediction(maps, keys, t), gt, 6)
    for t, conf in zip(sorted(ths), sweep.confusions()):
        assert (conf == per_t[t]).all(), t


def test_class_statistics_and_groups():
    masks = [np.array([[1, 1], [0, 2]]), np.array([[1, 0], [0, 255]])]
    labels = [np.array([1, 1, 0]), np.array([1, 0, 0])]
    st = class_statistics(masks, labels)
    assert st["occurrence"].tolist() == [2, 1, 0]
    assert st["size"][0] == pytest.approx((0.5 + 1 / 3) / 2)
    assert st["cooccurrence"].tolist() == [0.5, 1.0, 0.0]
    assert st["cardinality"].tolist() == [1.5, 2.0, 0.0]
    groups = class_groups(st, ["a", "b", "c"])
    assert groups["occurrence: high freq."] == ["a"]
    rows = group_table(np.array([0.9, 0.5, 0.4, 0.0]), ["a", "b", "c"], groups, st)
    assert rows[0]["miou"] == pytest.approx(0.45)


def test_percent_mean_std_and_mean_of_present():
    from pnoc.evaluation import mean_of_present, percent_mean_std

    assert percent_mean_std([0.3, 0.5]) == "40.00 ± 14.14"
    assert percent_mean_std([0.25, None]) == "25.00"
    assert percent_mean_std([None]) == ""
    assert mean_of_present([0.2, None, 0.4]) == pytest.approx(0.3)
    assert mean_of_present([None]) is None
