import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from foodvision.fetch import FetchError, fetch, source_name

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """/ok serves PAYLOAD; /fail-N answers 500 N times then serves; /drop promises more than it sends."""

    hits: dict[str, int] = {}

    def do_GET(self) -> None:
        n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path.startswith("/fail-") and n <= int(self.path.rsplit("-", 1)[1]):
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2] if self.path == "/drop" else PAYLOAD)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_url():
    FlakyHandler.hits = {}
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


def test_source_name():
    assert source_name("https://h/models/efficientnet_b0_rwightman-7f5810bc.pth?x=1") == "efficientnet_b0_rwightman-7f5810bc.pth"
    assert source_name("file:///data/my%20photo.jpg") == "my photo.jpg"
    assert source_name("photos/sushi.jpg") == "sushi.jpg"
