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
from foodvision.core.files import atomic_dir, atomic_path, write_json
from foodvision.data import EvalTransform, make_loader, split_images
from foodvision.features import FeatureIndex, NpyWriter
from foodvision.onnx_check import FIGURES, OPSET, ORT_FEATURES, REFERENCE, verdict

BATCH = 32
STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata torch's exporter writes: source paths


def write_checked(body: nn.Module, transform: dict[str, Any], features_dir: Path, index: FeatureIndex, *,
                  onnx_out: Path, check_dir: Path, torch_side: str) -> dict[str, Any]:
    """A fine-tuned `body` as ONNX plus its check folder, written only when ONNX Runtime agrees with torch on
    every decoded test image; torch's features are kept as `reference.npy`."""
    data = export_timed(body, transform["crop_size"], index.model)
    with atomic_path(onnx_out) as tmp_onnx, atomic_dir(check_dir) as tmp_check:
        tmp_onnx.write_bytes(data)
        worst, seen = _compare(body, onnx_engine(data, cpu_count()), index, transform, tmp_check)
        print(f"backbone check: {seen} test images, max |feature difference| {worst:.3g}; torch: the {torch_side}")
        figures = verdict(worst, seen, torch_side, index.model, data)
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


def _compare(body: nn.Module, ort_side: Engine, index: FeatureIndex, transform: dict[str, Any],
             check_dir: Path) -> tuple[float, int]:
    """ONNX Runtime against torch on the same decoded test batches, both written to `check_dir`; returns the
    largest difference and the number of images."""
    test = index.split("test")
    dataset = split_images(index, "test", EvalTransform(transform), transform["resize_size"])
    loader = make_loader(dataset, BATCH, shuffle=False, seed=0, workers=decode_workers("cpu"))  # both on the CPU
    ort_out = NpyWriter(check_dir / ORT_FEATURES, len(test.paths), index.feature_dim)
    reference = NpyWriter(check_dir / REFERENCE, len(test.paths), index.feature_dim)
    run_torch = torch_engine(body, torch.device("cpu"))
    worst, seen = 0.0, 0
    for images, got, _ in image_features(loader, ort_side, "backbone check"):
        expected = run_torch(images)
        reference.write(expected)
        ort_out.write(got)
        worst = max(worst, float(np.abs(got - expected).max()))
        seen += len(images)
    ort_out.close()
    reference.close()
    return worst, seen
