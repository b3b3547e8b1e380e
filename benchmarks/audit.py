"""Audit benchmark on real photos: label errors found, copies found, false pairs, and what the stage costs.

    python benchmarks/audit.py [--data DIR] [--model efficientnet_lite0] [--n 30000]

DIR holds pizza_steak_sushi.zip and flowers12.zip (class folders under train/ and test/).

1. Label errors: 5% of each dataset's train images moved to another class folder (seeded), the pipeline up to
   `audit` on that archive; of the top-k suspects (k = the number moved), how many were moved. Beside it the
   same out-of-sample probabilities ranked by the given label's probability alone, and cleanlab's
   `find_label_issues` on them where cleanlab is importable (a benchmark, never a dependency: AGPL-3.0).
2. Copies: 200 real photos each copied with one edit (re-encoded at JPEG quality 40, resized to half,
   cropped by 10%, flipped) into test/, the originals in train/: how many copies the audit pairs with their
   original (as leaks), the similarity of each kind of edit, and every other pair it reports (false pairs,
   or real copies in the public data: printed to look at).
3. Cost: N photos (as `scale.py` makes them), `featurize` cold then `audit`, each as its own process, imports
   included: seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).parent))
from scale import cpu_name, make_dataset, make_project, peak_of, photo_pool  # noqa: E402

from foodvision.core.params import load_paths  # noqa: E402
from foodvision.download import store_dataset  # noqa: E402

FLIP = 0.05
EDITS = ("jpeg40", "half", "crop10", "flip")


def flipped_archive(source: Path, dest: Path, seed: int = 0) -> set[str]:
    """`source` with 5% of train/ moved to another class folder; returns the moved members' new names."""
    with zipfile.ZipFile(source) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist() if not i.is_dir()]
    classes = sorted({name.split("/")[1] for name, _ in members})
    rng = random.Random(seed)
    train = [name for name, _ in members if name.startswith("train/")]
    moved = set(rng.sample(train, round(FLIP * len(train))))
    renamed, out = set(), []
    for name, data in members:
        if name in moved:
            split, cls, file = name.split("/")
            name = f"{split}/{rng.choice([c for c in classes if c != cls])}/{file}"
            renamed.add(name)
        out.append((name, data))
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for name, data in out:
            zf.writestr(name, data)
    return renamed


def edited(data: bytes, edit: str) -> bytes:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    if edit == "half":
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC)
    elif edit == "crop10":
        dx, dy = image.width // 20, image.height // 20  # 10% of each side in all
        image = image.crop((dx, dy, image.width - dx, image.height - dy))
    elif edit == "flip":
        image = ImageOps.mirror(image)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=40 if edit == "jpeg40" else 90)
    return out.getvalue()


def copies_archive(source: Path, dest: Path, count: int = 200) -> dict[str, tuple[str, str]]:
    """`source` plus `count` edited copies of its train photos in test/: {copy: (original, edit)}."""
    with zipfile.ZipFile(source) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist() if not i.is_dir()]
    train = [(n, d) for n, d in members if n.startswith("train/")][:count]
    planted = {}
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
        for i, (name, data) in enumerate(train):
            edit = EDITS[i % len(EDITS)]
            copy = f"test/{name.split('/')[1]}/copy_{edit}_{Path(name).name}"
            zf.writestr(copy, edited(data, edit))
            planted[copy] = (name, edit)
    return planted


def run_to_audit(project: Path, archive: Path) -> dict[str, float]:
    """prepare, featurize and audit on `archive`, each as a process: {stage: seconds}, and peaks."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"].update(url=str(archive), content_sha256=None)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    store_dataset(archive, project / load_paths(project / "dvc.yaml").raw, max_bytes=2**34, content_sha256=None)
    figures = {}
    for stage in ("pretrained", "prepare", "featurize", "audit"):
        seconds, peak, _ = peak_of([sys.executable, f"stages/{stage}.py"], project)
        figures[stage], figures[f"{stage} MB"] = seconds, peak
    return figures


def issues(project: Path) -> list[dict]:
    with open(project / load_paths(project / "dvc.yaml").audit_issues, newline="") as f:
        return list(csv.DictReader(f))


def label_benchmark(name: str, archive: Path, work: Path, model: str) -> None:
    flipped_zip = work / f"{name}_flipped.zip"
    moved = flipped_archive(archive, flipped_zip)
    project = make_project(work / f"{name}_labels", model, None)
    figures = run_to_audit(project, flipped_zip)
    suspects = [i["path"] for i in issues(project) if i["issue"] == "label"]
    k = len(moved)
    suspected = set(suspects)
    right = len(suspected & moved)
    probs, labels, paths = out_of_sample_of(project)
    ranked = [paths[i] for i in np.argsort(probs[np.arange(len(labels)), labels], kind="stable")]
    everyone = suspects + [p for p in ranked if p not in suspected]  # the suspects, then by the same score
    print(f"{name}: {k} of {len(paths)} train labels moved; audit: {len(suspects)} suspects, {right} of them moved "
          f"(precision {right / max(len(suspects), 1):.3f}, recall {right / k:.3f}); every train image ranked "
          f"(suspects first): top-{k} precision {len(set(everyone[:k]) & moved) / k:.3f}; "
          f"audit {figures['audit']:.1f} s, featurize {figures['featurize']:.1f} s", flush=True)
    print(f"{name}: the given label's out-of-sample probability alone, top-{k} precision "
          f"{len(set(ranked[:k]) & moved) / k:.3f}", flush=True)
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        print(f"{name}: cleanlab not importable here: not compared", flush=True)
        return
    found = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    print(f"{name}: cleanlab find_label_issues on the same probabilities: {len(found)} suspects, top-{k} precision "
          f"{len({paths[i] for i in found[:k]} & moved) / k:.3f}", flush=True)


def out_of_sample_of(project: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The audit's own out-of-sample probabilities for the project's train rows (the same seed and folds)."""
    from foodvision.audit import out_of_sample
    from foodvision.core.params import load_params
    from foodvision.features import load_index, open_split

    params = load_params(project / "params.yaml")
    features = project / load_paths(project / "dvc.yaml").features
    index = load_index(features)
    train = open_split(features, index, "train")
    import contextlib

    with contextlib.redirect_stdout(io.StringIO()):
        probs = out_of_sample(train, len(index.classes), params.audit.folds, params.seed)
    return probs, train.labels, index.split("train").paths


def copies_benchmark(archive: Path, work: Path, model: str) -> None:
    planted = copies_archive(archive, work / "copies.zip")
    project = make_project(work / "copies", model, None)
    run_to_audit(project, work / "copies.zip")
    found = [i for i in issues(project) if i["match"]]
    pairs = {(i["path"], i["match"]) for i in found} | {(i["match"], i["path"]) for i in found}
    hits = {copy for copy, (orig, _) in planted.items() if (copy, orig) in pairs}
    print(f"copies: {len(hits)} of {len(planted)} edited copies paired with their original "
          f"({len(hits) / len(planted):.1%})", flush=True)
    for edit in EDITS:
        mine = [c for c, (_, e) in planted.items() if e == edit]
        scores = [float(i["score"]) for i in found if i["path"] in mine or i["match"] in mine]
        missed = [c for c in mine if c not in hits]
        print(f"  {edit}: {len(mine) - len(missed)}/{len(mine)} found, similarity "
              f"{min(scores, default=float('nan')):.3f}-{max(scores, default=float('nan')):.3f}", flush=True)
    sims, distinct = similarities(project, planted)
    for edit in EDITS:
        mine = np.array([sims[c] for c, (_, e) in planted.items() if e == edit])
        print(f"  {edit}: similarity to the original min {mine.min():.3f}, 5th percentile "
              f"{np.percentile(mine, 5):.3f}, median {np.median(mine):.3f}", flush=True)
    print(f"copies: the most similar two distinct photos of the data: {distinct:.3f}", flush=True)
    known = {(c, o) for c, (o, _) in planted.items()}
    others = [i for i in found if (i["path"], i["match"]) not in known and (i["match"], i["path"]) not in known]
    print(f"copies: {len(others)} other pairs (look at them: a false pair, or a real copy in the data)", flush=True)
    for i in others:
        print(f"  {i['issue']} {i['score']} {i['path']} ~ {i['match']}", flush=True)


def similarities(project: Path, planted: dict[str, tuple[str, str]]) -> tuple[dict[str, float], float]:
    """Each planted copy's cosine similarity to its original, and the highest between two other photos."""
    from foodvision.features import load_index, open_split

    features = project / load_paths(project / "dvc.yaml").features
    index = load_index(features)
    rows = np.concatenate([next(open_split(features, index, s).batches(10**6))[0] for s in ("train", "test")])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    paths = index.split("train").paths + index.split("test").paths
    at = {p: i for i, p in enumerate(paths)}
    sims = rows @ rows.T
    np.fill_diagonal(sims, -1)
    copies = {c: float(sims[at[c], at[o]]) for c, (o, _) in planted.items()}
    for c in planted:
        sims[at[c], :] = sims[:, at[c]] = -1  # a copy is not a distinct photo of anything
    return copies, float(sims.max())


def distinct_benchmark(name: str, archive: Path, work: Path, model: str) -> None:
    """The data as published: every pair the audit reports, to look at."""
    project = make_project(work / f"{name}_pairs", model, None)
    run_to_audit(project, archive)
    found = [i for i in issues(project) if i["match"]]
    metrics = json.loads((project / load_paths(project / "dvc.yaml").audit_metrics).read_text())
    print(f"{name} as published: {len(found)} pairs; {metrics}", flush=True)
    for i in found:
        print(f"  {i['issue']} {i['score']} {i['path']} ~ {i['match']}", flush=True)


def scale_benchmark(n: int, work: Path, model: str) -> None:
    archive = make_dataset(work / f"scale_{n}.zip", n, photo_pool(work))
    project = make_project(work / f"scale_{n}", model, None)
    figures = run_to_audit(project, archive)
    share = figures["audit"] / figures["featurize"]
    print(f"N = {n:,}: featurize {figures['featurize']:.1f} s (peak {figures['featurize MB']:.0f} MB), audit "
          f"{figures['audit']:.1f} s (peak {figures['audit MB']:.0f} MB) = {share:.1%} of featurize", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--n", type=int, default=30000, help="photos for the cost (0: skip)")
    parser.add_argument("--only", choices=("labels", "copies", "distinct", "scale"), action="append")
    args = parser.parse_args()
    parts = set(args.only or ("labels", "copies", "distinct", "scale"))
    print(f"CPU: {cpu_name()}; backbone {args.model}", flush=True)
    with tempfile.TemporaryDirectory(prefix="foodvision-audit-bench.") as tmp:
        work = Path(tmp)
        if "labels" in parts:
            for name in ("flowers12", "pizza_steak_sushi"):
                label_benchmark(name, args.data / f"{name}.zip", work, args.model)
        if "copies" in parts:
            copies_benchmark(args.data / "pizza_steak_sushi.zip", work, args.model)
        if "distinct" in parts:
            for name in ("pizza_steak_sushi", "flowers12"):
                distinct_benchmark(name, args.data / f"{name}.zip", work, args.model)
        if "scale" in parts and args.n:
            scale_benchmark(args.n, work, args.model)


if __name__ == "__main__":
    main()
