"""Images in, tensors out: the weights' eval transform and the training preset, datasets over the zip, seeded
loaders and a decoding thread. Decoding itself (upright RGB, bounded pixels) is `images.py`'s."""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from foodvision.images import eval_array, open_rgb
from foodvision.store import ImageStore

if TYPE_CHECKING:
    from foodvision.features import FeatureIndex

Item = TypeVar("Item")


class EvalTransform:
    """The weights' eval transform on a PIL image, as a tensor: `images.eval_array`, the same bytes as
    torchvision's preset (`build_transform`) in less time. Picklable, for DataLoader workers."""

    def __init__(self, transform: dict[str, Any]) -> None:
        self.transform = transform
        self.crop_size = transform["crop_size"]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(eval_array(image, self.transform))


def build_transform(transform: dict[str, Any]) -> ImageClassification:
    """Exactly the preset `weights.transforms()` returns, rebuilt from transform.json's plain data: the
    reference `EvalTransform` is held to."""
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
    """(image tensor, label) for the spec's samples (`{"path": name in the dataset zip, "label": int}`), in order."""

    def __init__(self, root: Path, samples: list[dict[str, Any]], transform: Callable, min_size: int) -> None:
        self.store = ImageStore(root)
        self.samples = [(s["path"], s["label"]) for s in samples]
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        return self.transform(open_rgb(self.store.open(rel), self.min_size)), label


def split_images(index: FeatureIndex, split: str, transform: Callable, min_size: int,
                 rows: list[int] | None = None) -> ImageSamples:
    """A split's images (all, or the given rows of its feature file) from featurize's index."""
    return ImageSamples(Path(index.root), index.split(split).samples(rows), transform, min_size)


def prefetched(batches: Iterable[Item], depth: int = 2) -> Iterator[Item]:
    """Yield from `batches`, produced by a thread that runs up to `depth` batches ahead.

    PIL's decoding and torch's kernels both release the GIL, so the next batch decodes while the
    backbone runs on this one. Errors in the thread are raised here; stopping early stops the thread.
    """
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put((batch, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((done, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            slots.put((done, exc))

    thread = threading.Thread(target=produce, name="featurize-decode", daemon=True)
    thread.start()
    try:
        while True:
            batch, error = slots.get()
            if error is not None:
                raise error
            if batch is done:
                return
            yield batch
    finally:
        stop.set()
        thread.join(timeout=5)


def threaded(loader: DataLoader, threads: int) -> Iterator[Any]:
    """`loader`'s batches (a loader without workers), each batch's images decoded on `threads` threads.

    Pillow's decoding and resizing release the GIL, so on a CPU that also runs the backbone, decoding a
    batch on every core and then running it costs what the two cost (docs/scale.md): one decoding thread
    beside the backbone's threads left the cores oversubscribed and the pass slower."""
    with ThreadPoolExecutor(threads) as pool:
        for indices in loader.batch_sampler:
            yield loader.collate_fn(list(pool.map(loader.dataset.__getitem__, indices)))


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
