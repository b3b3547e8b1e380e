"""GPU benchmark: featurize images/s on this machine's GPUs, whole stage processes timed.

    python benchmarks/gpu.py [--images 20000] [--batch-size 256] [--model efficientnet_b0]
                             [--precisions fp32 bf16 fp16] [--processes 1 N]

Ready for a GPU machine without internet: the backbone is randomly initialised (speed does not depend
on the weights) and the dataset is generated 512x384 JPEGs (or the real photos where ../shared has
them). For each precision and process count it runs `python stages/featurize.py` as `dvc repro` would
(imports, torchrun launch, decoding in DataLoader workers, the output files) and prints images/s,
beside the bare backbone forward on random tensors already on the GPU. The target: >= 2,000 images/s
for Lite0/B0 at 224 px on one modern GPU. `--processes` defaults to 1 and every GPU present.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from scale import ENV, make_dataset, make_project, photo_pool  # noqa: E402


def bare_forward(model: str, batch: int, precision: str, batches: int = 20) -> float:
    """Images/s of the backbone alone on random GPU tensors (BN folded, channels-last)."""
    code = f"""
import time, torch
from foodvision.core.device import pick_device
from foodvision.precision import autocast_dtype
from foodvision.backbone import frozen_body
from foodvision.model import build_backbone, replace_head
dev = pick_device("auto")
dtype = autocast_dtype({precision!r}, dev)
m = build_backbone({model!r})
body = frozen_body(m, replace_head(m, 3, 0.0)).to(dev)
x = torch.randn({batch}, 3, 224, 224, device=dev).to(memory_format=torch.channels_last)
with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
    for _ in range(3):
        body(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range({batches}):
        body(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
print({batch} * {batches} / (time.perf_counter() - start))
"""
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    return float(out.stdout.split()[-1]) if out.returncode == 0 else float("nan")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", default="efficientnet_b0")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "fp16"])
    gpus = torch.cuda.device_count()
    parser.add_argument("--processes", type=int, nargs="+", default=sorted({1, max(gpus, 1)}))
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name(0) if gpus else "no GPU (the CPU runs it)"
    print(f"{gpus} x {gpu}; {os.cpu_count()} CPUs; {args.model}, batch {args.batch_size}, {args.images} images",
          flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCALE_TMP")) as tmp:
        work = Path(tmp)
        make_dataset(work / "raw", args.images, photo_pool(work))
        project = make_project(work / "p", args.model, work / "raw")
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["model"]["weights"] = None
        params["device"] = "auto"
        for stage in ("pretrained", "prepare"):
            subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=project, env=ENV, check=True,
                           capture_output=True)
        print(f"{'precision':>9} {'processes':>9} {'seconds':>8} {'images/s':>9} {'bare forward/s':>15}", flush=True)
        for precision in args.precisions:
            bare = bare_forward(args.model, args.batch_size, precision)
            for processes in args.processes:
                params["featurize"].update(batch_size=args.batch_size, processes=processes, precision=precision)
                (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
                shutil.rmtree(project / "data" / "features", ignore_errors=True)
                start = time.perf_counter()
                run = subprocess.run([sys.executable, "stages/featurize.py"], cwd=project, env=ENV,
                                     capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if run.returncode:
                    print(f"{precision:>9} {processes:>9}  refused: {run.stderr.strip().splitlines()[-1][:100]}",
                          flush=True)
                    continue
                print(f"{precision:>9} {processes:>9} {seconds:>8.1f} {args.images / seconds:>9.1f} {bare:>15.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
