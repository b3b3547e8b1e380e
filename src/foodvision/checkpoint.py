"""The trained classifier on disk: safetensors, so its bytes depend only on the weights and it reads without torch.

`evaluate` and `export` need only the head's two arrays and the metadata: reading them with numpy
spares those stages the seconds `import torch` costs. The metadata (classes, transform, backbone)
travels inside the file, so it is all a later stage or a user needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from foodvision.core.errors import ModelError, shown
from foodvision.core.files import atomic_path

CHECKPOINT_FORMAT = 2  # 1 was a torch.save pickle (models/model.pt)
META_KEY = "foodvision"
CHECKPOINT_KEYS = {"format", "model_name", "head", "dropout", "class_names", "transform"}


def save_checkpoint(path: Path, state_dict: dict[str, Any], *, name: str, head: str, dropout: float,
                    class_names: list[str], transform: dict[str, Any], finetuned: list[str] | None = None) -> None:
    """The whole model's weights plus what a runtime needs; `state_dict` values are torch tensors or arrays.

    `finetuned` names the backbone blocks trained with the head: then the backbone is no longer the pretrained
    one whose features `featurize` stored. Absent for a frozen backbone, so those files keep their bytes."""
    from safetensors.numpy import save

    meta = {"format": CHECKPOINT_FORMAT, "model_name": name, "head": head, "dropout": dropout,
            "class_names": list(class_names), "transform": transform}
    if finetuned:
        meta["finetuned"] = list(finetuned)
    arrays = {k: _array(v) for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(arrays, metadata={META_KEY: json.dumps(meta, sort_keys=True)}))


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, order="C")  # not ascontiguousarray: it makes 0-d counters 1-d


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata plus `state_dict` (name -> numpy array); every failure names the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} not found: run `dvc repro train` to create it")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own error type for a damaged or foreign file
        raise ModelError(f"{path} is not a readable safetensors file ({type(exc).__name__}); "
                         "run `dvc repro train` to write it again") from None
    try:
        meta = json.loads(raw) if raw is not None else {}
    except ValueError:
        meta = {}
    if isinstance(meta, dict) and "format" in meta and meta["format"] != CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is a FoodVision checkpoint of format {shown(meta['format'])}, but this version "
                         f"reads format {CHECKPOINT_FORMAT}; run `dvc repro train` to write it again")
    missing = CHECKPOINT_KEYS - set(meta if isinstance(meta, dict) else {})
    if missing:
        raise ModelError(f"{path} is not a FoodVision checkpoint (missing {', '.join(sorted(missing))}); "
                         "run `dvc repro train`")
    return {**meta, "state_dict": state}


def head_weights(path: Path, ckpt: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The trained head's Linear layer as (weight: classes x features, bias: classes), float32.

    In eval mode the head (Dropout, then Linear) is `features @ weight.T + bias`: a test checks it
    against torch's head, to float32 rounding.
    """
    prefix = ckpt["head"] + ".1."
    weight, bias = ckpt["state_dict"].get(prefix + "weight"), ckpt["state_dict"].get(prefix + "bias")
    classes = len(ckpt["class_names"])
    if weight is None or bias is None or weight.ndim != 2 or weight.shape[0] != classes or bias.shape != (classes,):
        raise ModelError(f"{path} has no head for its {classes} classes; run `dvc repro train`")
    return weight.astype(np.float32, copy=False), bias.astype(np.float32, copy=False)


def head_logits(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The eval-mode head on a block of feature rows, in float32 as torch computes it."""
    return features @ weight.T + bias
