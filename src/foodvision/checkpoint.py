"""The trained classifier on disk, and its head on its own: torch only, no torchvision.

`train` and `evaluate` work on stored features, so they need the head (Dropout + Linear) and the
checkpoint format, not the backbone's architecture; importing torchvision would cost them seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from foodvision.atomic import atomic_path
from foodvision.errors import FoodVisionError
from foodvision.params import DEVICE_PATTERN, shown

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = {"format", "model_name", "head", "dropout", "class_names", "transform", "state_dict"}


class ModelError(FoodVisionError):
    pass


def new_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """The article's head: Dropout, then Linear(in -> classes); its init draws from torch's global RNG."""
    return nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(in_features, num_classes))


def load_state_dict_file(path: Path) -> dict[str, Any]:
    """Load a state dict (or checkpoint dict) without unpickling arbitrary objects."""
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


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], *, name: str, head: str, dropout: float,
                    class_names: list[str], transform: dict[str, Any]) -> None:
    """State dict plus everything predict needs; plain types only, so weights_only loading works."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_name": name,
        "head": head,
        "dropout": dropout,
        "class_names": list(class_names),
        "transform": transform,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict of models/model.pt, its format checked; every failure names the file."""
    path = Path(path)
    ckpt = load_state_dict_file(path)
    if "format" in ckpt and ckpt["format"] != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is a FoodVision checkpoint of format {shown(ckpt['format'])}, but this version "
                         f"reads format {CHECKPOINT_FORMAT}; run `dvc repro train` to write it again")
    missing = CHECKPOINT_KEYS - set(ckpt)
    if missing:
        raise ModelError(f"{path} is not a FoodVision checkpoint (missing {', '.join(sorted(missing))}); "
                         "run `dvc repro train`")
    return ckpt


def head_from_checkpoint(path: Path, ckpt: dict[str, Any]) -> nn.Sequential:
    """Only the trained head, in eval mode: what evaluate applies to stored features."""
    prefix = ckpt["head"] + "."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    weight = state.get("1.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] != len(ckpt["class_names"]):
        raise ModelError(f"{path} has no head for its {len(ckpt['class_names'])} classes; run `dvc repro train`")
    head = new_head(weight.shape[1], weight.shape[0], ckpt["dropout"])
    head.load_state_dict(state, strict=True)
    return head.eval()


def pick_device(device: str) -> torch.device:
    """`auto` = CUDA, then Apple MPS, then CPU; anything else must exist on this machine."""
    if not DEVICE_PATTERN.fullmatch(device):
        raise ModelError(f"device {shown(device)} is not one of auto, cpu, cuda, cuda:N, mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} asked for, but CUDA is not available here; use auto or cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s), numbered from 0")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device 'mps' asked for, but MPS is not available here; use auto or cpu")
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
