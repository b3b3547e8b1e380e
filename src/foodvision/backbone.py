"""The frozen backbone without its head, and the one loop that turns decoded images into feature rows.

Everything that computes features builds the body and runs it here: `featurize` (the pretrained backbone,
every image), the backbone's ONNX check (torch against ONNX Runtime on the test images) and a fine-tuned
checkpoint's own backbone in `evaluate` and `export`. One builder, so the features of the same weights
are the same bytes whoever asks; one loop, so each engine (torch here, ONNX Runtime in the check) is a
function from a batch of images to float32 rows, and the decoding, prefetching and progress are shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from foodvision.core.device import cpu_count, decode_workers
from foodvision.core.errors import ModelError
from foodvision.data import EvalTransform, make_loader, prefetched, split_images, threaded
from foodvision.features import FeatureIndex
from foodvision.model import for_inference, load_checkpoint, load_pretrained, replace_head
from foodvision.precision import Autocast

# a batch of decoded images (N x 3 x crop x crop, float32, on the CPU) -> its features (N x D, float32)
Engine = Callable[[torch.Tensor], np.ndarray]


@dataclass(frozen=True)
class Body:
    """The pretrained backbone ready to run, and what the feature index records about it."""

    module: nn.Module  # BatchNorm folded, channels-last, eval mode, on the CPU
    head: str  # the name of the classifier head it was taken from
    cols: int  # features per image
    backbone_params: int


def frozen_body(model: nn.Module, head: str) -> nn.Module:
    """`model` without its head, each BatchNorm folded into its conv, channels-last (`model.for_inference`)."""
    model.set_submodule(head, nn.Identity())
    return for_inference(model)


def pretrained_body(model_name: str, pretrained_path: Path, num_classes: int) -> Body:
    """The pretrained backbone `featurize` runs, with the head's name, input width and the parameter count."""
    model = load_pretrained(model_name, pretrained_path)
    head = replace_head(model, num_classes, dropout=0.0)
    cols = model.get_submodule(head)[1].in_features
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(head + "."))
    return Body(frozen_body(model, head), head, cols, backbone_params)


def checkpoint_body(model_path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A fine-tuned checkpoint's own backbone: the stored features are the pretrained one's, so they no longer apply."""
    model, ckpt = load_checkpoint(model_path)
    return frozen_body(model, ckpt["head"]), ckpt


def torch_engine(body: nn.Module, device: torch.device, dtype: torch.dtype | None = None,
                 batch: int | None = None) -> Engine:
    """`body` on `device`, under autocast at `dtype` when given; rows come back as float32 on the CPU. Images go
    in channels-last, as the folded body's weights are (contiguous ones ran it several times slower).

    With `batch`, a shorter batch is padded with zeros to that size: torch's kernels give an image other bytes
    in a batch of 1 than in a batch of 5 or 32, and an image's row must not depend on how many images were
    left to compute with it (the feature cache; a test checks)."""
    module = body.to(device)
    if dtype is not None:
        module = Autocast(module, device.type, dtype)

    def run(images: torch.Tensor) -> np.ndarray:
        n = len(images)
        if batch is not None and n < batch:
            images = torch.cat([images, images.new_zeros((batch - n, *images.shape[1:]))])
        out = module(images.to(device, non_blocking=True, memory_format=torch.channels_last))
        return out[:n].float().cpu().numpy()

    return run


def pick_engine(engine: str, precision: str, device: torch.device) -> str:
    """What runs the frozen body for `featurize.engine`: `auto` is a fixed rule, never a timing race, so the
    same params give the same bytes on the same kind of machine. On a CPU, ONNX Runtime in fp32 (2.6x torch
    there, and the very graph `model.onnx` serves) and OpenVINO in bf16 (1.7x ONNX Runtime's fp32; torch's
    autocast was slower than that): docs/scale.md. torch on GPUs. bf16 on a CPU is refused before this where
    the CPU lacks AVX-512-BF16 and AMX (`precision.autocast_dtype`), so it only ever asks for x86 OpenVINO."""
    if engine == "auto":
        if device.type != "cpu":
            return "torch"
        return "onnxruntime" if precision == "fp32" else "openvino"
    if engine == "onnxruntime" and (device.type != "cpu" or precision != "fp32"):
        raise ModelError(f"featurize.engine onnxruntime runs fp32 on the CPU only, not {precision} on "
                         f"{device.type}; use featurize.engine: auto or torch")
    if engine == "openvino" and device.type != "cpu":
        raise ModelError(f"featurize.engine openvino runs on the CPU only, not {device.type}; use featurize.engine: "
                         "auto or torch")
    return engine


def onnx_engine(graph: bytes, threads: int) -> Engine:
    """ONNX Runtime's CPU provider on the exported body (`export_backbone.onnx_bytes`). An image's features
    do not depend on the batch it is in nor on the thread count (a test checks), so N processes write
    the same bytes as one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # no spinning: idle ONNX Runtime threads would busy-wait on the cores the decoding thread needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(["features"], {"images": images.numpy()})[0]


def openvino_engine(graph: bytes, threads: int, precision: str) -> Engine:
    """OpenVINO's CPU plugin on the exported body, in f32 or bf16 (`INFERENCE_PRECISION_HINT`); like ONNX
    Runtime, an image's features depend neither on its batch nor on the thread count (a test checks)."""
    try:
        import openvino as ov
    except ImportError:
        raise ModelError("featurize.engine openvino: OpenVINO is not installed (the lock installs it on x86 "
                         "machines); use featurize.engine: torch") from None
    core = ov.Core()
    compiled = core.compile_model(core.read_model(graph), "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    return lambda images: request.infer({0: images.numpy()})[0].copy()  # the request reuses its output buffer


def image_features(loader: DataLoader, engine: Engine, desc: str,
                   threads: int | None = None) -> Iterator[tuple[torch.Tensor, np.ndarray, Any]]:
    """(images, features, the batch's second item) for each batch of `loader`, in its order.

    Without DataLoader workers, each batch is decoded on `threads` threads (all the cores by default),
    one batch ahead of the engine (`data.threaded`, `data.prefetched`)."""
    batches = loader if loader.num_workers else prefetched(threaded(loader, threads or cpu_count()))
    with torch.inference_mode():
        for images, extra in tqdm(batches, desc=desc, total=len(loader), unit="batch", leave=False, disable=None):
            yield images, engine(images), extra


def split_features(body: nn.Module, index: FeatureIndex, split: str, transform: dict[str, Any],
                   device: torch.device, batch_size: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features, labels) of a split's images through `body`, in the index's order, a batch at a time."""
    dataset = split_images(index, split, EvalTransform(transform), transform["resize_size"])
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, workers=decode_workers(device.type))
    for _, features, labels in image_features(loader, torch_engine(body, device), f"{split} features"):
        yield features, labels.numpy()
