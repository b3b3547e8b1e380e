"""prepare stage: scan the extracted dataset and write the spec every later stage builds from.

The spec pins the class order, every sample (relative path, label), the exact eval transform of
the chosen weights, the batch size and the seed, so train, evaluate and predict cannot disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from foodvision.atomic import write_json
from foodvision.download import SPLITS
from foodvision.errors import FoodVisionError

# torchvision.datasets.folder.IMG_EXTENSIONS, the formats ImageFolder accepts (not imported from
# there: this stage stays free of torch, which takes seconds to import)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(FoodVisionError):
    pass


def prepare(raw_dir: Path, spec_path: Path, *, transform_path: Path, batch_size: int, seed: int,
            skip_corrupt: bool = False) -> dict[str, Any]:
    """Validate `raw_dir/{train,test}/<class>/*` and write the spec JSON; return it.

    `transform_path` is the pretrained stage's record of the preprocessing its weights expect.
    """
    raw_dir = Path(raw_dir)
    try:
        transform = json.loads(Path(transform_path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {transform_path} ({exc}); run `dvc repro pretrained`") from None
    classes = _class_names(raw_dir)
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, dict[str, int]] = {}
    ignored = 0
    unreadable: list[str] = []
    for split in SPLITS:
        samples = []
        for cls in classes:
            for path in sorted((raw_dir / split / cls).rglob("*")):
                if not path.is_file():
                    continue
                if path.suffix.lower() not in IMG_EXTENSIONS:
                    ignored += 1
                    continue
                if not _readable(path):
                    unreadable.append(path.relative_to(raw_dir).as_posix())
                    continue
                samples.append({"path": path.relative_to(raw_dir).as_posix(), "label": index[cls]})
        splits[split] = samples
        counts[split] = {c: sum(s["label"] == i for s in samples) for c, i in index.items()}
    if unreadable and not skip_corrupt:
        raise DatasetError(f"{len(unreadable)} unreadable image(s) in {raw_dir}: {', '.join(unreadable[:10])}"
                           f"{' …' if len(unreadable) > 10 else ''}; replace them, or set data.skip_corrupt: true")
    empty = [f"{split}/{c}" for split in SPLITS for c, n in counts[split].items() if n == 0]
    if empty:
        raise DatasetError(f"no images in {raw_dir}/{empty[0]}; every class needs images in train and test")
    spec = {
        "root": raw_dir.as_posix(),
        "classes": classes,
        "class_to_idx": index,
        "splits": splits,
        "counts": counts,
        "ignored_files": ignored,
        "skipped_corrupt": unreadable,
        "transform": transform,
        "batch_size": batch_size,
        "seed": seed,
    }
    write_json(spec_path, spec)
    summary = ", ".join(f"{s}: {sum(counts[s].values())}" for s in SPLITS)
    print(f"wrote {spec_path}: {len(classes)} classes ({', '.join(classes)}), {summary}, "
          f"{ignored} non-image file(s) ignored, {len(unreadable)} corrupt image(s) skipped")
    return spec


def _class_names(raw_dir: Path) -> list[str]:
    found = {}
    for split in SPLITS:
        folder = raw_dir / split
        if not folder.is_dir():
            raise DatasetError(f"{folder} is missing; the dataset needs train/<class>/ and test/<class>/ folders")
        found[split] = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if found["train"] != found["test"]:
        only_train = sorted(set(found["train"]) - set(found["test"]))
        only_test = sorted(set(found["test"]) - set(found["train"]))
        raise DatasetError(f"train and test classes differ in {raw_dir} (only in train: {only_train or 'none'}, "
                           f"only in test: {only_test or 'none'}); give both splits the same class folders")
    if len(found["train"]) < 2:
        raise DatasetError(f"{raw_dir}/train has {len(found['train'])} class folder(s); a classifier needs at least 2")
    return found["train"]


def _readable(path: Path) -> bool:
    """Decode the whole image (verify() misses truncation); cheap enough for the dataset sizes here."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:  # Pillow raises many types for corrupt files
        return False
