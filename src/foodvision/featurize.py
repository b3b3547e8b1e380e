"""featurize stage: every image of each split through the frozen backbone once, features streamed to disk.

The backbone is frozen and in eval mode and the eval transform is deterministic, so an image's features
never change while its head trains: computing them once here lets every head-only experiment (lr, epochs,
dropout) and `evaluate` skip decoding and the backbone entirely. Batches are decoded (in DataLoader
workers where there are spare cores), pushed through the BN-folded channels-last backbone and appended
to the output file, so memory stays flat whatever the number of images.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from PIL import Image
from torch import nn
from tqdm import tqdm

from foodvision import distributed
from foodvision.checkpoint import ModelError
from foodvision.core.device import cpu_count, decode_workers, pick_device
from foodvision.core.device import cpu_flags as read_cpu_flags
from foodvision.core.errors import DatasetError, listed
from foodvision.core.files import atomic_dir, write_json, write_text
from foodvision.data import ImageSamples, build_transform, make_loader, prefetched
from foodvision.export_backbone import export_backbone
from foodvision.features import INDEX, FeatureFile, NpyWriter
from foodvision.images import open_rgb
from foodvision.model import (
    build_backbone,
    for_inference,
    freeze_all_but,
    load_pretrained,
    replace_head,
    resolve_weights,
)
from foodvision.spec import SPLITS, load_spec, load_transform

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class _Decoded(ImageSamples):
    """(image tensor, ok): an image whose pixel data will not decode yields zeros and ok=False."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        rel, _ = self.samples[i]
        try:
            return self.transform(open_rgb(self.store.open(rel), self.min_size)), True
        except DECODE_ERRORS:
            crop = self.transform.crop_size[0]
            return torch.zeros(3, crop, crop), False


class Autocast(nn.Module):
    """The backbone under torch.autocast at a lower precision (`_stream` stores float32 all the same)."""

    def __init__(self, inner: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.device_type, self.dtype = inner, device_type, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.inner(x)


def autocast_dtype(precision: str, device: torch.device, cpu_flags: set[str] | None = None) -> torch.dtype | None:
    """The autocast dtype for `featurize.precision`, refused where the hardware would make it slower."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ModelError(f"featurize.precision fp16 needs a CUDA GPU, not {device.type}; use bf16 where the "
                             "hardware has it, or fp32")
        return torch.float16
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ModelError("featurize.precision bf16: this GPU has no bf16 arithmetic; use fp16 or fp32")
        return torch.bfloat16
    flags = read_cpu_flags() if cpu_flags is None else cpu_flags
    if device.type != "cpu" or not flags & {"avx512_bf16", "amx_bf16"}:
        raise ModelError(f"featurize.precision bf16: this {device.type.upper()} has neither AVX-512-BF16 nor AMX, "
                         "where bf16 ran the backbone about 17x slower than fp32; use fp32")
    return torch.bfloat16


@dataclass(frozen=True)
class Pass:
    """What one pass over a split needs: the frozen backbone ready to run, where, and on which rank."""

    body: nn.Module
    device: torch.device
    cols: int  # features per image
    root: Path
    transform: dict[str, Any]
    batch_size: int
    me: distributed.Rank


def featurize(spec_path: Path, pretrained_path: Path, transform_path: Path, out_dir: Path, *, model_name: str,
              batch_size: int, device: str, skip_corrupt: bool, summary_out: Path, precision: str,
              onnx_out: Path | None = None, check_dir: Path | None = None) -> dict[str, Any]:
    """Write `out_dir/{train,test}.npy` and `out_dir/index.json`; return the index.

    Also writes the article's torchinfo table of the classifier (frozen backbone + new head) to `summary_out`,
    and with `onnx_out` and `check_dir` the backbone as ONNX, checked on every test image (`export_backbone`).
    That export changes exactly when the features do, and in this process it costs no second import of torch
    and torchvision (about 3 s, a third of a forced `dvc repro` on the article's data; docs/scale.md).
    """
    resolve_weights(model_name, None)  # a bad name fails before any work
    spec, transform = load_spec(spec_path), load_transform(transform_path)
    me = distributed.current()
    dev, dtype = _setup(device, precision, me)
    try:
        if me.leader:
            write_text(summary_out, model_summary(model_name, len(spec["classes"]), batch_size,
                                                  transform["crop_size"]))
        body, head, cols, backbone_params = _frozen_body(model_name, pretrained_path, len(spec["classes"]), dev, dtype)
        index: dict[str, Any] = {"model": model_name, "head": head, "feature_dim": cols,
                                 "backbone_params": backbone_params, "classes": spec["classes"],
                                 "root": spec["root"], "precision": precision, "splits": {}, "skipped_corrupt": []}
        job = Pass(body, dev, cols, Path(spec["root"]), transform, batch_size, me)
        write = _write_alone if me.world == 1 else _write_ranked
        write(job, spec, out_dir, skip_corrupt, index)
    finally:
        if me.world > 1:
            torch.distributed.destroy_process_group()
    if onnx_out is not None and check_dir is not None and me.leader:
        reuse = dev.type == "cpu" and dtype is None  # the same BN-folded module backbone_body would build
        export_backbone(pretrained_path, transform_path, out_dir, model_name=model_name, onnx_out=onnx_out,
                        check_dir=check_dir, body=body if reuse else None)
    return index


def _setup(device: str, precision: str, me: distributed.Rank) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype (refused before any work), its numerics, and the process group."""
    dev = pick_device(device)
    dtype = autocast_dtype(precision, dev)
    if dev.type == "cuda" and dtype is None:
        # fp32 means fp32: cuDNN's default TF32 convolutions would store features about 1e-3 off what the
        # model computes elsewhere (export checks ONNX Runtime against these features)
        torch.backends.cudnn.allow_tf32 = False
    if dev.type == "cpu":
        # the same intra-op thread count in every process (torchrun sets OMP_NUM_THREADS=1): oneDNN's 1x1
        # convolutions on small batches sum in another order with another thread count, and the files
        # must not depend on how many processes wrote them
        torch.set_num_threads(cpu_count())
    if me.world > 1:  # under torchrun: one slice of each split per rank, rank 0 assembles
        if dev.type == "cuda":
            dev = torch.device("cuda", me.local)
            torch.cuda.set_device(dev)  # NCCL's collectives use the current GPU: this rank's, not GPU 0
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev, dtype


def _frozen_body(model_name: str, pretrained_path: Path, num_classes: int, dev: torch.device,
                 dtype: torch.dtype | None) -> tuple[nn.Module, str, int, int]:
    """The pretrained model without its head, BN-folded for inference on `dev`; also the head's name, its
    input width and the backbone's parameter count (for the index)."""
    model = load_pretrained(model_name, pretrained_path)
    head = replace_head(model, num_classes, dropout=0.0)
    cols = model.get_submodule(head)[1].in_features
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(head + "."))
    model.set_submodule(head, nn.Identity())
    body = for_inference(model).to(dev)
    return (body if dtype is None else Autocast(body, dev.type, dtype)), head, cols, backbone_params


def _write_alone(job: Pass, spec: dict[str, Any], out_dir: Path, skip_corrupt: bool, index: dict[str, Any]) -> None:
    """One process: each split streamed straight into the output folder's temporary."""
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            bad = _stream_slice(job, spec["splits"][split], split, tmp / f"{split}.npy")
            _finish_split(tmp / f"{split}.npy", spec, split, bad, skip_corrupt, job.cols, index)
        write_json(tmp / INDEX, index)


def _write_ranked(job: Pass, spec: dict[str, Any], out_dir: Path, skip_corrupt: bool, index: dict[str, Any]) -> None:
    """Under torchrun: each rank writes its slice as a part file; rank 0 joins them in rank order."""
    me = job.me
    # named after rank 0's torchrun agent, whose node assembles the files (cleanup spares it while the
    # agent lives); every node must see this folder: a shared filesystem across machines (docs/scale.md)
    parts_name = [f".{out_dir.name}.{os.getppid()}.parts.tmp"]
    torch.distributed.broadcast_object_list(parts_name, src=0)
    parts = out_dir.parent / parts_name[0]
    parts.mkdir(parents=True, exist_ok=True)
    bad_by_split = {}
    for split in SPLITS:
        bad = _stream_slice(job, spec["splits"][split], split, parts / f"{split}.{me.rank}.npy")
        gathered: list[list[int]] = [[] for _ in range(me.world)]
        torch.distributed.all_gather_object(gathered, bad)
        bad_by_split[split] = sorted(i for rank_bad in gathered for i in rank_bad)
    torch.distributed.barrier()  # every part is complete
    if me.leader:
        with atomic_dir(out_dir) as tmp:
            for split in SPLITS:
                _concatenate([parts / f"{split}.{r}.npy" for r in range(me.world)], tmp / f"{split}.npy",
                             len(spec["splits"][split]), job.cols, job.batch_size)
                _finish_split(tmp / f"{split}.npy", spec, split, bad_by_split[split], skip_corrupt, job.cols, index)
            write_json(tmp / INDEX, index)
        shutil.rmtree(parts, ignore_errors=True)
    torch.distributed.barrier()  # no rank leaves before the files exist


def _stream_slice(job: Pass, samples: list[dict[str, Any]], split: str, dest: Path) -> list[int]:
    """Featurise this rank's contiguous slice of `samples` into `dest`; return bad positions in `samples`."""
    me = job.me
    lo, hi = me.slice(len(samples), job.batch_size)
    dataset = _Decoded(job.root, samples[lo:hi], build_transform(job.transform), job.transform["resize_size"])
    workers = decode_workers(job.device.type, ranks_here=me.local_world)
    loader = make_loader(dataset, job.batch_size, shuffle=False, seed=0, workers=workers)
    start = time.perf_counter()
    bad = _stream(job.body, loader, job.device, dest, hi - lo, job.cols, desc=split)
    seconds = time.perf_counter() - start
    who = f"rank {me.rank}/{me.world}, " if me.world > 1 else ""
    print(f"featurize {split}: {hi - lo} images in {seconds:.1f} s ({(hi - lo) / max(seconds, 1e-9):.1f} images/s, "
          f"{who}{workers} decode worker(s), {job.device})")
    return [lo + i for i in bad]


def _finish_split(path: Path, spec: dict[str, Any], split: str, bad: list[int], skip_corrupt: bool, cols: int,
                  index: dict[str, Any]) -> None:
    """Name the images that did not decode (or drop their rows), and record the split in the index."""
    samples = spec["splits"][split]
    broken = [samples[i]["path"] for i in bad]
    if broken and not skip_corrupt:
        raise DatasetError(f"{len(broken)} image(s) in {spec['root']} do not decode: "
                           f"{listed(broken)}; "
                           "replace them, or set data.skip_corrupt: true")
    dropped = set(bad)
    if dropped:
        _drop_rows(path, dropped, len(samples), cols)
    kept = [s for i, s in enumerate(samples) if i not in dropped]
    index["splits"][split] = {"paths": [s["path"] for s in kept], "labels": [s["label"] for s in kept],
                              "at": [s.get("at") for s in kept]}  # where each lies in the zip: store.read_at
    index["skipped_corrupt"] += broken


def _concatenate(parts: list[Path], dest: Path, rows: int, cols: int, unit: int, chunk: int = 4096) -> None:
    """The ranks' part files, in rank order, into one .npy: streamed, never whole in memory."""
    writer = NpyWriter(dest, rows, cols)
    for rank, part in enumerate(parts):
        lo, hi = distributed.Rank(rank, len(parts)).slice(rows, unit)
        source = FeatureFile(part, [0] * (hi - lo))
        for feats, _ in source.batches(chunk):
            writer.write(feats)
        source.close()
    writer.close()


def _stream(body: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, dest: Path, rows: int,
            cols: int, desc: str) -> list[int]:
    """Append each batch's features to `dest` as it comes; return the positions of images that did not decode."""
    writer = NpyWriter(dest, rows, cols)
    bad, seen = [], 0
    batches = loader if loader.num_workers else prefetched(loader)
    with torch.inference_mode():
        for images, ok in tqdm(batches, desc=f"featurize {desc}", total=len(loader), unit="batch", leave=False):
            feats = body(images.to(device, non_blocking=True, memory_format=torch.channels_last))
            writer.write(feats.float().cpu().numpy())
            bad += [seen + j for j in (~ok).nonzero().flatten().tolist()]
            seen += len(ok)
    writer.close()
    return bad


def _drop_rows(path: Path, bad: set[int], rows: int, cols: int) -> None:
    """Rewrite `path` without the rows of images that did not decode (rare: data.skip_corrupt only)."""
    source = FeatureFile(path, [0] * rows)
    keep = [i for i in range(rows) if i not in bad]
    kept = path.with_suffix(".kept")
    writer = NpyWriter(kept, len(keep), cols)
    for start in range(0, len(keep), 1024):
        writer.write(source.take(keep[start:start + 1024]))
    writer.close()
    source.close()
    kept.replace(path)


def model_summary(name: str, num_classes: int, batch_size: int, crop_size: int) -> str:
    """torchinfo's table of the classifier (frozen backbone + new head), as in the article.

    Built and traced on the meta device: the same shapes and counts without computing a forward pass
    (0.3 s instead of 0.9 s for B0 at batch 32).
    """
    from torchinfo import summary

    with torch.device("meta"):
        model = build_backbone(name)
        freeze_all_but(model, replace_head(model, num_classes, dropout=0.0))
    stats = summary(model, input_size=(batch_size, 3, crop_size, crop_size), verbose=0, mode="eval",
                    col_names=["input_size", "output_size", "num_params", "trainable"],
                    col_width=20, row_settings=["var_names"], device="meta")
    return str(stats) + "\n"
