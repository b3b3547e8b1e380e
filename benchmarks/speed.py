"""Speed and memory benchmark: the article's training loop against ours, and whole `dvc repro` runs.

    python benchmarks/speed.py train [--epochs 5 20] [--model efficientnet_lite0]
    python benchmarks/speed.py pipeline [--model efficientnet_lite0]

Uses ../shared/data/pizza_steak_sushi.zip when present, else generated images (same counts).
Every figure is measured in the same run, on the same data, backbone and epochs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would drown the figures; set before tqdm loads

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from foodvision.data import build_transform
from foodvision.download import extract_dataset
from foodvision.model import classifier_for
from foodvision.params import ModelParams, TrainParams
from foodvision.prepare import prepare
from foodvision.pretrained import fetch_pretrained
from foodvision.train import seed_everything, train

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "pizza_steak_sushi.zip"
COUNTS = {"train": {"pizza": 78, "steak": 75, "sushi": 72}, "test": {"pizza": 25, "steak": 19, "sushi": 31}}


def dataset_zip(work: Path) -> Path:
    """The real archive, or one with the same class counts of generated 512x384 JPEGs."""
    if REAL.is_file():
        return REAL
    rng = np.random.default_rng(0)
    folder = work / "generated"
    for split, counts in COUNTS.items():
        for c, (cls, n) in enumerate(counts.items()):
            (folder / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.normal(80 * c + 40, 40, size=(384, 512, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / split / cls / f"{i}.jpg", quality=90)
    return Path(shutil.make_archive(str(work / "generated"), "zip", folder))


def article_loop(raw: Path, pretrained: Path, spec: dict, model_name: str, epochs: int, seed: int) -> float:
    """The article's engine.train: ImageFolder + DataLoader(batch 32, num_workers=cpu_count), model.train()
    each epoch (frozen params, but BatchNorm in train mode), then eval; returns final test accuracy
    over samples (the article averages over batches)."""
    seed_everything(seed)
    model, _ = classifier_for(model_name, pretrained, len(spec["classes"]), 0.2, seed)
    transform = build_transform(spec["transform"])
    workers = os.cpu_count() or 1
    train_dl = DataLoader(ImageFolder(raw / "train", transform), batch_size=32, shuffle=True, num_workers=workers)
    test_dl = DataLoader(ImageFolder(raw / "test", transform), batch_size=32, shuffle=False, num_workers=workers)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    acc = 0.0
    for _ in range(epochs):
        model.train()
        for x, y in train_dl:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = total = 0
        with torch.inference_mode():
            for x, y in test_dl:
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
        acc = correct / total
    return acc


def bench_train(model_name: str, epoch_list: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        archive = dataset_zip(work)
        raw, spec_path, backbone = work / "raw", work / "spec.json", work / "backbone.pth"
        extract_dataset(archive, raw)
        fetch_pretrained(model_name, "DEFAULT", None, backbone, transform_out=work / "transform.json")
        spec = prepare(raw, spec_path, transform_path=work / "transform.json", batch_size=32, seed=42)
        print(f"\ndata: {archive.name}, backbone: {model_name}, torch threads: {torch.get_num_threads()}")
        print(f"{'epochs':>6} {'article loop':>13} {'foodvision':>11} {'speed-up':>9} {'loop acc':>9} {'our acc':>8}")
        for epochs in epoch_list:
            start = time.perf_counter()
            loop_acc = article_loop(raw, backbone, spec, model_name, epochs, seed=42)
            t_loop = time.perf_counter() - start
            start = time.perf_counter()
            history = train(spec_path, backbone, ModelParams(name=model_name), TrainParams(epochs=epochs, device="cpu"),
                            seed=42, model_out=work / "m.pt", summary_out=work / "s.txt", metrics_out=work / "t.json",
                            history_out=work / "h.csv", curves_out=work / "c.png")
            t_ours = time.perf_counter() - start
            print(f"{epochs:>6} {t_loop:>12.1f}s {t_ours:>10.1f}s {t_loop / t_ours:>8.1f}x "
                  f"{loop_acc:>9.4f} {history[-1]['test_acc']:>8.4f}", flush=True)


def run_peak(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run `cmd`; return (seconds, peak RSS in MB of its largest descendant) via a fresh helper process."""
    helper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
              "sys.stderr.write(r.stderr if r.returncode else '');"
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", helper, *cmd], cwd=cwd, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, int(out.stdout.split()[-1]) / 1024


def bench_pipeline(model_name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        archive = dataset_zip(work)
        project = work / "project"
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True, text=True).stdout.split()
        for rel in files:
            (project / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, project / rel)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["data"]["url"] = str(archive)
        params["model"]["name"] = model_name
        params["predict"]["images"] = []
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env_bin = str(Path(sys.executable).parent)
        os.environ["PATH"] = env_bin + os.pathsep + os.environ["PATH"]
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        subprocess.run(["dvc", "repro", "download"], cwd=project, check=True, capture_output=True)
        t_all, peak_all = run_peak(["dvc", "repro"], project)
        t_noop, _ = run_peak(["dvc", "repro"], project)
        print(f"\ndata: {archive.name}, backbone: {model_name}")
        print(f"dvc repro after download: {t_all:.1f} s (target < 30 s); "
              f"no-op dvc repro: {t_noop:.2f} s (target < 3 s)")
        print(f"{'stage':>10} {'seconds':>8} {'peak MB':>8}")
        for stage in ("download", "pretrained", "prepare", "train", "evaluate", "predict"):
            seconds, peak = run_peak([sys.executable, f"stages/{stage}.py"], project)
            print(f"{stage:>10} {seconds:>8.1f} {peak:>8.0f}", flush=True)
        print(json.loads((project / "metrics/eval.json").read_text())["accuracy"], "test accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "pipeline"])
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args()
    if args.mode == "train":
        bench_train(args.model, args.epochs)
    else:
        bench_pipeline(args.model)


if __name__ == "__main__":
    main()
