"""Fetch one file from an http(s) URL, a file:// URL or a local path, verified, bounded and atomically.

The same code serves the dataset archive, the pretrained backbone and the user's own photos, so an
air-gapped user can point any of them at a mirror or a local copy. Over HTTP: identity encoding is
asked for (a gzip-encoded body is still decoded, and bounded), `max_bytes` is enforced from the
headers and while streaming, a server that drips bytes is cut off by a minimum rate, 429/503 honour
`Retry-After`, a dropped transfer resumes with a `Range` request where the server allows it, and
every failure is one line with any credentials in the URL redacted. Credentials belong in
`~/.netrc`, which requests reads by itself.
"""

from __future__ import annotations

import email.utils
import os
import shutil
import stat
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlparse, urlunparse
from urllib.request import url2pathname

import requests
import urllib3
from tqdm import tqdm

from foodvision.core.errors import FoodVisionError
from foodvision.core.files import CHUNK, atomic_path, file_sha256

MIN_BYTES_PER_WINDOW = 16 * 1024  # a transfer slower than this per `timeout` seconds is stalled
MAX_RETRY_AFTER = 120.0  # seconds of Retry-After honoured; a server asking for more fails at once
SCHEMES = ("http", "https", "file")


class FetchError(FoodVisionError):
    pass


class _Retry(Exception):
    """A fault worth another attempt; `wait` is what the server asked for (Retry-After), if anything."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


def is_url(source: str) -> bool:
    return _scheme(source) in SCHEMES


def _scheme(source: str) -> str:
    try:
        scheme = urlparse(source).scheme
    except ValueError as exc:
        raise FetchError(f"{redact(source)} is not a valid URL ({exc}); fix the URL in params.yaml") from None
    return "" if len(scheme) == 1 else scheme  # `C:\photos\a.jpg` is a Windows path, not a scheme


def redact(source: str) -> str:
    """The URL as it may be printed and stored: no password, no query values (tokens, signatures)."""
    try:
        parsed = urlparse(source)
    except ValueError:
        return source
    if parsed.scheme not in ("http", "https"):
        return source
    netloc = parsed.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}" if ":" in user else f"***@{host}"
    query = urlencode([(k, "***") for k, _ in parse_qsl(parsed.query, keep_blank_values=True)], safe="*")
    return urlunparse(parsed._replace(netloc=netloc, query=query))


def source_name(source: str) -> str:
    """The file name a URL or path points at (used for torchvision's hash-in-name convention)."""
    return Path(unquote(urlparse(source).path) if is_url(source) else source).name


def local_path(source: str) -> Path | None:
    """The filesystem path of a file:// URL or plain path; None for http(s)."""
    scheme = _scheme(source)
    if scheme == "file":
        return Path(url2pathname(urlparse(source).path))
    if scheme in ("http", "https"):
        return None
    if scheme:
        raise FetchError(f"{redact(source)}: {scheme}:// URLs are not supported; use http(s)://, file:// or a "
                         "path (for s3:// and the like, `dvc import-url` or a mirror over https)")
    return Path(source).expanduser()


KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket",
         stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}


def regular_file(path: Path, what: str = "file") -> Path:
    """`path` if it is a regular file (links followed); else one line saying what it is. Asked of the file
    system before anything opens it: opening a named pipe for reading waits for a writer, forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FetchError(f"{what} not found: {path} (fix the path or URL in params.yaml)") from None
    except OSError as exc:
        raise FetchError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in KINDS.items() if test(mode)), "not a regular file")
        raise FetchError(f"{what} {path} is {kind}, not a file: give a file's path")
    return path


def note_untracked(source: str | None, folder: Path, key: str) -> str | None:
    """A local input outside `folder` is read, but DVC does not see it change: say so (and where to put it).

    `folder` (one of `paths.inputs_*`) is a dependency of the stage in dvc.yaml; a file inside it is
    hashed by DVC, so editing it reruns the stage.
    """
    if source is None or _scheme(source) in ("http", "https"):
        return None
    path = local_path(source)
    if path is None or path.resolve().is_relative_to(Path(folder).resolve()):
        return None
    note = (f"note: {key} {path} is outside {folder}/, so DVC does not notice when it changes; "
            f"put it in {folder}/ to have edits rerun this stage")
    print(note, file=sys.stderr)
    return note


def fetch(
    source: str,
    dest: Path,
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    max_bytes: int | None = None,
    limit_name: str = "the size limit",  # e.g. "data.max_download_mb (10000 MB)"
    what: str = "file",
) -> str:
    """Copy `source` to `dest` and return its sha256; `dest` appears only once it is verified.

    `max_bytes` bounds what is written (`limit_name` says which param sets it).
    """
    shown = redact(source)
    with atomic_path(Path(dest)) as tmp:
        path = local_path(source)
        if path is None:
            _download(source, tmp, timeout=timeout, retries=retries, max_bytes=max_bytes, limit_name=limit_name,
                      what=what)
        else:
            size = regular_file(path, what).stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise FetchError(f"{what} {path} is {size / 2**20:.0f} MB, over {limit_name}")
            shutil.copyfile(path, tmp)
        digest = file_sha256(tmp)
        if sha256 is not None and digest != sha256.lower():
            raise FetchError(
                f"sha256 mismatch for {shown}: expected {sha256.lower()}, got {digest}; "
                "the file is corrupt or not the one expected (fix the URL or the sha256 param)"
            )
        if sha256_prefix and not digest.startswith(sha256_prefix):
            raise FetchError(
                f"sha256 of {shown} is {digest}, but its file name promises a hash starting "
                f"{sha256_prefix}; the download is corrupt or the mirror serves another file"
            )
    return digest


# what a failed connection's long chain of wrapped exceptions comes down to, in the words a user can act on
CONNECTION_CAUSES = (("NameResolutionError", "the host name did not resolve: offline, or no DNS?"),
                     ("Name or service not known", "the host name did not resolve: offline, or no DNS?"),
                     ("Connection refused", "connection refused"), ("Network is unreachable", "network unreachable"),
                     ("timed out", "timed out"), ("CERTIFICATE_VERIFY_FAILED", "its TLS certificate did not verify"))


def why_not_connected(exc: Exception) -> str:
    """One short reason for a connection error, not requests' 300 characters of nested reprs."""
    text = f"{type(exc).__name__}: {redact(str(exc))}"
    reason = next((says for pattern, says in CONNECTION_CAUSES if pattern in text), None)
    return f"{type(exc).__name__}: {reason}" if reason else clipped(text.splitlines()[0])


def clipped(text: str, limit: int = 200) -> str:
    """`text` cut at a word, never mid-word, with an ellipsis where it was cut."""
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def _download(url: str, dest: Path, *, timeout: float, retries: int, max_bytes: int | None, limit_name: str,
              what: str) -> None:
    """Stream `url` into `dest`: retries with backoff (or Retry-After), resuming where the server allows."""
    shown = redact(url)
    dest.write_bytes(b"")
    last = ""
    for attempt in range(retries + 1):
        try:
            _attempt(url, dest, timeout=timeout, max_bytes=max_bytes, limit_name=limit_name, what=what)
            return
        except _Retry as retry:
            last = str(retry)
            wait = retry.wait
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError) as exc:
            last = why_not_connected(exc)
            wait = None
        except (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError) as exc:
            raise FetchError(f"cannot download {what} {shown}: the server's compressed body is corrupt "
                             f"({type(exc).__name__}); try again later or use a mirror") from None
        except requests.exceptions.TooManyRedirects:
            raise FetchError(f"cannot download {what} {shown}: too many redirects (a redirect loop?); "
                             "fix the URL") from None
        except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema, requests.exceptions.URLRequired, ValueError) as exc:
            reason = clipped(redact(str(exc)).splitlines()[0])
            raise FetchError(f"cannot download {what} {shown}: {reason}; fix the URL in params.yaml") from None
        if attempt < retries:
            time.sleep(wait if wait is not None else min(2.0 ** (attempt + 1), 30.0) / 4)
    raise FetchError(
        f"cannot download {what} {shown} after {retries + 1} attempts ({last}); "
        "check the network, or point params.yaml at a mirror, a file:// URL or a local path"
    )


def _attempt(url: str, dest: Path, *, timeout: float, max_bytes: int | None, limit_name: str, what: str) -> None:
    """One request; appends to what `dest` already holds when the server honours a Range request."""
    have = dest.stat().st_size
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, stream=True, timeout=timeout, headers=headers) as resp:
        if resp.status_code in (429, 503) or resp.status_code >= 500:
            wait = _retry_after(resp.headers.get("Retry-After"))
            if wait is not None and wait > MAX_RETRY_AFTER:
                raise FetchError(f"cannot download {what} {redact(url)}: HTTP {resp.status_code}, the server asks "
                                 f"to retry after {wait:.0f} s; try again later")
            raise _Retry(f"HTTP {resp.status_code}", wait)
        if resp.status_code >= 400:
            raise FetchError(f"cannot download {what} {redact(url)}: HTTP {resp.status_code} (check the URL)")
        encoded = resp.headers.get("Content-Encoding", "identity").lower() != "identity"
        resumed = (have and resp.status_code == 206 and not encoded
                   and _range_start(resp.headers.get("Content-Range")) == have)
        if resp.status_code == 206 and not resumed:  # a part we cannot append: start again from byte 0
            dest.write_bytes(b"")
            raise _Retry("the server answered with a part that does not continue the file")
        if not resumed:
            have = 0
        length = _content_length(resp, url, what)
        total = have + length if length is not None else None
        if max_bytes is not None and total is not None and total > max_bytes:
            raise FetchError(f"{what} {redact(url)} is {total / 2**20:.0f} MB, over {limit_name}; "
                             "raise it if the file really is this big")
        _stream(resp, dest, append=bool(resumed), have=have, total=total, timeout=timeout, max_bytes=max_bytes,
                limit_name=limit_name, url=url, what=what)
        got = resp.raw.tell()  # bytes on the wire: what Content-Length counts, even for an encoded body
        if length is not None and got != length:
            raise _Retry(f"connection dropped after {have + got} of {total} bytes")


def _stream(resp: requests.Response, dest: Path, *, append: bool, have: int, total: int | None, timeout: float,
            max_bytes: int | None, limit_name: str, url: str, what: str) -> None:
    """Write the body as it arrives; give up on a transfer slower than MIN_BYTES_PER_WINDOW per `timeout`."""
    written = have
    window_start, window_bytes = time.monotonic(), 0
    with open(dest, "ab" if append else "wb") as f, tqdm(
        total=total, initial=have, unit="B", unit_scale=True, desc=f"download {source_name(url)}", leave=False,
        disable=None,  # bars on a terminal only: in `dvc queue` logs they were escape codes
    ) as bar:
        while chunk := resp.raw.read1(CHUNK, decode_content=True):
            written += len(chunk)
            if max_bytes is not None and written > max_bytes:
                raise FetchError(f"{what} {redact(url)} grew past {limit_name} while downloading; refusing it")
            f.write(chunk)
            bar.update(len(chunk))
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - window_start >= timeout:
                if window_bytes < MIN_BYTES_PER_WINDOW:
                    raise _Retry(f"stalled: {window_bytes} bytes in {now - window_start:.0f} s")
                window_start, window_bytes = now, 0


def _content_length(resp: requests.Response, url: str, what: str) -> int | None:
    value = resp.headers.get("Content-Length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        length = -1
    if length < 0:
        raise FetchError(f"cannot download {what} {redact(url)}: the server sent Content-Length {value[:40]!r}, "
                         "not a byte count; use another mirror")
    return length


def _range_start(value: str | None) -> int | None:
    """The first byte of `Content-Range: bytes START-END/TOTAL`."""
    try:
        return int(value.split()[1].split("-")[0]) if value else None
    except (IndexError, ValueError):
        return None


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, given as seconds or as an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
