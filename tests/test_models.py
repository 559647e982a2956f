import pytest
import torch

from pnoc.cam.tta import max_normalize, tta_maps
from pnoc.models import create_backbone, create_classifier
from pnoc.models.backbones import load_backbone_weights


@pytest.mark.parametrize("name,os_,expect", [("resnet18_w8", 8, 8), ("resnet18_w8", 16, 4), ("resnet18", 16, 4),
                                             ("resnet18", 8, 8), ("resnet50", 16, 4)])
def test_backbone_strides(name, os_, expect):
    bb = create_backbone(name, os_)
    f = bb(torch.randn(1, 3, 64, 64))
    assert f["layer4"].shape[-1] == expect
    assert f["stem"].shape[-1] == 16 and f["layer1"].shape[-1] == 16
    for k, v in f.items():
        assert v.shape[1] == bb.channels[k]


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vgg16")


def test_classifier_forward_backward():
    m = create_classifier("resnet18_w8", 4, 8)
    x = torch.randn(2, 3, 32, 32)
    logits, cam = m(x)
    assert logits.shape == (2, 4) and cam.shape == (2, 4, 4, 4)
    assert torch.allclose(logits, cam.mean((2, 3)))
    logits.sum().backward()
    assert m.classifier.weight.grad is not None and m.classifier.bias is None


def test_weights_from_local_file(tmp_path):
    """The ImageNet-loading path, exercised with a file the test writes (no download here)."""
    src = create_backbone("resnet18", 16)
    path = tmp_path / "resnet18_imagenet.pth"
    sd = {"module." + k: v for k, v in src.net.state_dict().items()}
    sd["fc.weight"] = torch.zeros(1000, 512)  # a real ImageNet checkpoint carries the fc layer
    torch.save({"state_dict": sd}, path)
    dst = create_backbone("resnet18", 16, weights=str(path))
    for k, v in src.net.state_dict().items():
        assert torch.equal(v, dst.net.state_dict()[k]), k
    # a checkpoint of another architecture is refused with the file named
    torch.save(create_backbone("resnet18_w8").net.state_dict(), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        load_backbone_weights(create_backbone("resnet18"), tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_tta_merge_of_known_map():
    # a "network" that returns its input's first channel: TTA over scales 1 and 2 with flip
    # of a left-right symmetric-free ramp must give 2 (flips) x 2 (scales) x the ramp
    img = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    img[..., :, :] = torch.arange(8, dtype=torch.uint8).view(1, 1, 1, 8) * 30
    from pnoc.data.transforms import normalize

    ref = normalize(img)[:, :1].clamp(min=0)
    hr, lr = tta_maps(lambda x: x[:, :1], img, scales=[1.0], flip=True)
    assert torch.allclose(hr, 2 * ref, atol=1e-5)
    assert lr.shape == (1, 1, 2, 2)
    hr_mean, _ = tta_maps(lambda x: x[:, :1], img, scales=[1.0, 1.0], flip=False, reduce="mean")
    assert torch.allclose(hr_mean, ref, atol=1e-5)


def test_max_normalize():
    m = torch.tensor([[[0.0, 2.0], [1.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    n = max_normalize(m)
    assert torch.allclose(n[0], torch.tensor([[0, 0.5], [0.25, 1.0]]), atol=1e-5)
    assert torch.equal(n[1], torch.zeros(2, 2))
