"""featurize stage: every image of each split through the frozen backbone once, features streamed to disk.

The backbone is frozen and in eval mode and the eval transform is deterministic, so an image's features
never change while its head trains: computing them once here lets every head-only experiment (lr, epochs,
dropout) and `evaluate` skip decoding and the backbone entirely. And since a row depends only on the image's
bytes and the backbone, rows are kept by content (`feature_cache`): a changed dataset (photos added,
labels moved, another split or class subset) computes only the images the cache lacks (`rows`, on the
engine and under the recipe `sources` gives). Batches
are decoded (in DataLoader workers where there are spare cores, else on every core, a batch ahead), run
through the frozen backbone on the engine `featurize.engine` picks and appended to a file, so memory stays
flat whatever the number of images.

The stage ends with the backbone as ONNX (the graph ONNX Runtime runs, exported once per backbone and kept
in the cache) and its check: torch's and ONNX Runtime's rows of every test image, each from the cache
where it has them, must agree (`onnx_check`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed

from foodvision import distributed
from foodvision.backbone import pick_engine, pretrained_body
from foodvision.core.device import cpu_count, pick_device
from foodvision.core.errors import DatasetError, ModelError, listed
from foodvision.core.files import atomic_dir, atomic_path, file_sha256, write_json, write_text
from foodvision.feature_cache import evict
from foodvision.features import FeatureFile, FeatureIndex, NpyWriter, SplitIndex, load_index, write_index
from foodvision.model import build_backbone, freeze_all_but, replace_head, resolve_weights
from foodvision.onnx_check import FIGURES, ORT_FEATURES, REFERENCE, read_figures, verdict
from foodvision.precision import autocast_dtype
from foodvision.rows import Made, Source, image_keys, make_rows
from foodvision.sources import Backbone, Cache
from foodvision.spec import SPLITS, load_spec, load_transform

CHECK_BATCH = 32  # the check's torch side runs at this batch size, whatever featurize.batch_size is


def featurize(spec_path: Path, pretrained_path: Path, transform_path: Path, out_dir: Path, *, model_name: str,
              batch_size: int, device: str, skip_corrupt: bool, summary_out: Path, precision: str, engine: str,
              onnx_out: Path | None = None, check_dir: Path | None = None, cache: Cache | None = None,
              rows_out: Path | None = None) -> FeatureIndex:
    """Write `out_dir/{train,test}.npy` and `out_dir/index.json`; return the index.

    Also writes the article's torchinfo table of the classifier (frozen backbone + new head) to `summary_out`;
    with `onnx_out` and `check_dir`, the backbone as ONNX, checked on every test image; with `cache`, rows
    come from it where it has them and new ones go into it; `rows_out` says how many of each file's rows
    were cached and how many computed (the feature files are the same bytes either way).
    """
    resolve_weights(model_name, None)  # a bad name fails before any work
    spec, transform = load_spec(spec_path), load_transform(transform_path)
    me = distributed.current()
    dev, dtype = _setup(device, precision, me)
    runner = pick_engine(engine, precision, dev)
    try:
        if me.leader:
            write_text(summary_out, model_summary(model_name, len(spec["classes"]), batch_size,
                                                  transform["crop_size"]))
        body = pretrained_body(model_name, pretrained_path, len(spec["classes"]))
        backbone = Backbone(body, model_name, file_sha256(pretrained_path), transform, cache, me)
        source = backbone.source(runner, dev, precision, dtype, batch_size)
        # the splits and the images that did not decode are filled in once every row is written
        header = FeatureIndex(model_name, body.head, body.cols, body.backbone_params, spec["classes"], spec["root"],
                              precision, runner, splits={}, skipped_corrupt=[])
        index, made, test_keys = _write(source, spec, out_dir, skip_corrupt, header, transform, batch_size, me)
    finally:
        if me.world > 1:
            torch.distributed.destroy_process_group()
    if me.leader:
        if onnx_out is not None and check_dir is not None:
            made |= _check(backbone, index, test_keys, out_dir, onnx_out, check_dir)
        if cache is not None:
            evict(cache.root, cache.max_bytes)
        print("featurize rows: " + "; ".join(f"{name} {m.cached:,} from the cache, {m.computed:,} computed"
                                             for name, m in made.items()))
        if rows_out is not None:
            write_json(rows_out, {name: {"cached": m.cached, "computed": m.computed} for name, m in made.items()})
    return index


def _write(source: Source, spec: dict[str, Any], out_dir: Path, skip_corrupt: bool, header: FeatureIndex,
           transform: dict[str, Any], batch_size: int,
           me: distributed.Rank) -> tuple[FeatureIndex, dict[str, Made], list[bytes]]:
    """Each split's rows (every rank computes its share), then rank 0 swaps the folder in; returns the index
    (the other ranks: `header`), how each split's rows were made and the kept test images' keys."""
    root = Path(spec["root"])
    work = _work_dir(out_dir, me)
    made, keys = {}, {}
    try:
        for split in SPLITS:
            samples = spec["splits"][split]
            keys[split] = image_keys(root, samples)
            made[split] = make_rows(source, root, samples, keys[split], work / f"{split}.npy", transform=transform,
                                    batch_size=batch_size, cols=header.feature_dim, desc=f"featurize {split}",
                                    work=work, me=me)
        index, test_keys = header, []
        if me.leader:
            splits, broken = {}, []
            with atomic_dir(out_dir) as tmp:
                for split in SPLITS:
                    os.replace(work / f"{split}.npy", tmp / f"{split}.npy")
                    splits[split] = _finish_split(tmp / f"{split}.npy", spec, split, made[split].bad, skip_corrupt,
                                                  header.feature_dim, broken)
                index = replace(header, splits=splits, skipped_corrupt=broken)
                write_index(tmp, index)
            dropped = set(made["test"].bad)
            test_keys = [k for i, k in enumerate(keys["test"]) if i not in dropped]
        if me.world > 1:
            torch.distributed.barrier()  # no rank leaves before the files exist
    finally:
        if me.leader:
            shutil.rmtree(work, ignore_errors=True)
    return index, made, test_keys


def _work_dir(out_dir: Path, me: distributed.Rank) -> Path:
    """A folder beside the output that every rank sees, named after rank 0's torchrun agent (or this process),
    so cleanup spares it while that lives; every node must see it: a shared filesystem across machines."""
    name = [f".{out_dir.name}.{os.getppid() if me.world > 1 else os.getpid()}.parts.tmp"]
    if me.world > 1:
        torch.distributed.broadcast_object_list(name, src=0)
    work = out_dir.parent / name[0]
    work.mkdir(parents=True, exist_ok=True)
    return work


def check_backbone(pretrained_path: Path, transform_path: Path, features_dir: Path, *, model_name: str,
                   onnx_out: Path, check_dir: Path, cache: Cache | None = None) -> dict[str, Any]:
    """The backbone's ONNX file and check folder for features written without them; return the check's figures."""
    index = load_index(features_dir)
    if index.model != model_name:
        raise ModelError(f"{features_dir} holds features of {index.model!r}, but model.name is "
                         f"{model_name!r}; run `dvc repro featurize`")
    body = pretrained_body(model_name, pretrained_path, len(index.classes))
    backbone = Backbone(body, model_name, file_sha256(pretrained_path), load_transform(transform_path), cache,
                        distributed.Rank())
    keys = image_keys(Path(index.root), index.split("test").samples())
    _check(backbone, index, keys, features_dir, onnx_out, check_dir)
    return read_figures(check_dir)


def _check(backbone: Backbone, index: FeatureIndex, keys: list[bytes], out_dir: Path, onnx_out: Path,
           check_dir: Path) -> dict[str, Made]:
    """The backbone's ONNX file and its check folder, written only when ONNX Runtime's rows of every test image
    agree with torch's float32 ones. Each side is the stored rows when they are its own, else rows from the
    cache or computed (only the test images the cache lacks are decoded)."""
    test = index.split("test")
    if not test.paths:
        raise ModelError("the test split is empty: nothing to check the ONNX export on")
    cpu, made, runner, transform = torch.device("cpu"), {}, index.engine, backbone.transform
    samples = [{"path": p, "label": label, "sha256": k.hex()} for p, label, k in zip(test.paths, test.labels, keys,
                                                                                      strict=True)]
    stored = out_dir / "test.npy"
    graph = backbone.graph()
    with atomic_path(onnx_out) as tmp_onnx, atomic_dir(check_dir) as tmp_check:
        tmp_onnx.write_bytes(graph)
        ort = tmp_check / ORT_FEATURES
        common = {"transform": transform, "batch_size": CHECK_BATCH, "cols": index.feature_dim, "work": tmp_check}
        if runner == "onnxruntime":
            shutil.copyfile(stored, ort)
        else:
            made["check onnxruntime"] = make_rows(backbone.source("onnxruntime", cpu, "fp32", None, CHECK_BATCH),
                                                  Path(index.root), samples, keys, ort, desc="backbone check",
                                                  **common)
        if runner == "torch" and index.precision == "fp32":
            reference, torch_side = stored, "stored features"
        else:
            reference = tmp_check / REFERENCE
            made["check torch"] = make_rows(backbone.source("torch", cpu, "fp32", None, CHECK_BATCH),
                                            Path(index.root), samples, keys, reference, desc="backbone check",
                                            **common)
            stored_by = {"onnxruntime": "by ONNX Runtime", "openvino": f"by OpenVINO in {index.precision}"}.get(
                runner, "in lower precision")
            torch_side = f"float32 backbone (features stored {stored_by})"
        worst = _max_abs_diff(ort, reference, test.labels)
        print(f"backbone check: {len(test.paths)} test images, max |feature difference| {worst:.3g}; "
              f"torch: the {torch_side}")
        write_json(tmp_check / FIGURES, verdict(worst, len(test.paths), torch_side, index.model, graph))
    return made


def _max_abs_diff(a: Path, b: Path, labels: list[int]) -> float:
    left, right = FeatureFile(a, labels), FeatureFile(b, labels)
    worst = 0.0
    for (x, _), (y, _) in zip(left.batches(4096), right.batches(4096), strict=True):
        worst = max(worst, float(np.abs(x - y).max()))
    left.close()
    right.close()
    return worst


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
