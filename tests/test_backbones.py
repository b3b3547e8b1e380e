"""Any torchvision classifier with a weights enum, and EfficientNet-Lite0 with its real ImageNet weights."""

import io
import zipfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models import EfficientNet_B0_Weights
from torchvision.ops.misc import SqueezeExcitation

from foodvision import lite0
from foodvision.data import build_transform
from foodvision.images import open_rgb
from foodvision.model import (
    build_backbone,
    eval_transform,
    freeze_all_but,
    load_state_dict_file,
    replace_head,
    resolve_weights,
)
from foodvision.pretrained import fetch_pretrained

IMAGENET = EfficientNet_B0_Weights.DEFAULT.meta["categories"]


@pytest.mark.parametrize(("name", "head", "in_features"), [
    ("efficientnet_b0", "classifier", 1280), ("resnet18", "fc", 512), ("vit_b_16", "heads", 768),
    ("convnext_tiny", "classifier.2", 768), ("mobilenet_v3_large", "classifier.3", 1280),
    ("efficientnet_lite0", "classifier", 1280),
])
def test_head_is_replaced_whatever_it_is_called(name, head, in_features):
    model = build_backbone(name)
    assert replace_head(model, 3, 0.25) == head
    freeze_all_but(model, head)
    new = model.get_submodule(head)
    assert isinstance(new[0], nn.Dropout) and new[0].p == 0.25
    assert (new[1].in_features, new[1].out_features) == (in_features, 3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{head}.1.weight", f"{head}.1.bias"]


def test_transforms_come_from_the_weights():
    assert eval_transform("vit_b_16", "IMAGENET1K_V1")["crop_size"] == 224
    assert eval_transform("efficientnet_b2", "DEFAULT")["crop_size"] == 288
    assert eval_transform("efficientnet_lite0", "DEFAULT")["mean"] == [0.5, 0.5, 0.5]


def test_lite0_is_b0_without_se_with_relu6_and_tf_batchnorm():
    model = lite0.build()
    kinds = {type(m) for m in model.modules()}
    assert SqueezeExcitation not in kinds and nn.SiLU not in kinds and nn.ReLU6 in kinds
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}


@pytest.mark.parametrize("size", [224, 225, 7])
def test_same_padding_matches_tensorflow(size):
    conv = lite0.Conv2dSame(2, 4, 3, stride=2, bias=False)
    x = torch.randn(1, 2, size, size)
    y = conv(x)
    assert y.shape[-1] == -(-size // 2)  # ceil(size / stride)
    if size % 2 == 0:  # TF pads 0 before and 1 after for k=3, s=2 on even sizes
        assert torch.allclose(y, F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2), atol=1e-6)


def test_packaged_lite0_weights_load_strictly(tmp_path):
    source = resolve_weights("efficientnet_lite0", "DEFAULT")
    assert source.url.endswith("efficientnet-lite0-57934424.pth")
    original = load_state_dict_file(source.url)
    assert len(original) == 296
    dest = fetch_pretrained("efficientnet_lite0", "DEFAULT", None, tmp_path / "backbone.pth", sha256=None)
    converted = load_state_dict_file(dest)
    model = lite0.build()
    assert model.load_state_dict(converted, strict=True).missing_keys == []
    assert len(converted) == 296 and set(converted) == set(model.state_dict())
    assert torch.equal(converted["classifier.1.weight"], original["_fc.weight"])


def test_converter_refuses_a_foreign_file(tmp_path):
    with pytest.raises(KeyError):
        lite0.convert({"layer1.0.conv1.weight": torch.zeros(1)})


def real_photos(shared_data, n: int = 10) -> list[Image.Image]:
    with zipfile.ZipFile(shared_data / "pizza_steak_sushi.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("test/pizza/") and n.endswith(".jpg"))[:n]
        photos = [open_rgb(io.BytesIO(zf.read(name))) for name in names]
    return [*photos, open_rgb(shared_data / "04-pizza-dad.jpeg")]


def top1(model: nn.Module, photos: list[Image.Image]) -> list[str]:
    transform = build_transform(lite0.TRANSFORM)
    with torch.inference_mode():
        logits = model.eval()(torch.stack([transform(p) for p in photos]))
    return [IMAGENET[i] for i in logits.argmax(1)]


def test_lite0_recognises_real_pizza_and_silu_would_ruin_it(shared_data, tmp_path):
    photos = real_photos(shared_data)
    state = load_state_dict_file(fetch_pretrained("efficientnet_lite0", "DEFAULT", None, tmp_path / "b.pth", sha256=None))
    model = lite0.build()
    model.load_state_dict(state)
    labels = top1(model, photos)
    assert labels.count("pizza") >= 9 and labels[-1] == "pizza", labels
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU6):
                setattr(parent, child_name, nn.SiLU())
    assert top1(model, photos).count("pizza") <= 3


def test_only_stride_two_convs_need_dynamic_padding():
    model = lite0.build()
    same = [m for m in model.modules() if isinstance(m, lite0.Conv2dSame)]
    assert len(same) == 5 and all(m.stride == (2, 2) for m in same)
    plain = [m for m in model.modules() if type(m) is nn.Conv2d]
    assert all(m.padding == (m.kernel_size[0] // 2,) * 2 for m in plain)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_inference_copy_folds_batchnorm_without_changing_outputs(tmp_path, name):
    from foodvision.model import for_inference, load_pretrained

    if name == "efficientnet_lite0":
        model = load_pretrained(name, fetch_pretrained(name, "DEFAULT", None, tmp_path / "b.pth", sha256=None))
    else:
        model = build_backbone(name)
        for m in model.modules():  # non-trivial statistics, as trained weights have
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    fast = for_inference(model)
    folded = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - sum(
        isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert folded > 0
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected, got = model(x), fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(expected, got, rtol=1e-3, atol=1e-3)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original is untouched"
