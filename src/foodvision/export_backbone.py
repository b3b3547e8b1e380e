"""The frozen backbone as ONNX (images -> features), checked on every test image: the end of the `featurize` stage.

The backbone changes only when the features do (another model.name, pretrained file or dataset), so its
slow part, `torch.onnx.export` and a pass of ONNX Runtime over the decoded test split, runs once per
featurize, in that stage's process (no second import of torch and torchvision), never in an experiment.
ONNX Runtime's features of the test split are kept (`check/test.npy`): the per-experiment `export` stage
puts the trained head on top of them and so checks the whole file's logits on every test image with a
matrix product, decoding nothing.

The torch side is the stored fp32 features (what `featurize` computed with the same fused backbone).
After a bf16/fp16 `featurize` the backbone runs in float32 on the same batches instead, and its
features are kept as `check/reference.npy` for `export`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from foodvision.backbone import Engine, image_features, pretrained_body, torch_engine
from foodvision.core.device import decode_workers
from foodvision.core.errors import ModelError
from foodvision.core.files import atomic_dir, atomic_path, write_json
from foodvision.data import build_transform, make_loader, split_images
from foodvision.features import FeatureIndex, NpyWriter, load_index, open_split
from foodvision.onnx_check import FIGURES, MAX_ABS_DIFF, OPSET, ORT_FEATURES, REFERENCE
from foodvision.spec import load_transform

BATCH = 32
STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata torch's exporter writes: source paths


def export_backbone(pretrained_path: Path, transform_path: Path, features_dir: Path, *, model_name: str,
                    onnx_out: Path, check_dir: Path, body: nn.Module | None = None) -> dict[str, Any]:
    """Write the backbone's ONNX file and the check folder; return the check's figures.

    `body` is `backbone.pretrained_body`'s module when the caller already has it on the CPU (`featurize` in
    float32), so the weights are not loaded twice."""
    index = load_index(features_dir)
    if index.model != model_name:
        raise ModelError(f"{features_dir} holds features of {index.model!r}, but model.name is "
                         f"{model_name!r}; run `dvc repro featurize`")
    if body is None:
        body = pretrained_body(model_name, pretrained_path, len(index.classes)).module
    fp32 = index.precision == "fp32"
    return write_checked(body, load_transform(transform_path), features_dir, index, onnx_out=onnx_out,
                         check_dir=check_dir, run_torch=not fp32,
                         torch_side="float32 backbone (features stored in lower precision)")


def write_checked(body: nn.Module, transform: dict[str, Any], features_dir: Path, index: FeatureIndex, *,
                  onnx_out: Path, check_dir: Path, run_torch: bool, torch_side: str) -> dict[str, Any]:
    """`body` as ONNX plus its check folder, written only when ONNX Runtime agrees with torch on every test image.

    torch's side is the stored features, or with `run_torch` the body itself on the same decoded batches
    (after a bf16/fp16 featurize; a fine-tuned backbone), whose features are kept as `reference.npy`."""
    import onnxruntime as ort

    start = time.perf_counter()
    data = onnx_bytes(body.to(memory_format=torch.contiguous_format), transform["crop_size"], "features")
    print(f"exported the {index.model} backbone with torch.onnx.export in {time.perf_counter() - start:.1f} s")
    with atomic_path(onnx_out) as tmp_onnx, atomic_dir(check_dir) as tmp_check:
        tmp_onnx.write_bytes(data)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        figures = _compare(body if run_torch else None, features_dir, session, index, transform, tmp_check,
                           torch_side)
        figures.update(opset=OPSET, onnx_mb=round(len(data) / 2**20, 2))
        if figures["backbone_max_abs_diff"] > MAX_ABS_DIFF:
            raise ModelError(f"the ONNX export of the {index.model} backbone disagrees with torch on the test "
                             f"images (max |feature difference| {figures['backbone_max_abs_diff']:.3g}); not "
                             "written. Report it with your torch and onnxruntime versions")
        write_json(tmp_check / FIGURES, figures)
    return figures


def onnx_bytes(module: nn.Module, crop: int, output: str) -> bytes:
    """`module` on a dynamic batch of crop x crop images as ONNX; the same bytes for the same module.

    A copy with in-place activations made out of place is exported: the graph computes the same, but
    torch.export takes each in-place ReLU6 through a slow reference decomposition (docs/scale.md has the
    figures).

    torch notes on every node the Python stack that made it, absolute paths included (the checkout, the
    virtual environment, a home folder); those notes are dropped, so the file is the same wherever the
    project lies and tells nobody where that is. The rest of the node metadata (module names) stays."""
    module = copy.deepcopy(module).eval()
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


def _compare(body: nn.Module | None, features_dir: Path, session: Any, index: FeatureIndex,
             transform: dict[str, Any], check_dir: Path, torch_side: str) -> dict[str, Any]:
    """ONNX Runtime on the decoded test batches against torch (the stored features, or `body` on the same
    batches); ONNX Runtime's features (and torch's, with `body`) are written to `check_dir`."""
    test = index.split("test")
    if not test.paths:
        raise ModelError("the test split is empty: nothing to check the ONNX export on")
    dataset = split_images(index, "test", build_transform(transform), transform["resize_size"])
    # ONNX Runtime and torch run on the CPU here
    loader = make_loader(dataset, BATCH, shuffle=False, seed=0, workers=decode_workers("cpu"))
    rows, cols = len(test.paths), index.feature_dim
    stored = open_split(features_dir, index, "test") if body is None else None
    ort_out = NpyWriter(check_dir / ORT_FEATURES, rows, cols)
    reference = NpyWriter(check_dir / REFERENCE, rows, cols) if body is not None else None
    engine = _timed(_ort_engine(session))
    expected_rows = stored.batches(BATCH) if stored is not None else None
    # the body as exported (contiguous), on the images as ONNX Runtime gets them
    run_torch = (torch_engine(body, torch.device("cpu"), memory_format=torch.contiguous_format)
                 if body is not None else None)
    worst, seen = 0.0, 0
    for images, got, _ in image_features(loader, engine, "backbone check"):
        if run_torch is None:
            expected = next(expected_rows)[0]
        else:
            expected = run_torch(images)
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
    print(f"backbone check: {seen} test images, max |feature difference| {worst:.3g}; ONNX Runtime "
          f"{seen / max(engine.seconds, 1e-9):.1f} images/s (batch {BATCH}); torch: the {torch_side}")
    return {"images": seen, "backbone_max_abs_diff": float(f"{worst:.3g}"), "torch_reference": torch_side,
            "backbone": index.model}


def _ort_engine(session: Any) -> Engine:
    """ONNX Runtime on the exported graph: a batch of decoded images to feature rows."""
    return lambda images: session.run(["features"], {"images": images.numpy()})[0]


class _timed:
    """An engine that adds up the seconds it runs (the check reports ONNX Runtime's speed alone)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.seconds = engine, 0.0

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        start = time.perf_counter()
        out = self.engine(images)
        self.seconds += time.perf_counter() - start
        return out
