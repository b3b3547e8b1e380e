"""Backbones from torchvision's registry: weights, a new head for our classes, frozen parameters, BatchNorm folding.

The frozen body built from them, and the loop that runs it over images, are `backbone.py`'s."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.models
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import get_model, get_model_weights, list_models

from foodvision import lite0
from foodvision.checkpoint import read_checkpoint
from foodvision.core.errors import ModelError
from foodvision.head import new_head
from foodvision.statedict import load_state_dict_file


@dataclass(frozen=True)
class Weights:
    """Where a backbone's pretrained file comes from and how its inputs must be preprocessed."""

    label: str  # e.g. EfficientNet_B0_Weights.IMAGENET1K_V1
    url: str
    transform: dict[str, Any]
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None  # to torchvision keys


def backbone_names() -> list[str]:
    """Classification models torchvision publishes weights for, plus EfficientNet-Lite0."""
    return sorted([*list_models(module=torchvision.models), lite0.NAME])


def resolve_weights(name: str, weights: str | None) -> Weights | None:
    """Map params `model.name`/`model.weights` to a weights source (None = random init)."""
    names = backbone_names()
    if name not in names:
        raise ModelError(f"model.name {name!r} is not a known classification backbone; accepted: {', '.join(names)}")
    if name == lite0.NAME:
        members, label = lite0.WEIGHTS, "efficientnet_lite0"
    else:
        enum = get_model_weights(name)
        members, label = tuple(dict.fromkeys(["DEFAULT", *enum.__members__])), enum.__name__
    if weights is None:
        return None
    if weights not in members:
        raise ModelError(f"model.weights {weights!r} is not a member of {label}; "
                         f"accepted: {', '.join(members)}, or null")
    if name == lite0.NAME:
        return Weights("efficientnet_lite0.IMAGENET1K", lite0.default_source(), lite0.TRANSFORM, lite0.convert)
    member = enum[weights]
    return Weights(str(member), member.url, _transform_dict(member.transforms()))


def _transform_dict(t: Any) -> dict[str, Any]:
    return {
        "resize_size": int(t.resize_size[0]),
        "crop_size": int(t.crop_size[0]),
        "interpolation": t.interpolation.value,
        "mean": [float(m) for m in t.mean],
        "std": [float(s) for s in t.std],
        "antialias": bool(t.antialias),
    }


def eval_transform(name: str, weights: str | None) -> dict[str, Any]:
    """The preprocessing the weights were trained with, as plain data for the spec.

    With `weights: null` the default weights' transform is used: it is metadata, no download.
    """
    source = resolve_weights(name, weights) or resolve_weights(name, "DEFAULT")
    return source.transform


def build_backbone(name: str) -> nn.Module:
    """The architecture with its original ImageNet head, uninitialised weights (random)."""
    return lite0.build() if name == lite0.NAME else get_model(name, weights=None)


def replace_head(model: nn.Module, num_classes: int, dropout: float) -> str:
    """Swap the last Linear layer for Dropout + Linear(in -> num_classes); return the head's name.

    Works for `classifier` (EfficientNet, MobileNet, ConvNeXt), `fc` (ResNet) and `heads` (ViT).
    When the last Linear sits in a container of only Dropout and that Linear (EfficientNet's
    `classifier`), the whole container is the head, exactly as in the article.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(model).__name__} has no Linear layer to replace")
    name, last = linears[-1]
    parent_name = name.rpartition(".")[0]
    siblings = list(model.get_submodule(parent_name).children()) if parent_name else []
    whole_parent = parent_name and all(isinstance(m, nn.Dropout) for m in siblings if m is not last)
    target = parent_name if whole_parent else name
    model.set_submodule(target, new_head(last.in_features, num_classes, dropout))
    return target


def freeze_all_but(model: nn.Module, head: str) -> None:
    """No gradients outside the head (train also keeps those layers in eval mode: BatchNorm stats never drift)."""
    for pname, param in model.named_parameters():
        param.requires_grad = pname.startswith(head + ".")


def for_inference(model: nn.Module) -> nn.Module:
    """An eval-only copy: each BatchNorm folded into the conv before it, channels-last memory.

    Both measurably speed up CPU inference (BatchNorm was a third of EfficientNet's time) and change
    results only at float rounding level. Layouts that are not conv-then-BN in a Sequential stay as is.
    """
    fast = copy.deepcopy(model).eval()
    for parent in list(fast.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return fast.to(memory_format=torch.channels_last)


def load_pretrained(name: str, path: Path, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Build `name` and load the pretrained file (or its already loaded `state`) strictly.

    A wrong file fails here, by name.
    """
    model = build_backbone(name)
    state = load_state_dict_file(path) if state is None else state
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(f"{path} does not fit model.name {name!r} ({detail}); "
                         "fix model.weights_url or model.name") from None
    return model


def classifier_for(name: str, pretrained: Path, num_classes: int, dropout: float, seed: int) -> tuple[nn.Module, str]:
    """The pretrained backbone, frozen, with a freshly seeded head for our classes."""
    model = load_pretrained(name, pretrained)
    torch.manual_seed(seed)
    head = replace_head(model, num_classes, dropout)
    freeze_all_but(model, head)
    return model, head


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the whole trained classifier, as torch modules in eval mode, from its checkpoint (e.g. one fetched
    from the model registry: docs/sharing.md); failures name the file."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if ckpt["model_name"] not in backbone_names():
        raise ModelError(f"{path} holds a {ckpt['model_name']!r} model, which this torchvision does not have; "
                         "install the torchvision the project pins, or run `dvc repro train`")
    model = build_backbone(ckpt["model_name"])
    replace_head(model, len(ckpt["class_names"]), ckpt["dropout"])
    try:
        model.load_state_dict({k: torch.tensor(v) for k, v in ckpt["state_dict"].items()}, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path} does not match its own backbone {ckpt['model_name']!r} and "
                         f"{len(ckpt['class_names'])} classes ({str(exc).splitlines()[0]}); "
                         "run `dvc repro train`") from None
    return model.eval(), ckpt
