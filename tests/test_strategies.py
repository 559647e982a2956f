import copy

import pytest
import torch

from pnoc.cam.strategies import erased_targets, hard_erase, merge, psi, puzzle_losses, sample_classes, soft_erase, tile
from pnoc.cam.train_cam import CamTrainer, Config
from pnoc.models.classifier import create_classifier
from pnoc.training import make_optimizer, make_scaler, param_groups, poly_scheduler


def test_tile_merge_roundtrip_and_order():
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    t = tile(x)
    assert t.shape == (8, 1, 2, 3)
    assert torch.equal(t[0], x[0, :, :2, :3])  # top-left of image 0
    assert torch.equal(t[3], x[1, :, :2, 3:])  # top-right of image 1
    assert torch.equal(t[7], x[1, :, 2:, 3:])  # bottom-right of image 1
    assert torch.equal(merge(t), x)
    with pytest.raises(ValueError, match="even"):
        tile(torch.zeros(1, 1, 3, 4))


def test_puzzle_losses_by_hand():
    cam = torch.tensor([[[[1.0, -1.0]], [[2.0, 2.0]]]])  # (1, 2, 1, 2)
    cam_re = torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]])
    y = torch.tensor([[1.0, 0.0]])
    l_recls, l_re = puzzle_losses(None, cam, cam_re, y)
    # L_re: |1-0| + |-1-1| for class 0 only, divided by all 4 entries
    assert l_re.item() == pytest.approx(3 / 4)
    expect = torch.nn.functional.multilabel_soft_margin_loss(torch.tensor([[0.5, 0.0]]), y)
    assert l_recls.item() == pytest.approx(expect.item())


def test_psi_image_vs_batch_norm():
    cam_r = torch.tensor([[[1.0, -2.0], [0.5, 0.0]], [[4.0, 2.0], [0.0, 0.0]]])
    m_img = psi(cam_r, (2, 2), "image")
    m_bat = psi(cam_r, (2, 2), "batch")
    assert torch.allclose(m_img[0, 0], torch.tensor([[1.0, 0.0], [0.5, 0.0]]), atol=1e-4)
    assert torch.allclose(m_img[1, 0], torch.tensor([[1.0, 0.5], [0.0, 0.0]]), atol=1e-4)
    assert torch.allclose(m_bat[0, 0], torch.tensor([[0.25, 0.0], [0.125, 0.0]]), atol=1e-4)


def test_soft_and_hard_masks():
    x = torch.ones(1, 1, 1, 4)
    mask = torch.tensor([[[[0.0, 0.2, 0.5, 1.0]]]])
    assert soft_erase(x, mask).flatten().tolist() == pytest.approx([1.0, 0.8, 0.5, 0.0])
    # paper: keep 1 - psi > 0.2  <=> psi < 0.8
    assert hard_erase(x, mask, 0.2, "paper").flatten().tolist() == [1, 1, 1, 0]
    # reference: keep psi <= 0.2
    assert hard_erase(x, mask, 0.2, "reference").flatten().tolist() == [1, 1, 0, 0]


def test_sample_classes_and_erased_targets():
    y = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        r = sample_classes(y, g)
        assert y[torch.arange(2), r].eq(1).all()
    r = torch.tensor([1, 2])
    assert erased_targets(y, r).tolist() == [[0, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError):
        sample_classes(torch.zeros(1, 3))


def _trainer(strategy, leak=False):
    torch.manual_seed(0)
    ordinary = create_classifier("resnet18_w8", 3, 8)
    cfg = Config(dataset="synthetic", root=".", classifier=".", out=".", metrics=".", state_dir=".",
                 strategy=strategy, noc_cse_leak=leak, amp=False, lr=0.1, momentum=0.0)
    f = copy.deepcopy(ordinary)
    oc = noc = noc_opt = noc_sched = None
    if strategy in ("occse", "poc"):
        oc = copy.deepcopy(ordinary).eval()
        oc.requires_grad_(False)
    if strategy == "pnoc":
        noc = copy.deepcopy(ordinary).fix_bn()
        noc_opt = make_optimizer(param_groups(noc.backbone_parameters(), noc.new_parameters(), 0.1, 0), "sgd")
        noc_sched = poly_scheduler(noc_opt, 10)
    opt = make_optimizer(param_groups(f.backbone_parameters(), f.new_parameters(), 0.1, 0), "sgd")
    dev = torch.device("cpu")
    return CamTrainer(cfg, f, oc, noc, opt, poly_scheduler(opt, 10), make_scaler(dev), noc_opt, noc_sched, dev, 10)


X = torch.randn(2, 3, 32, 32)
Y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


@pytest.mark.parametrize("strategy", ["cam", "puzzle", "occse", "poc", "pnoc"])
def test_each_strategy_steps_and_updates_f(strategy):
    tr = _trainer(strategy)
    before = tr.f.classifier.weight.clone()
    parts = tr.step(X, Y)
    assert torch.isfinite(torch.tensor(parts["loss"]))
    assert not torch.equal(before, tr.f.classifier.weight)
    assert ("re" in parts) == (strategy in ("puzzle", "poc", "pnoc"))
    assert ("cse" in parts) == (strategy in ("occse", "poc", "pnoc"))
    assert ("noc" in parts) == (strategy == "pnoc")


def test_poc_ordinary_classifier_receives_no_update():
    tr = _trainer("poc")
    ref = copy.deepcopy(tr.oc.state_dict())
    for _ in range(2):
        tr.step(X, Y)
    for k, v in tr.oc.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert all(p.grad is None for p in tr.oc.parameters())


def _noc_grad_after_f_backward(leak):
    tr = _trainer("pnoc", leak=leak)
    # iteration 0: lambda_noc = 0, so noc's own loss adds nothing; accumulate=2: no optimizer
    # step yet, so the gradients deposited during f's backward stay visible
    tr.iteration = 0
    tr.cfg.accumulate = 2
    tr.step(X, Y)
    return [p.grad for p in tr.noc_params]


def test_noc_receives_cse_gradients_only_with_leak_option():
    assert all(g is None or g.abs().sum() == 0 for g in _noc_grad_after_f_backward(False))
    assert any(g is not None and g.abs().sum() > 0 for g in _noc_grad_after_f_backward(True))


def test_noc_trains_on_hard_masked_images_and_bn_stays_frozen():
    tr = _trainer("pnoc")
    tr.cfg.noc_max = 1.0
    tr.iteration = 5  # lambda_noc > 0
    bn_before = {k: v.clone() for k, v in tr.noc.state_dict().items() if "running" in k or "bn" in k}
    w_before = tr.noc.classifier.weight.clone()
    tr.step(X, Y)
    assert not torch.equal(w_before, tr.noc.classifier.weight)
    for k, v in tr.noc.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), k

