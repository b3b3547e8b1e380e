"""Uploads under one budget for the whole server, not only per request.

Each `POST /api/predict` books its declared size (MAX_UPLOAD_MB when it declares none) before a byte is
read. The photo is parsed out of the multipart body as the body arrives and kept in memory while all
uploads together hold under `memory` bytes, else in an unlinked file in the temporary folder (TMPDIR)
while they hold under `disk` bytes. When both are booked, an upload that has stalled (nothing for
STALL_SECONDS, or under MIN_RATE on average) is cut off for the newcomer, longest-stalled first; with
none stalled the newcomer is answered 503 with Retry-After. An honest client sends its photo at once,
so it never stalls, and what a thousand held connections cost is a bounded number of bytes, in files.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from python_multipart.multipart import MultipartParser, parse_options_header

STALL_SECONDS = 1.0  # an upload that has sent nothing for this long may be cut off for another
MIN_RATE = 64 * 1024  # bytes/s: slower on average (after STALL_SECONDS) counts as stalled too
MAX_PARTS = 10  # multipart parts one upload may have (a browser sends one)
MAX_HEADER = 8192  # bytes of one part's headers


class Busy(Exception):
    """No room for another upload now: answered 503 with Retry-After."""


class Upload:
    """One request's photo, in memory or in a file, holding its booking until closed."""

    def __init__(self, budget: Uploads, size: int, in_memory: bool, folder: Path | None) -> None:
        self.budget, self.size, self.in_memory = budget, size, in_memory
        self.file: IO[bytes] = io.BytesIO() if in_memory else tempfile.TemporaryFile(dir=folder)
        self.started = self.last = time.monotonic()
        self.received = 0  # body bytes so far, multipart framing included
        self.complete = False  # the whole body arrived: never cut off after that
        self.cut: Callable[[], None] | None = None  # what cuts the reader off (set by the reader)
        self.closed = False

    def arrived(self, n: int) -> None:
        self.received += n
        self.last = time.monotonic()

    def stalled(self, now: float) -> bool:
        if self.complete or self.closed:
            return False
        age = now - self.started
        return now - self.last > STALL_SECONDS or (age > STALL_SECONDS and self.received / age < MIN_RATE)

    def photo(self) -> IO[bytes]:
        """The photo's bytes as a file, from its start (for the decoder)."""
        self.file.seek(0)
        return self.file

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.file.close()
            self.budget.release(self)


class Uploads:
    """The bytes every upload in flight holds, in memory and on disk, and who may be cut off for whom."""

    def __init__(self, memory: int, disk: int, folder: Path | None = None) -> None:
        self.memory, self.disk, self.folder = memory, disk, folder
        self.in_memory = self.on_disk = 0
        self.held: set[Upload] = set()
        self.trim_pending = False

    def book(self, size: int) -> Upload:
        """An upload of up to `size` bytes: in memory if it fits, else on disk, else in a stalled one's place."""
        upload = self._fit(size)
        now = time.monotonic()
        stalled = sorted((u for u in self.held if u.stalled(now)), key=lambda u: u.last) if upload is None else []
        for victim in stalled:
            self.cut_off(victim)
            upload = self._fit(size)
            if upload is not None:
                break
        if upload is None:
            raise Busy(f"{len(self.held)} uploads in progress fill this server's {self.limit_text()}: try again "
                       "shortly")
        return upload

    def _fit(self, size: int) -> Upload | None:
        """A new upload in memory if `size` fits there, else on disk if it fits there, else None."""
        for in_memory, used, limit in ((True, self.in_memory, self.memory), (False, self.on_disk, self.disk)):
            if used + size <= limit:
                try:
                    upload = Upload(self, size, in_memory, self.folder)
                except OSError as exc:  # no usable temporary folder (TMPDIR gone, not writable)
                    raise Busy(f"this server cannot hold uploads in its temporary folder ({exc.strerror or exc}): "
                               "try again shortly") from None
                self.held.add(upload)
                self.in_memory += size if in_memory else 0
                self.on_disk += 0 if in_memory else size
                return upload
        return None

    def cut_off(self, upload: Upload) -> None:
        """Free its booking now and stop its reader (which answers it)."""
        if upload.cut is not None:
            upload.cut()
        upload.close()

    def release(self, upload: Upload) -> None:
        if upload in self.held:
            self.held.discard(upload)
            if upload.in_memory:
                self.in_memory -= upload.size
            else:
                self.on_disk -= upload.size
        if not self.held and not self.trim_pending:  # a second after the last upload, if none came since
            self.trim_pending = True
            try:
                asyncio.get_running_loop().call_later(1.0, self.trim)
            except RuntimeError:  # no event loop: outside the server
                self.trim()

    def trim(self) -> None:
        self.trim_pending = False
        if not self.held:
            return_freed_memory()

    def limit_text(self) -> str:
        return f"{self.memory / 2**20:g} MB in memory and {self.disk / 2**20:g} MB on disk"


class ImageField:
    """Fed the body's chunks (then b""), writes the file in the multipart field `image` into the upload.

    ValueError: not multipart, more than one file, too many parts or too long a part header;
    LookupError: the body ended without a file in `image`.
    """

    def __init__(self, content_type: str, upload: Upload) -> None:
        _, options = parse_options_header(content_type)
        if not options.get(b"boundary"):
            raise ValueError("no boundary in Content-Type")
        self.upload = upload
        self.parts = self.files = 0
        self.headers: dict[bytes, bytes] = {}
        self.field = self.value = b""
        self.in_image = self.found = False
        self.parser = MultipartParser(options[b"boundary"], {
            "on_part_begin": self.part_begin, "on_header_field": self.header_field,
            "on_header_value": self.header_value, "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
            "on_part_end": self.part_end})

    def feed(self, chunk: bytes) -> None:
        if chunk:
            self.parser.write(chunk)
            return
        self.parser.finalize()
        self.upload.complete = True
        if not self.found:
            raise LookupError("no file in the multipart field `image`")

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ValueError(f"over {MAX_PARTS} parts")
        self.headers, self.field, self.value = {}, b"", b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]
        if len(self.field) > MAX_HEADER:
            raise ValueError("a part header is too long")

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]
        if len(self.value) > MAX_HEADER:
            raise ValueError("a part header is too long")

    def header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field = self.value = b""

    def headers_finished(self) -> None:
        _, disposition = parse_options_header(self.headers.get(b"content-disposition", b""))
        is_file = b"filename" in disposition
        self.files += is_file
        if self.files > 1:
            raise ValueError("more than one file")
        self.in_image = is_file and disposition.get(b"name") == b"image"

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_image:
            self.upload.file.write(data[start:end])

    def part_end(self) -> None:
        self.found |= self.in_image
        self.in_image = False


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps them after a burst of uploads; elsewhere a no-op)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_big_buffers_out_of_the_heap() -> None:
    """Buffers of 1 MB and more each get their own mapping, returned to the OS when freed (glibc's default
    threshold grows to 32 MB after the first big free, and uploads' buffers then stay in the heap)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD, fixed (not adapting)
        libc.mallopt(-1, 4 * 2**20)  # M_TRIM_THRESHOLD: free heap above 4 MB goes back at once


@functools.cache
def _libc() -> Any:
    """glibc, where this process has it (the symbols already loaded: no library search)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # Windows
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
