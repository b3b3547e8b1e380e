"""The dataset as `download` keeps it: one uncompressed zip (paths.raw), read member by member.

One file instead of a folder of images, because DVC checks a tracked folder file by file: at 30,000
images every `dvc status`, `dvc exp run` and checkout walked them, seconds of every head-only
experiment (docs/scale.md); one file is one lookup. Stored, not deflated (photos do not compress; a member is one seek),
with fixed timestamps and modes, so the same archive gives the same bytes on any machine.
Members are only ever read, by name or at the location `prepare` recorded, never extracted: no later stage
writes a path the archive chose.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from foodvision.core.errors import FoodVisionError

SHA256_HEX = re.compile(rb"[0-9a-f]{64}")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no member carries the time it was written
# where a member lies, as the central directory says: its local header's offset, its size and its CRC-32
Location = tuple[int, int, int]


class StoreError(FoodVisionError):
    pass


class ImageStore:
    """Read-only access to the dataset zip; each process (DataLoader workers too) opens its own handle."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def _file(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():  # a forked worker must not share the parent's offset
            try:
                self._zip = zipfile.ZipFile(self.path)
            except FileNotFoundError:
                raise StoreError(f"{self.path} is missing: run `dvc repro download` (or `dvc pull`)") from None
            except (OSError, zipfile.BadZipFile) as exc:
                raise StoreError(f"{self.path} is not a readable dataset zip ({exc}); "
                                 "run `dvc repro -f download`") from None
            self._pid = os.getpid()
        return self._zip

    def names(self) -> list[str]:
        """Every file's name (POSIX path from the archive's top), sorted."""
        return sorted(i.filename for i in self._file().infolist() if not i.is_dir())

    def open(self, name: str) -> IO[bytes]:
        """A seekable stream of the member (a header check reads only what it needs)."""
        try:
            return self._file().open(name)
        except KeyError:
            raise StoreError(f"{self.path} has no {name!r}: the spec is from another dataset; "
                             "run `dvc repro prepare`") from None

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def locations(self) -> dict[str, Location]:
        """Every file's location, for `read_at`."""
        return {i.filename: (i.header_offset, i.file_size, i.CRC) for i in self._file().infolist() if not i.is_dir()}

    def sha256s(self) -> dict[str, str]:
        """Every file's sha256 as `write_store` recorded it (files of a store written before it did: none)."""
        return {i.filename: i.comment.decode("ascii") for i in self._file().infolist()
                if not i.is_dir() and SHA256_HEX.fullmatch(i.comment)}

    def read_at(self, name: str, where: Location | None) -> IO[bytes]:
        """The member at its recorded location, without opening the zip: `zipfile` parses every entry of the
        central directory first, a cost that grows with the dataset in each process that reads a few images.
        Checked against its local header's name and its CRC-32; without a location, read by name."""
        if where is None:
            return io.BytesIO(self.read(name))
        offset, size, crc = where
        data = b""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                header = f.read(zipfile.sizeFileHeader)
                if len(header) == zipfile.sizeFileHeader and offset + size <= os.fstat(f.fileno()).st_size:
                    # signature, versions, flags, method, time, date, CRC, sizes, name length, extra length
                    sig, _, _, flags, method, _, _, _, _, _, name_len, extra_len = struct.unpack(
                        zipfile.structFileHeader, header)
                    found = f.read(name_len).decode("utf-8" if flags & 0x800 else "cp437", "replace")
                    if sig == zipfile.stringFileHeader and method == zipfile.ZIP_STORED and found == name:
                        f.seek(extra_len, os.SEEK_CUR)
                        data = f.read(size)
        except FileNotFoundError:
            raise StoreError(f"{self.path} is missing: run `dvc repro download` (or `dvc pull`)") from None
        if len(data) != size or zlib.crc32(data) != crc:
            raise StoreError(f"{self.path} does not hold {name!r} where the spec says; "
                             "run `dvc repro prepare`")
        return io.BytesIO(data)

    def __getstate__(self) -> dict:  # spawned workers reopen the file themselves
        return {"path": self.path, "_zip": None, "_pid": -1}

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def write_store(target: Path, members: Iterable[tuple[str, Iterable[bytes]]]) -> dict[str, str]:
    """Write (name, chunks) pairs as a stored zip at `target` whose bytes depend only on names, order and content;
    return each member's sha256, hashed while copying and kept as its entry's comment (`sha256s`): the
    feature cache finds an image's row by it, and nothing reads the images again to hash them."""
    hashes: dict[str, str] = {}
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, chunks in members:
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.create_system = 3  # Unix, whatever system writes it: the same bytes everywhere
            h = hashlib.sha256()
            with zf.open(info, "w", force_zip64=True) as dst:
                for chunk in chunks:
                    h.update(chunk)
                    dst.write(chunk)
            hashes[name] = h.hexdigest()
            info.comment = hashes[name].encode("ascii")  # the central directory is written at close
    return hashes


class Tree:
    """The folders the store's file names imply, to find a dataset's layout as one would on a disk.

    Folders are POSIX paths without a trailing slash; "" is the top.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.files = sorted(names)
        self._file_set = set(self.files)
        self._children: dict[str, set[str]] = {"": set()}
        for name in self.files:
            parts = name.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder in self._children:
                    continue
                self._children[folder] = set()
                self._children["/".join(parts[:depth - 1])].add(parts[depth - 1])
            self._children["/".join(parts[:-1])].add(parts[-1])

    def is_dir(self, path: str) -> bool:
        return path in self._children

    def is_file(self, path: str) -> bool:
        return path in self._file_set

    def entries(self, folder: str) -> list[str]:
        """Names directly in `folder` (files and folders), sorted."""
        return sorted(self._children.get(folder, ()))

    def subdirs(self, folder: str) -> list[str]:
        return [n for n in self.entries(folder) if self.is_dir(join(folder, n))]

    def files_below(self, folder: str) -> list[str]:
        """Every file anywhere under `folder`, sorted: a range of the sorted names, found by bisection."""
        prefix = f"{folder}/" if folder else ""
        start = bisect.bisect_left(self.files, prefix)
        end = bisect.bisect_left(self.files, prefix[:-1] + chr(ord("/") + 1)) if prefix else len(self.files)
        return self.files[start:end]


def join(folder: str, *names: str) -> str:
    return "/".join(p for p in (folder, *names) if p)
