"""Where a backbone's feature rows come from: the recipe that names their cache folder, and the engine that
computes what the cache lacks.

A row depends on the image's bytes and on everything that runs it: the backbone and its pretrained file,
the eval transform, the precision, the engine and its version (for ONNX Runtime and OpenVINO, the exact
graph), the decoder and the hardware's kernels. The recipe digests all of it, so rows of one recipe are
the same bytes whoever computes them, and anything else gets a folder of its own. The backbone's ONNX graph
is made once per backbone and kept in the cache too. Both also digest our own code that decides their bytes
(every stage reruns on any code change: a fixed transform must not be answered with the old rows).
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torch.distributed

from foodvision import backbone, data, distributed, export_backbone, images, lite0, model
from foodvision.backbone import Body, Engine, onnx_engine, openvino_engine, torch_engine
from foodvision.core.device import cpu_count, cpu_flags
from foodvision.export_backbone import export_timed
from foodvision.feature_cache import FeatureCache, read_graph, recipe_digest, store_graph
from foodvision.onnx_check import OPSET
from foodvision.rows import Source

ISA = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
       "amx_int8", "amx_tile"}  # what decides which kernels an engine runs on a CPU, so which bytes


@dataclass(frozen=True)
class Cache:
    """Where rows are kept by content, and its bound (`featurize.cache_dir`, `featurize.cache_gb`)."""

    root: Path
    max_bytes: int


class Backbone:
    """The pretrained body, its ONNX graph and the sources of rows on each engine, each made on first use."""

    def __init__(self, body: Body, name: str, weights_sha256: str, transform: dict[str, Any], cache: Cache | None,
                 me: distributed.Rank) -> None:
        self.body, self.name, self.weights, self.transform, self.cache, self.me = body, name, weights_sha256, \
            transform, cache, me
        self._graph: bytes | None = None

    def graph(self) -> bytes:
        """The body's ONNX graph: from the cache, else exported (and kept there). Under torchrun, while the
        process group lives, every rank calls this at once: rank 0 makes it and hands it on."""
        if self._graph is None:
            if self.me.world > 1 and torch.distributed.is_initialized():
                shared = [self._make_graph() if self.me.leader else None]
                torch.distributed.broadcast_object_list(shared, src=0)
                self._graph = shared[0]
            else:
                self._graph = self._make_graph()
        return self._graph

    def _make_graph(self) -> bytes:
        crop = self.transform["crop_size"]
        key = recipe_digest({"graph": 1, "model": self.name, "weights": self.weights, "crop": crop,
                             "torch": torch.__version__, "opset": OPSET,
                             "code": _code_digest(model, lite0, backbone, export_backbone)})
        if self.cache is not None:
            found, problem = read_graph(self.cache.root, key)
            if problem:
                print(f"featurize cache: {problem}; exporting again")
            if found is not None:
                print(f"the {self.name} backbone's ONNX graph from the cache ({self.cache.root})")
                return found
        graph = export_timed(self.body.module, crop, self.name)
        if self.cache is not None:
            try:
                store_graph(self.cache.root, key, graph)
            except OSError as exc:
                print(f"featurize cache: could not keep the graph in {self.cache.root} ({exc}); continuing")
        return graph

    def source(self, runner: str, dev: torch.device, precision: str, dtype: torch.dtype | None,
               batch: int) -> Source:
        """Rows by `runner` on `dev`: the cache of exactly that recipe, and the engine for the rest."""
        parts: dict[str, object] = {
            "rows": 1, "model": self.name, "weights": self.weights, "precision": precision, "engine": runner,
            "transform": json.dumps(self.transform, sort_keys=True), "pillow": PIL.__version__,
            "numpy": np.__version__, "torch": torch.__version__, "device": _device_kind(dev),
            "code": _code_digest(images, data, model, lite0, backbone)}
        if runner == "torch":
            parts |= {"batch": batch, "threads": torch.get_num_threads() if dev.type == "cpu" else None}
        else:  # the very graph, whose bytes the check holds against torch
            parts |= {"graph": _sha256(self.graph()), runner: _engine_version(runner)}
        cache = (FeatureCache(self.cache.root, recipe_digest(parts), self.body.cols)
                 if self.cache is not None else None)

        def engine() -> Engine:
            if runner == "torch":
                return torch_engine(self.body.module, dev, dtype, batch)
            threads = max(1, cpu_count() // self.me.local_world)
            if runner == "onnxruntime":
                return onnx_engine(self.graph(), threads)
            return openvino_engine(self.graph(), threads, precision)

        return Source(cache, engine, dev)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _code_digest(*modules: Any) -> str:
    """Our source files that decide a row's (or the graph's) bytes: the decoder, the transform, the backbone."""
    return _sha256(b"".join(Path(m.__file__).read_bytes() for m in modules))


def _engine_version(runner: str) -> str:
    if runner == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    import openvino

    return openvino.get_version()


def _device_kind(dev: torch.device) -> str:
    """What an engine's bytes depend on besides the software: the GPU model, or the CPU and its vector units."""
    if dev.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(dev)} cudnn {torch.backends.cudnn.version()}"
    if dev.type == "cpu":
        return f"cpu {platform.machine()} {_cpu_model()} {' '.join(sorted(cpu_flags() & ISA))}"
    return dev.type


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
