"""Lower precision: the one rule for which autocast dtype runs where, for the frozen backbone and the fine-tune.

`featurize.precision` asks for a precision and is refused where the hardware would make it slower; the
fine-tune has no param and takes the fastest a CUDA GPU has (bf16, else fp16 with a gradient scaler),
float32 elsewhere. Whatever the dtype, features are stored and compared in float32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from foodvision.core.device import cpu_flags as read_cpu_flags
from foodvision.core.errors import ModelError


def autocast_dtype(precision: str, device: torch.device, cpu_flags: set[str] | None = None) -> torch.dtype | None:
    """The autocast dtype for `precision` (fp32, bf16, fp16) on `device`; None = float32, no autocast."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ModelError(f"featurize.precision fp16 needs a CUDA GPU, not {device.type}; use bf16 where the "
                             "hardware has it, or fp32")
        return torch.float16
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ModelError("featurize.precision bf16: this GPU has no bf16 arithmetic; use fp16 or fp32")
        return torch.bfloat16
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    if device.type != "cpu" or not flags & {"avx512_bf16", "amx_bf16"}:
        raise ModelError(f"featurize.precision bf16: this {device.type.upper()} has neither AVX-512-BF16 nor AMX, "
                         "where bf16 ran the backbone about 17x slower than fp32; use fp32")
    return torch.bfloat16


def training_precision(device: torch.device) -> str:
    """The fine-tune's precision: mixed on CUDA only (CPUs and MPS train in float32)."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """torch.autocast at `dtype`, or nothing for float32."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class Autocast(nn.Module):
    """A module run under torch.autocast at a lower precision (callers store its outputs as float32)."""

    def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(x)
