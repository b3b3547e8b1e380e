"""A pretrained backbone's weights file (`.pth`) read as a plain state dict: torch only, no torchvision.

`train` puts its head onto these weights without building the backbone, so it must not pay for
torchvision's import; `model` builds the architecture and loads them strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from foodvision.core.errors import ModelError


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
