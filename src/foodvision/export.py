"""export stage: the trained classifier as ONNX (dynamic batch), checked against torch on every test image.

ONNX Runtime runs the model without the training stack (no torch, no torchvision): `foodvision.serve`
uses it, and so can any ONNX runtime. The file carries its classes and eval transform as metadata, so
it is all a runtime needs. The check runs ONNX Runtime on every decoded test image and fails the stage
where it disagrees with torch, so a wrong export never reaches `dvc push`. The torch side is the
trained head on the stored fp32 features (what `featurize` computed with the same frozen backbone):
each head-only experiment then decodes and runs the test split once, not twice. After a bf16/fp16
`featurize` the whole torch model runs on the images instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from foodvision.atomic import atomic_path, write_json
from foodvision.checkpoint import ModelError, head_from_checkpoint
from foodvision.data import ImageSamples, build_transform, decode_workers, make_loader, prefetched
from foodvision.features import load_index, open_split
from foodvision.model import load_checkpoint

OPSET = 18
MAX_ABS_DIFF = 1e-4  # the largest logit difference accepted between ONNX Runtime and torch
BATCH = 32


def export(model_path: Path, features_dir: Path, onnx_out: Path, metrics_out: Path) -> dict[str, Any]:
    """Write `onnx_out` and the check's figures to `metrics_out`; return the figures."""
    import onnxruntime as ort

    model, ckpt = load_checkpoint(model_path)
    index = load_index(features_dir)
    if ckpt["class_names"] != index["classes"]:
        raise ModelError(f"{model_path} was trained on other classes than {features_dir}/index.json lists; "
                         "run `dvc repro` so train and export see the same data")
    data = onnx_bytes(model, ckpt["class_names"], ckpt["transform"], ckpt["model_name"])
    with atomic_path(onnx_out) as tmp:
        tmp.write_bytes(data)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        head = head_from_checkpoint(model_path, ckpt) if _stored_fp32(index, ckpt) else None
        figures = _compare(model, head, features_dir, session, index, ckpt["transform"])
        figures.update(opset=OPSET, onnx_mb=round(len(data) / 2**20, 2))
        if figures["max_abs_diff"] > MAX_ABS_DIFF or figures["argmax_agreement"] < 1.0:
            raise ModelError(f"the ONNX export of {model_path} disagrees with torch on the test images "
                             f"(max |logit difference| {figures['max_abs_diff']:.3g}, same class on "
                             f"{figures['argmax_agreement']:.2%}); not written. Report it with your torch and "
                             "onnxruntime versions")
    write_json(metrics_out, figures)
    return figures


def onnx_bytes(model: torch.nn.Module, classes: list[str], transform: dict[str, Any], backbone: str) -> bytes:
    """The eval-mode classifier as an ONNX model with a dynamic batch; the same bytes for the same model."""
    crop = transform["crop_size"]
    program = torch.onnx.export(model.eval(), (torch.zeros(2, 3, crop, crop),), input_names=["images"],
                                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                opset_version=OPSET, dynamo=True, verbose=False)
    proto = program.model_proto
    for key, value in (("classes", classes), ("transform", transform), ("backbone", backbone)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return proto.SerializeToString(deterministic=True)


def _stored_fp32(index: dict[str, Any], ckpt: dict[str, Any]) -> bool:
    """Whether the stored features are what the checkpoint's backbone computes in float32."""
    return index.get("precision") == "fp32" and index["model"] == ckpt["model_name"]


def _compare(model: torch.nn.Module, head: torch.nn.Module | None, features_dir: Path, session: Any,
             index: dict[str, Any], transform: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime on the decoded test batches against torch (the head on the stored features, or the
    whole model on the same batches): the largest logit difference and the argmax agreement."""
    split = index["splits"]["test"]
    samples = [{"path": path, "label": label} for path, label in zip(split["paths"], split["labels"])]
    dataset = ImageSamples(Path(index["root"]), samples,
                           build_transform(transform), transform["resize_size"])
    workers = decode_workers(torch.device("cpu"))  # ONNX Runtime and torch run on the CPU here
    loader = make_loader(dataset, BATCH, shuffle=False, seed=0, workers=workers)
    feature_file = open_split(features_dir, index, "test") if head is not None else None
    stored = feature_file.batches(BATCH) if feature_file is not None else None
    worst, same, seen, ort_s = 0.0, 0, 0, 0.0
    with torch.inference_mode():
        batches = loader if workers else prefetched(loader)  # the next batch decodes while this one runs
        for images, _ in tqdm(batches, desc="export check", total=len(loader), unit="batch", leave=False):
            expected = (model(images) if stored is None else head(next(stored)[0])).numpy()
            start = time.perf_counter()
            got = session.run(["logits"], {"images": images.numpy()})[0]
            ort_s += time.perf_counter() - start
            worst = max(worst, float(np.abs(got - expected).max()))
            same += int((got.argmax(1) == expected.argmax(1)).sum())
            seen += len(images)
    if feature_file is not None:
        feature_file.close()
    if not seen:
        raise ModelError("the test split is empty: nothing to check the ONNX export on")
    reference = "whole model" if stored is None else "head on stored features"
    print(f"export check: {seen} test images, max |logit difference| {worst:.3g}, same class on {same}/{seen}; "
          f"ONNX Runtime {seen / ort_s:.1f} images/s (batch {BATCH}); torch: the {reference}")
    return {"images": seen, "max_abs_diff": float(f"{worst:.3g}"), "argmax_agreement": round(same / seen, 6),
            "torch_reference": reference}
