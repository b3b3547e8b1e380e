"""foodvision-serve: the JSON endpoint with good and bad uploads, concurrency, and the page in a real browser."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from conftest import make_image
from PIL import Image

from foodvision.data import build_transform
from foodvision.images import open_photo
from foodvision.model import load_checkpoint
from foodvision.store import ImageStore


def jpeg(cls: str, seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    make_image(cls, seed, size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def onnx_model(trained, exported) -> Path:
    out, _ = exported
    (out / "photos").mkdir(exist_ok=True)
    example = out / "photos" / "test_0_000.jpg"  # as the predict stage keeps a test photo (paths.examples)
    example.write_bytes(ImageStore(trained.raw).read("test/sushi/000.jpg"))
    (out / "predictions.json").write_text(json.dumps(
        [{"source": "test/sushi/000.jpg", "true": "sushi", "pred": "sushi", "path": str(example)},
         {"source": "https://example.org/mine.jpg", "true": None, "pred": "pizza"},
         {"source": "passwd", "true": "sushi", "pred": "sushi", "path": "/etc/passwd"},  # an edited file
         {"source": "model", "true": "sushi", "pred": "sushi", "path": str(out / "photos" / ".." / "model.onnx")}]))
    return out / "model.onnx"


@contextmanager
def serving(model: Path, examples: Path, *options: str, banner: list[str] | None = None) -> Iterator[str]:
    """`python -m foodvision.serve --port 0`: the OS picks a free port (no race with another process for one
    chosen beforehand) and the banner names it (appended to `banner` when given); stopped (and waited for)
    at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "foodvision.serve", "--model", str(model), "--examples",
                             str(examples), "--photos", str(examples.parent / "photos"), "--port", "0", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()  # printed once the socket listens
        found = re.search(r"on (http://127\.0\.0\.1:\d+)/(\?token=\S+)?$", first.strip())
        assert found, f"the server did not start: {first}"
        if banner is not None:
            banner.append(first.strip())
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextmanager
def logged(model: Path, log: Path, *options: str) -> Iterator[tuple[subprocess.Popen, str, str, int]]:
    """`foodvision-serve --port 0` with its log in `log`: (process, URL, host, port); stopped at the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "foodvision.serve", "--model", str(model), "--port", "0",
                                 *options], stdout=subprocess.PIPE, stderr=out, text=True)
    try:
        host, port = re.search(r"on http://(127\.0\.0\.1):(\d+)/", proc.stdout.readline()).groups()
        yield proc, f"http://{host}:{port}", host, int(port)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(onnx_model) -> Iterator[str]:
    with serving(onnx_model, onnx_model.parent / "predictions.json") as url:
        yield url


def post(url: str, data: bytes, field: str = "image") -> requests.Response:
    return requests.post(f"{url}/api/predict", files={field: ("photo.jpg", data, "image/jpeg")}, timeout=60)


def test_a_photo_gets_the_same_answer_as_the_torch_model(server, trained, tmp_path):
    """The same probabilities as `foodvision-predict` (to 1e-4), on a photo big enough to be decoded at reduced scale."""
    data = jpeg("sushi", 7, (2000, 1500))
    answer = post(server, data)
    assert answer.status_code == 200
    result = answer.json()
    assert set(result) == {"class", "probability", "probabilities", "ms"}
    assert list(result["probabilities"]) == sorted(result["probabilities"], key=result["probabilities"].get,
                                                   reverse=True)
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-5 and 0 < result["ms"] < 10_000
    (tmp_path / "photo.jpg").write_bytes(data)
    model, ckpt = load_checkpoint(trained.model)  # the training stack: torch, torchvision, the checkpoint
    with torch.inference_mode():
        x = build_transform(ckpt["transform"])(open_photo(tmp_path / "photo.jpg", ckpt["transform"])).unsqueeze(0)
        probs = torch.softmax(model(x), dim=1)[0]
    assert result["class"] == ckpt["class_names"][int(probs.argmax())]
    for cls, p in zip(ckpt["class_names"], probs.tolist()):
        assert abs(result["probabilities"][cls] - p) < 1e-4, cls


def test_bad_uploads_get_a_one_line_400_and_the_server_keeps_serving(server, tmp_path):
    bomb = io.BytesIO()
    Image.new("1", (20000, 10000)).save(bomb, "PNG", optimize=True)  # 200 megapixels in a few KB
    cases = {
        "text": (post(server, b"hello, not a photo"), "not an image this can read (JPEG, PNG, WebP, HEIC"),
        "jxl": (post(server, b"\xff\x0a" + bytes(100)), "JPEG XL is not supported: convert it to one of JPEG"),
        "empty": (post(server, b""), "empty upload"),
        "bomb": (post(server, bomb.getvalue()), "178,956,970-pixel limit"),
        "no field": (post(server, jpeg("pizza", 1), field="photo"), "no file in the multipart field `image`"),
        "no form": (requests.post(f"{server}/api/predict", data=b"x", timeout=10), "not a multipart/form-data"),
    }
    for name, (answer, expected) in cases.items():
        assert answer.status_code == 400, name
        error = answer.json()["error"]
        assert expected in error and "\n" not in error, (name, error)
    assert post(server, jpeg("pizza", 1)).status_code == 200, "still serving"


def test_twenty_concurrent_requests_are_all_answered_correctly(server):
    photos = [jpeg(("pizza", "steak", "sushi")[i % 3], 100 + i) for i in range(20)]
    alone = [post(server, p).json()["probabilities"] for p in photos]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda p: post(server, p), photos))
    assert [a.status_code for a in together] == [200] * 20
    assert [a.json()["probabilities"] for a in together] == alone


def test_the_examples_are_the_last_runs_test_photos(server, trained):
    listed = requests.get(f"{server}/api/examples", timeout=10).json()
    assert listed == [{"name": "000.jpg", "true": "sushi", "url": "/examples/0"}]
    image = requests.get(f"{server}{listed[0]['url']}", timeout=10)
    assert image.content == ImageStore(trained.raw).read("test/sushi/000.jpg")
    assert requests.get(f"{server}/examples/5", timeout=10).status_code == 404


def test_a_missing_or_foreign_model_is_one_line_at_start(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    for model, expected in ((tmp_path / "none.onnx", "not found: run `dvc repro export`"),
                            (tmp_path / "model.onnx", "is not a FoodVision ONNX export")):
        run = subprocess.run([sys.executable, "-m", "foodvision.serve", "--model", str(model)], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and expected in run.stderr, run.stderr


@contextmanager
def browser_page() -> Iterator[Any]:
    """A page of the system's headless Chromium, driven by Playwright (no browser download)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if not executable:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser.new_page()
        finally:
            browser.close()


def wait_for_cards(page: Any, n: int) -> None:
    """Until `n` cards show and the newest one has its answer (not the placeholder)."""
    page.wait_for_function(f"document.querySelectorAll('.card').length == {n} && "
                           "!document.querySelector('.class').textContent.startsWith('…')", timeout=60_000)


def class_shown_for(url: str, photo: Path) -> str:
    """Pick `photo` on the page in headless Chromium; the class line its card shows."""
    with browser_page() as page:
        page.goto(url)
        page.set_input_files("#files", str(photo))
        wait_for_cards(page, 1)
        return page.locator(".card .class").first.text_content()


def test_the_page_classifies_a_picked_photo_and_an_example_in_headless_chromium(server, tmp_path):
    (tmp_path / "steak.jpg").write_bytes(jpeg("steak", 3, (300, 200)))
    expected = post(server, (tmp_path / "steak.jpg").read_bytes()).json()["class"]
    requested = []
    with browser_page() as page:
        page.on("request", lambda r: requested.append(r.url))
        page.goto(server)
        page.set_input_files("#files", str(tmp_path / "steak.jpg"))
        wait_for_cards(page, 1)
        card = page.locator(".card").first
        assert card.locator(".class").text_content().startswith(f"{expected} ")
        assert card.locator(".bar").count() == 3 and " ms" in card.locator(".meta").text_content()
        page.locator("#examples img").first.click()
        wait_for_cards(page, 2)
        assert page.locator(".card .meta").first.text_content().startswith("000.jpg")
    assert requested and all(u.startswith((server, "blob:")) for u in requested), "nothing from the internet"


def test_the_server_never_imports_torch(onnx_model):
    code = ("import io, sys, foodvision.serve; from foodvision.web import Classifier; from PIL import Image; "
            "b = io.BytesIO(); "
            "Image.new('RGB', (300, 200), 'red').save(b, 'JPEG'); b.seek(0); Classifier(sys.argv[1])(b); "
            "sys.exit(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code, str(onnx_model)], timeout=60).returncode == 0


def test_a_taken_port_is_one_line_and_exit_2(onnx_model):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "foodvision.serve", "--model", str(onnx_model), "--port",
                              str(port)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert "pick another --port" in run.stderr


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """An RGBA PNG whose header declares `width` x `height` (2.7 GB decoded at 13000²), in 69 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF made by Pillow whose screen says `width` x `height`."""
    import struct

    buffer = io.BytesIO()
    Image.new("P", (4, 4)).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def test_image_bombs_are_refused_from_the_header_and_the_server_stays_small(server):
    """Each bomb is a few hundred bytes; decoded, each would take 1-26 GB. Refused before any pixel, in one line."""
    webp = io.BytesIO()
    Image.new("L", (16383, 10000)).save(webp, "WEBP", lossless=True, quality=0, method=0)  # 3 GB as RGBA
    cases = {"1 x 4000": (png((1, 4000)), "longer than 20:1"), "1 x 100000": (png((1, 100000)), "longer than 20:1"),
             "64 megapixels": (png((8000, 8000), "1"), "over the 50,000,000-pixel limit"),
             "WebP 16383 x 10000": (webp.getvalue(), "16383 x 10000 pixels is over the 50,000,000-pixel limit"),
             "RGBA PNG 13000 x 13000": (png_claiming(13000, 13000), "13000 x 13000 pixels is over the 50,000,000"),
             "GIF 16000 x 11000": (gif_claiming(16000, 11000), "16000 x 11000 pixels is over the 50,000,000")}
    for name, (data, expected) in cases.items():
        assert len(data) < 20_000, name
        answer = post(server, data)
        assert answer.status_code == 400, name
        error = answer.json()["error"]
        assert expected in error and "\n" not in error, (name, error)
    assert post(server, jpeg("pizza", 1)).status_code == 200, "still serving"


def test_a_chunked_upload_is_cut_off_at_the_limit_not_stored(server):
    """No Content-Length: the body is counted as it arrives, and refused once it passes 20 MB."""
    sent = []

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
        for _ in range(200):  # 200 MB if nobody stops it
            sent.append(1)
            yield b"x" * 2**20

    try:
        answer = requests.post(f"{server}/api/predict", data=body(), timeout=60,
                               headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert answer.status_code == 413 and "over 20 MB" in answer.json()["error"]
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
        # the server answered 413 and closed while the client was still sending: as good. The close can reset
        # the connection before the client has read all of the answer (a loaded machine): the same outcome
        pass
    assert len(sent) < 100, "the server read far past its limit"
    assert post(server, jpeg("pizza", 1)).status_code == 200, "still serving"


def test_other_sites_pages_and_hosts_are_refused(server):
    """Any web page the user visits can post to localhost: its requests carry Origin / Sec-Fetch-Site, and a
    DNS-rebinding page an other Host; all refused before the upload is read."""
    photo = {"image": ("p.jpg", jpeg("pizza", 1), "image/jpeg")}
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        answer = requests.post(f"{server}/api/predict", files=photo, headers=headers, timeout=30)
        assert answer.status_code == 403 and "another site" in answer.json()["error"], headers
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "[::2]:80"):
        rebound = requests.post(f"{server}/api/predict", files=photo, headers={"Host": host}, timeout=30)
        assert rebound.status_code == 400 and "only to this machine" in rebound.json()["error"], host
    for host in ("LOCALHOST", "127.0.0.1", f"localhost:{server.rsplit(':', 1)[1]}"):
        assert requests.get(f"{server}/api/examples", headers={"Host": host}, timeout=30).status_code == 200, host
    same = requests.post(f"{server}/api/predict", files=photo, headers={"Origin": server,
                         "Sec-Fetch-Site": "same-origin"}, timeout=30)
    assert same.status_code == 200, "the server's own page"


def test_every_answer_is_json_the_routers_own_included(server):
    """The API promises `{"error": ...}`: a path that does not exist and a method a route does not take too."""
    for method, path, status in (("GET", "/nope", 404), ("GET", "/api/predict", 405), ("DELETE", "/", 405)):
        answer = requests.request(method, f"{server}{path}", timeout=10)
        assert answer.status_code == status and answer.headers["content-type"] == "application/json"
        assert f"no {method} {path} here" in answer.json()["error"]


def test_only_the_predict_stages_photos_are_examples(server):
    listed = requests.get(f"{server}/api/examples", timeout=10).json()
    assert [e["name"] for e in listed] == ["000.jpg"], "not /etc/passwd, not a file outside the photos folder"
    assert requests.get(f"{server}/examples/1", timeout=10).status_code == 404


def test_a_token_guards_every_route(onnx_model):
    """Every route asks for the token; the printed address works whatever the token holds (`+&#` included,
    percent-encoded), the `Bearer` scheme in any case, and `Multipart/Form-Data` is multipart/form-data."""
    banner: list[str] = []
    secret = "p+q&r#s"
    with serving(onnx_model, onnx_model.parent / "predictions.json", "--token", secret, banner=banner) as url:
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(f"{url}/api/examples", timeout=10).status_code == 401
        assert requests.get(f"{url}/?token=wrong", timeout=10).status_code == 401
        printed = banner[0].split(" on ", 1)[1]
        assert printed.endswith("?token=p%2Bq%26r%23s") and requests.get(printed, timeout=10).status_code == 200
        for scheme in ("Bearer", "bearer", "BEARER"):
            answer = requests.post(f"{url}/api/predict", files={"image": ("p.jpg", jpeg("pizza", 1), "image/jpeg")},
                                   headers={"Authorization": f"{scheme} {secret}"}, timeout=30)
            assert answer.status_code == 200, scheme
        body, content_type = requests.models.RequestEncodingMixin._encode_files(
            {"image": ("p.jpg", jpeg("pizza", 1), "image/jpeg")}, {})
        answer = requests.post(f"{url}/api/predict", data=body, timeout=30,
                               headers={"Authorization": f"Bearer {secret}",
                                        "Content-Type": content_type.replace("multipart/form-data", "Multipart/Form-Data")})
        assert answer.status_code == 200, answer.text


def test_a_client_that_stalls_mid_request_is_disconnected(onnx_model):
    import socket
    import time

    with serving(onnx_model, onnx_model.parent / "predictions.json", "--timeout", "2") as url:
        host, port = url.removeprefix("http://").split(":")
        stalled = [socket.create_connection((host, int(port))) for _ in range(50)]
        for s in stalled:
            s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a header, then nothing
        assert post(url, jpeg("pizza", 1)).status_code == 200, "others are still served"
        start = time.monotonic()
        stalled[0].settimeout(30)
        assert stalled[0].recv(100) == b"", "closed by the server"
        assert time.monotonic() - start < 25, "long before the client would have given up"
        for s in stalled:
            s.close()


def test_bad_ports_hosts_and_model_metadata_fail_at_start(onnx_model, tmp_path):
    import onnx

    for args, expected in ((["--port", "70000"], "not a port number from 0 to 65535"),
                           (["--host", ""], "--host is empty"),
                           (["--max-connections", "0"], "'0' is not a number from 1 up"),
                           (["--upload-memory-mb", "-1"], "'-1' is not a number from 0 up"),
                           (["--upload-disk-mb", "nan"], "'nan' is not a number from 0 up"),
                           (["--upload-disk-mb", "inf"], "'inf' is not a number from 0 up"),
                           (["--timeout", "0"], "'0' is not a number from 0.1 up")):
        run = subprocess.run([sys.executable, "-m", "foodvision.serve", "--model", str(onnx_model), *args],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and expected in run.stderr, run.stderr
    model = onnx.load(str(onnx_model))
    for prop in model.metadata_props:
        if prop.key == "classes":
            prop.value = json.dumps(["pizza", "steak"])
    onnx.save(model, str(tmp_path / "two.onnx"))
    run = subprocess.run([sys.executable, "-m", "foodvision.serve", "--model", str(tmp_path / "two.onnx")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "lists 2 classes for 3 outputs" in run.stderr


def test_inside_a_project_the_files_are_those_dvc_yaml_names(onnx_model, tmp_path):
    """No options in a project folder: the model, predictions and photos of its dvc.yaml's `paths:` (moved
    ones included); outside a project, without --model: one line asking for it, exit 2."""
    import shutil

    from conftest import default_params_text, write_pipeline

    project = tmp_path / "project"
    shutil.copytree(onnx_model.parent, project / "out", ignore=shutil.ignore_patterns("check"))
    (project / "params.yaml").write_text(default_params_text())
    write_pipeline(project, onnx="out/model.onnx", predictions_json="out/predictions.json", examples="out/photos")
    listing = json.loads((project / "out" / "predictions.json").read_text())
    listing[0]["path"] = str(project / "out" / "photos" / "test_0_000.jpg")
    (project / "out" / "predictions.json").write_text(json.dumps(listing))
    proc = subprocess.Popen([sys.executable, "-m", "foodvision.serve", "--port", "0"], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("FoodVision: out/model.onnx (3 classes, 1 examples) on http://127.0.0.1:"), banner
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    run = subprocess.run([sys.executable, "-m", "foodvision.serve"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    assert run.stderr == f"error: no dvc.yaml in {tmp_path}: run inside the project, or give --model MODEL.onnx\n"


def test_iphone_heic_and_avif_photos_are_read(server):
    """HEIC (pillow-heif) and AVIF (Pillow's own), encoded here by real encoders: decoded to the PNG's pixels
    (to lossy-codec error) and answered."""
    import numpy as np
    from pillow_heif import register_heif_opener

    register_heif_opener()
    ramp = Image.linear_gradient("L").resize((320, 240))  # smooth, as photos are: lossy codecs keep it
    image = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("L", (320, 240), 90)))
    transform = {"resize_size": 232, "crop_size": 224, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    for fmt in ("HEIF", "AVIF"):
        buffer = io.BytesIO()
        image.save(buffer, fmt, quality=95)
        data = buffer.getvalue()
        assert data[4:8] == b"ftyp", data[:16]
        decoded = np.asarray(open_photo(io.BytesIO(data), transform), dtype=np.float64)
        assert decoded.shape == (240, 320, 3) and np.abs(decoded - np.asarray(image, dtype=np.float64)).mean() < 8
        answer = post(server, data)
        assert answer.status_code == 200, (fmt, answer.text)


def test_sigterm_stops_the_server_while_a_client_stalls(onnx_model):
    """uvicorn waits for open connections on shutdown: a stalled one must not keep the server alive."""
    import signal
    import socket
    import time

    proc = subprocess.Popen([sys.executable, "-m", "foodvision.serve", "--model", str(onnx_model), "--port", "0",
                             "--examples", "/dev/null"], stdout=subprocess.PIPE, text=True)
    try:
        host, port = re.search(r"on http://([^/]+):(\d+)/", proc.stdout.readline()).groups()
        stalled = socket.create_connection((host, int(port)))
        stalled.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nhalf")
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.monotonic() - start < 15, "the graceful-shutdown timeout ended it"
        stalled.close()
    finally:
        proc.kill()
        proc.wait()


def test_an_ipv6_loopback_host_is_served(onnx_model):
    """`--host ::1` (or `[::1]`, as a URL writes it) listens on IPv6 and counts as this machine."""
    import socket

    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    for host in ("::1", "[::1]"):
        proc = subprocess.Popen([sys.executable, "-m", "foodvision.serve", "--model", str(onnx_model), "--host", host,
                                 "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            banner = proc.stdout.readline()
            found = re.search(r"on (http://\[::1\]:\d+)/$", banner.strip())
            assert found, banner
            assert requests.get(f"{found.group(1)}/api/examples", timeout=10).status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=20)


def test_an_aborted_upload_or_a_request_that_is_not_http_costs_no_log_line(onnx_model, tmp_path):
    """A client that closes mid-upload (any browser tab closed during a send) leaves nothing in the log: 20 of
    them must not flood it with 47-line tracebacks; nor do 20 malformed bodies or 20 requests that are not HTTP
    (each a JSON 400)."""
    import socket

    log = tmp_path / "serve.log"
    with logged(onnx_model, log) as (proc, url, host, port):
        for _ in range(20):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                          b"boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\npartial")
        for _ in range(20):  # a malformed multipart body: a JSON 400 each, no log line
            broken = requests.post(f"{url}/api/predict", data=b"--b\r\n\x00garbage", timeout=30,
                                   headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert broken.status_code == 400 and "not a multipart/form-data upload" in broken.json()["error"]
        for _ in range(20):  # bytes that are not HTTP: a JSON 400 each, and no log line either
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"GARBAGE \x00\x01\r\n\r\n")
                status, headers, body = answer_of(s)
                assert status == 400 and headers["content-type"] == "application/json" and "HTTP" in body["error"]
        assert post(url, jpeg("pizza", 1)).status_code == 200, "still serving"
    text = log.read_text()
    assert "Traceback" not in text and len(text.splitlines()) <= 2, text[-2000:]


def upload_head(length: int, boundary: bytes = b"b") -> bytes:
    """An upload's request line, headers and the start of its `image` part: a body to go on with."""
    return (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=" + boundary
            + b"\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n--" + boundary
            + b'\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n')


def answer_of(sock: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and JSON body of the answer the server sends on `sock` (read until it closes)."""
    sock.settimeout(30)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_uploads_share_one_budget_a_stalled_one_gives_way_and_a_full_server_says_retry(onnx_model, tmp_path):
    """Every upload books its size from one budget (memory, then disk): past it a newcomer is answered 503
    with Retry-After while the holders keep sending, and takes the place of one that stalled once it has."""
    import select
    import socket
    import threading
    import time

    log = tmp_path / "serve.log"
    with logged(onnx_model, log, "--upload-memory-mb", "1", "--upload-disk-mb", "2") as (proc, url, host, port):
        photo = jpeg("sushi", 3, (900, 700))  # 300 KB
        want = post(url, photo).json()["class"]
        holders = [socket.create_connection((host, int(port))) for _ in range(3)]
        for s in holders:  # 1 MB each: one fills the memory, two the disk
            s.sendall(upload_head(1_040_000))
        sending = threading.Event()
        sending.set()

        def trickle() -> None:  # 200 KB/s each: none of them stalls
            while sending.is_set():
                for s in holders:
                    s.sendall(b"x" * 20_000)
                time.sleep(0.1)

        t = threading.Thread(target=trickle)
        t.start()
        time.sleep(1.5)
        busy = post(url, photo)
        sending.clear()
        t.join()
        assert busy.status_code == 503 and busy.headers["Retry-After"].isdigit(), busy.text
        assert "try again" in busy.json()["error"]
        time.sleep(1.5)  # all three stalled now
        assert post(url, photo).json()["class"] == want, "served in a stalled upload's place"
        answered, _, _ = select.select(holders, [], [], 5)
        assert len(answered) == 1, "one holder cut off, the others left alone"
        status, headers, body = answer_of(answered[0])
        assert status == 503 and headers["retry-after"].isdigit() and "stalled" in body["error"]
        for s in holders:
            s.close()
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


def test_idle_and_half_open_connections_past_the_cap_make_room_for_honest_clients(onnx_model):
    """At the connection cap the quietest idle connection is closed for a newcomer (it used to be the newcomer:
    2,000 idle connections locked every user out)."""
    import socket

    with serving(onnx_model, onnx_model.parent / "predictions.json", "--max-connections", "40") as url:
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(40)]
        for s in idle[30:]:
            s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a header
        for _ in range(5):
            assert post(url, jpeg("pizza", 1)).status_code == 200
        idle[0].settimeout(10)
        assert idle[0].recv(100) == b"", "the oldest idle connection made room"
        idle[-1].setblocking(False)
        with pytest.raises(BlockingIOError):
            idle[-1].recv(100)  # the newest is still open
        for s in idle:
            s.close()


def test_sigterm_during_uploads_ends_quietly(onnx_model, tmp_path):
    """Uploads still arriving at shutdown are dropped at once: no 5-s wait, no CancelledError traceback each."""
    import signal
    import socket
    import time

    log = tmp_path / "serve.log"
    with logged(onnx_model, log) as (proc, url, host, port):
        uploads = [socket.create_connection((host, int(port))) for _ in range(5)]
        for s in uploads:
            s.sendall(upload_head(5_000_000) + b"x" * 100_000)
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.monotonic() - start < 4, "not the graceful-shutdown timeout"
        for s in uploads:
            s.close()
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text and len(text.splitlines()) <= 2, text[-2000:]


def test_a_multipart_body_is_parsed_as_it_arrives(server):
    """Two files, no `image` file, a broken body: one-line 400s; the photo in `image` beside other fields: 200."""
    photo = jpeg("pizza", 1)
    two = requests.post(f"{server}/api/predict", timeout=30,
                        files={"image": ("a.jpg", photo), "other": ("b.jpg", photo)})
    assert two.status_code == 400 and "more than one file" in two.json()["error"]
    field = requests.post(f"{server}/api/predict", timeout=30, data={"image": "not a file"},
                          files={"note": ("n.txt", b"hello")})
    assert field.status_code == 400 and field.json()["error"] == "no file in the multipart field `image`"
    broken = requests.post(f"{server}/api/predict", timeout=30, data=b"garbage",
                           headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert broken.status_code == 400 and broken.json()["error"].startswith("not a multipart/form-data upload")
    beside = requests.post(f"{server}/api/predict", timeout=30, data={"caption": "lunch"},
                           files={"image": ("a.jpg", photo)})
    assert beside.status_code == 200 and beside.json()["class"] in ("pizza", "steak", "sushi")


def test_a_full_temporary_folder_is_a_503_not_a_traceback(onnx_model, tmp_path):
    """Uploads past the memory budget go to files in TMPDIR; when that fills up mid-upload the client gets a
    JSON 503 with Retry-After and the server goes on (here TMPDIR is a 64 KB tmpfs in a private namespace)."""
    import shutil

    if not shutil.which("unshare") or subprocess.run(["unshare", "--mount", "--map-root-user", "true"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here")
    spool = tmp_path / "spool"
    spool.mkdir()
    log = tmp_path / "serve.log"
    script = (f"mount -t tmpfs -o size=64k none {spool} || exit 77; TMPDIR={spool} exec {sys.executable} -m "
              f"foodvision.serve --model {onnx_model} --port 0 --upload-memory-mb 0")
    with open(log, "w") as out:
        proc = subprocess.Popen(["unshare", "--mount", "--map-root-user", "sh", "-c", script], stdout=subprocess.PIPE,
                                stderr=out, text=True)
    try:
        banner = proc.stdout.readline()
        if proc.poll() == 77:
            pytest.skip("mounting a tmpfs is not allowed here")
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/", banner).group(1)
        small, big = jpeg("pizza", 1), jpeg("sushi", 3, (900, 700))  # a few KB; 300 KB
        full = post(url, big)
        assert full.status_code == 503 and full.headers["Retry-After"].isdigit(), full.text
        assert "cannot hold the upload" in full.json()["error"]
        assert post(url, small).status_code == 200, "still serving what fits"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]
