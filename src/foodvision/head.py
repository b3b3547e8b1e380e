"""The head: torch, no torchvision (which would cost `train` seconds of imports)."""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
    """nn.Dropout whose mask comes from raw 16-bit draws of torch's CPU generator, on every CPU and device.

    torch's own CPU mask (`bernoulli_`) takes MKL's stream on Intel CPUs and one mt19937 draw per element,
    converted to a double, elsewhere (pytorch#84030, #121595): one seed trains other weights on Intel than on
    AMD or Apple CPUs, and on the latter the mask is the head's largest cost per step (docs/scale.md). Raw
    integers come from one kernel on every CPU; 16 bits per unit take a quarter of a 64-bit draw. Each unit
    is dropped with probability p rounded to a multiple of 2**-16 (0.2: 0.199997; GPU dropout kernels
    commonly round to 2**-8), the kept ones scaled by 1 / (1 - p), as nn.Dropout does; in eval mode it is
    the identity. Drawn on the CPU, a mask is the same under CUDA or MPS.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        # int64 draws over their full range (one kernel, two 32-bit mt19937 outputs each), read as 4 int16 units
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        units = bits.view(torch.int16)[:x.numel()].view(x.shape).to(x.device).float()
        # unit - threshold + 1, clamped to [0, 1], is exactly 1 where unit >= threshold, else 0 (integers are
        # exact in float32): float ops only, faster per step on a CPU than a comparison and torch.where
        threshold = -(2**15) + round(self.p * 2**16)
        keep = units.sub_(threshold - 1).clamp_(0, 1).mul_(1 / (1 - self.p))
        return x * keep.to(x.dtype)


def new_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The article's head: Dropout, then Linear(in -> classes); its init draws from torch's global RNG."""
    return nn.Sequential(Dropout(p=dropout), nn.Linear(in_features, num_classes))
