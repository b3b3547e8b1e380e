"""Speed benchmark: the article's training loop as one process against a forced `dvc repro -f`.

    python benchmarks/speed.py [--model efficientnet_lite0] [--epochs 5] [--rounds 3]

Uses ../shared/data/pizza_steak_sushi.zip when present, else generated images (same counts). Both are
timed in the same run, as whole processes (imports included), on the same data, backbone and epochs, in
alternated rounds whose medians are compared:
`dvc repro -f evaluate` (the article's training and test accuracy) and `dvc repro -f predict` (all of
it: predict runs the ONNX export); then each stage's script on its own with its peak RSS, beside its
imports alone (the fixed cost of a process), and a no-op `dvc repro`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from statistics import median

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from scale import ENV, REAL, imports_of, make_project, peak_of  # noqa: E402

from foodvision.core.params import load_paths  # noqa: E402

STAGES = ("download", "pretrained", "prepare", "featurize", "audit", "train", "evaluate", "export", "predict")
COUNTS = {"train": {"pizza": 78, "steak": 75, "sushi": 72}, "test": {"pizza": 25, "steak": 19, "sushi": 31}}


def article_loop(raw: Path, pretrained: Path, transform_json: Path, model_name: str, epochs: int) -> float:
    """The article's engine.train: ImageFolder + DataLoader(batch 32, num_workers=cpu_count), model.train()
    each epoch (frozen params, but BatchNorm in train mode), then eval; returns the final test accuracy."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from foodvision.data import build_transform
    from foodvision.model import classifier_for

    torch.manual_seed(42)
    model, _ = classifier_for(model_name, pretrained, 3, 0.2, 42)
    transform = build_transform(json.loads(transform_json.read_text()))
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


def dataset_zip(work: Path) -> Path:
    """A local copy of the real archive, or one with the same class counts of generated 512x384 JPEGs."""
    if REAL.is_file():
        return Path(shutil.copy(REAL, work / "pizza_steak_sushi.zip"))
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = work / "generated"
    for split, counts in COUNTS.items():
        for c, (cls, n) in enumerate(counts.items()):
            (folder / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.normal(80 * c + 40, 40, size=(384, 512, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / split / cls / f"{i}.jpg", quality=90)
    return Path(shutil.make_archive(str(work / "generated"), "zip", folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternated timings of each; medians compared")
    parser.add_argument("--article", nargs=3, metavar=("RAW", "PRETRAINED", "TRANSFORM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.article:  # the article's loop, as its own process
        raw, pretrained, transform = map(Path, args.article)
        print(article_loop(raw, pretrained, transform, args.model, args.epochs))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        archive = dataset_zip(work)
        project = make_project(work / "project", args.model, None)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["data"]["url"] = str(archive)
        if not REAL.is_file():  # generated images: not the ones params.yaml pins
            params["data"]["content_sha256"] = None
        params["train"]["epochs"] = args.epochs
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        subprocess.run(["dvc", "repro"], cwd=project, env=ENV, check=True, capture_output=True)  # warm the OS cache
        paths = dataclasses.asdict(load_paths(project / "dvc.yaml"))
        with zipfile.ZipFile(archive) as zf:  # the article extracts its download: so does its loop here
            zf.extractall(work / "article")
        inputs = [str(work / "article"), *(str(project / paths[key]) for key in ("pretrained", "transform"))]
        article_cmd = [sys.executable, __file__, "--model", args.model, "--epochs", str(args.epochs),
                       "--article", *inputs]
        # alternated rounds, compared by their medians: this VM's speed drifts by 1.4x within an hour
        loops, evals, repros, peaks = [], [], [], {"loop": 0.0, "eval": 0.0, "repro": 0.0}
        for r in range(1, args.rounds + 1):
            t_loop, peak, out = peak_of(article_cmd, project)
            loops.append(t_loop)
            peaks["loop"] = max(peaks["loop"], peak)
            loop_acc = float(out.split()[-1])
            # the article's training and test accuracy (like for like), then everything the article does and more
            t_eval, peak, _ = peak_of(["dvc", "repro", "-f", "evaluate"], project)
            evals.append(t_eval)
            peaks["eval"] = max(peaks["eval"], peak)
            t_repro, peak, _ = peak_of(["dvc", "repro", "-f", "predict"], project)
            repros.append(t_repro)
            peaks["repro"] = max(peaks["repro"], peak)
            print(f"round {r}: article's loop {t_loop:.1f} s, dvc repro -f evaluate {t_eval:.1f} s "
                  f"({t_loop / t_eval:.1f}x), -f predict {t_repro:.1f} s ({t_loop / t_repro:.2f}x)", flush=True)
        t_loop, t_eval, t_repro = median(loops), median(evals), median(repros)
        t_noop, _, _ = peak_of(["dvc", "repro"], project)
        ours = json.loads((project / paths["eval_metrics"]).read_text())["accuracy"]
        print(f"data: {archive.name}, backbone: {args.model}, {args.epochs} epochs, {os.cpu_count()} cores; "
              f"medians of {args.rounds} rounds")
        print(f"article's loop, one process: {t_loop:.1f} s (peak {peaks['loop']:.0f} MB), test accuracy "
              f"{loop_acc:.4f}")
        print(f"dvc repro -f evaluate: {t_eval:.1f} s (peak {peaks['eval']:.0f} MB), test accuracy {ours:.4f}; "
              f"speed-up {t_loop / t_eval:.1f}x")
        print(f"dvc repro -f predict (every stage but evaluate, the ONNX export included): {t_repro:.1f} s (peak "
              f"{peaks['repro']:.0f} MB); speed-up {t_loop / t_repro:.2f}x; no-op dvc repro: {t_noop:.2f} s")
        print(f"{'stage':>15} {'seconds':>8} {'imports':>8} {'work':>8} {'peak MB':>8}")
        fixed = 0.0
        for stage in STAGES:
            seconds, peak, out = peak_of([sys.executable, f"stages/{stage}.py"], project)
            imports, _, _ = peak_of(imports_of(stage), project)
            fixed += imports
            print(f"{stage:>15} {seconds:>8.1f} {imports:>8.1f} {seconds - imports:>8.1f} {peak:>8.0f}", flush=True)
            exported = [line for line in out.splitlines() if line.startswith("exported the")]
            print("".join(f"{'':>15} ({line})\n" for line in exported), end="")
        print(f"imports of the {len(STAGES)} stage processes: {fixed:.1f} s; the article's budget at 3x: "
              f"{t_loop / 3:.1f} s")


if __name__ == "__main__":
    main()
