"""The dataset spec: a plain, torch-free index of the data (classes, samples, counts).

Written by `prepare`, read by every later stage. It holds nothing a later stage chooses (batch
size, seed, transform), so changing those never rescans the dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from foodvision.errors import FoodVisionError

SPLITS = ("train", "test")
# torchvision.datasets.folder.IMG_EXTENSIONS, the formats ImageFolder accepts (copied, not imported:
# the stages that use them stay free of torch, which takes seconds to import)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Pillow's own error threshold (2 x Image.MAX_IMAGE_PIXELS), stated here so that no stage depends on a
# global another library may have changed: a 108-megapixel phone photo passes, a 24 KB PNG claiming
# 20000 x 10000 pixels (a decompression bomb) does not.
MAX_PIXELS = 178_956_970


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


def dataset_root(raw_dir: Path) -> Path:
    """Step into wrapper folders (`food-101/`, `pizza_steak_sushi/`): a folder holding one folder and no image."""
    if not raw_dir.is_dir():
        raise DatasetError(f"{raw_dir} is missing: run `dvc repro download` first")
    root = raw_dir
    while True:
        entries = [e for e in root.iterdir() if not hidden(e.name)]
        dirs = [e for e in entries if e.is_dir()]
        has_images = any(is_image_name(e.name) for e in entries if e.is_file())
        if len(dirs) != 1 or has_images or _is_layout(root):
            return root
        root = dirs[0]


def _is_layout(folder: Path) -> bool:
    return all((folder / s).is_dir() for s in SPLITS) or (folder / "images").is_dir() and (folder / "meta").is_dir()


def hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    """An image extension and not hidden (`._IMG.jpg` is macOS metadata, not a photo)."""
    return not hidden(name) and Path(name).suffix.lower() in IMG_EXTENSIONS


def content_sha256(folder: Path, known: Mapping[str, str] | None = None) -> str:
    """A digest of the dataset by content: its images' paths (from the dataset root) and bytes.

    Re-zipping the same images, or wrapping them in another top folder, keeps it; changing, adding or
    removing an image changes it. It is the sha256 of the lines `sha256sum` prints for the images,
    `<sha256>  <path from the dataset root>`, sorted by path. `known` (POSIX path from `folder` ->
    sha256) spares reading files again whose hash is already known (download hashes while extracting).
    """
    folder = Path(folder)
    known = known or {}
    root = dataset_root(folder)
    lines = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not hidden(d)]
        for name in filenames:
            if is_image_name(name):
                path = Path(dirpath) / name
                sha = known.get(path.relative_to(folder).as_posix()) or file_sha256(path)
                lines.append(f"{sha}  {path.relative_to(root).as_posix()}\n")
    lines.sort(key=lambda line: line[66:].encode("utf-8"))
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
