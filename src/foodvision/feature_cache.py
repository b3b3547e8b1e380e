"""featurize's cache: each image's feature row kept by content, so a changed dataset costs what changed.

A row is found by the image's sha256 (the store records it, the spec carries it) inside a folder named by
the recipe: a digest of everything that decides the row (backbone, pretrained weights' sha256, eval
transform, precision, engine and the versions of what runs it and decodes). Rows live in shard files that
are written whole under a temporary name, renamed into place and never changed after, so:

- readers take no lock, and two writers at once (queued experiments, torchrun ranks, two clones) never
  corrupt each other: an image computed by both is stored twice, harmlessly;
- a reader keeps the shards it uses open, so another process's eviction cannot pull them away (POSIX);
- each row carries a digest of the recipe, its key and its bytes: a damaged, truncated, misplaced or
  other-width entry is reported in one line and recomputed, never used.

The cache is bounded (`featurize.cache_gb`): past the bound, the shards used least recently go first.
Deleting the folder changes only time. docs/data.md has the curating loop it serves.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"FVCACHE1"
HEADER = struct.Struct("<8s32sII")  # magic, recipe digest, columns, rows
KEY, DIGEST, ALIGN = 32, 16, 64  # bytes of an image's sha256, of a row's digest; rows start aligned
SHARD_ROWS = 4096  # rows per shard: the unit of eviction (20 MB at 1,280 columns)
GRAPHS = "graphs"  # the folder of backbones' ONNX graphs, beside the recipes' folders
STALE_TEMP_S = 24 * 3600  # a temporary shard this old belongs to a writer that died
Location = tuple[int, int]  # (shard, row in it)


def default_dir() -> Path:
    """The user's cache folder, shared by every clone, queued experiment and rank on this machine."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "foodvision" / "features"


def recipe_digest(parts: dict[str, object]) -> str:
    """The recipe folder's name: a digest of what decides a row (the caller lists it)."""
    text = "\n".join(f"{k}={parts[k]!r}" for k in sorted(parts))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _row_digest(recipe: bytes, key: bytes, row: np.ndarray) -> bytes:
    return hashlib.blake2b(recipe + key + row.tobytes(), digest_size=DIGEST).digest()


def _rows_offset(rows: int) -> int:
    start = HEADER.size + rows * (KEY + DIGEST)
    return -(-start // ALIGN) * ALIGN


@dataclass
class Found:
    """What a lookup found: a verified location for each position with a usable row (None: compute it), and
    what was wrong with the entries that could not be used."""

    where: list[Location | None]
    damaged: list[str] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return sum(w is not None for w in self.where)


class FeatureCache:
    """The shards of one recipe under `root`, for rows of `cols` float32 values."""

    def __init__(self, root: Path, recipe: str, cols: int) -> None:
        self.root, self.cols = Path(root), cols
        self.recipe = bytes.fromhex(recipe)
        self.folder = self.root / recipe
        self._shards: list[Path] = []
        self._rows: list[np.ndarray] = []
        self._digests: list[bytes] = []
        self._index: dict[bytes, Location] = {}
        self._problems: list[str] = []
        self._load()

    def _load(self) -> None:
        """Every complete shard's keys (rows are mapped, read only when used); bad shards are named and removed."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.shard")):
            try:
                self._open(path)
            except FileNotFoundError:
                continue  # evicted by another process since the listing
            except (OSError, ValueError) as exc:
                self._problems.append(f"{path.name}: {exc}")
                path.unlink(missing_ok=True)

    def _open(self, path: Path) -> None:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                raise ValueError("truncated header")
            magic, recipe, cols, rows = HEADER.unpack(head)
            if magic != MAGIC:
                raise ValueError("not a cache shard")
            if recipe != self.recipe:
                raise ValueError("another recipe's shard")
            if cols != self.cols:
                raise ValueError(f"rows of {cols} values, not {self.cols}")
            keys_and_digests = f.read(rows * (KEY + DIGEST))
            size = os.fstat(f.fileno()).st_size
        offset = _rows_offset(rows)
        if len(keys_and_digests) != rows * (KEY + DIGEST) or size != offset + rows * cols * 4:
            raise ValueError(f"{size} bytes, not the {offset + rows * cols * 4} its header promises (truncated?)")
        number = len(self._shards)
        self._shards.append(path)
        self._rows.append(np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(rows, cols)))
        self._digests.append(keys_and_digests[rows * KEY:])
        for i in range(rows):
            self._index[keys_and_digests[i * KEY:(i + 1) * KEY]] = (number, i)

    def find(self, keys: Sequence[bytes]) -> Found:
        """Where each key's row is, each one verified against its digest (damaged ones are left to compute);
        the shards used are marked as used now, for eviction."""
        found = Found([None] * len(keys), list(self._problems))
        used = set()
        for position, key in enumerate(keys):
            where = self._index.get(key)
            if where is None:
                continue
            shard, row = where
            digest = self._digests[shard][row * DIGEST:(row + 1) * DIGEST]
            if _row_digest(self.recipe, key, np.asarray(self._rows[shard][row])) != digest:
                found.damaged.append(f"{self._shards[shard].name} row {row}: its digest does not match")
                del self._index[key]
                continue
            found.where[position] = where
            used.add(shard)
        now = time.time()
        for shard in used:
            try:
                os.utime(self._shards[shard], (now, now))
            except OSError:
                pass  # a read-only cache still serves
        return found

    def rows(self, where: Sequence[Location]) -> np.ndarray:
        """The rows at `where`, in order (as float32, len(where) x cols)."""
        out = np.empty((len(where), self.cols), np.float32)
        for i, (shard, row) in enumerate(where):
            out[i] = self._rows[shard][row]
        return out

    def writer(self) -> ShardWriter:
        return ShardWriter(self.folder, self.recipe, self.cols)


class ShardWriter:
    """Rows added here become shards of at most SHARD_ROWS rows, each appearing whole or not at all."""

    def __init__(self, folder: Path, recipe: bytes, cols: int) -> None:
        self.folder, self.recipe, self.cols = folder, recipe, cols
        self._keys: list[bytes] = []
        self._rows: list[np.ndarray] = []
        self.written = 0

    def add(self, keys: Iterable[bytes], rows: np.ndarray) -> None:
        for key, row in zip(keys, rows, strict=True):
            self._keys.append(key)
            self._rows.append(np.ascontiguousarray(row, dtype="<f4"))
            if len(self._keys) == SHARD_ROWS:
                self._flush()

    def close(self) -> None:
        if self._keys:
            self._flush()

    def _flush(self) -> None:
        keys, rows = self._keys, self._rows
        self._keys, self._rows = [], []
        name = uuid.uuid4().hex
        tmp = self.folder / f".{name}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, self.recipe, self.cols, len(keys)))
                f.write(b"".join(keys))
                f.write(b"".join(_row_digest(self.recipe, k, r) for k, r in zip(keys, rows, strict=True)))
                f.write(b"\0" * (_rows_offset(len(keys)) - f.tell()))
                f.write(np.stack(rows).tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / f"{name}.shard")
            self.written += len(keys)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk or a read-only cache costs time next run, nothing else
            raise


def read_graph(root: Path, key: str) -> tuple[bytes | None, str | None]:
    """A backbone's ONNX graph kept under `key`, checked against the sha256 its name carries; (graph or None,
    what was wrong with a damaged one)."""
    for path in sorted((Path(root) / GRAPHS).glob(f"{key}-*.onnx")):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        if hashlib.sha256(data).hexdigest() == path.stem.rpartition("-")[2]:
            now = time.time()
            try:
                os.utime(path, (now, now))
            except OSError:
                pass
            return data, None
        path.unlink(missing_ok=True)
        return None, f"{path.name}: its bytes do not match its sha256"
    return None, None


def store_graph(root: Path, key: str, data: bytes) -> None:
    folder = Path(root) / GRAPHS
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, folder / f"{key}-{hashlib.sha256(data).hexdigest()}.onnx")
    finally:
        tmp.unlink(missing_ok=True)


def evict(root: Path, max_bytes: int) -> list[Path]:
    """Remove the shards and graphs used least recently (every recipe's) until the cache holds at most
    `max_bytes`, and temporary files of writers that died; return what was removed."""
    shards, removed, now = [], [], time.time()
    for path in Path(root).glob("*/*"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if path.suffix in (".shard", ".onnx"):
            shards.append((stat.st_mtime, stat.st_size, path))
        elif path.name.endswith(".tmp") and now - stat.st_mtime > STALE_TEMP_S:
            path.unlink(missing_ok=True)
            removed.append(path)
    total = sum(size for _, size, _ in shards)
    for _, size, path in sorted(shards):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        removed.append(path)
        total -= size
    return removed
