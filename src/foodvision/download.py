"""download stage: fetch the dataset archive (.zip, .tar, .tar.gz/.tgz) and keep it as the canonical store.

Every member is checked as if it were extracted (no escaping paths, links, devices, bombs, names a
file system cannot hold), then copied, uncompressed and in the archive's order (a .tar.gz reads only
forwards), into one zip (see `store`):
`prepare` finds the layout inside (train/test, Food-101, class folders) and later stages read the images
from it by name.
"""

from __future__ import annotations

import gzip
import lzma
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from foodvision.core.errors import FoodVisionError
from foodvision.core.files import CHUNK, atomic_path, remove_stale, temp_prefix
from foodvision.fetch import fetch, redact
from foodvision.spec import content_sha256 as dataset_digest
from foodvision.store import write_store

MAX_MEMBERS = 500_000  # Food-101 holds about 101,000
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
ZIP_METHOD_NAMES = {9: "Deflate64, what Windows Explorer writes for large folders", 93: "Zstandard",
                    95: "XZ", 98: "PPMd", 99: "AES encryption"}


class ArchiveError(FoodVisionError):
    pass


def download_dataset(url: str, target: Path, *, sha256: str | None, content_sha256: str | None,
                     max_extract_mb: int, max_download_mb: int) -> Path:
    """Fetch the archive at `url` (http(s), file:// or a path) and store its images at `target` (a zip).

    The archive as downloaded is kept only in a temporary directory: DVC caches the store, so keeping
    the archive too would store the dataset twice.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=temp_prefix(target, "download."), suffix=".tmp") as tmp:
        archive = Path(tmp) / "archive"
        digest = fetch(url, archive, sha256=sha256, what="dataset archive", max_bytes=max_download_mb * 2**20,
                       limit_name=f"data.max_download_mb ({max_download_mb} MB)")
        print(f"downloaded {redact(url)} (sha256 {digest})")
        store_dataset(archive, target, source=redact(url), max_bytes=max_extract_mb * 2**20,
                      content_sha256=content_sha256)
    return target


def store_dataset(archive: Path, target: Path, *, max_bytes: int, content_sha256: str | None,
                  source: str | None = None) -> str:
    """Copy a zip or (compressed) tar archive's files into the store zip `target`, all or nothing;
    return the content digest.

    Refuses archives that would write outside a folder if extracted, hold links or devices, or inflate
    beyond `max_bytes` (counted both from the headers and while copying, since headers can lie), and,
    when `content_sha256` is given, images that are not the ones pinned (see `spec.content_sha256`).
    """
    name = source or str(archive)
    limit = f"data.max_extract_mb ({max_bytes // 2**20} MB)"
    try:
        with _members(archive, name) as members, atomic_path(target) as tmp:
            hashes = _copy(_checked_files(members, name, max_bytes, limit), tmp, name, max_bytes, limit)
            digest = dataset_digest(hashes)
            if content_sha256 is not None and digest != content_sha256.lower():
                raise ArchiveError(f"{name} holds other images than data.content_sha256 pins: expected "
                                   f"{content_sha256.lower()}, got {digest}; if the data changed on purpose, or this "
                                   "is another dataset, set data.content_sha256 to the new digest (or null)")
    except UnicodeDecodeError:
        raise ArchiveError(f"{name} has a member name flagged as UTF-8 that is not UTF-8; re-create the archive "
                           "(or use .tar.gz)") from None
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, EOFError) as exc:
        raise ArchiveError(f"{name} is a corrupt archive ({exc}); download it again or fix data.url") from None
    print(f"stored {len(hashes)} files of {name} in {target} "
          f"(content sha256 {digest}: set data.content_sha256 to pin it)")
    return digest


def _members(archive: Path, name: str) -> AbstractContextManager[list[_Member]]:
    """The archive's entries, zip or tar, open while the block runs."""
    if zipfile.is_zipfile(archive):
        return _zip_members(archive, name)
    if tarfile.is_tarfile(archive):
        return _tar_members(archive, name)
    raise ArchiveError(f"{name} is not a zip or tar archive (an HTML error page? a truncated download?)")


def _checked_files(members: list[_Member], name: str, max_bytes: int, limit: str) -> list[_Member]:
    """The files to keep, after the checks the headers allow: a safe tree, a declared size within the limit."""
    kept = [m for m in members if not _is_junk(m.path)]
    files = [m for m in kept if not m.is_dir]
    if not files:
        raise ArchiveError(f"{name} is empty: expected folders of images")
    _check_tree(kept, name)
    declared = sum(m.size for m in files)
    if declared > max_bytes:
        raise ArchiveError(f"{name} would inflate to {declared // 2**20} MB, over {limit}; "
                           "raise that param if the dataset really is this big")
    return files


def _copy(files: list[_Member], dest: Path, name: str, max_bytes: int, limit: str) -> dict[str, str]:
    """Write `files` into the store zip `dest`; return each one's sha256, hashed while copying (the digest
    then reads nothing again) and counted against the limit as the bytes come (headers can lie)."""
    copied = 0

    def chunks(member: _Member) -> Iterator[bytes]:
        nonlocal copied
        with member.open() as src:
            while chunk := src.read(CHUNK):
                copied += len(chunk)
                if copied > max_bytes:
                    raise ArchiveError(f"{name} inflates beyond {limit} (a zip bomb?); refusing it")
                yield chunk

    return write_store(dest, ((str(m.path), chunks(m)) for m in files))


class _Member:
    """One archive entry, the same for zip and tar: checked path, size, and a way to read it."""

    def __init__(self, path: PurePosixPath, size: int, is_dir: bool, open_: Callable[[], IO[bytes]]) -> None:
        self.path, self.size, self.is_dir, self.open = path, size, is_dir, open_


@contextmanager
def _zip_members(archive: Path, name: str) -> Iterator[list[_Member]]:
    with zipfile.ZipFile(archive) as zf:
        _check_count(len(zf.infolist()), name)
        members = []
        for info in zf.infolist():
            filename = _zip_name(info)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArchiveError(f"{name}: member {filename!r} is a symbolic link; refusing the archive")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"{name}: member {filename!r} is encrypted; give an unencrypted archive")
            if info.compress_type not in ZIP_METHODS:
                method = ZIP_METHOD_NAMES.get(info.compress_type, "unknown")
                raise ArchiveError(f"{name}: member {filename!r} uses compression method {info.compress_type} "
                                   f"({method}), which Python cannot read; re-zip it with Deflate (`zip -r`, "
                                   "7-Zip) or give a .tar.gz")
            members.append(_Member(_safe_path(filename, name), info.file_size, info.is_dir(),
                                   lambda info=info: zf.open(info)))
        yield members


def _check_count(count: int, name: str) -> None:
    if count > MAX_MEMBERS:
        raise ArchiveError(f"{name} holds {count:,} members, over the {MAX_MEMBERS:,} this pipeline extracts; "
                           "split the dataset")


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The member's name; a name without the UTF-8 flag is read as UTF-8 when it is valid UTF-8.

    Zip tools that write UTF-8 without setting the flag are common (`寿司` would otherwise read as cp437
    `Ä⌡Äi`); a true cp437 name is rarely valid UTF-8.
    """
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


def _check_tree(members: list[_Member], name: str) -> None:
    """Refuse paths a file system cannot hold, or holds differently: a path twice (the last would win),
    a file where a folder must be, names differing only in case (one folder on macOS and Windows, two
    on Linux), names over 255 bytes."""
    files = [m.path for m in members if not m.is_dir]
    twice = [path for path, n in Counter(files).items() if n > 1]
    if twice:
        raise ArchiveError(f"{name}: holds {str(twice[0])[:80]!r} twice; refusing an archive whose contents "
                           "depend on extraction order")
    dirs = {parent for m in members for parent in m.path.parents if parent.parts}
    dirs |= {m.path for m in members if m.is_dir}
    clash = sorted(set(files) & dirs)
    if clash:
        raise ArchiveError(f"{name}: {str(clash[0])[:80]!r} is both a file and a folder; refusing the archive")
    folded: dict[str, PurePosixPath] = {}
    for path in sorted(dirs | set(files)):  # every parent folder is in `dirs` and sorts first: one name each
        _check_name(path.name, path, name)
        if len(path.name.encode("utf-8")) > 255:
            raise ArchiveError(f"{name}: {str(path)[:80]!r}… has a name over 255 bytes, which no common file "
                               "system holds; rename it")
        other = folded.setdefault(str(path).casefold(), path)
        if other != path:
            raise ArchiveError(f"{name}: {str(other)[:80]!r} and {str(path)[:80]!r} differ only in case: one "
                               "folder on macOS and Windows, two on Linux; rename one")


WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
WINDOWS_FORBIDDEN = set('<>:"|?*')


def _check_name(part: str, path: PurePosixPath, name: str) -> None:
    """Refuse a name that would split the stages' printed lines or that another system cannot hold: bytes that
    are not UTF-8 text, control characters (a newline can forge a result line), and what Windows refuses
    (`<>:"|?*`, a trailing dot or space, CON, NUL, COM1 ...): the project runs there too."""
    shown = repr(str(path))[:90]  # escaped: a newline or a lone surrogate shows as \n, \udcff, on one line
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:
        raise ArchiveError(f"{name}: member {shown} has a name that is not UTF-8 text; rename it") from None
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in part):
        raise ArchiveError(f"{name}: member {shown} has a control character (a newline, a tab ...) in its name; "
                           "rename it")
    if WINDOWS_FORBIDDEN & set(part) or part.endswith((".", " ")) or part.split(".")[0].lower() in WINDOWS_RESERVED:
        raise ArchiveError(f"{name}: member {shown} has a name Windows cannot hold (<>:\"|?*, a trailing dot or "
                           "space, CON, NUL, COM1 ...); rename it")


@contextmanager
def _tar_members(archive: Path, name: str) -> Iterator[list[_Member]]:
    with tarfile.open(archive, mode="r:*") as tf:
        members = []
        infos = tf.getmembers()
        _check_count(len(infos), name)
        for info in infos:
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
