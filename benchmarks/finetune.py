"""Fine-tune benchmark: frozen head vs `finetune.blocks` 1 to 6 (Lite0): test accuracy, seconds, peak RSS.

    python benchmarks/finetune.py [--data ../shared/data/flowers12.zip ../shared/data/pizza_steak_sushi.zip]
                                  [--seeds 42 43 44] [--blocks 1 2 3 4 5 6] [--best-seeds 1]
    python benchmarks/finetune.py --prefix-share models/pretrained/backbone.pth  # what cached activations save

Per dataset, a project (the tracked files, Lite0, CPU) runs pretrained, prepare and featurize once; then
each configuration runs `stages/train.py` and `stages/evaluate.py` as their own processes, as `dvc repro`
runs them (seconds and peak RSS of each process). Configurations, on the same epoch budget of 10:
- frozen-5: the defaults (5 epochs of the head on stored features), frozen-10: 10 epochs;
- frozen-val: data.val_fraction 0.15, up to 100 epochs, patience 10 (the kept epoch has the lowest val loss);
- ft-N: 5 epochs of the head, then 5 epochs of the head with the last N blocks (finetune.epochs 5).
Frozen ones run every seed; fine-tunes run the first seed for each N, then the best N on the other seeds
(on the first `--best-seeds` datasets). The best linear classifier the frozen features allow (L-BFGS
logistic regression, L2 weight chosen on a 15% validation cut, refit on all of train) is the reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from scale import ROOT, cpu_name, make_project, peak_of  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
FROZEN = {"frozen-5": {}, "frozen-10": {"train": {"epochs": 10}},
          "frozen-val": {"data": {"val_fraction": 0.15}, "train": {"epochs": 100, "patience": 10}}}


def finetuned(blocks: int) -> dict[str, dict]:
    return {"finetune": {"blocks": blocks, "epochs": 5}}


def run_config(project: Path, data: dict, changes: dict[str, dict], seed: int) -> dict:
    """train + evaluate with the committed params, the project's `data`, changed by `changes`; figures of both
    processes."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name"], params["device"], params["seed"] = "efficientnet_lite0", "cpu", seed
    params["data"].update(data)
    for section, values in changes.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    train_s, train_mb, out = peak_of([sys.executable, "stages/train.py"], project)
    eval_s, eval_mb, _ = peak_of([sys.executable, "stages/evaluate.py"], project)
    figures = json.loads((project / "metrics/eval.json").read_text())
    history = (project / "plots/train/history.csv").read_text().splitlines()[1:]
    tuned = next((line for line in out.splitlines() if line.startswith("fine-tuned")), "")
    tuned_s = float(tuned.rsplit(" in ", 1)[1].split()[0]) if tuned else 0.0
    tuned_epochs = len(history) - params["train"]["epochs"] if tuned else 0
    return {"accuracy": figures["accuracy"], "train_s": round(train_s, 1), "train_mb": round(train_mb),
            "eval_s": round(eval_s, 1), "eval_mb": round(eval_mb), "epochs": len(history),
            "s_per_finetune_epoch": round(tuned_s / tuned_epochs, 1) if tuned_epochs else None}


def linear_probe(features: Path, seed: int) -> dict:
    """The best linear classifier on the frozen features: multinomial logistic regression by L-BFGS, its L2
    weight chosen on a validation cut of train, then refit on all of train and scored once on test."""
    import numpy as np
    import torch

    from foodvision.features import load_index
    from foodvision.loop import val_cut

    index = load_index(features)
    x = {s: torch.from_numpy(np.load(features / f"{s}.npy")) for s in ("train", "test")}
    y = {s: torch.tensor(index.split(s).labels) for s in ("train", "test")}
    classes = len(index.classes)

    def fit(xs: torch.Tensor, ys: torch.Tensor, l2: float) -> torch.nn.Linear:
        torch.manual_seed(seed)
        lin = torch.nn.Linear(xs.shape[1], classes)
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(lin(xs), ys) + l2 * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return lin

    keep, val = val_cut(y["train"].tolist(), 0.15, seed)
    scores = {}
    for l2 in (1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        lin = fit(x["train"][keep], y["train"][keep], l2)
        with torch.no_grad():
            scores[l2] = (lin(x["train"][val]).argmax(1) == y["train"][val]).float().mean().item()
    best = max(scores, key=lambda k: (scores[k], k))
    lin = fit(x["train"], y["train"], best)
    with torch.no_grad():
        accuracy = (lin(x["test"]).argmax(1) == y["test"]).float().mean().item()
    return {"l2": best, "accuracy": round(accuracy, 6)}


def prefix_share(pretrained: Path, blocks: list[int], batch: int = 32, steps: int = 4) -> dict[int, dict]:
    """What storing the activations entering the first unfrozen block would save (possible only without
    augmentation): per N, the frozen blocks' forward against a whole training step, batch 32, Lite0 on this CPU."""
    import torch

    from foodvision.finetune import unfreeze
    from foodvision.loop import train_mode
    from foodvision.model import classifier_for

    out = {}
    for n in blocks:
        model, head = classifier_for("efficientnet_lite0", pretrained, 12, 0.2, seed=0)
        trained = unfreeze(model, head, n, "efficientnet_lite0")
        model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        x = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
        y = torch.randint(0, 12, (batch,))
        first = int(trained[0].split(".")[1])
        prefix = model.features[:first]
        train_mode(model, trained)
        timings = {"step": 0.0, "prefix": 0.0}
        for i in range(steps + 1):
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step = time.perf_counter() - start
            with torch.no_grad():
                start = time.perf_counter()
                act = prefix(x)
                pre = time.perf_counter() - start
            if i:  # the first is warm-up
                timings["step"] += step / steps
                timings["prefix"] += pre / steps
        out[n] = {"step_s": round(timings["step"], 3), "frozen_forward_s": round(timings["prefix"], 3),
                  "share": round(timings["prefix"] / timings["step"], 3),
                  "activation_kb_per_image": round(act[0].numel() * 4 / 1024, 1)}
    return out


def bench(archive: Path, work: Path, seeds: list[int], blocks: list[int], best_seeds: bool) -> dict:
    project = make_project(work / archive.stem, "efficientnet_lite0", archive, epochs=5)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["weights_url"] = None
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = params["data"]
    setup = {}
    for stage in ("pretrained", "prepare", "featurize"):
        seconds, mb, _ = peak_of([sys.executable, f"stages/{stage}.py"], project)
        setup[stage] = (round(seconds, 1), round(mb))
        print(f"  {archive.name} {stage}: {seconds:.1f} s, peak {mb:.0f} MB", flush=True)
    results: dict[str, list[dict]] = {}
    for name, changes in FROZEN.items():
        results[name] = [run_config(project, data, changes, s) for s in seeds]
        print(f"  {name}: {[r['accuracy'] for r in results[name]]}", flush=True)
    for n in blocks:
        results[f"ft-{n}"] = [run_config(project, data, finetuned(n), seeds[0])]
        print(f"  ft-{n}: {results[f'ft-{n}']}", flush=True)
    if best_seeds and blocks:
        best = max(blocks, key=lambda n: results[f"ft-{n}"][0]["accuracy"])
        results[f"ft-{best}"] += [run_config(project, data, finetuned(best), s) for s in seeds[1:]]
    probe = [linear_probe(project / "data/features", s) for s in seeds]
    index = json.loads((project / "data/features/index.json").read_text())
    sizes = {s: len(index["splits"][s]["labels"]) for s in ("train", "test")}
    return {"setup": setup, "results": results, "probe": probe, "sizes": sizes, "classes": len(index["classes"])}


def report(name: str, figures: dict) -> None:
    print(f"\n## {name}: {figures['classes']} classes, {figures['sizes']['train']} train / "
          f"{figures['sizes']['test']} test images")
    print("| config | seeds | test accuracy (mean, each) | epochs run | train s | s per fine-tune epoch | "
          "train peak MB | evaluate s | evaluate peak MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for config, runs in figures["results"].items():
        accs = [r["accuracy"] for r in runs]
        mean = statistics.mean(accs)
        per_epoch = runs[0]["s_per_finetune_epoch"]
        print(f"| {config} | {len(runs)} | {mean:.4f} ({', '.join(f'{a:.4f}' for a in accs)}) | "
              f"{statistics.mean(r['epochs'] for r in runs):.1f} | {statistics.mean(r['train_s'] for r in runs):.1f} | "
              f"{per_epoch if per_epoch is not None else '-'} | {max(r['train_mb'] for r in runs)} | "
              f"{statistics.mean(r['eval_s'] for r in runs):.1f} | {max(r['eval_mb'] for r in runs)} |")
    probe = figures["probe"]
    each = ", ".join(format(p["accuracy"], ".4f") for p in probe)
    print(f"| linear probe (L-BFGS, L2 {', '.join(str(p['l2']) for p in probe)}) | {len(probe)} | "
          f"{statistics.mean(p['accuracy'] for p in probe):.4f} ({each})"
          " | | | | | | |")
    print(f"setup (s, peak MB): {figures['setup']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, nargs="+",
                        default=[SHARED / "flowers12.zip", SHARED / "pizza_steak_sushi.zip"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--blocks", type=int, nargs="*", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--prefix-share", type=Path, metavar="PRETRAINED",
                        help="only measure the frozen blocks' share of a step, with this Lite0 backbone.pth")
    parser.add_argument("--best-seeds", type=int, default=1, help="datasets (first ones) where the best N runs "
                                                                   "every seed")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; torch threads: default", flush=True)
    if args.prefix_share:
        for n, figures in prefix_share(args.prefix_share, args.blocks).items():
            print(f"finetune.blocks {n}: {figures}")
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="foodvision-finetune-") as tmp:
        all_figures = {}
        for i, archive in enumerate(args.data):
            print(f"{archive.name}:", flush=True)
            all_figures[archive.name] = bench(archive, Path(tmp), args.seeds, args.blocks, i < args.best_seeds)
    for name, figures in all_figures.items():
        report(name, figures)
    print(f"\nwhole benchmark: {time.perf_counter() - start:.0f} s")
    print(json.dumps(all_figures))


if __name__ == "__main__":
    main()
