import math

import pytest
import torch

from pnoc.cam.losses import multilabel_soft_margin, smooth_labels
from pnoc.training import (Checkpointer, linear_ramp, make_optimizer, param_groups, poly_factor, poly_scheduler,
                           resolve_device)


def test_label_smoothing_exact():
    y = torch.tensor([[1.0, 0.0]])
    assert smooth_labels(y, 0.1)[0].tolist() == pytest.approx([0.95, 0.05])
    assert smooth_labels(y, 0.0).tolist() == [[1.0, 0.0]]


def test_mlsm_on_smoothed_targets():
    logits = torch.tensor([[0.0, 2.0]])
    y = torch.tensor([[1.0, 0.0]])
    t = [0.95, 0.05]
    sig = [0.5, 1 / (1 + math.exp(-2))]
    expect = -sum(ti * math.log(s) + (1 - ti) * math.log(1 - s) for ti, s in zip(t, sig)) / 2
    assert multilabel_soft_margin(logits, y, 0.1).item() == pytest.approx(expect, rel=1e-6)


def test_poly_schedule_values():
    assert poly_factor(0, 100) == 1.0
    assert poly_factor(50, 100) == pytest.approx(0.5 ** 0.9)
    assert poly_factor(100, 100) == 0.0
    assert poly_factor(150, 100) == 0.0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([{"params": [p], "lr": 0.1}], "sgd")
    sched = poly_scheduler(opt, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 0.9)


def test_linear_ramps_start_middle_end():
    # lambda_re: 0 -> 4 over the first half
    assert linear_ramp(0, 4, 0, 100, 0.5) == 0
    assert linear_ramp(0, 4, 25, 100, 0.5) == 2
    assert linear_ramp(0, 4, 50, 100, 0.5) == 4
    assert linear_ramp(0, 4, 99, 100, 0.5) == 4
    # lambda_cse: 0.3 -> 1 over all training
    assert linear_ramp(0.3, 1.0, 50, 100) == pytest.approx(0.65)


def test_param_groups_multipliers():
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    head = torch.nn.Conv2d(4, 2, 1, bias=True)
    groups = param_groups(trunk.named_parameters(), head.named_parameters(), lr=0.1, weight_decay=1e-4)
    by = {g["name"]: g for g in groups}
    assert by["pw"]["lr"] == pytest.approx(0.1) and by["pw"]["weight_decay"] == 1e-4
    assert by["pb"]["lr"] == pytest.approx(0.2) and by["pb"]["weight_decay"] == 0
    assert by["nw"]["lr"] == pytest.approx(1.0)
    assert by["nb"]["lr"] == pytest.approx(2.0) and by["nb"]["weight_decay"] == 0
    assert len(by["pw"]["params"]) == 2  # conv weight + BN gamma
    assert len(by["pb"]["params"]) == 2  # conv bias + BN beta


def test_checkpointer_roundtrip_and_config_guard(tmp_path):
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    ck = Checkpointer(tmp_path, {"a": 1})
    ck.save(3, model=m, opt=opt)
    m2 = torch.nn.Linear(2, 2)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    nxt, _ = Checkpointer(tmp_path, {"a": 1}).restore(model=m2, opt=opt2)
    assert nxt == 4
    assert torch.equal(m.weight, m2.weight)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(opt.state_dict()["state"][0]["momentum_buffer"])
    with pytest.raises(RuntimeError, match="different configuration"):
        Checkpointer(tmp_path, {"a": 2}).restore(model=m2)


def test_device_auto_is_cpu_here_or_cuda():
    d = resolve_device("auto")
    assert d.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_memory_guard_names_the_images_and_the_fix():
    from pnoc.io import DataError
    from pnoc.training import memory_guard

    with pytest.raises(DataError) as e:
        with memory_guard(torch.device("cpu"), ["2008_000123", "2008_000124"], (1200, 1600),
                          "lower inference.batch_size"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msg = str(e.value)
    assert msg.startswith("2008_000123 and 1 more image(s) of its batch, 1200x1600 px: out of cpu memory")
    assert "Tried to allocate 2.00 GiB" in msg and msg.endswith("lower inference.batch_size")
    with memory_guard(torch.device("cpu"), ["a"], (1, 1), "x"):
        pass  # nothing raised, nothing changed
    with pytest.raises(ValueError):  # other errors pass through untouched
        with memory_guard(torch.device("cpu"), ["a"], (1, 1), "x"):
            raise ValueError("not memory")
