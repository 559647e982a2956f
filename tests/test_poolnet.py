"""PoolNet shapes, gradients and parameter groups on tiny inputs."""

import torch
import torch.nn as nn

from pnoc.models.backbones import create_backbone
from pnoc.models.poolnet import PoolNet, create_poolnet


def test_poolnet_forward_backward_tiny():
    torch.manual_seed(0)
    model = PoolNet(create_backbone("resnet18_w8", output_stride=32), width=16).train()
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    assert y.shape == (2, 1, 64, 64)
    loss = nn.functional.binary_cross_entropy_with_logits(y, torch.rand_like(y), reduction="sum")
    loss.backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    assert model.convert["layer1"][0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.backbone_parameters())


def test_poolnet_non_square_and_odd_sizes():
    model = PoolNet(create_backbone("resnet18_w8", output_stride=32), width=8).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 97)).shape == (1, 1, 70, 97)
        assert model(torch.randn(1, 3, 33, 48)).shape == (1, 1, 33, 48)


def test_poolnet_fixed_bn_and_groups():
    model = PoolNet(create_backbone("resnet18_w8", output_stride=32), width=8).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    new = {n for n, _ in model.new_parameters()}
    old = {n for n, _ in model.backbone_parameters()}
    assert "score.weight" in new and not new & old
    assert new | old == {n for n, _ in model.named_parameters()}
    free = PoolNet(create_backbone("resnet18_w8", output_stride=32), width=8, fixed_bn=False).train()
    assert all(m.training for m in free.backbone.modules() if isinstance(m, nn.BatchNorm2d))


def test_poolnet_resnet50():
    model = create_poolnet("resnet50", output_stride=32, width=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
