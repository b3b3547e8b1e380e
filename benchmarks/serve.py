"""Serving benchmark: ONNX Runtime against torch, and the web endpoint on a phone photo.

    python benchmarks/serve.py [--model efficientnet_lite0] [--requests 20]

1. images/s of the classifier at batch 1 and 32 on random inputs: torch as `predict` runs it (BN
   folded, channels-last), torch as trained (eval mode), and ONNX Runtime on the export;
2. `foodvision-serve` as a user starts it: seconds until it first answers, its peak RSS, and
   `POST /api/predict` latency (p50, p90) over sequential requests of a 3024x4032 phone photo
   (../shared/data/04-pizza-dad.jpeg where present, else a generated one).
Weights are random (speed does not depend on them); everything runs in this one process's session
except the server, which is its own process.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import requests
import torch
from PIL import Image

from foodvision.backbone import frozen_body
from foodvision.export import head_onnx, joined_bytes
from foodvision.export_backbone import onnx_bytes
from foodvision.model import build_backbone, eval_transform, for_inference, replace_head

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "04-pizza-dad.jpeg"
sys.path.insert(0, str(Path(__file__).parent))
from scale import cpu_name  # noqa: E402


def rate(run, batch: int, seconds: float = 3.0) -> float:
    """Images/s of `run()` on one batch, after a warm-up, over about `seconds`."""
    run()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        done += batch
    return done / (time.perf_counter() - start)


def phone_photo() -> bytes:
    """The article's 12-megapixel photo where ../shared has it, else a generated one of that size."""
    if PHOTO.is_file():
        with Image.open(PHOTO) as im:
            if im.width * im.height >= 12_000_000:
                return PHOTO.read_bytes()
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (63, 84, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((3024, 4032), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.model}; torch {torch.__version__}, onnxruntime "
          f"{ort.__version__}", flush=True)
    torch.manual_seed(0)
    model = build_backbone(args.model)
    replace_head(model, 3, 0.2)
    model.eval()
    transform = eval_transform(args.model, None)
    fast = for_inference(model)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_path.write_bytes(exported(model, transform, args.model))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        print(f"{'batch':>5} {'torch eval':>11} {'torch predict':>14} {'ONNX Runtime':>13} {'ORT / predict':>14}")
        for batch in (1, 32):
            x = torch.randn(batch, 3, 224, 224)
            xl, xn = x.contiguous(memory_format=torch.channels_last), x.numpy()
            with torch.inference_mode():
                plain = rate(lambda: model(x), batch)  # noqa: B023
                folded = rate(lambda: fast(xl), batch)  # noqa: B023
            onnx = rate(lambda: session.run(["logits"], {"images": xn}), batch)  # noqa: B023
            print(f"{batch:>5} {plain:>9.1f}/s {folded:>12.1f}/s {onnx:>11.1f}/s {onnx / folded:>13.2f}x", flush=True)
        serve(onnx_path, phone_photo(), args.requests)


def exported(model: torch.nn.Module, transform: dict, name: str) -> bytes:
    """The model as the two-part export writes it: the folded backbone's graph joined to the head's Gemm."""
    import onnx

    head = model.classifier[1]
    body = frozen_body(model, "classifier").to(memory_format=torch.contiguous_format)
    backbone = onnx.load_from_string(onnx_bytes(body, transform["crop_size"], "features"))
    weights = (head.weight.detach().numpy(), head.bias.detach().numpy())
    return joined_bytes(backbone, head_onnx(weights, backbone.ir_version), ["pizza", "steak", "sushi"], transform,
                        name)


def start_server(onnx_path: Path, log: Any = None) -> tuple[subprocess.Popen, str]:
    """`foodvision-serve --port 0` as a user starts it (its stderr to `log` when given); (process, base URL) once
    its banner is out."""
    proc = subprocess.Popen([sys.executable, "-m", "foodvision.serve", "--model", str(onnx_path), "--port", "0",
                             "--examples", os.devnull], stdout=subprocess.PIPE, stderr=log, text=True)
    found = re.search(r"on (http://[^/]+)/", proc.stdout.readline())
    if not found:
        raise SystemExit("the server did not start")
    return proc, found.group(1)


def peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    """A process's peak RSS (VmHWM), or its RSS now with `field="VmRSS"`, in MB."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith(field))) / 1024


def serve(onnx_path: Path, photo: bytes, n: int) -> None:
    start = time.perf_counter()
    proc, url = start_server(onnx_path)
    try:
        requests.get(url, timeout=10)
        started = time.perf_counter() - start
        size = Image.open(io.BytesIO(photo)).size
        latencies, server_ms = [], []
        for _ in range(n):
            t = time.perf_counter()
            answer = requests.post(f"{url}/api/predict", files={"image": ("photo.jpg", photo, "image/jpeg")},
                                   timeout=60)
            latencies.append(1000 * (time.perf_counter() - t))
            server_ms.append(answer.json()["ms"])
        for bad in (b"", b"not an image"):
            assert requests.post(f"{url}/api/predict", files={"image": ("x", bad)}, timeout=60).status_code == 400
        alive = requests.post(f"{url}/api/predict", files={"image": ("p.jpg", photo)}, timeout=60).status_code
        peak = peak_rss_mb(proc.pid)  # the server's own
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    q = statistics.quantiles(latencies, n=10)
    print(f"\nfoodvision-serve: first answer {started:.2f} s after the command; peak RSS {peak:.0f} MB")
    print(f"POST /api/predict, {size[0]}x{size[1]} JPEG ({len(photo) / 2**20:.1f} MB), {n} sequential requests: "
          f"p50 {statistics.median(latencies):.0f} ms, p90 {q[8]:.0f} ms (server's own ms: p50 "
          f"{statistics.median(server_ms):.0f}); after two bad uploads: HTTP {alive}")


if __name__ == "__main__":
    main()
