"""download stage: fetch the dataset archive (.zip, .tar, .tar.gz/.tgz) and extract it safely.

The archive is extracted as it is; `prepare` finds the layout inside (train/test, Food-101, class folders).
"""

from __future__ import annotations

import gzip
import lzma
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from foodvision.atomic import atomic_dir, remove_stale, temp_prefix
from foodvision.errors import FoodVisionError
from foodvision.fetch import fetch, redact


class ArchiveError(FoodVisionError):
    pass


def download_dataset(url: str, target: Path, *, sha256: str | None = None, max_extract_mb: int = 5000,
                     max_download_mb: int = 10000) -> Path:
    """Fetch the archive at `url` (http(s), file:// or a path) and extract it into `target`.

    The archive is kept only in a temporary directory: DVC caches the extracted images, so
    keeping the archive too would store the dataset twice.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=temp_prefix(target, "download."), suffix=".tmp") as tmp:
        archive = Path(tmp) / "archive"
        digest = fetch(url, archive, sha256=sha256, what="dataset archive", max_bytes=max_download_mb * 2**20,
                       limit_name=f"data.max_download_mb ({max_download_mb} MB)")
        print(f"downloaded {redact(url)} (sha256 {digest})")
        extract_dataset(archive, target, source=redact(url), max_bytes=max_extract_mb * 2**20)
    return target


def extract_dataset(archive: Path, target: Path, *, source: str | None = None, max_bytes: int = 5000 * 2**20) -> None:
    """Extract a zip or (compressed) tar archive into `target`, all or nothing.

    Refuses archives that would write outside `target`, hold links or devices, or inflate beyond
    `max_bytes` (counted both from the headers and while writing, since headers can lie).
    """
    name = source or str(archive)
    if zipfile.is_zipfile(archive):
        opener = _zip_members
    elif tarfile.is_tarfile(archive):
        opener = _tar_members
    else:
        raise ArchiveError(f"{name} is not a zip or tar archive (an HTML error page? a truncated download?)")
    limit = f"data.max_extract_mb ({max_bytes // 2**20} MB)"
    try:
        with opener(archive, name) as members, atomic_dir(target) as tmp:
            members = [m for m in members if not _is_junk(m.path)]
            if not any(not m.is_dir for m in members):
                raise ArchiveError(f"{name} is empty: expected folders of images")
            declared = sum(m.size for m in members)
            if declared > max_bytes:
                raise ArchiveError(f"{name} would inflate to {declared // 2**20} MB, over {limit}; "
                                   "raise that param if the dataset really is this big")
            written = 0
            for member in members:
                out = tmp.joinpath(*member.path.parts)
                if member.is_dir:
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with member.open() as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ArchiveError(f"{name} inflates beyond {limit} (a zip bomb?); refusing it")
                        dst.write(chunk)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, EOFError) as exc:
        raise ArchiveError(f"{name} is a corrupt archive ({exc}); download it again or fix data.url") from None
    print(f"extracted {name} to {target}")


class _Member:
    """One archive entry, the same for zip and tar: checked path, size, and a way to read it."""

    def __init__(self, path: PurePosixPath, size: int, is_dir: bool, open_: Callable[[], IO[bytes]]) -> None:
        self.path, self.size, self.is_dir, self.open = path, size, is_dir, open_


@contextmanager
def _zip_members(archive: Path, name: str) -> Iterator[list[_Member]]:
    with zipfile.ZipFile(archive) as zf:
        members = []
        for info in zf.infolist():
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArchiveError(f"{name}: member {info.filename!r} is a symbolic link; refusing the archive")
            members.append(_Member(_safe_path(info.filename, name), info.file_size, info.is_dir(),
                                   lambda info=info: zf.open(info)))
        yield members


@contextmanager
def _tar_members(archive: Path, name: str) -> Iterator[list[_Member]]:
    with tarfile.open(archive, mode="r:*") as tf:
        members = []
        for info in tf.getmembers():
            if info.issym() or info.islnk():
                raise ArchiveError(f"{name}: member {info.name!r} is a link; refusing the archive")
            if not (info.isfile() or info.isdir()):
                raise ArchiveError(f"{name}: member {info.name!r} is not a file or folder; refusing the archive")
            members.append(_Member(_safe_path(info.name, name), info.size, info.isdir(),
                                   lambda info=info: _tar_open(tf, info)))
        yield members


def _tar_open(tf: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    src = tf.extractfile(info)
    assert src is not None  # regular files only, checked above
    return src


def _safe_path(filename: str, name: str) -> PurePosixPath:
    """Refuse anything that could write outside the target: absolute paths, drive letters, `..`."""
    path = filename.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":") or ".." in PurePosixPath(path).parts:
        raise ArchiveError(f"{name}: member {filename!r} would extract outside the target; refusing the archive")
    return PurePosixPath(path)  # `./a/b` -> `a/b`; `.` -> no parts (skipped as junk)


def _is_junk(path: PurePosixPath) -> bool:
    return not path.parts or path.parts[0] == "__MACOSX"
