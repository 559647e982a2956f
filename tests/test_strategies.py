import copy

import pytest
import torch

from pnoc.cam.losses import multilabel_soft_margin
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


# ---------------------------------------------------------------------------- gradient flow (issue 12)
# Each test below fails when a detach is added where the method needs gradient, or removed where it
# must not flow; checked by comparing the gradients of f before the optimizer step (accumulate = 2).

def _f_grads(strategy, it, **cfg):
    tr = _trainer(strategy)
    tr.cfg.accumulate = 2  # (it + 1) % 2 != 0 for even it: no optimizer step, gradients stay in .grad
    for k, v in cfg.items():
        setattr(tr.cfg, k, v)
    tr.iteration = it
    torch.manual_seed(1)  # the same sampled class r in every call
    parts = tr.step(X, Y)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in tr.f.parameters()], parts, tr


def test_cse_gradient_reaches_f_through_the_soft_mask():
    """OC-CSE: oc is frozen and the input carries no gradient, so L_cse reaches f only through ψ(A^r)."""
    g0, _, _ = _f_grads("occse", 0, cse_min=0.0, cse_max=0.0)
    g1, parts, _ = _f_grads("occse", 0, cse_min=1.0, cse_max=1.0)
    assert parts["cse"] > 0
    diff = sum(float((a - b).abs().sum()) for a, b in zip(g0, g1))
    assert diff > 1e-6  # a detached mask gives exactly the same gradients as lambda_cse = 0


def test_noc_hard_mask_is_detached_from_f():
    """P-NOC: noc's own loss must leave f's gradients unchanged (the hard mask is detached)."""
    g0, _, _ = _f_grads("pnoc", 4, noc_max=0.0)
    g1, parts, _ = _f_grads("pnoc", 4, noc_max=1.0)
    assert parts["noc"] > 0 and parts["lambda_noc"] > 0
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("norm", ["image", "batch"])
def test_noc_trains_on_the_full_labels_of_the_per_sample_hard_mask(norm):
    """L_noc = MLSM(noc(x ∘ hard(ψ_image(A^r))), y): the full label set (not y without r) and a
    per-sample normalised mask, whatever cse_mask_norm says (the authors' hard_mask_images)."""
    y1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # one class per image: r is fixed
    tr = _trainer("pnoc")
    tr.cfg.cse_mask_norm = norm
    tr.cfg.accumulate = 2
    tr.iteration = 4
    noc0 = copy.deepcopy(tr.noc)
    f0 = copy.deepcopy(tr.f)
    parts = tr.step(X, y1)
    with torch.no_grad():
        _, cam = f0(X)
        r = y1.argmax(1)
        mask = psi(cam[torch.arange(2), r].float(), X.shape[-2:], "image")
        logits, _ = noc0(hard_erase(X, mask, tr.cfg.noc_delta, tr.cfg.noc_mask_rule))
        full = multilabel_soft_margin(logits, y1, tr.cfg.label_smoothing).item()
        erased = multilabel_soft_margin(logits, erased_targets(y1, r), tr.cfg.label_smoothing).item()
    assert parts["noc"] == pytest.approx(full, rel=1e-5)
    assert abs(full - erased) > 1e-3


def test_both_sides_of_the_reconstruction_loss_carry_gradient():
    torch.manual_seed(0)
    cam = torch.randn(2, 3, 4, 4, requires_grad=True)
    cam_re = torch.randn(2, 3, 4, 4, requires_grad=True)
    _, l_re = puzzle_losses(None, cam, cam_re, Y)
    l_re.backward()
    assert cam.grad.abs().sum() > 0 and cam_re.grad.abs().sum() > 0
    # opposite signs on the entries of present classes: |A - A_re| pulls both towards each other
    present = Y[:, :, None, None].expand_as(cam).bool()
    assert torch.equal(cam.grad[present], -cam_re.grad[present])


@pytest.mark.parametrize("strategy", ["cam", "pnoc"])
def test_accumulation_sums_like_the_reference_or_averages(strategy):
    """accumulate_loss: sum (authors: each iteration's loss backpropagated as is) gives exactly
    accumulate x the gradients of mean (ours: loss / accumulate)."""
    g_mean, _, _ = _f_grads(strategy, 0, accumulate_loss="mean")
    g_sum, _, _ = _f_grads(strategy, 0, accumulate_loss="sum")
    for a, b in zip(g_mean, g_sum):
        assert torch.allclose(2 * a, b, rtol=1e-5, atol=1e-7)
