"""featurize stage: every image of each split through the frozen backbone once, features streamed to disk.

The backbone is frozen and in eval mode and the eval transform is deterministic, so an image's features
never change while its head trains: computing them once here lets every head-only experiment (lr, epochs,
dropout) and `evaluate` skip decoding and the backbone entirely. Batches are decoded (in DataLoader
workers where there are spare cores, else on every core, a batch ahead), run through the frozen backbone
on the engine `featurize.engine` picks and appended to the output file, so memory stays flat whatever
the number of images.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from PIL import Image

from foodvision import distributed
from foodvision.backbone import (
    Engine,
    image_features,
    onnx_engine,
    openvino_engine,
    pick_engine,
    pretrained_body,
    torch_engine,
)
from foodvision.core.device import cpu_count, decode_workers, pick_device
from foodvision.core.errors import DatasetError, listed
from foodvision.core.files import atomic_dir, write_text
from foodvision.data import EvalTransform, ImageSamples, make_loader
from foodvision.export_backbone import export_backbone, export_timed
from foodvision.features import FeatureFile, FeatureIndex, NpyWriter, SplitIndex, write_index
from foodvision.images import open_rgb
from foodvision.model import build_backbone, freeze_all_but, replace_head, resolve_weights
from foodvision.precision import autocast_dtype
from foodvision.spec import SPLITS, load_spec, load_transform

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class _Decoded(ImageSamples):
    """(image tensor, ok): an image whose pixel data will not decode yields zeros and ok=False."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        rel, _ = self.samples[i]
        try:
            return self.transform(open_rgb(self.store.open(rel), self.min_size)), True
        except DECODE_ERRORS:
            crop = self.transform.crop_size
            return torch.zeros(3, crop, crop), False


@dataclass(frozen=True)
class Pass:
    """What one pass over a split needs: the frozen backbone ready to run, where, and on which rank."""

    engine: Engine
    device: torch.device
    cols: int  # features per image
    root: Path
    transform: dict[str, Any]
    batch_size: int
    me: distributed.Rank


def featurize(spec_path: Path, pretrained_path: Path, transform_path: Path, out_dir: Path, *, model_name: str,
              batch_size: int, device: str, skip_corrupt: bool, summary_out: Path, precision: str, engine: str,
              onnx_out: Path | None = None, check_dir: Path | None = None) -> FeatureIndex:
    """Write `out_dir/{train,test}.npy` and `out_dir/index.json`; return the index.

    Also writes the article's torchinfo table of the classifier (frozen backbone + new head) to `summary_out`,
    and with `onnx_out` and `check_dir` the backbone as ONNX, checked on every test image (`export_backbone`).
    On ONNX Runtime (`featurize.engine`, `backbone.pick_engine`) the body is exported first and every image
    runs through that very graph, the one `model.onnx` serves; the check then holds torch against it. The
    export changes exactly when the features do, and in this process it costs no second import of torch and
    torchvision (docs/scale.md has the figures).
    """
    resolve_weights(model_name, None)  # a bad name fails before any work
    spec, transform = load_spec(spec_path), load_transform(transform_path)
    me = distributed.current()
    dev, dtype = _setup(device, precision, me)
    runner = pick_engine(engine, precision, dev)
    graph = None
    try:
        if me.leader:
            write_text(summary_out, model_summary(model_name, len(spec["classes"]), batch_size,
                                                  transform["crop_size"]))
        body = pretrained_body(model_name, pretrained_path, len(spec["classes"]))
        if runner == "torch":
            run = torch_engine(body.module, dev, dtype)
        else:
            graph = _shared_graph(body.module, transform["crop_size"], model_name, me)
            threads = max(1, cpu_count() // me.local_world)
            run = (onnx_engine(graph, threads) if runner == "onnxruntime"
                   else openvino_engine(graph, threads, precision))
        job = Pass(run, dev, body.cols, Path(spec["root"]), transform, batch_size, me)
        # the splits and the images that did not decode are filled in once every row is written
        header = FeatureIndex(model_name, body.head, body.cols, body.backbone_params, spec["classes"], spec["root"],
                              precision, runner, splits={}, skipped_corrupt=[])
        write = _write_alone if me.world == 1 else _write_ranked
        index = write(job, spec, out_dir, skip_corrupt, header)
        del job, run  # the engine and its memory go before the check loads torch's side
    finally:
        if me.world > 1:
            torch.distributed.destroy_process_group()
    if onnx_out is not None and check_dir is not None and me.leader:
        reuse = dev.type == "cpu" and dtype is None  # the same BN-folded module, still on the CPU
        export_backbone(pretrained_path, transform_path, out_dir, model_name=model_name, onnx_out=onnx_out,
                        check_dir=check_dir, body=body.module if reuse else None, graph=graph)
    return index


def _shared_graph(body: torch.nn.Module, crop: int, name: str, me: distributed.Rank) -> bytes:
    """The body's ONNX graph for ONNX Runtime: exported once, by rank 0, and handed to every rank."""
    graph = [export_timed(body, crop, name) if me.leader else None]
    if me.world > 1:
        torch.distributed.broadcast_object_list(graph, src=0)
    return graph[0]


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


def _write_alone(job: Pass, spec: dict[str, Any], out_dir: Path, skip_corrupt: bool,
                 header: FeatureIndex) -> FeatureIndex:
    """One process: each split streamed straight into the output folder's temporary."""
    splits, broken = {}, []
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            bad = _stream_slice(job, spec["splits"][split], split, tmp / f"{split}.npy")
            splits[split] = _finish_split(tmp / f"{split}.npy", spec, split, bad, skip_corrupt, job.cols, broken)
        index = replace(header, splits=splits, skipped_corrupt=broken)
        write_index(tmp, index)
    return index


def _write_ranked(job: Pass, spec: dict[str, Any], out_dir: Path, skip_corrupt: bool,
                  header: FeatureIndex) -> FeatureIndex:
    """Under torchrun: each rank writes its slice as a part file; rank 0 joins them in rank order (the other
    ranks return `header`, without splits)."""
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
    index = header
    if me.leader:
        splits, broken = {}, []
        with atomic_dir(out_dir) as tmp:
            for split in SPLITS:
                _concatenate([parts / f"{split}.{r}.npy" for r in range(me.world)], tmp / f"{split}.npy",
                             len(spec["splits"][split]), job.cols, job.batch_size)
                splits[split] = _finish_split(tmp / f"{split}.npy", spec, split, bad_by_split[split], skip_corrupt,
                                              job.cols, broken)
            index = replace(header, splits=splits, skipped_corrupt=broken)
            write_index(tmp, index)
        shutil.rmtree(parts, ignore_errors=True)
    torch.distributed.barrier()  # no rank leaves before the files exist
    return index


def _stream_slice(job: Pass, samples: list[dict[str, Any]], split: str, dest: Path) -> list[int]:
    """Featurise this rank's contiguous slice of `samples` into `dest`; return bad positions in `samples`."""
    me = job.me
    lo, hi = me.slice(len(samples), job.batch_size)
    dataset = _Decoded(job.root, samples[lo:hi], EvalTransform(job.transform), job.transform["resize_size"])
    workers = decode_workers(job.device.type, ranks_here=me.local_world)
    threads = max(1, cpu_count() // me.local_world)
    loader = make_loader(dataset, job.batch_size, shuffle=False, seed=0, workers=workers)
    start = time.perf_counter()
    bad = _stream(job.engine, loader, dest, hi - lo, job.cols, desc=split, threads=threads)
    seconds = time.perf_counter() - start
    who = f"rank {me.rank}/{me.world}, " if me.world > 1 else ""
    print(f"featurize {split}: {hi - lo} images in {seconds:.1f} s ({(hi - lo) / max(seconds, 1e-9):.1f} images/s, "
          f"{who}{f'{workers} decode worker(s)' if workers else f'decoding on {threads} thread(s)'}, {job.device})")
    return [lo + i for i in bad]


def _finish_split(path: Path, spec: dict[str, Any], split: str, bad: list[int], skip_corrupt: bool, cols: int,
                  broken_so_far: list[str]) -> SplitIndex:
    """Name the images that did not decode (or drop their rows, adding them to `broken_so_far`); the split's
    entry in the index."""
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
    broken_so_far += broken
    # where each lies in the zip: store.read_at
    return SplitIndex([s["path"] for s in kept], [s["label"] for s in kept], [s.get("at") for s in kept])


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


def _stream(engine: Engine, loader: torch.utils.data.DataLoader, dest: Path, rows: int, cols: int,
            desc: str, threads: int) -> list[int]:
    """Append each batch's features to `dest` as it comes; return the positions of images that did not decode."""
    writer = NpyWriter(dest, rows, cols)
    bad, seen = [], 0
    for _, features, ok in image_features(loader, engine, f"featurize {desc}", threads):
        writer.write(features)
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

    Built and traced on the meta device: the same shapes and counts without computing a forward pass.
    """
    from torchinfo import summary

    with torch.device("meta"):
        model = build_backbone(name)
        freeze_all_but(model, replace_head(model, num_classes, dropout=0.0))
    stats = summary(model, input_size=(batch_size, 3, crop_size, crop_size), verbose=0, mode="eval",
                    col_names=["input_size", "output_size", "num_params", "trainable"],
                    col_width=20, row_settings=["var_names"], device="meta")
    return str(stats) + "\n"
