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
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from foodvision.spec import MAX_PIXELS


class ImageTooLarge(ValueError):
    pass


def open_rgb(path: Path, min_size: int | None = None) -> Image.Image:
    """Any image Pillow opens (RGBA, L, P, CMYK, EXIF-rotated phone photo) as upright RGB.

    With `min_size`, JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8) that keeps both sides at
    least `min_size`: a 12-megapixel phone photo decodes 8x smaller, before the transform resizes it.
    Images over MAX_PIXELS are refused before any pixel is decoded.
    """
    try:
        opened = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"its header claims over the {MAX_PIXELS:,}-pixel limit (a decompression bomb?); "
                            "not decoded") from None
    with opened as im:
        if im.width * im.height > MAX_PIXELS:
            raise ImageTooLarge(f"{im.width} x {im.height} pixels is over the {MAX_PIXELS:,}-pixel limit "
                                "(a decompression bomb?); not decoded")
        if min_size:
            im.draft("RGB", (min_size, min_size))
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            im = _to_8bit(im)
        if im.mode in ("P", "LA", "PA", "RGBA"):  # transparency goes onto white, not black
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float grayscale to 8-bit L; Pillow's own convert would clip everything above 255."""
    pixels = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16") or (im.mode == "I" and pixels.max() > 255):
        pixels = pixels / 257.0
    elif im.mode == "F" and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    return Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8), "L")


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
