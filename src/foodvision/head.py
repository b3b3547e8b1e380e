"""The head: torch, no torchvision (which would cost `train` seconds of imports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from foodvision.checkpoint import ModelError


def new_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The article's head: Dropout, then Linear(in -> classes); its init draws from torch's global RNG."""
    return nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(in_features, num_classes))


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """Load a torch state dict (a pretrained .pth) without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path} not found: run `dvc repro` to create it") from None
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise ModelError(f"{path} is not a readable PyTorch weights file ({type(exc).__name__}); "
                         "delete it and run `dvc repro`") from None
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state
