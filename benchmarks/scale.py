"""Scale benchmark: per stage, wall time, images/s and peak RSS at N images, and the bare backbone's speed.

    python benchmarks/scale.py [--sizes 300 3000 30000] [--model efficientnet_lite0] [--exp 3000]

Datasets of N images (75% train, 25% test, 3 classes; a zip, as a user downloads one) are made of the
real photos of ../shared/data/pizza_steak_sushi.zip (reused in turn) when it is there, else of generated
512x384 JPEGs. Each stage's script runs as its own process, imports included, as `dvc repro` runs it;
peak RSS is the process's maximum resident set. The bare backbone forward (batch 32, BN folded,
channels-last, random inputs) is measured in the same run, so featurize can be compared with it.
`--exp N [N ...]` times, in a git + DVC repository of N images each, a whole `dvc repro` (after the
download) against head-only `dvc exp run -S train.lr=...` (the default 5 epochs), three per size,
alternating between the sizes so that a shared machine's noise falls on each alike (medians compared);
then each stage the experiment reran, as its own process, beside its imports alone (the fixed cost
before any work), and the physical floor: reading the stored feature rows and 5 epochs of the head's
matrix products.

    python benchmarks/scale.py --sizes --exp 3000 30000     # issue 16's figures
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from foodvision.core.params import load_paths
from foodvision.download import store_dataset

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "pizza_steak_sushi.zip"
CLASSES = ("pizza", "steak", "sushi")
STAGES = ("prepare", "featurize", "audit", "train", "evaluate", "export", "predict")
# what each stage imports before its first useful line (lazy imports included): its fixed cost per process
IMPORTS = {"params": "foodvision.core.params",
           "download": "foodvision.download", "pretrained": "foodvision.pretrained", "prepare": "foodvision.prepare",
           "featurize": "foodvision.featurize, torchinfo, onnxruntime", "audit": "foodvision.audit, foodvision.fit",
           "train": "foodvision.train, foodvision.plots", "evaluate": "foodvision.evaluate",
           "export": "foodvision.export, onnx, onnxruntime",
           "predict": "foodvision.predict, foodvision.plots, onnxruntime"}
ENV = {**os.environ, "TQDM_DISABLE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def photo_pool(work: Path) -> dict[str, list[Path]]:
    """Per class, the real photos (or generated ones) that datasets of any size are made of."""
    pool: dict[str, list[Path]] = {c: [] for c in CLASSES}
    if REAL.is_file():
        with zipfile.ZipFile(REAL) as zf:
            zf.extractall(work / "real")
        for path in sorted((work / "real").rglob("*.jpg")):
            pool[path.parent.name].append(path)
        return pool
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, cls in enumerate(CLASSES):
        (work / "real" / cls).mkdir(parents=True)
        for i in range(100):
            pixels = rng.normal(80 * c + 40, 40, size=(384, 512, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(work / "real" / cls / f"{i}.jpg", quality=90)
            pool[cls].append(work / "real" / cls / f"{i}.jpg")
    return pool


def make_dataset(archive: Path, n: int, pool: dict[str, list[Path]]) -> Path:
    """A zip of train/<class>/ and test/<class>/ with n images in all, the pool's photos (what a user downloads).

    Each copy of a photo gets its own bytes (its number after the JPEG's end, which decoders ignore): the
    same pixels, but not the same file, or featurize would compute each photo once (it keys rows by content)."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for name, data in dataset_members(n, pool):
            zf.writestr(name, data)
    return archive


def dataset_members(n: int, pool: dict[str, list[Path]], first: int = 0) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of n images, numbered from `first`, every one different (see `make_dataset`)."""
    per_class = n // len(CLASSES)
    for cls in CLASSES:
        photos = itertools.cycle([p.read_bytes() for p in pool[cls]])
        for i in range(first, first + per_class):
            split = "test" if i % 4 == 3 else "train"
            yield f"{split}/{cls}/{i:06d}.jpg", next(photos) + i.to_bytes(8, "little")


def make_project(dest: Path, model: str, archive: Path | None, epochs: int = 1) -> Path:
    """The project's tracked files, with params for an `epochs` run; the archive stored at paths.raw as
    `download` stores it."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    for rel in files:
        if not rel.startswith(("tests/", "benchmarks/", "docs/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["model"]["name"] = model
    params["train"]["epochs"] = epochs
    params["device"] = "cpu"
    params["predict"]["images"] = []
    params["featurize"]["cache_gb"] = 0  # every run computes what it times (cache.py measures the cache)
    if archive is not None:
        params["data"].update(url=str(archive), content_sha256=None)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if archive is not None:
        store_dataset(archive, dest / load_paths(dest / "dvc.yaml").raw,
                      max_bytes=params["data"]["max_extract_mb"] * 2**20, content_sha256=None)
    return dest


def run_peak(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run `cmd`; return (seconds, peak RSS in MB of its largest process, stdout) from its rusage."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{err[-2000:]}")
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    return seconds, peak, out


def imports_of(stage: str) -> list[str]:
    """A process that imports what `stage` imports and leaves as the stages do (foodvision.core.stage.exit_now:
    no interpreter teardown), so that a stage's seconds minus these are its work."""
    return [sys.executable, "-c", f"import {IMPORTS[stage]}; import os; os._exit(0)"]


def peak_of(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """`run_peak` in a fresh helper process, so each figure is that command's own peak."""
    helper = ("import json, sys; sys.path.insert(0, sys.argv[1]); from scale import run_peak; "
              "print(json.dumps(run_peak(sys.argv[3:], __import__('pathlib').Path(sys.argv[2]))))")
    out = subprocess.run([sys.executable, "-c", helper, str(Path(__file__).parent), str(cwd), *cmd], env=ENV,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return tuple(json.loads(out.stdout.splitlines()[-1]))


def cpu_name() -> str:
    """The CPU model (machines vary between sessions: say which one a figure comes from)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def bare_forward(model: str, pretrained: Path, batches: int) -> float:
    """Images/s of the backbone alone on random batches of 32 (BN folded, channels-last, inference mode)."""
    code = f"""
import time, torch
from foodvision.backbone import pretrained_body
body = pretrained_body({model!r}, {str(pretrained)!r}, 3).module
x = torch.randn(32, 3, 224, 224).to(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(2):
        body(x)
    start = time.perf_counter()
    for _ in range({batches}):
        body(x)
print(32 * {batches} / (time.perf_counter() - start))
"""
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[300, 3000, 30000])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--exp", type=int, nargs="*", default=[],
                        help="time `dvc repro` against a head-only `dvc exp run` at N images")
    args = parser.parse_args()
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; backbone {args.model}; data: "
          f"{'real photos' if REAL.is_file() else 'generated JPEGs'}", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_TMP")) as tmp:
        work = Path(tmp)
        pool = photo_pool(work)
        first = make_project(work / "pretrained", args.model, None)
        subprocess.run([sys.executable, "stages/pretrained.py"], cwd=first, env=ENV, check=True, capture_output=True)
        pretrained = first / "models" / "pretrained"
        bare = bare_forward(args.model, pretrained / "backbone.pth", batches=20)
        print(f"bare backbone forward: {bare:.1f} images/s (batch 32)\n", flush=True)
        print(f"{'N':>7} {'stage':>10} {'seconds':>8} {'ms/image':>9} {'images/s':>9} {'peak MB':>8}", flush=True)
        results: dict[int, dict[str, tuple[float, float]]] = {}
        passes: dict[int, float] = {}  # featurize's feature pass alone (the stage then exports the backbone)
        for n in args.sizes:
            archive = make_dataset(work / f"raw{n}.zip", n, pool)
            project = make_project(work / f"p{n}", args.model, archive)
            archive.unlink()
            shutil.copytree(pretrained, project / "models" / "pretrained")
            results[n] = {}
            for stage in STAGES:
                seconds, peak, out = peak_of([sys.executable, f"stages/{stage}.py"], project)
                results[n][stage] = (seconds, peak)
                if stage == "featurize":
                    found = re.findall(r"^featurize \w+: \d+ images in ([\d.]+) s", out, re.M)
                    passes[n] = sum(map(float, found))
                print(f"{n:>7} {stage:>10} {seconds:>8.1f} {1000 * seconds / n:>9.2f} {n / seconds:>9.1f} "
                      f"{peak:>8.0f}", flush=True)
            accuracy = json.loads((project / "metrics/eval.json").read_text())["accuracy"]
            print(f"{n:>7} test accuracy after 1 epoch: {accuracy:.4f}", flush=True)
            shutil.rmtree(project)
        if results:
            summary(results, passes, bare)
        projects = {n: make_project(work / f"e{n}", args.model, None, epochs=5) for n in args.exp}
        archives = {n: make_dataset(work / f"raw{n}.zip", n, pool) for n in args.exp}
        experiments = exp_timing(projects, archives) if projects else {}
        if len(experiments) > 1:
            small, big = min(experiments), max(experiments)
            print(f"\nhead-only experiment at {big} vs {small} images: {experiments[big] / experiments[small]:.2f}x")


def summary(results: dict[int, dict[str, tuple[float, float]]], passes: dict[int, float], bare: float) -> None:
    """Peak RSS and time per image across sizes, per stage; featurize's feature pass against the bare forward."""
    print()
    small, big = min(results), max(results)
    mid = sorted(results)[1] if len(results) > 2 else small
    for stage in STAGES:
        (t_mid, _), (t_big, p_big), (_, p_small) = results[mid][stage], results[big][stage], results[small][stage]
        print(f"{stage:>10}: peak RSS {big} vs {small} images {p_big / p_small:.2f}x; "
              f"time per image {big} vs {mid} {t_big / big / (t_mid / mid):.2f}x")
    for n in results:
        if n >= 3000:
            rest = results[n]["featurize"][0] - passes[n]
            print(f"featurize's feature pass at {n}: {n / passes[n]:.1f} images/s = {n / passes[n] / bare:.2f}x the "
                  f"bare forward; the backbone's export and check and the process's start: the other {rest:.1f} s")


def exp_project(project: Path, archive: Path) -> float:
    """A git + DVC repository of the archive, after a whole `dvc repro` (timed after the download) and a commit.
    Returns the repro's seconds."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(url=str(archive), content_sha256=None)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["dvc", "repro", "download"], cwd=project, env=ENV, check=True, capture_output=True)
    archive.unlink()
    full, full_peak, _ = peak_of(["dvc", "repro"], project)
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=project, check=True)
    print(f"{project.name[1:]} images: dvc repro after the download: {full:.1f} s (peak {full_peak:.0f} MB)",
          flush=True)
    return full


def head_only(project: Path, lr: float) -> tuple[float, float, list[str]]:
    """One `dvc exp run -S train.lr=...`: (seconds, peak RSS in MB, the stages it reran)."""
    seconds, peak, out = peak_of(["dvc", "exp", "run", "-S", f"train.lr={lr}"], project)
    reran = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    print(f"{project.name[1:]} images: dvc exp run -S train.lr={lr}: {seconds:.1f} s (peak {peak:.0f} MB), "
          f"reran {', '.join(reran)}", flush=True)
    return seconds, peak, reran


def exp_stages(project: Path, reran: list[str], seconds: float) -> None:
    """The experiment's stages one by one against their imports, DVC's share of `seconds`, and the floor."""
    print(f"{'stage':>10} {'process s':>10} {'imports s':>10} {'work s':>8} {'peak MB':>8}")
    total = 0.0
    for stage in reran:
        spent, peak, _ = peak_of([sys.executable, f"stages/{stage}.py"], project)
        imports, _, _ = peak_of(imports_of(stage), project)
        total += spent
        print(f"{stage:>10} {spent:>10.2f} {imports:>10.2f} {spent - imports:>8.2f} {peak:>8.0f}", flush=True)
    print(f"{'stages':>10} {total:>10.2f}; DVC's own share of the experiment (its median): {seconds - total:.1f} s")
    features = load_paths(project / "dvc.yaml").features
    floor = subprocess.run([sys.executable, "-c", FLOOR, str(project / features)], env=ENV,
                           check=True, capture_output=True, text=True).stdout.strip()
    print(f"floor (in one process, imports excluded): {floor}", flush=True)


def exp_timing(projects: dict[int, Path], archives: dict[int, Path], rounds: int = 3) -> dict[int, float]:
    """Each size's whole `dvc repro`, then head-only experiments alternating between the sizes, `rounds` each
    (a shared machine's noise then falls on every size alike); per size the median, its share of the repro,
    its stages and the floor. Returns the medians."""
    full = {n: exp_project(projects[n], archives[n]) for n in projects}
    runs: dict[int, list[tuple[float, float, list[str]]]] = {n: [] for n in projects}
    for i in range(rounds):
        for n in projects:
            runs[n].append(head_only(projects[n], round(0.01 * (i + 1), 4)))
    medians = {}
    for n, timed in runs.items():
        seconds, peak, reran = sorted(timed)[len(timed) // 2]
        medians[n] = seconds
        print(f"\n{n} images: dvc repro after the download {full[n]:.1f} s; head-only experiment median "
              f"{seconds:.1f} s of {', '.join(f'{t[0]:.1f}' for t in timed)} (peak {peak:.0f} MB) = "
              f"{100 * seconds / full[n]:.1f}% of the repro", flush=True)
        exp_stages(projects[n], reran, seconds)
    return medians


FLOOR = """
import sys, time
from pathlib import Path
import numpy as np, torch
from foodvision.features import load_index, open_split
from foodvision.fit import Adam
folder = Path(sys.argv[1])
index = load_index(folder)
start = time.perf_counter()
splits = {s: open_split(folder, index, s) for s in ("train", "test")}
x = {s: torch.from_numpy(np.concatenate([b for b, _ in f.batches(8192)])) for s, f in splits.items()}
y = {s: torch.from_numpy(f.labels) for s, f in splits.items()}
read = time.perf_counter() - start
torch.manual_seed(0)
head = torch.nn.Linear(x["train"].shape[1], len(index.classes))
opt = Adam(head.parameters(), 1e-3)
start = time.perf_counter()
for epoch in range(5):
    order = torch.randperm(len(x["train"]))
    for i in range(0, len(order), 32):
        batch = order[i:i + 32]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x["train"][batch]), y["train"][batch]).backward()
        opt.step()
    with torch.no_grad():
        head(x["test"])
maths = time.perf_counter() - start
rows = sum(len(v) for v in x.values())
print(f"reading {rows} feature rows {read:.2f} s + 5 epochs of the head {maths:.2f} s = {read + maths:.2f} s")
"""


if __name__ == "__main__":
    main()
