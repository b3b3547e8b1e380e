"""Stored features: one `.npy` per split (float32, N x D, the spec's sample order) plus `index.json`.

Written as a stream and read back by row with `os.preadv`, never memory-mapped or loaded whole, so
neither `featurize` nor `train` nor `evaluate` holds more than a batch: their memory does not grow
with the number of images (mapped file pages would count in a process's RSS; page-cache reads do not).
NumPy only: `evaluate` and `export` read rows without importing torch; `train` wraps them for its DataLoader.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foodvision.core.errors import DatasetError
from foodvision.core.files import read_json, write_json

INDEX = "index.json"
DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class SplitIndex:
    """One split's images, in the order of its feature rows: names in the dataset zip, labels, locations."""

    paths: list[str]
    labels: list[int]
    at: list[list[int] | None]  # [offset, size, crc] per image, as prepare recorded it

    def location(self, row: int) -> tuple[int, int, int] | None:
        """Where `row`'s image lies in the zip (`store.Location`); None in an index older than locations."""
        where = self.at[row] if row < len(self.at) else None
        return None if where is None else (where[0], where[1], where[2])

    def samples(self, rows: list[int] | None = None) -> list[dict[str, Any]]:
        """The split's images (all, or the given rows) as `data.ImageSamples` takes them."""
        picked = range(len(self.paths)) if rows is None else rows
        return [{"path": self.paths[i], "label": self.labels[i]} for i in picked]


@dataclass(frozen=True)
class FeatureIndex:
    """What `featurize` recorded beside the feature files (`index.json`): read and written only here."""

    model: str  # model.name of the backbone that made the features
    head: str  # the name of its classifier head, replaced by ours (`classifier`, `fc`, `heads`)
    feature_dim: int  # features per image: the head's input width
    backbone_params: int
    classes: list[str]
    root: str  # the dataset zip the paths are members of
    precision: str | None  # featurize.precision; None in an index older than the param
    engine: str  # what ran the backbone (`backbone.pick_engine`); torch in an index older than the param
    splits: dict[str, SplitIndex]
    skipped_corrupt: list[str]

    def split(self, name: str) -> SplitIndex:
        return self.splits[name]


def split_file(features_dir: Path, split: str) -> Path:
    return Path(features_dir) / f"{split}.npy"


def load_index(features_dir: Path) -> FeatureIndex:
    """What `featurize` recorded: backbone, feature size, classes, and per split the sample paths and labels."""
    path = Path(features_dir) / INDEX
    raw = read_json(path, "featurize")
    try:
        splits = {name: SplitIndex(list(s["paths"]), list(s["labels"]), list(s.get("at") or [None] * len(s["paths"])))
                  for name, s in raw["splits"].items()}
        return FeatureIndex(raw["model"], raw["head"], raw["feature_dim"], raw["backbone_params"], raw["classes"],
                            raw["root"], raw.get("precision"), raw.get("engine", "torch"), splits,
                            raw.get("skipped_corrupt", []))
    except (KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path} lacks {exc} or is not a feature index; run `dvc repro featurize`") from None


def write_index(features_dir: Path, index: FeatureIndex) -> None:
    write_json(Path(features_dir) / INDEX, dataclasses.asdict(index))


class NpyWriter:
    """Append rows to a `.npy` whose shape is known up front; refuses to close short."""

    def __init__(self, path: Path, rows: int, cols: int) -> None:
        self.path, self.rows, self.cols, self.written = Path(path), rows, cols, 0
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        np.lib.format.write_array_header_1_0(self.file, {"descr": DTYPE.str, "fortran_order": False,
                                                         "shape": (rows, cols)})

    def write(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=DTYPE)
        if block.ndim != 2 or block.shape[1] != self.cols or self.written + len(block) > self.rows:
            raise ValueError(f"{self.path}: a block of shape {block.shape} does not fit "
                             f"({self.written} of {self.rows} rows written)")
        self.file.write(block.tobytes())
        self.written += len(block)

    def close(self) -> None:
        self.file.close()
        if self.written != self.rows:
            raise ValueError(f"{self.path}: {self.written} of {self.rows} rows written")


class FeatureFile:
    """One split's stored features and labels, read by row (`rows`) or in order, a block at a time (`batches`)."""

    def __init__(self, path: Path, labels: list[int]) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                self.offset = f.tell()
        except FileNotFoundError:
            raise DatasetError(f"{self.path} not found: run `dvc repro featurize`") from None
        except ValueError as exc:
            raise DatasetError(f"{self.path} is not a .npy file ({exc}); run `dvc repro featurize`") from None
        if fortran or dtype != DTYPE or len(shape) != 2 or shape[0] != len(labels):
            raise DatasetError(f"{self.path} holds {shape} {dtype}, not {len(labels)} rows of float32 as index.json "
                               "says; run `dvc repro featurize`")
        self.rows, self.cols = shape
        self.row_bytes = self.cols * DTYPE.itemsize
        expected = self.offset + self.rows * self.row_bytes
        if self.path.stat().st_size != expected:
            raise DatasetError(f"{self.path} is {self.path.stat().st_size} bytes, expected {expected} (truncated?); "
                               "run `dvc repro featurize`")
        self.labels = np.asarray(labels, dtype=np.int64)
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.rows

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def _read_into(self, out: np.ndarray, start: int) -> np.ndarray:
        """Rows start.. into `out` (C-contiguous, len(out) rows): straight from the kernel, no bytes object."""
        size = out.nbytes
        if os.preadv(self._open(), [memoryview(out).cast("B")], self.offset + start * self.row_bytes) != size:
            raise DatasetError(f"{self.path} ended before row {start + len(out) - 1}; run `dvc repro featurize`")
        return out

    def read_ahead(self) -> None:
        """Ask the kernel to read the whole file into its page cache (not this process's memory), in order:
        shuffled reads of a file not cached (an experiment the next day) then find their rows there instead
        of waiting for the disk row by row. Linux only; a no-op where the file is cached already."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._open(), 0, 0, os.POSIX_FADV_WILLNEED)

    def take(self, indices: list[int]) -> np.ndarray:
        """The given rows (any order), one small read each: a shuffled batch."""
        out = np.empty((len(indices), self.cols), dtype=DTYPE)
        fd, size, offset, rows = self._open(), self.row_bytes, self.offset, memoryview(out).cast("B")
        for j, i in enumerate(indices):  # `_read_into` inlined: the train loop's hot path
            if os.preadv(fd, [rows[j * size:(j + 1) * size]], offset + i * size) != size:
                raise DatasetError(f"{self.path} ended before row {i}; run `dvc repro featurize`")
        return out

    def batches(self, batch_size: int, first: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive (features, labels) blocks in the stored order from row `first`, one read each."""
        for start in range(first, self.rows, batch_size):
            count = min(batch_size, self.rows - start)
            yield self._read_into(np.empty((count, self.cols), dtype=DTYPE), start), self.labels[start:start + count]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_split(features_dir: Path, index: FeatureIndex, split: str) -> FeatureFile:
    return FeatureFile(split_file(features_dir, split), index.split(split).labels)


READ_BUDGET = 32 * 2**20  # bytes of feature rows a stage holds at once when it reads a split in order


def rows_per_read(cols: int, budget: int = READ_BUDGET) -> int:
    """Rows per block for an in-order pass (evaluate, export's checks): a fixed memory budget, whatever the
    feature width, and few enough reads that a pass over 25,000 rows costs milliseconds of overhead."""
    return max(1, budget // (cols * DTYPE.itemsize))
