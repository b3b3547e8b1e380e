"""Engines benchmark: what runs the frozen backbone fastest here, and whether `featurize` keeps up with it.

    python benchmarks/engines.py [--n 3000] [--model efficientnet_lite0] [--rounds 5]

In one run, on this machine: each engine's bare forward of the backbone (the same random batch of 32,
alternated rounds, medians): torch fp32 (the BN-folded channels-last body), ONNX Runtime and OpenVINO
fp32 on the exported graph, and torch autocast and OpenVINO in bf16 where the CPU has AVX-512-BF16 or
AMX; decoding (Pillow with JPEG draft) and the eval transform (torchvision's preset and ours, the same
bytes) in ms per photo on one core; then the `featurize` stage as its own process on N real photos (as
`scale.py` makes them, each file different) for each engine and precision, each with its own empty
feature cache (a cold run): the feature pass's images/s against the fastest bare forward in that
precision, the whole stage's seconds and peak RSS, the largest difference from torch fp32's features,
and the test accuracy the head reaches on each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from scale import ENV, cpu_name, make_dataset, make_project, peak_of, photo_pool  # noqa: E402

FORWARD = """
import json, statistics, sys, time, torch
from foodvision.backbone import onnx_engine, openvino_engine, pretrained_body, torch_engine
from foodvision.core.device import cpu_count, cpu_flags
from foodvision.export_backbone import onnx_bytes
body = pretrained_body(sys.argv[1], sys.argv[2], 3).module
rounds, cpu = int(sys.argv[3]), torch.device("cpu")
torch.manual_seed(0)
x = torch.randn(32, 3, 224, 224)
graph = onnx_bytes(body, 224, "features")
engines = {"torch fp32": torch_engine(body, cpu), "onnxruntime fp32": onnx_engine(graph, cpu_count()),
           "openvino fp32": openvino_engine(graph, cpu_count(), "fp32")}
if cpu_flags() & {"avx512_bf16", "amx_bf16"}:
    engines["torch bf16"] = torch_engine(body, cpu, torch.bfloat16)
    engines["openvino bf16"] = openvino_engine(graph, cpu_count(), "bf16")
times = {name: [] for name in engines}
with torch.inference_mode():
    for run in engines.values():
        run(x)  # warm up
    for _ in range(rounds):
        for name, run in engines.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
print(json.dumps({name: 32 / statistics.median(t) for name, t in times.items()}))
"""

DECODE = """
import json, statistics, sys, time, torch
from foodvision.data import EvalTransform, build_transform
from foodvision.images import open_rgb
torch.set_num_threads(1)
transform = json.loads(open(sys.argv[1]).read())
paths = sys.argv[2:]
blobs = [open(p, "rb").read() for p in paths]
import io
images = [open_rgb(io.BytesIO(b), transform["resize_size"]) for b in blobs]
steps = {"decode": lambda i: open_rgb(io.BytesIO(blobs[i]), transform["resize_size"]),
         "torchvision": lambda i: build_transform(transform)(images[i]),
         "EvalTransform": lambda i: EvalTransform(transform)(images[i])}
times = {name: [] for name in steps}
for _ in range(3):
    for name, step in steps.items():
        start = time.perf_counter()
        for i in range(len(blobs)):
            step(i)
        times[name].append((time.perf_counter() - start) / len(blobs) * 1e3)
print(json.dumps({name: statistics.median(t) for name, t in times.items()}))
"""


def bare_forwards(model: str, pretrained: Path, rounds: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", FORWARD, model, str(pretrained), str(rounds)], env=ENV,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def decode_per_core(transform: Path, photos: list[Path]) -> dict[str, float]:
    """Milliseconds per photo on one core: decoding, then each eval transform on the decoded image."""
    out = subprocess.run([sys.executable, "-c", DECODE, str(transform), *map(str, photos)], env=ENV,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def set_engine(project: Path, engine: str, precision: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["featurize"]["engine"], params["featurize"]["precision"] = engine, precision
    params["featurize"].update(cache_dir=str(project / "cache"), cache_gb=20)  # its own, empty: a cold run
    params["train"]["epochs"] = 5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def featurize_run(project: Path, n: int) -> dict[str, float]:
    """The featurize stage as its own process, then train and evaluate: its figures and the head's accuracy."""
    seconds, peak, out = peak_of([sys.executable, "stages/featurize.py"], project)
    found = re.findall(r"^featurize \w+: (\d+) images in ([\d.]+) s", out, re.M)
    pass_s = sum(float(s) for _, s in found)
    for stage in ("train", "evaluate"):
        peak_of([sys.executable, f"stages/{stage}.py"], project)
    accuracy = json.loads((project / "metrics/eval.json").read_text())["accuracy"]
    return {"pass_images_s": n / pass_s, "stage_s": seconds, "stage_images_s": n / seconds, "peak_mb": peak,
            "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; backbone {args.model}; {args.n} photos", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pool = photo_pool(work)
        first = make_project(work / "pretrained", args.model, None)
        subprocess.run([sys.executable, "stages/pretrained.py"], cwd=first, env=ENV, check=True, capture_output=True)
        pretrained = first / "models" / "pretrained"
        bare = bare_forwards(args.model, pretrained / "backbone.pth", args.rounds)
        for name, speed in bare.items():
            print(f"bare forward, {name}: {speed:.1f} images/s (batch 32, median of {args.rounds})", flush=True)
        photos = [p for ps in pool.values() for p in ps][:300]
        ms = decode_per_core(pretrained / "transform.json", photos)
        decode = 1e3 / (ms["decode"] + ms["EvalTransform"])
        print(f"on one core, per photo ({len(photos)} photos, medians of 3): decode {ms['decode']:.2f} ms, "
              f"torchvision's eval preset {ms['torchvision']:.2f} ms, EvalTransform (the same bytes) "
              f"{ms['EvalTransform']:.2f} ms: {decode:.1f} images/s decoded per core", flush=True)
        archive = make_dataset(work / "raw.zip", args.n, pool)
        runs, features = {}, {}
        configs = [("torch", "fp32"), ("onnxruntime", "fp32")]
        if "openvino bf16" in bare:
            configs += [("torch", "bf16"), ("openvino", "bf16")]
        for engine, precision in configs:
            name = f"{engine} {precision}"
            project = make_project(work / name.replace(" ", "-"), args.model, archive)
            shutil.copytree(pretrained, project / "models" / "pretrained")
            set_engine(project, engine, precision)
            peak_of([sys.executable, "stages/prepare.py"], project)
            runs[name] = featurize_run(project, args.n)
            features[name] = {s: np.load(project / "data/features" / f"{s}.npy") for s in ("train", "test")}
            shutil.rmtree(project)
            r = runs[name]
            print(f"featurize, {name}: pass {r['pass_images_s']:.1f} images/s; stage {r['stage_s']:.1f} s "
                  f"({r['stage_images_s']:.1f} images/s, export and check included), peak {r['peak_mb']:.0f} MB; "
                  f"test accuracy {r['accuracy']:.4f}", flush=True)
    fp32 = {k: v for k, v in bare.items() if k.endswith("fp32")}
    for name, r in runs.items():
        same = {k: v for k, v in bare.items() if k.endswith(name.split()[1])}
        best = max(same, key=same.get)
        diff = max(float(np.abs(features[name][s] - features["torch fp32"][s]).max()) for s in ("train", "test"))
        print(f"{name}: pass {r['pass_images_s'] / same[best]:.2f}x the fastest bare forward in its precision "
              f"({best}); "
              f"{r['pass_images_s'] / runs['torch fp32']['pass_images_s']:.2f}x torch fp32's pass, whole stage "
              f"{runs['torch fp32']['stage_s'] / r['stage_s']:.2f}x faster; features against torch fp32's: max "
              f"|difference| {diff:.3g}; test accuracy {r['accuracy']:.4f}")
    scale = max(float(np.abs(features["torch fp32"][s]).max()) for s in ("train", "test"))
    print(f"(largest |feature| {scale:.3g}; fastest fp32 bare forward {max(fp32.values()):.1f} images/s)")
    ours = runs["onnxruntime fp32"]
    print(f"decoding at onnxruntime fp32's pass speed takes {ours['pass_images_s'] / decode:.2f} of one core")

if __name__ == "__main__":
    main()
