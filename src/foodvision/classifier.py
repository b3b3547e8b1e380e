"""The exported model on ONNX Runtime, without torch: what the predict stage, the predict command and
`foodvision-serve` all run, so the three give the same probabilities for the same photo.

The file carries its classes and eval transform as metadata (`export` writes them), so it is all
this needs; importing it costs a fraction of a second, against seconds for torch and torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from foodvision.core.errors import FoodVisionError
from foodvision.images import RESAMPLE, eval_array, open_photo

TRANSFORM_KEYS = {"resize_size", "crop_size", "mean", "std", "interpolation"}


class OnnxClassifier:
    """models/model.onnx, loaded once; a missing or foreign file fails here, in one line naming it."""

    def __init__(self, model_path: Path) -> None:
        import onnxruntime as ort

        if not Path(model_path).is_file():
            raise FoodVisionError(f"{model_path} not found: run `dvc repro export` (or `dvc pull export`), "
                                  "or pass --model")
        try:
            self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.classes: list[str] = json.loads(meta["classes"])
            self.transform: dict[str, Any] = json.loads(meta["transform"])
            missing = TRANSFORM_KEYS - set(self.transform)
            if missing:
                raise ValueError(f"its transform lacks {', '.join(sorted(missing))}")
            if self.transform["interpolation"] not in RESAMPLE:
                raise ValueError(f"interpolation {self.transform['interpolation']!r} has no Pillow equivalent")
            outputs = self.session.get_outputs()[0].shape[-1]
            if not all(isinstance(c, str) for c in self.classes) or (
                    isinstance(outputs, int) and outputs != len(self.classes)):
                raise ValueError(f"its metadata lists {len(self.classes)} classes for {outputs} outputs")
        except Exception as exc:  # onnxruntime's load errors (InvalidProtobuf, Fail, ...) share no narrower base
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise FoodVisionError(f"{model_path} is not a FoodVision ONNX export ({detail}); "
                                  "run `dvc repro export`") from None

    def load(self, photo: Path | IO[bytes]) -> Image.Image:
        """A photo decoded as every caller decodes it (the same reduced scale, so the same pixels)."""
        return open_photo(photo, self.transform)

    def probabilities(self, image: Image.Image) -> np.ndarray:
        """Softmax probabilities for one upright RGB image, in `self.classes` order."""
        logits = self.session.run(["logits"], {"images": eval_array(image, self.transform)[None]})[0][0]
        probs = np.exp(logits - logits.max())
        return probs / probs.sum()
