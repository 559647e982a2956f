"""Backbone factory by name (timm ``create_model`` style).

Every backbone returns a dict of feature maps::

    {"stem": (B, C0, H/4, W/4), "layer1": (B, C1, H/4, W/4), "layer2": (B, C2, H/8, W/8),
     "layer3": (B, C3, H/os3, W/os3), "layer4": (B, C4, H/os, W/os)}

and exposes ``channels`` (name -> channels) and ``strides`` (name -> stride).

Names:
    ``resnet18|34|50|101``  torchvision ResNets; ``output_stride`` 16 or 8 by dilation.
    ``resnet18_w<k>``        a narrow ResNet-18 (widths k, 2k, 4k, 8k) for CPU demos; its
                             reduced stride keeps layer3/4 at stride 1 *without* dilation
                             (a dilated OS8 narrow net gives gridded CAMs on small images).
    ``resnest101|200|269``   ResNeSt through timm (``resnest*e`` deep-stem variants).

``weights``: ``"none"`` (random init), ``"imagenet"`` (the library's published ImageNet
weights, downloaded by torchvision/timm: for direct library use only; the workflow resolves
``weights: imagenet`` to a file fetched by rule fetch_weights, :mod:`pnoc.models.pretrained`) or a
path to a state dict as users hold them: torchvision's and timm's ``.pth``/``.bin`` files,
zhanghang1989's ResNeSt releases (``resnest269-0cc87c48.pth``, the keys of timm's ``resnest*e``),
``.safetensors`` (timm's hub files), pnoc's own backbone files; a ``state_dict``/``model`` wrapper
and ``module.``/``backbone.`` prefixes are accepted; the classifier ``fc.*`` keys are ignored. A
file named the torch.hub way (``<name>-<sha256 prefix>.pth``) or with a ``.sha256`` record beside it
is hash-checked before it is loaded.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock

from pnoc.io import DataError
from pnoc.models.pretrained import verify
from pnoc.training import safe_load

log = logging.getLogger(__name__)

FEATURES = ("stem", "layer1", "layer2", "layer3", "layer4")


class Backbone(nn.Module):
    """ResNet-style trunk returning the five feature maps of :data:`FEATURES`."""

    def __init__(self, net: nn.Module, channels: dict[str, int], strides: dict[str, int], name: str):
        super().__init__()
        self.net = net
        self.channels = channels
        self.strides = strides
        self.name = name

    @property
    def out_channels(self) -> int:
        return self.channels["layer4"]

    @property
    def output_stride(self) -> int:
        return self.strides["layer4"]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x (B, 3, H, W) normalised images. Returns: dict of feature maps."""
        n = self.net
        x = n.conv1(x)
        x = n.bn1(x)
        x = n.act1(x) if hasattr(n, "act1") else n.relu(x)
        stem = n.maxpool(x)
        l1 = n.layer1(stem)
        l2 = n.layer2(l1)
        l3 = n.layer3(l2)
        l4 = n.layer4(l3)
        return {"stem": stem, "layer1": l1, "layer2": l2, "layer3": l3, "layer4": l4}


class _NarrowResNet(nn.Module):
    """ResNet-18 layout with configurable width (torchvision BasicBlocks)."""

    def __init__(self, width: int, stride3: int, stride4: int):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = w[0]
        self.layer1 = self._make(w[0], 2, 1)
        self.layer2 = self._make(w[1], 2, 2)
        self.layer3 = self._make(w[2], 2, stride3)
        self.layer4 = self._make(w[3], 2, stride4)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)


_TV = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights", False),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights", False),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights", True),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights", True),
}
_TIMM = {"resnest50": "resnest50d", "resnest101": "resnest101e", "resnest200": "resnest200e",
         "resnest269": "resnest269e"}


def available_backbones() -> list[str]:
    return sorted(_TV) + ["resnet18_w<k>"] + sorted(_TIMM)


def _strides(output_stride: int) -> tuple[int, int]:
    if output_stride == 32:
        return 2, 2
    if output_stride == 16:
        return 2, 1
    if output_stride == 8:
        return 1, 1
    raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")


def create_backbone(name: str, output_stride: int = 16, weights: str | Path | None = "none") -> Backbone:
    """Create a backbone by name.

    Args:
        name: see the module docstring.
        output_stride: 8, 16 or 32 (stride of ``layer4``).
        weights: ``"none"``, ``"imagenet"`` or a path to a state dict.

    Returns:
        :class:`Backbone`.
    """
    weights = "none" if weights in (None, "", "none") else weights
    s3, s4 = _strides(output_stride)
    m = re.fullmatch(r"resnet18_w(\d+)", name)
    if m:
        net = _NarrowResNet(int(m.group(1)), s3, s4)
        w = int(m.group(1))
        channels = dict(zip(FEATURES, (w, w, 2 * w, 4 * w, 8 * w)))
        if weights == "imagenet":
            raise ValueError(f"{name} has no ImageNet weights; use weights: none or a path")
    elif name in _TV:
        fn, wname, bottleneck = _TV[name]
        # dilation keeps the receptive field when a stage's stride is removed (DeepLab style)
        dil = [False, s3 == 1, s4 == 1]
        tv_weights = None
        if weights == "imagenet":
            tv_weights = getattr(torchvision.models, wname).IMAGENET1K_V1
        if not bottleneck and any(dil):
            # torchvision's BasicBlock refuses dilation: build with stride and convert
            net = fn(weights=tv_weights)
            _dilate_basic(net, dil)
        else:
            net = fn(weights=tv_weights, replace_stride_with_dilation=dil)
        e = 4 if bottleneck else 1
        channels = dict(zip(FEATURES, (64, 64 * e, 128 * e, 256 * e, 512 * e)))
    elif name in _TIMM:
        try:
            import timm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"backbone {name} needs timm: pip install 'pnoc[timm]'") from e
        net = timm.create_model(_TIMM[name], pretrained=(weights == "imagenet"), output_stride=output_stride)
        stem_ch = net.conv1[-1].out_channels if isinstance(net.conv1, nn.Sequential) else net.conv1.out_channels
        channels = dict(zip(FEATURES, (stem_ch, 256, 512, 1024, 2048)))
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {available_backbones()}")
    if hasattr(net, "fc"):
        net.fc = nn.Identity()
    strides = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 8 * s3, "layer4": 8 * s3 * s4}
    bb = Backbone(net, channels, strides, name)
    if weights not in ("none", "imagenet"):
        load_backbone_weights(bb, weights)
    return bb


def _dilate_basic(net: nn.Module, dil: list[bool]) -> None:
    """Turn stride-2 BasicBlock stages into stride-1 dilated ones (for resnet18/34)."""
    dilation = 1
    for layer, d in zip((net.layer2, net.layer3, net.layer4), dil):
        if d:
            for i, blk in enumerate(layer):
                if i == 0 and blk.downsample is not None:
                    blk.downsample[0].stride = (1, 1)
                    blk.conv1.stride = (1, 1)
                prev = dilation
                dilation = dilation * 2 if i == 0 else dilation
                blk.conv1.dilation = (prev, prev) if i == 0 else (dilation, dilation)
                blk.conv1.padding = blk.conv1.dilation
                blk.conv2.dilation = (dilation, dilation)
                blk.conv2.padding = (dilation, dilation)


def load_backbone_weights(backbone: Backbone, path: str | Path) -> None:
    """Load a state dict file into ``backbone``; every backbone key must be present.

    Raises:
        FileNotFoundError: no such file.
        ValueError: keys missing or shapes differ (the message lists them).
        pnoc.io.DataError: (a ValueError) the file holds more than tensors and plain values, or is unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found; set weights: none|imagenet|<existing .pth>")
    verify(path)
    sd = read_state_dict(path)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    clean = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone.net.", "backbone.", "net."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("fc."):
            continue
        clean[k] = v
    own = backbone.net.state_dict()
    missing = [k for k in own if k not in clean]
    bad = [k for k in own if k in clean and clean[k].shape != own[k].shape]
    if missing or bad:
        raise ValueError(
            f"{path}: does not fit backbone {backbone.name}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), shape mismatches {bad[:3]}"
        )
    backbone.net.load_state_dict({k: clean[k] for k in own}, strict=True)
    log.info("loaded backbone weights from %s", path)


def read_state_dict(path: str | Path) -> dict:
    """A state dict from a ``.safetensors`` file (timm's hub format) or a torch file read with ``weights_only``.

    Raises:
        pnoc.io.DataError: unreadable, or a torch file holding more than tensors and plain values.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - timm brings it
            raise ImportError(f"{path}: reading .safetensors needs the safetensors package: pip install safetensors") from e

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{path}: unreadable safetensors file ({e}); download it again") from e
    return safe_load(path, "weights file", "save the weights as a plain state dict: torch.save(model.state_dict(), path)")


def freeze_bn(module: nn.Module) -> nn.Module:
    """Put BatchNorm layers in eval mode with frozen affine parameters (``mode=fix``)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
    return module
