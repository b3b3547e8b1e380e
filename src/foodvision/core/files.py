"""Files in and out, in one place. Writes go to a temporary that is renamed: a killed run never leaves a file
that looks complete, and a full disk or a folder the user may not write to is one line naming the output, with
the temporaries removed. Reads name the stage that makes a missing file."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from foodvision.core.errors import DatasetError, FoodVisionError

CHUNK = 1 << 20  # bytes read or copied at a time: big enough for throughput, small enough for memory
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "read-only file system",
               errno.EFBIG: "file too large for this process's file-size limit (ulimit -f) or the file system",
               errno.EBUSY: "the output is busy (in use, or a mount point that cannot be replaced)",
               errno.ENAMETOOLONG: "a name in its path is too long for the file system"}


class OutputError(FoodVisionError):
    pass


@contextmanager
def _named_disk_errors(dest: Path) -> Iterator[None]:
    """A full disk or a forbidden folder while writing `dest` becomes one line that names `dest`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != dest else ""
        raise OutputError(f"cannot write {dest}: {DISK_ERRORS[exc.errno]}{where}; free space or fix the "
                          "folder's permissions, then run again") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(dest: Path, tag: str = "") -> str:
    """`.<name>.<pid>.<tag>`: temporaries beside `dest` carry their writer's pid, so cleanup can tell
    a killed run's leftovers from the live work of another process writing the same output."""
    return f".{Path(dest).name}.{os.getpid()}.{tag}"


def pid_alive(pid: str) -> bool:
    """Whether the process whose pid a temporary's name carries still runs (no pid: an older version's, dead)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _writer_alive(name: str, dest_name: str) -> bool:
    return pid_alive(name[len(dest_name) + 2:].partition(".")[0])


def remove_stale(dest: Path) -> None:
    """Delete what killed earlier runs left beside `dest`; temporaries of live writers are left alone."""
    dest = Path(dest)
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
        if not _writer_alive(stale.name, dest.name):
            _remove(stale)


def _temp_name(dest: Path, tag: str = "") -> Path:
    """A fresh temporary's path beside `dest`, named before it is made: an interrupt (Ctrl-C) that lands right
    after the file is created still finds it to remove (`tempfile.mkstemp` hands the name back only then)."""
    return dest.parent / f"{temp_prefix(dest, tag)}{os.urandom(6).hex()}.tmp"


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; rename it onto `dest` only if the block succeeds."""
    dest = Path(dest)
    with _named_disk_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dest)
        tmp_path = _temp_name(dest)
        try:
            os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, dest)
        finally:
            tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `dest`; swap it in for `dest` on success."""
    dest = Path(dest)
    with _named_disk_errors(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(dest)
        tmp, old = _temp_name(dest), _temp_name(dest, "old.")
        try:
            os.mkdir(tmp, 0o700)
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            if dest.exists():
                os.mkdir(old, 0o700)
                os.replace(dest, old / "previous")
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def outputs_together(dests: list[Path]) -> Iterator[None]:
    """A stage's outputs change together or not at all. Each existing one is hard-linked aside first (no bytes
    copied); if the block fails (an error, a full disk, Ctrl-C), every output it replaced goes back to what it
    was, and one it created is removed: never a new history beside an old model. (On a file system without
    hard links a replaced output cannot go back: it is removed, none rather than a mix.) (`dvc repro` deletes a
    stage's outputs before running it: there, a failed stage leaves none.)"""
    before = {Path(d): _identity(Path(d)) for d in dests}
    saved = {d: _link_aside(d) for d, ident in before.items() if ident is not None}
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):  # sys.exit(0): a success (a launcher's)
            raise
        for dest, ident in before.items():
            if _identity(dest) != ident:
                _remove(dest)
                if saved.get(dest) is not None:
                    os.replace(saved[dest], dest)
        raise
    finally:
        for backup in saved.values():
            if backup is not None:
                _remove(backup)


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` (our writers replace, never rewrite in place: a new inode), None if none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _link_aside(dest: Path) -> Path | None:
    """A hard-linked copy beside `dest` (a folder: its tree of links), named as a temporary of this process;
    None where the file system has no hard links."""
    backup = _temp_name(dest, "old.")
    try:
        if dest.is_dir():
            shutil.copytree(dest, backup, copy_function=os.link, symlinks=True)
        else:
            os.link(dest, backup)
        return backup
    except OSError:
        _remove(backup)
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(dest: Path, header: list[str], rows: list[list[object]]) -> None:
    """Unix line endings, so reruns on any platform give the same bytes."""
    with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_json(dest: Path, data: object) -> None:
    """Stable formatting (sorted keys, fixed indent) so reruns give byte-identical files.

    Streamed to the file: `json.dumps` with an indent builds every piece in a list first, which for a
    100,000-image index costs more memory than the index itself.
    """
    with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: Path, stage: str) -> Any:
    """A JSON file a stage wrote; when it is missing or damaged, say which stage makes it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} not found: run `dvc repro {stage}` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); run `dvc repro {stage}`") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
