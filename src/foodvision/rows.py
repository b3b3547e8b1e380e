"""Feature rows for a list of images, from the cache where it has them, computed where it does not.

`featurize` makes every split's rows here, and the backbone's check makes its two sides here (torch's and
ONNX Runtime's rows of the test images), so a data change decodes and runs only the images that changed,
for the features and for the check alike. Under torchrun the images to compute are shared among the ranks
in whole batches and rank 0 assembles the file. Rows are written in the images' order, whichever way
they came, and are the same bytes either way: an image's row depends neither on its batch (ONNX Runtime,
OpenVINO; torch pads short batches, `backbone.torch_engine`) nor on the thread or process count.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed
from PIL import Image

from foodvision import distributed
from foodvision.backbone import Engine, image_features
from foodvision.core.device import cpu_count, decode_workers
from foodvision.data import EvalTransform, ImageSamples, make_loader
from foodvision.feature_cache import FeatureCache, Found, Location
from foodvision.features import FeatureFile, NpyWriter
from foodvision.images import open_rgb
from foodvision.store import ImageStore

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
CHUNK = 4096  # rows assembled at a time: memory flat in the number of images


class _Decoded(ImageSamples):
    """(image tensor, ok): an image whose pixel data will not decode yields zeros and ok=False."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        rel, _ = self.samples[i]
        try:
            return self.transform(open_rgb(self.store.open(rel), self.min_size)), True
        except DECODE_ERRORS:
            crop = self.transform.crop_size
            return torch.zeros(3, crop, crop), False


@dataclass(frozen=True)
class Source:
    """Where rows come from: a cache of one recipe (or none) and the engine that computes the rest, made on
    first use (a run whose rows are all cached exports and loads nothing). Under torchrun `engine` is
    called by every rank at once (its graph may be broadcast)."""

    cache: FeatureCache | None
    engine: Callable[[], Engine]
    device: torch.device


@dataclass
class Made:
    """How a file's rows were made, and the images that did not decode (positions in its list)."""

    cached: int = 0
    computed: int = 0
    bad: list[int] = field(default_factory=list)


def image_keys(root: Path, samples: list[dict[str, Any]]) -> list[bytes]:
    """Each image's sha256 as the spec carries it (from the store); hashed here only for a spec without it."""
    store, keys = ImageStore(root), []
    for s in samples:
        digest = s.get("sha256")
        if digest is None:
            digest = hashlib.sha256(store.read(s["path"])).hexdigest()
        keys.append(bytes.fromhex(digest))
    return keys


def make_rows(source: Source, root: Path, samples: list[dict[str, Any]], keys: list[bytes], dest: Path, *,
              transform: dict[str, Any], batch_size: int, cols: int, desc: str, work: Path,
              me: distributed.Rank | None = None) -> Made:
    """Write the rows of `samples` (with their `keys`) to `dest`, a .npy in their order (rank 0's; every rank
    computes its share, in `work`, a folder every rank sees); return how they were made. Rows of images that
    do not decode are zeros."""
    me = me or distributed.Rank()
    where = _plan(source.cache, keys, me)
    todo, first = _to_compute(where, keys)
    made = Made(cached=sum(w is not None for w in where), computed=len(todo))
    computed = work / f"{dest.stem}.computed.npy"
    bad_todo = _compute(source, root, [samples[i] for i in todo], [keys[i] for i in todo], computed, transform,
                        batch_size, cols, desc, me) if todo else []
    if me.leader:
        bad_keys = {keys[todo[j]] for j in bad_todo}
        made.bad = [i for i, k in enumerate(keys) if where[i] is None and k in bad_keys]
        _assemble(dest, where, keys, first, computed if todo else None, source.cache, cols)
        computed.unlink(missing_ok=True)
    return made


def _plan(cache: FeatureCache | None, keys: list[bytes], me: distributed.Rank) -> list[Location | None]:
    """Rank 0 looks up every key (verifying each row it finds) and every rank gets the same answer: a shard
    another process adds meanwhile must not make the ranks disagree."""
    found = cache.find(keys) if cache is not None and me.leader else Found([None] * len(keys))
    for problem in found.damaged:
        print(f"featurize cache: {problem}; recomputing what it held")
    if me.world > 1:
        shared = [found.where]
        torch.distributed.broadcast_object_list(shared, src=0)
        return shared[0]
    return found.where


def _to_compute(where: list[Location | None], keys: list[bytes]) -> tuple[list[int], dict[bytes, int]]:
    """The positions to compute (an image that appears twice is computed once) and, per key, its place there."""
    todo, first = [], {}
    for i, w in enumerate(where):
        if w is None and keys[i] not in first:
            first[keys[i]] = len(todo)
            todo.append(i)
    return todo, first


def _compute(source: Source, root: Path, samples: list[dict[str, Any]], keys: list[bytes], dest: Path,
             transform: dict[str, Any], batch_size: int, cols: int, desc: str, me: distributed.Rank) -> list[int]:
    """This rank's whole batches of `samples` through the engine, into part files rank 0 joins into `dest`;
    each rank adds the rows that decoded to the cache. Returns the positions (in `samples`) that did not decode."""
    engine = source.engine()
    lo, hi = me.slice(len(samples), batch_size)
    part = dest if me.world == 1 else _part(dest, me.rank)
    threads = max(1, cpu_count() // me.local_world)
    dataset = _Decoded(root, samples[lo:hi], EvalTransform(transform), transform["resize_size"])
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0,
                         workers=decode_workers(source.device.type, ranks_here=me.local_world))
    writer = NpyWriter(part, hi - lo, cols)
    keep = source.cache.writer() if source.cache is not None else None
    bad, seen, start = [], 0, time.perf_counter()
    for _, features, ok in image_features(loader, engine, desc, threads):
        writer.write(features)
        good = ok.numpy()
        bad += [lo + seen + j for j in np.flatnonzero(~good)]
        if keep is not None:
            keep.add([keys[lo + seen + j] for j in np.flatnonzero(good)], features[good])
        seen += len(ok)
    writer.close()
    seconds = time.perf_counter() - start
    who = f"rank {me.rank}/{me.world}, " if me.world > 1 else ""
    how = f"{loader.num_workers} decode worker(s)" if loader.num_workers else f"decoding on {threads} thread(s)"
    print(f"{desc}: {hi - lo} images in {seconds:.1f} s ({(hi - lo) / max(seconds, 1e-9):.1f} images/s, {who}{how}, "
          f"{source.device})")
    if keep is not None:
        try:
            keep.close()
        except OSError as exc:  # a full or read-only cache folder costs time next run, never this one
            print(f"featurize cache: could not store rows in {source.cache.folder} ({exc}); continuing without")
    if me.world > 1:
        gathered: list[list[int]] = [[] for _ in range(me.world)]
        torch.distributed.all_gather_object(gathered, bad)
        bad = sorted(i for rank_bad in gathered for i in rank_bad)
        torch.distributed.barrier()  # every part is complete
        if me.leader:
            _concatenate([_part(dest, r) for r in range(me.world)], dest, len(samples), cols, batch_size)
    return bad


def _part(dest: Path, rank: int) -> Path:
    return dest.with_name(f"{dest.stem}.{rank}.npy")


def _assemble(dest: Path, where: list[Location | None], keys: list[bytes], first: dict[bytes, int],
              computed: Path | None, cache: FeatureCache | None, cols: int) -> None:
    """`dest`'s rows in order: each from the cache or from the computed ones, a chunk at a time."""
    fresh = np.load(computed, mmap_mode="r") if computed is not None else None
    writer = NpyWriter(dest, len(keys), cols)
    for start in range(0, len(keys), CHUNK):
        block = np.empty((min(CHUNK, len(keys) - start), cols), np.float32)
        hit = [(j, w) for j, w in enumerate(where[start:start + len(block)]) if w is not None]
        if hit:
            block[[j for j, _ in hit]] = cache.rows([w for _, w in hit])
        for j in range(len(block)):
            if where[start + j] is None:
                block[j] = fresh[first[keys[start + j]]]
        writer.write(block)
    writer.close()
    del fresh


def _concatenate(parts: list[Path], dest: Path, rows: int, cols: int, unit: int, chunk: int = CHUNK) -> None:
    """The ranks' part files, in rank order, into one .npy: streamed, never whole in memory."""
    writer = NpyWriter(dest, rows, cols)
    for rank, part in enumerate(parts):
        lo, hi = distributed.Rank(rank, len(parts)).slice(rows, unit)
        source = FeatureFile(part, [0] * (hi - lo))
        for feats, _ in source.batches(chunk):
            writer.write(feats)
        source.close()
        part.unlink()
    writer.close()


def report(made: dict[str, Made]) -> str:
    """One line: how many rows came from the cache and how many were computed, per file."""
    parts = [f"{name} {m.cached:,} cached + {m.computed:,} computed" for name, m in made.items()]
    return "featurize rows: " + "; ".join(parts)
