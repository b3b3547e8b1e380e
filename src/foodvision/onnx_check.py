"""The backbone check folder (`paths.onnx_check`): what `export_backbone` writes and `export` reads.

One contract for both sides: the opset both graphs use, the bound on feature differences, the files the
folder holds and its figures (`check.json`, written last, so its presence proves the folder complete).
NumPy only: `export` reads it without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from foodvision.core.errors import ModelError
from foodvision.core.files import read_json
from foodvision.features import FeatureFile, FeatureIndex

OPSET = 18
MAX_ABS_DIFF = 1e-4  # the largest difference accepted between ONNX Runtime's and torch's backbone features
ORT_FEATURES = "test.npy"  # ONNX Runtime's features of every test image
REFERENCE = "reference.npy"  # only after a bf16/fp16 featurize: torch's float32 features of the same images
FIGURES = "check.json"  # the check's figures


def verdict(worst: float, images: int, torch_side: str, model: str, graph: bytes) -> dict[str, Any]:
    """The check's figures, or the one-line refusal when ONNX Runtime and torch disagree: the same for
    featurize's pretrained backbone and export's fine-tuned one."""
    if worst > MAX_ABS_DIFF:
        raise ModelError(f"the ONNX export of the {model} backbone disagrees with torch on the test images (max "
                         f"|feature difference| {worst:.3g}); not written. Report it with your torch and onnxruntime "
                         "versions")
    return {"images": images, "backbone_max_abs_diff": float(f"{worst:.3g}"), "torch_reference": torch_side,
            "backbone": model, "opset": OPSET, "onnx_mb": round(len(graph) / 2**20, 2)}


def read_figures(check_dir: Path) -> dict[str, Any]:
    """export_backbone's figures (and the proof that its check folder is complete)."""
    return read_json(Path(check_dir) / FIGURES, "featurize")


def ort_features(check_dir: Path, index: FeatureIndex) -> FeatureFile:
    """ONNX Runtime's backbone features of the test split, row for row with the stored ones."""
    return FeatureFile(Path(check_dir) / ORT_FEATURES, index.split("test").labels)


def own_reference(check_dir: Path, index: FeatureIndex) -> FeatureFile | None:
    """torch's float32 features after a bf16/fp16 featurize; None when the stored ones are float32."""
    own = Path(check_dir) / REFERENCE
    return FeatureFile(own, index.split("test").labels) if own.exists() else None
