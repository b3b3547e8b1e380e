"""download stage: fetch the dataset archive and extract it safely into data/raw/<name>."""

from __future__ import annotations

import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from foodvision.atomic import atomic_dir, remove_stale
from foodvision.errors import FoodVisionError
from foodvision.fetch import fetch

SPLITS = ("train", "test")


class ArchiveError(FoodVisionError):
    pass


def download_dataset(url: str, target: Path, *, sha256: str | None = None, max_extract_mb: int = 5000) -> Path:
    """Fetch the zip at `url` (http(s), file:// or a path) and extract it to `target/{train,test}`.

    The archive is kept only in a temporary directory: DVC caches the extracted images, so
    keeping the zip too would store the dataset twice.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.download.", suffix=".tmp") as tmp:
        archive = Path(tmp) / "archive.zip"
        digest = fetch(url, archive, sha256=sha256, what="dataset archive")
        print(f"downloaded {url} (sha256 {digest})")
        extract_dataset(archive, target, source=url, max_bytes=max_extract_mb * 2**20)
    return target


def extract_dataset(archive: Path, target: Path, *, source: str | None = None, max_bytes: int = 5000 * 2**20) -> None:
    """Extract a zip holding train/ and test/ (at its root or under one top folder) into `target`.

    Refuses archives that would write outside `target` or inflate beyond `max_bytes` (counted
    both from the headers and while writing, since headers can lie).
    """
    name = source or str(archive)
    if not zipfile.is_zipfile(archive):
        raise ArchiveError(f"{name} is not a zip archive (an HTML error page? a truncated download?)")
    limit = f"data.max_extract_mb ({max_bytes // 2**20} MB)"
    try:
        with zipfile.ZipFile(archive) as zf, atomic_dir(target) as tmp:
            members = [m for m in zf.infolist() if not _is_junk(m.filename)]
            for member in members:
                _check_member(member, name)
            if not any(not m.is_dir() for m in members):
                raise ArchiveError(f"{name} is empty: expected train/<class>/<image> and test/<class>/<image>")
            if sum(m.file_size for m in members) > max_bytes:
                raise ArchiveError(f"{name} would inflate to {sum(m.file_size for m in members) // 2**20} MB, "
                                   f"over {limit}; raise that param if the dataset really is this big")
            root = _dataset_root([PurePosixPath(m.filename) for m in members], name)
            written = 0
            for member in members:
                rel = PurePosixPath(member.filename).relative_to(root) if root.parts else PurePosixPath(member.filename)
                if not rel.parts or rel.parts[0] not in SPLITS:
                    continue
                out = tmp.joinpath(*rel.parts)
                if member.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ArchiveError(f"{name} inflates beyond {limit} (a zip bomb?); refusing it")
                        dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ArchiveError(f"{name} is a corrupt zip archive ({exc}); download it again or fix data.url") from None
    print(f"extracted {name} to {target}")


def _is_junk(filename: str) -> bool:
    parts = PurePosixPath(filename).parts
    return bool(parts) and parts[0] == "__MACOSX"


def _check_member(member: zipfile.ZipInfo, name: str) -> None:
    """Refuse anything that could write outside the target: absolute paths, `..`, links."""
    path = member.filename.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":") or ".." in PurePosixPath(path).parts:
        raise ArchiveError(f"{name}: member {member.filename!r} would extract outside the target; refusing the archive")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise ArchiveError(f"{name}: member {member.filename!r} is a symbolic link; refusing the archive")


def _dataset_root(paths: list[PurePosixPath], name: str) -> PurePosixPath:
    """Find the folder holding train/ and test/: the archive root or a single top folder."""
    tops = {p.parts[0] for p in paths if p.parts}
    if set(SPLITS) <= tops:
        return PurePosixPath()
    if len(tops) == 1:
        (top,) = tops
        below = {p.parts[1] for p in paths if len(p.parts) > 1}
        if set(SPLITS) <= below:
            return PurePosixPath(top)
    raise ArchiveError(
        f"{name} has no train/ and test/ folders (found {', '.join(sorted(tops)) or 'nothing'}); "
        "expected train/<class>/<image> and test/<class>/<image>"
    )
