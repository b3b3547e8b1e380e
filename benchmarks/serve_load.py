"""The web endpoint under attack: are legitimate users still served, fast, by a small server?

    python benchmarks/serve_load.py [--model efficientnet_lite0] [--legit 100]

While 8 clients post a lossless WebP of a few dozen bytes declaring 16383x10000 pixels (3 GB once
decoded) in a loop and 500 half-open connections (half a header, then nothing) are held, `--legit`
uploads of a 3024x4032 phone photo, 4 at a time: how many got the right class, their p50/p99 latency,
and the server's peak RSS. Targets (issue 17, a 2-core CPU): every answer right, p99 < 2 s, < 1 GB.
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from PIL import Image
from scale import cpu_name
from serve import exported, peak_rss_mb, phone_photo, start_server

from foodvision.model import build_backbone, eval_transform, replace_head


def webp_bomb() -> bytes:
    """A lossless WebP of 16383 x 10000 black pixels: a few dozen bytes that decode to 3 GB (RGBA)."""
    buffer = io.BytesIO()
    Image.new("L", (16383, 10000)).save(buffer, "WEBP", lossless=True, quality=0, method=0)
    return buffer.getvalue()


def under_attack(onnx_path: Path, photo: bytes, n: int) -> None:
    bomb = webp_bomb()
    proc, url = start_server(onnx_path)
    host, port = url.removeprefix("http://").split(":")
    stop = threading.Event()
    bombs = []

    def attacker() -> None:
        while not stop.is_set():
            try:
                bombs.append(requests.post(f"{url}/api/predict", files={"image": ("b.webp", bomb)}, timeout=30)
                             .status_code)
            except requests.RequestException:
                bombs.append(0)

    try:
        idle = []
        for _ in range(500):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a header, then nothing
            idle.append(s)
        want = requests.post(f"{url}/api/predict", files={"image": ("p.jpg", photo)}, timeout=60).json()["class"]
        attackers = [threading.Thread(target=attacker) for _ in range(8)]
        for t in attackers:
            t.start()

        def legit(_: int) -> tuple[float, bool]:
            t = time.perf_counter()
            try:
                answer = requests.post(f"{url}/api/predict", files={"image": ("p.jpg", photo)}, timeout=60)
                right = answer.status_code == 200 and answer.json()["class"] == want
            except requests.RequestException:
                right = False
            return 1000 * (time.perf_counter() - t), right

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(legit, range(n)))
        stop.set()
        for t in attackers:
            t.join()
        peak = peak_rss_mb(proc.pid)
        for s in idle:
            s.close()
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=20)
    latencies = sorted(ms for ms, _ in results)
    q = statistics.quantiles(latencies, n=100)
    print(f"\nunder attack ({len(bomb)}-byte WebP bomb from 8 clients, {len(bombs)} sent, statuses "
          f"{sorted(set(bombs))}; 500 half-open connections held): {sum(r for _, r in results)}/{n} legitimate "
          f"uploads answered right (4 at a time), p50 {statistics.median(latencies):.0f} ms, p99 {q[98]:.0f} ms; "
          f"server peak RSS {peak:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--legit", type=int, default=100, help="phone-photo uploads while under attack")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; {args.model}", flush=True)
    torch.manual_seed(0)
    model = build_backbone(args.model)
    replace_head(model, 3, 0.2)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_path.write_bytes(exported(model.eval(), eval_transform(args.model, None), args.model))
        under_attack(onnx_path, phone_photo(), args.legit)


if __name__ == "__main__":
    main()
