"""The config group ``speed`` (pnoc.training.Speed, make_optimizer's ``fused``, set_backend_speed): every option
computes what the plain run computes, bit for bit or within the float tolerance stated beside each check."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from pnoc.training import EpochRunner, Runtime, Solver, Speed, make_optimizer, set_backend_speed, start_training

# channels_last: oneDNN's NHWC convolutions sum the k·k·C products of an output in another order than the NCHW
# ones, so every conv rounds differently (~1e-7 relative); through ~20 layers forward and backward this grows
# to ~1e-5 of the tensor's scale. RTOL bounds that, relative to the compared tensor's largest magnitude.
RTOL = 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    """``a`` and ``b`` agree within ``rtol`` of ``a``'s largest magnitude (rounding noise is absolute-sized)."""
    return bool((a - b).abs().max() <= rtol * max(a.abs().max().item(), 1e-12))


# ---------------------------------------------------------------------------- fused optimizer
def _params_after_steps(name: str, fused: bool, momentum: float, nesterov: bool, steps: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(16, 8, 3, 3, generator=g)), nn.Parameter(torch.randn(16, generator=g)),
              nn.Parameter(torch.randn(20, 16, generator=g))]
    groups = [{"params": params[:1] + params[2:], "lr": 0.05, "weight_decay": 1e-4},
              {"params": params[1:2], "lr": 0.1, "weight_decay": 0.0}]
    opt = make_optimizer(groups, name, momentum, nesterov, fused=fused)
    for _ in range(steps):
        for p in params:  # gradients of many magnitudes, as a network's layers have
            p.grad = torch.randn(p.shape, generator=g) * 10.0 ** float(torch.randint(-6, 1, (1,), generator=g))
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_fused_sgd_is_bit_identical_to_the_loop(momentum, nesterov):
    loop = _params_after_steps("sgd", False, momentum, nesterov)
    fused = _params_after_steps("sgd", True, momentum, nesterov)
    assert torch.equal(loop, fused)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_fused_adam_equals_the_loop_within_rounding(name):
    loop = _params_after_steps(name, False, 0.0, False)
    fused = _params_after_steps(name, True, 0.0, False)
    # the fused kernel orders the bias corrections and the division by sqrt(v) + eps differently: the updates
    # (lr-sized) differ in the last bits, ~1e-6 of the parameters' scale after a few steps
    assert _close(loop, fused, 1e-5)
    assert not torch.equal(loop, _params_after_steps(name, False, 0.0, False, steps=3))  # the steps did something


def test_stage_config_makes_the_fused_optimizer():
    from pnoc.cam.train_classifier import Config

    p = [nn.Parameter(torch.zeros(3))]
    cfg = Config(dataset="synthetic", root=".", out=".", metrics=".", state_dir=".", fused_optimizer=True)
    assert isinstance(cfg, Solver) and cfg.make_optimizer([{"params": p, "lr": 0.1}]).defaults["fused"] is True
    cfg = Config(dataset="synthetic", root=".", out=".", metrics=".", state_dir=".")
    assert not cfg.make_optimizer([{"params": p, "lr": 0.1}]).defaults.get("fused")


# ---------------------------------------------------------------------------- channels_last
def _networks():
    from pnoc.models.affinitynet import AffinityNet
    from pnoc.models.backbones import create_backbone
    from pnoc.models.ccam import create_ccam
    from pnoc.models.classifier import create_classifier
    from pnoc.models.deeplab import create_segmenter
    from pnoc.models.poolnet import create_poolnet

    return {
        "classifier": lambda: create_classifier("resnet18_w8", 4, 8),
        "ccam": lambda: create_ccam("resnet18_w8", 8),
        # dropout active (0.5, GroupNorm: the VOC recipe): its masks must not depend on the layout either
        "deeplabv3plus": lambda: create_segmenter("deeplabv3plus", "resnet18_w8", 5, 8, aspp_channels=16,
                                                  decoder_low_channels=8, decoder_channels=16, norm="gn",
                                                  dropout=0.5),
        "deeplabv2": lambda: create_segmenter("deeplabv2", "resnet18_w8", 5, 8),
        "affinitynet": lambda: AffinityNet(create_backbone("resnet18_w8", 8, "none"), 8),
        "poolnet": lambda: create_poolnet("resnet18_w8", 32, "none", 16, True),
    }


@pytest.mark.parametrize("net", list(_networks()))
def test_channels_last_train_step_equals_nchw(net):
    torch.manual_seed(0)
    plain = _networks()[net]().train()
    fast = Speed(channels_last=True).prepare(copy.deepcopy(plain))
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters())
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for m in (plain, fast):
        torch.manual_seed(2)  # the same dropout draws
        out = m(x)
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        w = [torch.randn(o.shape, generator=torch.Generator().manual_seed(3)) for o in out]
        loss = sum((o.float() * wi).sum() for o, wi in zip(out, w))
        loss.backward()
        outs.append([o.detach() for o in out])
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*outs):
        assert a.shape == b.shape and _close(a, b), (net, (a - b).abs().max().item(), a.abs().max().item())
    assert len(grads[0]) == len(grads[1]) > 0 and all(a.shape == b.shape for a, b in zip(*grads))
    # against the largest gradient of the network: a bias's gradient sums the whole map and cancels, so its
    # rounding noise has the size of its summands, not of its (small) result
    a, b = (torch.cat([g.flatten() for g in gs]) for gs in grads)
    assert _close(a, b), (net, (a - b).abs().max().item(), a.abs().max().item())


def test_channels_last_pnoc_step_equals_nchw():
    """P-NOC's whole step (Puzzle tiles, CSE through noc, noc's hard-masked step) on NHWC networks: the first
    step's losses and updated weights match. (Later steps can part further: noc's hard mask thresholds the CAM,
    and a pixel within rounding of the threshold flips; so does it between thread counts.)"""
    from test_strategies import X, Y, _trainer

    plain, fast = _trainer("pnoc"), _trainer("pnoc")
    speed = Speed(channels_last=True)
    fast.f_train, fast.noc_train = speed.prepare(fast.f), speed.prepare(fast.noc)
    torch.manual_seed(5)
    a = plain.step(X, Y)
    torch.manual_seed(5)
    b = fast.step(X, Y)
    for k in ("cls", "re_cls", "re", "cse", "noc", "loss"):
        assert abs(a[k] - b[k]) <= RTOL * max(abs(a[k]), 1e-6), (k, a[k], b[k])
    for m_plain, m_fast in ((plain.f, fast.f), (plain.noc, fast.noc)):
        for (name, p), q in zip(m_plain.named_parameters(), m_fast.parameters()):
            assert _close(p.detach(), q.detach()), name


def test_epoch_runner_wrap_applies_the_stage_speed(tmp_path):
    cfg = Runtime(device="cpu", channels_last=True)
    dist = start_training(cfg)
    assert dist.speed == Speed(channels_last=True, compile=False)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    weight = model[0].weight
    runner = EpochRunner(tmp_path / "state", {}, 1, 0, dist=dist, model=model)
    net = runner.wrap(model)
    assert net is model and model[0].weight is weight  # the same Parameter: optimizers and state dicts hold
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    plain = start_training(Runtime(device="cpu"))
    other = nn.Conv2d(3, 4, 3)
    assert EpochRunner(tmp_path / "s2", {}, 1, 0, dist=plain).wrap(other).weight.is_contiguous()
    compiled = EpochRunner(tmp_path / "s3", {}, 1, 0, dist=start_training(Runtime(device="cpu", compile=True)))
    assert isinstance(compiled.wrap(nn.Conv2d(3, 4, 3)), torch._dynamo.eval_frame.OptimizedModule)


def test_speed_keys_do_not_key_the_resume_state():
    from pnoc.cam.train_classifier import Config
    from pnoc.training import resume_key

    base = dict(dataset="synthetic", root=".", out=".", metrics=".", state_dir=".")
    assert resume_key(Config(**base)) == resume_key(Config(**base, channels_last=True, fused_optimizer=True,
                                                           compile=True, cudnn_benchmark=True))


def test_cudnn_benchmark_is_set_on_cuda_only():
    old = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        set_backend_speed(Runtime(cudnn_benchmark=True), torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False  # nothing to do on the CPU
        set_backend_speed(Runtime(cudnn_benchmark=True), torch.device("cuda"))  # the flag only; no GPU needed
        assert torch.backends.cudnn.benchmark is True
        set_backend_speed(Runtime(cudnn_benchmark=False), torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = old


def test_train_affinity_with_speed_options_equals_plain(tmp_path):
    """A whole training stage with channels_last and the fused optimizer (the IRN loss reshapes the boundary
    map): the same losses, up to rounding."""
    from test_affinity_stages import gt_masks, hand_cams, make_mini

    from pnoc.affinity import make_affinity_labels, train_affinity

    masks, labels = gt_masks()
    mini = make_mini(tmp_path / "ds", masks, labels)
    cams = hand_cams(tmp_path)
    lab = tmp_path / "labels"
    make_affinity_labels.run(make_affinity_labels.Config("synthetic", mini, "train", cams, lab, method="classic",
                                                         crf=False))
    runs = {}
    for fast in (False, True):
        d = tmp_path / f"fast{fast}"
        runs[fast] = train_affinity.run(train_affinity.Config(
            "synthetic", mini, lab, d / "aff.pt", d / "aff.json", d / "state", init="backbone",
            backbone="resnet18_w8", branch_channels=8, epochs=2, batch_size=2, crop=32, resize_min=28,
            resize_max=36, device="cpu", channels_last=fast, fused_optimizer=fast))
    a = np.array([r["loss"] for r in runs[False]["epochs"]])
    b = np.array([r["loss"] for r in runs[True]["epochs"]])
    assert np.isfinite(a).all() and np.allclose(a, b, rtol=RTOL, atol=0), (a, b)


@pytest.mark.slow
def test_compiled_train_step_equals_eager():
    """torch.compile (inductor; compiling takes 25-60 s on 2 CPU cores, hence slow): the compiled step's
    outputs and gradients match eager within float rounding (inductor fuses and reorders the element-wise
    work and the reductions of BatchNorm)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    eager_copy = copy.deepcopy(plain)
    compiled = Speed(compile=True).compiled(plain)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ys, gs = [], []
    for m, params in ((eager_copy, eager_copy.parameters()), (compiled, plain.parameters())):
        y = m(x)
        y.square().sum().backward()
        ys.append(y.detach())
        gs.append([p.grad.clone() for p in params])
    assert _close(ys[0], ys[1])
    # against the largest gradient: the first conv's bias feeds a BatchNorm, its true gradient is 0 and what
    # either run computes there is rounding noise of the size of the other gradients' summands
    a, b = (torch.cat([g.flatten() for g in g_]) for g_ in gs)
    assert _close(a, b), ((a - b).abs().max().item(), a.abs().max().item())
