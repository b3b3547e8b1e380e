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
    example = out / "test_0_000.jpg"  # as the predict stage keeps a test photo beside its plot
    example.write_bytes(ImageStore(trained.raw).read("test/sushi/000.jpg"))
    (out / "predictions.json").write_text(json.dumps(
        [{"source": "test/sushi/000.jpg", "true": "sushi", "pred": "sushi", "path": str(example)},
         {"source": "https://example.org/mine.jpg", "true": None, "pred": "pizza"}]))
    return out / "model.onnx"


@contextmanager
def serving(model: Path, examples: Path) -> Iterator[str]:
    """`python -m foodvision.serve --port 0`: the OS picks a free port (no race with another process for one
    chosen beforehand) and the banner names it; stopped (and waited for) at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "foodvision.serve", "--model", str(model), "--examples",
                             str(examples), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        banner = proc.stdout.readline()  # printed once the socket listens
        found = re.search(r"on (http://127\.0\.0\.1:\d+)/$", banner.strip())
        assert found, f"the server did not start: {banner}"
        yield found.group(1)
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
        "text": (post(server, b"hello, not a photo"), "not an image Pillow can read"),
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
    code = ("import io, sys; from foodvision.serve import Classifier; from PIL import Image; b = io.BytesIO(); "
            "Image.new('RGB', (300, 200), 'red').save(b, 'JPEG'); Classifier(sys.argv[1])(b.getvalue()); "
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
