"""Images in, tensors out: upright RGB decoding, the spec's eval transform, seeded loaders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from foodvision.errors import FoodVisionError

# torchvision.datasets.folder.IMG_EXTENSIONS, the formats ImageFolder accepts
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def open_rgb(path: Path) -> Image.Image:
    """Any image Pillow opens (RGBA, L, P, CMYK, EXIF-rotated phone photo) as upright RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("P", "LA", "PA") or (im.mode == "RGBA"):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")


def build_transform(spec_transform: dict[str, Any]) -> ImageClassification:
    """Exactly the preset `weights.transforms()` returns, rebuilt from the spec's plain data."""
    t = spec_transform
    return ImageClassification(
        crop_size=t["crop_size"],
        resize_size=t["resize_size"],
        mean=tuple(t["mean"]),
        std=tuple(t["std"]),
        interpolation=InterpolationMode(t["interpolation"]),
        antialias=t["antialias"],
    )


def load_spec(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FoodVisionError(f"{path} not found: run `dvc repro prepare` first") from None
    except json.JSONDecodeError as exc:
        raise FoodVisionError(f"{path} is not valid JSON ({exc}); run `dvc repro prepare`") from None


class SpecDataset(Dataset):
    """One split of the spec: (image tensor, label) pairs in the spec's order."""

    def __init__(self, spec: dict[str, Any], split: str) -> None:
        self.root = Path(spec["root"])
        self.samples = [(s["path"], s["label"]) for s in spec["splits"][split]]
        self.transform = build_transform(spec["transform"])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        return self.transform(open_rgb(self.root / rel)), label


def make_loader(spec: dict[str, Any], split: str, *, shuffle: bool, seed: int) -> DataLoader:
    """Batches of the spec's size; shuffling comes from its own seeded generator, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(SpecDataset(spec, split), batch_size=spec["batch_size"], shuffle=shuffle, generator=generator)
