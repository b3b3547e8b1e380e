"""The dataset spec: a plain, torch-free index of the data (classes, samples, counts).

Written by `prepare`, read by every later stage. It holds nothing a later stage chooses (batch
size, seed, transform), so changing those never rescans the dataset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from foodvision.errors import FoodVisionError

SPLITS = ("train", "test")
# torchvision.datasets.folder.IMG_EXTENSIONS, the formats ImageFolder accepts (copied, not imported:
# the stages that use them stay free of torch, which takes seconds to import)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(FoodVisionError):
    pass


def load_spec(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} not found: run `dvc repro prepare` first") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}); run `dvc repro prepare`") from None


def load_transform(path: Path) -> dict[str, Any]:
    """The eval transform the pretrained weights expect, as the `pretrained` stage recorded it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); run `dvc repro pretrained`") from None
