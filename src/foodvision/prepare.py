"""prepare stage: find the dataset's layout and classes and write the spec every later stage builds from.

Three layouts are recognised in the dataset zip `download` stored, at its top or under wrapper folders:
- `train/<class>/*` and `test/<class>/*` (the article's archive);
- Food-101's own: `images/<class>/*.jpg` with `meta/train.txt` and `meta/test.txt` (`<class>/<id>` lines);
- plain `<class>/*` folders, split per class with `data.test_fraction` (stratified, seeded).

Images are checked at header level only (a thread pool; no pixel is decoded here): files that are not
images fail or are skipped now, and the rare image whose pixel data is corrupt is caught by `featurize`,
which decodes every image anyway.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from foodvision.core.device import io_threads
from foodvision.core.errors import DatasetError, listed
from foodvision.core.files import write_json
from foodvision.spec import MAX_PIXELS, SPLITS, dataset_root, hidden, is_image_name
from foodvision.store import ImageStore, StoreError, Tree, join

CHECK_CHUNK = 256  # files per header-check task


def prepare(dataset_zip: Path, spec_path: Path, *, classes: tuple[str, ...] | None, test_fraction: float, seed: int,
            skip_corrupt: bool) -> dict[str, Any]:
    """Index the dataset zip `dataset_zip` (`download`'s output) into the spec JSON at `spec_path`; return the spec.

    `classes` keeps a subset (in the given names' sorted order); `test_fraction` and `seed` only
    matter for plain class folders, which have no split of their own.
    """
    dataset_zip = Path(dataset_zip)
    store = ImageStore(dataset_zip)
    tree = Tree(store.names())
    root = dataset_root(tree)
    layout, candidates = _find_samples(store, tree, root, test_fraction, seed)
    found = sorted({cls for split in SPLITS for _, cls in candidates[split]})
    names = _select(found, classes, dataset_zip)
    index = {c: i for i, c in enumerate(names)}
    images: dict[str, list[tuple[str, str]]] = {}
    ignored = 0
    for split in SPLITS:
        kept = [(rel, c) for rel, c in candidates.pop(split) if c in index]
        images[split] = [(rel, c) for rel, c in kept if is_image_name(rel.rpartition("/")[2])]
        ignored += len(kept) - len(images[split])
    unreadable = _unreadable(store, [rel for split in SPLITS for rel, _ in images[split]])
    if unreadable and not skip_corrupt:
        raise DatasetError(f"{len(unreadable)} unreadable image(s) in {dataset_zip}: {listed(unreadable)}; "
                           "replace them, or set data.skip_corrupt: true")
    bad = set(unreadable)
    where = store.locations()  # stages that read a few images (export, predict) read them at these
    sha256 = store.sha256s()  # featurize's cache finds rows by them
    splits = {split: [{"path": rel, "label": index[c], "at": list(where[rel]), "sha256": sha256.get(rel)}
                      for rel, c in images.pop(split) if rel not in bad] for split in SPLITS}
    counts = {split: {c: 0 for c in names} for split in SPLITS}
    for split in SPLITS:
        for sample in splits[split]:
            counts[split][names[sample["label"]]] += 1
    empty = [f"{split}/{c}" for split in SPLITS for c, n in counts[split].items() if n == 0]
    if empty:
        raise DatasetError(f"no images for {empty[0]} in {dataset_zip} ({layout} layout); every class needs images "
                           "in train and test (with plain class folders: at least 2 images per class)")
    hidden_dirs = _hidden_folders(tree, root, layout)
    spec = {"root": dataset_zip.as_posix(), "layout": layout, "classes": names, "splits": splits, "counts": counts,
            "ignored_files": ignored, "ignored_folders": hidden_dirs, "skipped_corrupt": unreadable}
    write_json(spec_path, spec)
    summary = ", ".join(f"{s}: {len(splits[s])}" for s in SPLITS)
    print(f"wrote {spec_path}: {layout} layout, {len(names)} classes ({listed(names)}), {summary}, "
          f"{ignored} non-image file(s) ignored, {len(unreadable)} unreadable image(s) skipped"
          + (f", hidden folder(s) not taken as classes: {listed(hidden_dirs)}" if hidden_dirs else ""))
    return spec


def _hidden_folders(tree: Tree, root: str, layout: str) -> list[str]:
    """Folders where classes live whose names start with `.`: not classes, but said, not silently dropped."""
    parents = {"train/test": [join(root, s) for s in SPLITS], "food-101": [join(root, "images")]}.get(layout, [root])
    return sorted({name for parent in parents for name in tree.subdirs(parent) if hidden(name)})


def _class_dirs(tree: Tree, folder: str) -> list[str]:
    """The class folders' names in `folder`, sorted."""
    return [name for name in tree.subdirs(folder) if not hidden(name)]


def _find_samples(store: ImageStore, tree: Tree, root: str, test_fraction: float,
                  seed: int) -> tuple[str, dict[str, list[tuple[str, str]]]]:
    """(layout name, split -> [(file name in the store, class name)]) before any filtering."""
    shown = f"{store.path}:{root}/" if root else str(store.path)
    if all(tree.is_dir(join(root, s)) for s in SPLITS):
        names = {s: _class_dirs(tree, join(root, s)) for s in SPLITS}
        if names["train"] != names["test"]:
            only_train = sorted(set(names["train"]) - set(names["test"]))
            only_test = sorted(set(names["test"]) - set(names["train"]))
            raise DatasetError(f"train and test classes differ in {shown} (only in train: {only_train or 'none'}, "
                               f"only in test: {only_test or 'none'}); give both splits the same class folders")
        return "train/test", {s: [(f, d) for d in names[s] for f in tree.files_below(join(root, s, d))]
                              for s in SPLITS}
    if tree.is_dir(join(root, "images")) and all(tree.is_file(join(root, "meta", f"{s}.txt")) for s in SPLITS):
        return "food-101", {s: list(_food101_split(store, root, s)) for s in SPLITS}
    dirs = _class_dirs(tree, root)
    if len(dirs) < 2:
        raise DatasetError(f"{shown} holds {len(dirs)} class folder(s) and no train/ and test/ or images/ and meta/; "
                           "expected train/<class>/*, Food-101's images/ + meta/, or one folder per class")
    return "class folders", _split_folders(tree, root, dirs, test_fraction, seed)


def _food101_split(store: ImageStore, root: str, split: str) -> Iterable[tuple[str, str]]:
    """`meta/<split>.txt` lines are `<class>/<id>`; the image is `images/<class>/<id>.jpg`."""
    listing = join(root, "meta", f"{split}.txt")
    for n, line in enumerate(store.read(listing).decode("utf-8").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        cls, sep, _ = line.partition("/")
        if not sep or ".." in line.split("/"):
            raise DatasetError(f"{store.path}:{listing}:{n}: expected `<class>/<image id>`, got {line[:80]!r}")
        yield join(root, "images", f"{line}.jpg"), cls


def _split_folders(tree: Tree, root: str, dirs: list[str], test_fraction: float,
                   seed: int) -> dict[str, list[tuple[str, str]]]:
    """Per class, a seeded shuffle; the first `round(n * test_fraction)` files (at least one) are test."""
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for d in dirs:
        files = [f for f in tree.files_below(join(root, d)) if is_image_name(f.rpartition("/")[2])]
        random.Random(f"{seed}/{d}").shuffle(files)
        n_test = max(1, round(len(files) * test_fraction)) if len(files) >= 2 else 0
        out["test"] += [(f, d) for f in sorted(files[:n_test])]
        out["train"] += [(f, d) for f in sorted(files[n_test:])]
    return out


def _select(found: list[str], wanted: tuple[str, ...] | None, dataset_zip: Path) -> list[str]:
    if wanted is None:
        names = found
    else:
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise DatasetError(f"data.classes names {listed(missing)}, not in {dataset_zip}; "
                               f"its classes are {listed(found)}")
        names = sorted(set(wanted))
    if len(names) < 2:
        raise DatasetError(f"{dataset_zip} has {len(names)} class(es) to train on; a classifier needs at least 2")
    return names


def _unreadable(store: ImageStore, rels: list[str]) -> list[str]:
    """The files among `rels` whose header Pillow cannot read, checked by a thread pool.

    Chunks of files, not one task per file: a future per image would cost more memory than the index.
    """
    chunks = [rels[i:i + CHECK_CHUNK] for i in range(0, len(rels), CHECK_CHUNK)]

    def check(chunk: list[str]) -> list[str]:
        return [rel for rel in chunk if not _has_image_header(store, rel)]

    with ThreadPoolExecutor(max_workers=io_threads()) as pool:
        return [rel for found in pool.map(check, chunks) for rel in found]


def _has_image_header(store: ImageStore, name: str) -> bool:
    """Pillow recognises the file and reads a plausible size: a header check, no pixel decoded."""
    try:
        with store.open(name) as f, Image.open(f) as im:  # a seekable member: only the header is read
            width, height = im.size
        return 0 < width * height <= MAX_PIXELS
    except (StoreError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # StoreError: not in the zip
        return False
