"""Images in, tensors out: upright RGB decoding, the weights' eval transform, seeded loaders."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from foodvision.images import open_rgb


def build_transform(transform: dict[str, Any]) -> ImageClassification:
    """Exactly the preset `weights.transforms()` returns, rebuilt from transform.json's plain data."""
    t = transform
    return ImageClassification(
        crop_size=t["crop_size"],
        resize_size=t["resize_size"],
        mean=tuple(t["mean"]),
        std=tuple(t["std"]),
        interpolation=InterpolationMode(t["interpolation"]),
        antialias=t["antialias"],
    )


def augment_transform(transform: dict[str, Any]) -> T.Compose:
    """torchvision's reference training preset: random resized crop and flip, then normalise."""
    t = transform
    return T.Compose([
        T.RandomResizedCrop(t["crop_size"], interpolation=InterpolationMode(t["interpolation"]), antialias=True),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
        T.ConvertImageDtype(torch.float32),
        T.Normalize(mean=t["mean"], std=t["std"]),
    ])


class ImageSamples(Dataset):
    """(image tensor, label) for the spec's samples (`{"path": relative to root, "label": int}`), in order."""

    def __init__(self, root: Path, samples: list[dict[str, Any]], transform: Callable, min_size: int) -> None:
        self.root = Path(root)
        self.samples = [(s["path"], s["label"]) for s in samples]
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        return self.transform(open_rgb(self.root / rel, self.min_size)), label


def loader_workers(device: torch.device) -> int:
    """On CPU, torch's kernels already use every core: decoding in workers would oversubscribe them."""
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # torch seeds each worker from the loader's generator
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int = 0) -> DataLoader:
    """Shuffling comes from its own seeded generator, so the order is reproducible."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=workers,
                      worker_init_fn=_seed_worker, pin_memory=workers > 0 and torch.cuda.is_available(),
                      persistent_workers=False)
