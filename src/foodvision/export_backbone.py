"""A backbone as ONNX (images -> features), and the check that holds ONNX Runtime to torch on every test image.

`featurize` exports its pretrained backbone here (once per backbone: the graph is kept in its cache) and
checks it on rows from the cache (`featurize.check_backbone`). A fine-tuned checkpoint's own backbone is
exported and checked here by `export` (`write_checked`), decoding the test images: its features are in no
cache. Either way ONNX Runtime's features of the test split are kept (`check/test.npy`): the per-experiment
`export` stage puts the trained head on top of them and so checks the whole file's logits on every test
image with a matrix product, decoding nothing.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from foodvision.backbone import Engine, image_features, onnx_engine, torch_engine
from foodvision.core.device import cpu_count, decode_workers
from foodvision.core.errors import ModelError
from foodvision.core.files import atomic_dir, atomic_path, write_json
from foodvision.data import EvalTransform, make_loader, split_images
from foodvision.features import FeatureIndex, NpyWriter, open_split
from foodvision.onnx_check import FIGURES, MAX_ABS_DIFF, OPSET, ORT_FEATURES, REFERENCE

BATCH = 32
STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata torch's exporter writes: source paths


def write_checked(body: nn.Module, transform: dict[str, Any], features_dir: Path, index: FeatureIndex, *,
                  onnx_out: Path, check_dir: Path, run_torch: bool, torch_side: str, graph: bytes | None = None,
                  stored_by_onnx: bool = False) -> dict[str, Any]:
    """`body` as ONNX (`graph` when already exported) plus its check folder, written only when ONNX Runtime
    agrees with torch on every test image.

    ONNX Runtime's side is the graph on the decoded test batches, or with `stored_by_onnx` the stored features,
    which it computed. torch's side is the stored features, or with `run_torch` the body itself on the same
    batches (features stored by ONNX Runtime or in lower precision; a fine-tuned backbone), kept as
    `reference.npy`."""
    data = graph if graph is not None else export_timed(body, transform["crop_size"], index.model)
    with atomic_path(onnx_out) as tmp_onnx, atomic_dir(check_dir) as tmp_check:
        tmp_onnx.write_bytes(data)
        ort_side = None if stored_by_onnx else onnx_engine(data, cpu_count())
        figures = _compare(body if run_torch else None, features_dir, ort_side, index, transform, tmp_check,
                           torch_side)
        figures.update(opset=OPSET, onnx_mb=round(len(data) / 2**20, 2))
        if figures["backbone_max_abs_diff"] > MAX_ABS_DIFF:
            raise ModelError(f"the ONNX export of the {index.model} backbone disagrees with torch on the test "
                             f"images (max |feature difference| {figures['backbone_max_abs_diff']:.3g}); not "
                             "written. Report it with your torch and onnxruntime versions")
        write_json(tmp_check / FIGURES, figures)
    return figures


def export_timed(body: nn.Module, crop: int, name: str) -> bytes:
    """`onnx_bytes` of a frozen body, saying how long torch's exporter took."""
    start = time.perf_counter()
    data = onnx_bytes(body, crop, "features")
    print(f"exported the {name} backbone with torch.onnx.export in {time.perf_counter() - start:.1f} s")
    return data


def onnx_bytes(module: nn.Module, crop: int, output: str) -> bytes:
    """`module` on a dynamic batch of crop x crop images as ONNX; the same bytes for the same module.

    A copy with in-place activations made out of place is exported: the graph computes the same, but
    torch.export takes each in-place ReLU6 through a slow reference decomposition (docs/scale.md has the
    figures).

    torch notes on every node the Python stack that made it, absolute paths included (the checkout, the
    virtual environment, a home folder); those notes are dropped, so the file is the same wherever the
    project lies and tells nobody where that is. The rest of the node metadata (module names) stays."""
    module = copy.deepcopy(module).eval().to("cpu", memory_format=torch.contiguous_format)
    for layer in module.modules():
        if isinstance(getattr(layer, "inplace", None), bool):
            layer.inplace = False
    program = torch.onnx.export(module, (torch.zeros(2, 3, crop, crop),), input_names=["images"],
                                output_names=[output], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                opset_version=OPSET, dynamo=True, verbose=False)
    proto = program.model_proto
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        kept = [entry for entry in node.metadata_props if entry.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return proto.SerializeToString(deterministic=True)


def _compare(body: nn.Module | None, features_dir: Path, ort_side: Engine | None, index: FeatureIndex,
             transform: dict[str, Any], check_dir: Path, torch_side: str) -> dict[str, Any]:
    """ONNX Runtime (`ort_side` on the decoded test batches, or None: the stored rows, its own) against torch
    (`body` on the same batches, or None: the stored rows, its own); ONNX Runtime's features (and torch's,
    with `body`) are written to `check_dir`."""
    test = index.split("test")
    if not test.paths:
        raise ModelError("the test split is empty: nothing to check the ONNX export on")
    if body is None and ort_side is None:
        raise ValueError("the check needs torch or ONNX Runtime to run on the images")
    dataset = split_images(index, "test", EvalTransform(transform), transform["resize_size"])
    # ONNX Runtime and torch run on the CPU here
    loader = make_loader(dataset, BATCH, shuffle=False, seed=0, workers=decode_workers("cpu"))
    rows, cols = len(test.paths), index.feature_dim
    stored = open_split(features_dir, index, "test") if body is None or ort_side is None else None
    stored_rows = stored.batches(BATCH) if stored is not None else None
    ort_out = NpyWriter(check_dir / ORT_FEATURES, rows, cols)
    reference = NpyWriter(check_dir / REFERENCE, rows, cols) if body is not None else None
    run_torch = torch_engine(body, torch.device("cpu")) if body is not None else None
    engine = _timed(ort_side if ort_side is not None else run_torch)  # the one that runs on the images first
    worst, seen = 0.0, 0
    for images, out, _ in image_features(loader, engine, "backbone check"):
        if ort_side is None:  # stored rows are ONNX Runtime's
            got, expected = next(stored_rows)[0], out
        else:
            got, expected = out, (next(stored_rows)[0] if run_torch is None else run_torch(images))
        if reference is not None:
            reference.write(expected)
        ort_out.write(got)
        worst = max(worst, float(np.abs(got - expected).max()))
        seen += len(images)
    if stored is not None:
        stored.close()
    for writer in (ort_out, reference):
        if writer is not None:
            writer.close()
    torch_side = "stored features" if body is None else torch_side
    timed = "ONNX Runtime" if ort_side is not None else "torch"
    print(f"backbone check: {seen} test images, max |feature difference| {worst:.3g}; {timed} "
          f"{seen / max(engine.seconds, 1e-9):.1f} images/s (batch {BATCH}); torch: the {torch_side}")
    return {"images": seen, "backbone_max_abs_diff": float(f"{worst:.3g}"), "torch_reference": torch_side,
            "backbone": index.model}


class _timed:
    """An engine that adds up the seconds it runs (the check reports the speed of the engine it times)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.seconds = engine, 0.0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        out = self.engine(images)
        self.seconds += time.perf_counter() - start
        return out
