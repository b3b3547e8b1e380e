"""A fine-tuned checkpoint's own backbone, for the stages after `train`: `evaluate` scores it on the test images
and `export` exports and checks it. The stored features are the pretrained backbone's, so they no longer apply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from foodvision.core.device import decode_workers
from foodvision.data import ImageSamples, build_transform, image_samples, make_loader, prefetched
from foodvision.model import for_inference, load_checkpoint


def checkpoint_body(model_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A checkpoint's own backbone without its head, BatchNorm folded as `featurize` runs the pretrained one."""
    model, ckpt = load_checkpoint(model_path)
    model.set_submodule(ckpt["head"], nn.Identity())
    return for_inference(model), ckpt


def image_features(body: nn.Module, index: dict[str, Any], split: str, transform: dict[str, Any],
                   device: torch.device, batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of a split's images through `body`, in the index's order, a batch at a time."""
    samples = image_samples(index, split)
    dataset = ImageSamples(Path(index["root"]), samples, build_transform(transform), transform["resize_size"])
    workers = decode_workers(device.type)
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, workers=workers)
    body = body.to(device)
    with torch.inference_mode():
        for images, labels in (loader if workers else prefetched(loader)):
            images = images.to(device, memory_format=torch.channels_last)
            yield body(images).float().cpu().numpy(), labels.numpy()
