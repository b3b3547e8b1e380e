import gzip
import hashlib
import http.server
import re
import threading
import time
from pathlib import Path

import pytest

from foodvision.fetch import FetchError, fetch, redact, source_name

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """/ok serves PAYLOAD; /fail-N answers 500 N times then serves; /drop promises more than it sends;
    the rest are the misbehaviours of `odd()`."""

    hits: dict[str, int] = {}
    ranges: list[str | None] = []

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        n = self.hits[path] = self.hits.get(path, 0) + 1
        if path.startswith("/fail-") and n <= int(path.rsplit("-", 1)[1]):
            self.send_error(500)
            return
        if self.odd(path, n):
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2] if self.path == "/drop" else PAYLOAD)

    def log_message(self, *args: object) -> None:
        pass

    def reply(self, body: bytes, status: int = 200, **headers: str) -> None:
        self.send_response(status)
        headers = {key.replace("_", "-"): value for key, value in headers.items()}
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def odd(self, path: str, n: int) -> bool:
        """Answer `path` if it is one of the misbehaviours; False if it is not."""
        answers = {
            # Content-Encoding although identity was asked for
            "/gzip": lambda: self.reply(gzip.compress(PAYLOAD), Content_Encoding="gzip"),
            # 64 MiB of zeros in 64 KiB
            "/gzip-bomb": lambda: self.reply(gzip.compress(bytes(64 * 2**20)), Content_Encoding="gzip"),
            "/bad-gzip": lambda: self.reply(b"\x1f\x8b\x08\x00 certainly not deflate data" * 10, Content_Encoding="gzip"),
            "/huge": lambda: self.reply(b"", Content_Length=str(10 * 2**30)),  # announces 10 GiB
            "/bad-length": lambda: self.reply(PAYLOAD[:10], Content_Length="abc"),
            "/drip": self.drip,
            "/busy-long": lambda: self.reply(b"", 429, Retry_After="3600"),
            "/resume": self.resume,
            "/to-file": lambda: self.reply(b"", 302, Location="file:///etc/passwd"),
            "/loop": lambda: self.reply(b"", 302, Location="/loop"),
        }
        if path == "/busy" and n == 1:
            answers[path] = lambda: self.reply(b"", 503, Retry_After="1")
        if path not in answers:
            return False
        answers[path]()
        return True

    def drip(self) -> None:
        """One byte every 0.1 s: each read succeeds, the transfer never ends."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(1000):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(0.1)

    def resume(self) -> None:
        """The first answer stops half way; a Range request gets the rest."""
        self.ranges.append(self.headers.get("Range"))
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        if start:
            rest = PAYLOAD[start:]
            self.reply(rest, 206, Content_Range=f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.reply(PAYLOAD[: len(PAYLOAD) // 2], Content_Length=str(len(PAYLOAD)))


@pytest.fixture
def flaky_url():
    FlakyHandler.hits, FlakyHandler.ranges = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_http_download_verifies_sha256(flaky_url, tmp_path):
    assert fetch(f"{flaky_url}/ok", tmp_path / "f.bin", sha256=SHA) == SHA
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_file_url_and_plain_path(tmp_path):
    src = tmp_path / "src dir" / "a.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    assert fetch(src.as_uri(), tmp_path / "a.bin", sha256=SHA) == SHA
    assert fetch(str(src), tmp_path / "b.bin") == SHA
    assert (tmp_path / "b.bin").read_bytes() == PAYLOAD


def test_server_errors_are_retried_then_succeed(flaky_url, tmp_path):
    fetch(f"{flaky_url}/fail-2", tmp_path / "f.bin", retries=3)
    assert FlakyHandler.hits["/fail-2"] == 3
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_persistent_500_gives_up_and_leaves_nothing(flaky_url, tmp_path):
    with pytest.raises(FetchError, match=r"after 3 attempts \(HTTP 500\).*mirror"):
        fetch(f"{flaky_url}/fail-99", tmp_path / "f.bin", retries=2)
    assert FlakyHandler.hits["/fail-99"] == 3
    assert leftovers(tmp_path) == []


def test_dropped_connection_is_retried_then_reported(flaky_url, tmp_path):
    with pytest.raises(FetchError, match="after 2 attempts"):
        fetch(f"{flaky_url}/drop", tmp_path / "f.bin", retries=1)
    assert FlakyHandler.hits["/drop"] == 2
    assert leftovers(tmp_path) == []


def test_404_fails_at_once(server_url, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(f"{server_url}/missing.zip", tmp_path / "f.bin")
    assert leftovers(tmp_path) == []


def test_unreachable_host_names_the_url(tmp_path):
    with pytest.raises(FetchError, match=r"cannot download file http://127\.0\.0\.1:9/x\.zip"):
        fetch("http://127.0.0.1:9/x.zip", tmp_path / "f.bin", retries=0, timeout=2)


def test_checksum_mismatch_shows_both_and_keeps_nothing(flaky_url, tmp_path):
    wrong = "0" * 64
    with pytest.raises(FetchError, match=f"expected {wrong}, got {SHA}"):
        fetch(f"{flaky_url}/ok", tmp_path / "f.bin", sha256=wrong)
    with pytest.raises(FetchError, match="promises a hash starting deadbeef"):
        fetch(f"{flaky_url}/ok", tmp_path / "f.bin", sha256_prefix="deadbeef")
    assert leftovers(tmp_path) == []


def test_missing_local_file(tmp_path):
    with pytest.raises(FetchError, match="not found: .*nope.zip"):
        fetch(str(tmp_path / "nope.zip"), tmp_path / "f.bin")


@pytest.mark.timeout(60)  # a read of the pipe would wait for a writer forever: the limit fails this test, not the run
@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
def test_a_local_source_that_is_not_a_file_is_one_line(tmp_path):
    """data.url, model.weights_url, predict.images: a pipe, a device or a folder is named for what it is."""
    import os

    os.mkfifo(tmp_path / "pipe.zip")
    for source, kind in ((tmp_path / "pipe.zip", "a named pipe (FIFO)"), (Path("/dev/zero"), "a character device"),
                         (tmp_path, "a folder")):
        with pytest.raises(FetchError, match=rf"^dataset {source} is {re.escape(kind)}, not a file: give a file's"):
            fetch(str(source), tmp_path / "f.bin", what="dataset")
    assert not (tmp_path / "f.bin").exists()


def test_source_name():
    assert source_name("https://h/models/efficientnet_b0_rwightman-7f5810bc.pth?x=1") == "efficientnet_b0_rwightman-7f5810bc.pth"
    assert source_name("file:///data/my%20photo.jpg") == "my photo.jpg"
    assert source_name("photos/sushi.jpg") == "sushi.jpg"


def test_a_gzip_encoded_body_is_decoded_and_bounded(flaky_url, tmp_path):
    assert fetch(f"{flaky_url}/gzip", tmp_path / "f.bin", sha256=SHA) == SHA
    with pytest.raises(FetchError, match=r"/gzip-bomb grew past data.max_download_mb \(8 MB\) while downloading"):
        fetch(f"{flaky_url}/gzip-bomb", tmp_path / "g.bin", max_bytes=8 * 2**20, limit_name="data.max_download_mb (8 MB)")
    with pytest.raises(FetchError, match="/bad-gzip: the server's compressed body is corrupt"):
        fetch(f"{flaky_url}/bad-gzip", tmp_path / "h.bin")
    assert leftovers(tmp_path) == ["f.bin"]


def test_an_announced_size_over_the_limit_is_refused_before_downloading(flaky_url, tmp_path):
    with pytest.raises(FetchError, match=r"/huge is 10240 MB, over data.max_download_mb \(100 MB\)"):
        fetch(f"{flaky_url}/huge", tmp_path / "f.bin", max_bytes=100 * 2**20, limit_name="data.max_download_mb (100 MB)")
    with pytest.raises(FetchError, match="Content-Length 'abc', not a byte count"):
        fetch(f"{flaky_url}/bad-length", tmp_path / "f.bin")
    assert leftovers(tmp_path) == []


def test_a_dripping_server_is_cut_off(flaky_url, tmp_path):
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"after 1 attempts \(stalled: \d+ bytes in 1 s\)"):
        fetch(f"{flaky_url}/drip", tmp_path / "f.bin", retries=0, timeout=1.0)
    assert time.monotonic() - start < 30, "cut off long before the 100 s drip ends (loose: a loaded CI machine)"
    assert leftovers(tmp_path) == []


def test_retry_after_is_honoured_and_a_long_one_fails_at_once(flaky_url, tmp_path):
    start = time.monotonic()
    fetch(f"{flaky_url}/busy", tmp_path / "f.bin")
    assert time.monotonic() - start >= 1.0 and FlakyHandler.hits["/busy"] == 2
    with pytest.raises(FetchError, match="HTTP 429, the server asks to retry after 3600 s"):
        fetch(f"{flaky_url}/busy-long", tmp_path / "g.bin")
    assert FlakyHandler.hits["/busy-long"] == 1


def test_a_dropped_download_resumes_with_a_range_request(flaky_url, tmp_path):
    assert fetch(f"{flaky_url}/resume", tmp_path / "f.bin", sha256=SHA) == SHA
    assert FlakyHandler.ranges == [None, f"bytes={len(PAYLOAD) // 2}-"]


@pytest.mark.parametrize(("url", "message"), [
    ("{base}/to-file", "No connection adapters"),
    ("{base}/loop", "too many redirects"),
    ("http:///x.zip", "fix the URL"),
    ("http://[::1/x", "fix the URL"),
    ("s3://bucket/x.zip", "s3:// URLs are not supported"),
    ("ftp://host/x.zip", "ftp:// URLs are not supported"),
])
def test_bad_urls_are_one_line(flaky_url, tmp_path, url, message):
    with pytest.raises(FetchError, match=message) as raised:
        fetch(url.format(base=flaky_url), tmp_path / "f.bin", retries=0)
    assert "\n" not in str(raised.value)
    assert leftovers(tmp_path) == []


def test_credentials_never_appear_in_messages(flaky_url, tmp_path):
    url = flaky_url.replace("http://", "http://alice:s3cret@") + "/fail-99?token=abc123&x=1"
    with pytest.raises(FetchError) as raised:
        fetch(url, tmp_path / "f.bin", retries=0)
    message = str(raised.value)
    assert "s3cret" not in message and "abc123" not in message
    assert "alice:***@" in message and "token=***&x=***" in message
    assert redact("https://h/p.zip") == "https://h/p.zip" and redact("/data/a.zip") == "/data/a.zip"


def test_a_refused_connection_is_one_short_reason_not_a_chain_of_reprs(tmp_path):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/weights.pth"  # nothing listens there
    with pytest.raises(FetchError) as caught:
        fetch(url, tmp_path / "w.pth", retries=0)
    message = str(caught.value)
    assert "after 1 attempts (ConnectionError: connection refused); check the network" in message
    assert "HTTPConnectionPool" not in message and len(message) < 300
