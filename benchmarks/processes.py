"""Processes benchmark: the featurize stage with featurize.processes 1 and N, whole processes timed.

    python benchmarks/processes.py [--sizes 900 3000] [--processes 1 2] [--model efficientnet_lite0]

Each run is `python stages/featurize.py` as `dvc repro` starts it (imports, the torchrun launch and
rank 0's assembly included), on the datasets `scale.py` makes; peak RSS is the largest process's.
Every run's files are compared with the 1-process run's, byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from scale import ENV, REAL, cpu_name, make_dataset, make_project, peak_of, photo_pool  # noqa: E402


def set_processes(project: Path, processes: int) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["featurize"]["processes"] = processes
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[900, 3000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args()
    cpu = cpu_name()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; backbone {args.model}; data: "
          f"{'real photos' if REAL.is_file() else 'generated JPEGs'}", flush=True)
    print(f"{'N':>7} {'processes':>9} {'seconds':>8} {'images/s':>9} {'vs 1':>6} {'peak MB':>8} {'same bytes':>10}",
          flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_TMP")) as tmp:
        work = Path(tmp)
        pool = photo_pool(work)
        for n in args.sizes:
            make_dataset(work / f"raw{n}", n, pool)
            project = make_project(work / f"p{n}", args.model, work / f"raw{n}")
            for stage in ("pretrained", "prepare"):
                subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=project, env=ENV, check=True,
                               capture_output=True)
            baseline, reference = 0.0, work / f"ref{n}"
            for processes in args.processes:
                set_processes(project, processes)
                shutil.rmtree(project / "data" / "features", ignore_errors=True)
                seconds, peak, _ = peak_of([sys.executable, "stages/featurize.py"], project)
                if not reference.exists():
                    baseline = seconds
                    shutil.copytree(project / "data" / "features", reference)
                same = same_files(project / "data" / "features", reference)
                print(f"{n:>7} {processes:>9} {seconds:>8.1f} {n / seconds:>9.1f} {seconds / baseline:>5.2f}x "
                      f"{peak:>8.0f} {'yes' if same else 'NO':>10}", flush=True)
            shutil.rmtree(project)


if __name__ == "__main__":
    main()
