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


def read_json(path: Path, stage: str) -> Any:
    """A JSON file a stage wrote; when it is missing or damaged, say which stage makes it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} not found: run `dvc repro {stage}` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); run `dvc repro {stage}`") from None


def load_spec(path: Path) -> dict[str, Any]:
    return read_json(path, "prepare")


def load_transform(path: Path) -> dict[str, Any]:
    """The eval transform the pretrained weights expect, as the `pretrained` stage recorded it."""
    return read_json(path, "pretrained")
