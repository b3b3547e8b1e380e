"""Feature cache benchmark: what a data change costs at N photos, cold against incremental, and the same bytes.

    python benchmarks/cache.py [--n 30000] [--model efficientnet_lite0]

One project of N real photos (as `scale.py` makes them, every file different), its stages run as their own
processes, imports included, as `dvc repro` runs them. First `featurize` cold without the cache
(`featurize.cache_gb: 0`) and cold with an empty one: what keeping the rows costs. Then, each from the
cache the cold run left, the data changes of a curating loop: 1% more photos, 1% fewer, 100 photos moved
to another class, a class subset, and a switch to bf16 and back (another recipe, then the first again).
For each: featurize's seconds and peak RSS, the rows it took from the cache and computed, the stages
after it (train, evaluate, export) where the dataset changed, and whether `data/features/*` are the bytes
of a cold run without the cache on the same final dataset (a cold run of each dataset is made for that,
then deleted; with `--no-verify` only the first one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from scale import CLASSES, cpu_name, dataset_members, make_project, peak_of, photo_pool  # noqa: E402

from foodvision.core.params import load_paths  # noqa: E402
from foodvision.download import store_dataset  # noqa: E402


def write_archive(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def set_params(project: Path, **featurize: object) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["featurize"].update(featurize)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def use_data(project: Path, archive: Path, classes: list[str] | None = None) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["classes"] = classes
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    store_dataset(archive, project / load_paths(project / "dvc.yaml").raw,
                  max_bytes=params["data"]["max_extract_mb"] * 2**20, content_sha256=None)
    peak_of([sys.executable, "stages/prepare.py"], project)


def featurize(project: Path) -> dict:
    seconds, peak, _ = peak_of([sys.executable, "stages/featurize.py"], project)
    rows = json.loads((project / "data/feature_rows.json").read_text())
    digest = hashlib.sha256()
    for name in ("train.npy", "test.npy", "index.json"):
        digest.update((project / "data/features" / name).read_bytes())
    return {"seconds": seconds, "peak": peak, "cached": sum(r["cached"] for r in rows.values()),
            "computed": sum(r["computed"] for r in rows.values()), "digest": digest.hexdigest()}


def after(project: Path) -> float:
    """audit, train, evaluate and export as processes: the rest of what a data change reruns."""
    stages = ("audit", "train", "evaluate", "export")
    return sum(peak_of([sys.executable, f"stages/{stage}.py"], project)[0] for stage in stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30000)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--no-verify", action="store_true", help="skip the cold run of each changed dataset")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; backbone {args.model}; {args.n} photos", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_TMP")) as tmp:
        work = Path(tmp)
        pool = photo_pool(work)
        base = list(dataset_members(args.n, pool))
        added = base + list(dataset_members(args.n // 100, pool, first=args.n))
        removed = [m for i, m in enumerate(base) if i % 100 != 7]
        moved = 0
        relabelled = []
        for name, data in base:
            if moved < 100 and name.startswith("train/pizza/"):
                name, moved = name.replace("train/pizza/", "train/steak/moved-"), moved + 1
            relabelled.append((name, data))
        archives = {label: write_archive(work / f"{label}.zip", members) for label, members in
                    (("base", base), ("add 1%", added), ("remove 1%", removed), ("relabel 100", relabelled))}
        project = make_project(work / "p", args.model, archives["base"])
        cache = work / "cache"
        peak_of([sys.executable, "stages/pretrained.py"], project)
        peak_of([sys.executable, "stages/prepare.py"], project)

        def cold(label: str) -> dict:
            set_params(project, cache_gb=0)
            r = featurize(project)
            set_params(project, cache_gb=20, cache_dir=str(cache))
            print(f"{label}: cold without the cache: featurize {r['seconds']:.1f} s, peak {r['peak']:.0f} MB",
                  flush=True)
            return r

        reference = cold("base")
        base_after = after(project)
        set_params(project, cache_gb=20, cache_dir=str(cache))
        first = featurize(project)
        print(f"base: cold with an empty cache: featurize {first['seconds']:.1f} s "
              f"({first['seconds'] / reference['seconds']:.3f}x without), peak {first['peak']:.0f} MB; "
              f"same bytes: {first['digest'] == reference['digest']}; train + evaluate + export {base_after:.1f} s",
              flush=True)
        cases = [("add 1%", archives["add 1%"], None), ("remove 1%", archives["remove 1%"], None),
                 ("relabel 100", archives["relabel 100"], None), ("class subset", archives["base"], list(CLASSES[:2]))]
        for label, archive, classes in cases:
            use_data(project, archive, classes)
            r = featurize(project)
            rest = after(project)
            same = "not verified"
            if not args.no_verify:
                same = str(cold(label)["digest"] == r["digest"])
            print(f"{label}: featurize {r['seconds']:.1f} s ({r['seconds'] / first['seconds']:.3f}x cold), "
                  f"{r['cached']:,} rows from the cache, {r['computed']:,} computed, peak {r['peak']:.0f} MB; "
                  f"with train + evaluate + export {r['seconds'] + rest:.1f} s "
                  f"({(r['seconds'] + rest) / (first['seconds'] + base_after):.3f}x cold); same bytes as cold: {same}",
                  flush=True)
        use_data(project, archives["base"], None)
        for label, precision in (("to bf16", "bf16"), ("back to fp32", "fp32")):
            set_params(project, precision=precision)
            r = featurize(project)
            print(f"switch {label}: featurize {r['seconds']:.1f} s ({r['seconds'] / first['seconds']:.3f}x cold), "
                  f"{r['cached']:,} rows from the cache, {r['computed']:,} computed; same bytes as the first cold run: "
                  f"{r['digest'] == reference['digest'] if precision == 'fp32' else 'n/a'}", flush=True)
        size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        print(f"cache: {size / 2**20:.0f} MB in {sum(1 for _ in cache.rglob('*.shard'))} shards", flush=True)


if __name__ == "__main__":
    main()
