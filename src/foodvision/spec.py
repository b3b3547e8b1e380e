"""The dataset spec: a plain, torch-free index of the data (classes, samples, counts).

Written by `prepare`, read by every later stage. It holds nothing a later stage chooses (batch
size, seed, transform), so changing those never rescans the dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from foodvision.core.files import read_json
from foodvision.store import Tree, join

SPLITS = ("train", "test")
# torchvision.datasets.folder.IMG_EXTENSIONS, the formats ImageFolder accepts (copied, not imported:
# the stages that use them stay free of torch, which takes seconds to import)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Pillow's own error threshold (2 x Image.MAX_IMAGE_PIXELS), stated here so that no stage depends on a
# global another library may have changed: a 108-megapixel phone photo passes, a 24 KB PNG claiming
# 20000 x 10000 pixels (a decompression bomb) does not.
MAX_PIXELS = 178_956_970


def load_spec(path: Path) -> dict[str, Any]:
    return read_json(path, "prepare")


def load_transform(path: Path) -> dict[str, Any]:
    """The eval transform the pretrained weights expect, as the `pretrained` stage recorded it."""
    return read_json(path, "pretrained")


def dataset_root(tree: Tree) -> str:
    """Step into wrapper folders (`food-101/`, `pizza_steak_sushi/`): a folder holding one folder and no image."""
    root = ""
    while True:
        entries = [e for e in tree.entries(root) if not hidden(e)]
        dirs = [e for e in entries if tree.is_dir(join(root, e))]
        has_images = any(is_image_name(e) for e in entries if tree.is_file(join(root, e)))
        if len(dirs) != 1 or has_images or _is_layout(tree, root):
            return root
        root = join(root, dirs[0])


def _is_layout(tree: Tree, folder: str) -> bool:
    return (all(tree.is_dir(join(folder, s)) for s in SPLITS)
            or tree.is_dir(join(folder, "images")) and tree.is_dir(join(folder, "meta")))


def hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    """An image extension and not hidden (`._IMG.jpg` is macOS metadata, not a photo)."""
    return not hidden(name) and Path(name).suffix.lower() in IMG_EXTENSIONS


def content_sha256(hashes: Mapping[str, str]) -> str:
    """A digest of the dataset by content: its images' paths (from the dataset root) and bytes.

    `hashes` maps every file's name in the archive to the sha256 of its bytes. Re-zipping the same
    images, or wrapping them in another top folder, keeps the digest; changing, adding or removing an
    image changes it. It is the sha256 of the lines `sha256sum` prints for the images, `<sha256>  <path
    from the dataset root>`, sorted by path, so it can be checked on an extracted copy with shell tools.
    """
    tree = Tree(hashes)
    root = dataset_root(tree)
    prefix = f"{root}/" if root else ""
    lines = [f"{hashes[name]}  {name[len(prefix):]}\n" for name in tree.files_below(root)
             if is_image_name(name.rpartition("/")[2]) and not any(hidden(p) for p in name.split("/"))]
    lines.sort(key=lambda line: line[66:].encode("utf-8"))
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
