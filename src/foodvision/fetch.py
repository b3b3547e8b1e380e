"""Fetch one file from an http(s) URL, a file:// URL or a local path, verified and atomically.

The same code serves the dataset archive, the pretrained backbone and the user's own photos, so an
air-gapped user can point any of them at a mirror or a local copy.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import requests
from tqdm import tqdm

from foodvision.atomic import atomic_path
from foodvision.errors import FoodVisionError

CHUNK = 1 << 20


class FetchError(FoodVisionError):
    pass


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https", "file")


def source_name(source: str) -> str:
    """The file name a URL or path points at (used for torchvision's hash-in-name convention)."""
    return Path(unquote(urlparse(source).path) if is_url(source) else source).name


def local_path(source: str) -> Path | None:
    """The filesystem path of a file:// URL or plain path; None for http(s)."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    return Path(source).expanduser()


def fetch(
    source: str,
    dest: Path,
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    what: str = "file",
) -> str:
    """Copy `source` to `dest` and return its sha256; `dest` appears only once it is verified."""
    with atomic_path(Path(dest)) as tmp:
        path = local_path(source)
        if path is None:
            _download(source, tmp, timeout=timeout, retries=retries, what=what)
        elif not path.is_file():
            raise FetchError(f"{what} not found: {path} (fix the path or URL in params.yaml)")
        else:
            shutil.copyfile(path, tmp)
        digest = file_sha256(tmp)
        if sha256 is not None and digest != sha256.lower():
            raise FetchError(
                f"sha256 mismatch for {source}: expected {sha256.lower()}, got {digest}; "
                "the file is corrupt or not the one expected (fix the URL or the sha256 param)"
            )
        if sha256_prefix and not digest.startswith(sha256_prefix):
            raise FetchError(
                f"sha256 of {source} is {digest}, but its file name promises a hash starting "
                f"{sha256_prefix}; the download is corrupt or the mirror serves another file"
            )
    return digest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, *, timeout: float, retries: int, what: str) -> None:
    """Stream `url` into `dest`, retrying network faults and 5xx with exponential backoff."""
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0**attempt, 30.0) / 4)
        try:
            with requests.get(url, stream=True, timeout=timeout) as resp:
                if resp.status_code >= 500 or resp.status_code == 429:
                    last = f"HTTP {resp.status_code}"
                    continue
                if resp.status_code >= 400:
                    raise FetchError(f"cannot download {what} {url}: HTTP {resp.status_code} (check the URL)")
                total = int(resp.headers.get("content-length") or 0) or None
                with open(dest, "wb") as f, tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"download {source_name(url)}", leave=False
                ) as bar:
                    for chunk in resp.iter_content(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                if total is not None and dest.stat().st_size != total:
                    last = f"connection dropped after {dest.stat().st_size} of {total} bytes"
                    continue
                return
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last = f"{type(exc).__name__}: {exc}".splitlines()[0]
    raise FetchError(
        f"cannot download {what} {url} after {retries + 1} attempts ({last}); "
        "check the network, or point params.yaml at a mirror, a file:// URL or a local path"
    )
