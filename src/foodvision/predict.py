"""predict stage and command: class and probability for test samples and the user's own photos.

    foodvision-predict IMAGE [IMAGE ...] [--model MODEL.onnx]

Both run the exported model (the export stage's `paths.onnx`) on ONNX Runtime, as `foodvision-serve` does:
the same probabilities everywhere, and a stage that imports neither torch nor torchvision (seconds of
every experiment). A handful of photos needs no GPU.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from foodvision.classifier import OnnxClassifier
from foodvision.core.errors import FoodVisionError
from foodvision.core.files import atomic_dir, write_json
from foodvision.core.params import required_project_paths
from foodvision.features import load_index
from foodvision.fetch import fetch, local_path, redact, source_name
from foodvision.store import ImageStore

MAX_IMAGE_MB = 200  # a photo, not a video


def describe(probs: np.ndarray, classes: list[str], source: str, true: str | None) -> dict[str, Any]:
    idx = int(probs.argmax())
    return {"source": source, "pred": classes[idx], "prob": round(float(probs[idx]), 6), "true": true,
            "probs": {c: round(float(p), 6) for c, p in zip(classes, probs)}}


def title(result: dict[str, Any]) -> str:
    """The article's title, `Pred: sushi | Prob: 0.943`, plus the true class where known."""
    text = f"Pred: {result['pred']} | Prob: {result['prob']:.3f}"
    return text + (f" | True: {result['true']}" if result["true"] is not None else "")


def predict(model_path: Path, features_dir: Path, *, num_samples: int, images: tuple[str, ...], seed: int,
            out_dir: Path, json_out: Path, photos_dir: Path) -> list[dict[str, Any]]:
    """Predict `num_samples` seeded test images plus every path/URL in `images`; one PNG each, and the test
    images themselves in `photos_dir` (read from the dataset zip: `foodvision-serve` offers them as examples)."""
    index = load_index(features_dir)
    predictor = OnnxClassifier(model_path)
    if predictor.classes != index.classes:
        raise FoodVisionError(f"{model_path} was trained on other classes than {features_dir}/index.json lists; "
                              "run `dvc repro` so train and predict see the same data")
    test = index.split("test")
    # the same picks as sampling the (path, label) pairs themselves: sample() draws positions only
    picked = random.Random(seed).sample(range(len(test.paths)), k=min(num_samples, len(test.paths)))
    from foodvision.plots import prediction  # matplotlib is slow to import; the command does not need it

    results = []
    with (atomic_dir(out_dir) as tmp_out, atomic_dir(photos_dir) as tmp_photos,
          tempfile.TemporaryDirectory(prefix="foodvision-predict.") as tmp_in):
        store = ImageStore(Path(index.root))
        jobs = []
        for i, row in enumerate(picked):
            rel = test.paths[row]
            photo = tmp_photos / f"test_{i}_{PurePosixPath(rel).name}"
            photo.write_bytes(store.read_at(rel, test.location(row)).read())
            jobs.append((photo, rel, index.classes[test.labels[row]], f"test_{i}"))
        store.close()
        for i, source in enumerate(images):
            path = _materialise(source, Path(tmp_in) / f"{i}_{source_name(source)}")
            jobs.append((path, redact(source), None, f"image_{i}"))
        for path, source, true, stem in jobs:
            try:
                image = predictor.load(path)
            except (OSError, ValueError) as exc:
                raise FoodVisionError(f"cannot read image {source} ({exc}); "
                                      "fix predict.images in params.yaml") from None
            result = describe(predictor.probabilities(image), predictor.classes, source, true)
            result["plot"] = f"{stem}_{Path(source_name(source)).stem}.png"
            if true is not None:  # the test photo itself: `foodvision-serve` offers it as an example
                result["path"] = (photos_dir / path.name).as_posix()
            prediction(image, title(result), None if true is None else result["pred"] == true,
                       tmp_out / result["plot"])
            print(f"{source}: {title(result)}")
            results.append(result)
    write_json(json_out, results)
    return results


def _materialise(source: str, dest: Path) -> Path:
    """An http(s) URL is fetched to `dest`; a path or file:// URL is read where it is."""
    path = local_path(source)
    if path is not None:
        return path
    fetch(source, dest, what="image", max_bytes=MAX_IMAGE_MB * 2**20, limit_name=f"{MAX_IMAGE_MB} MB for one image")
    return dest


def main(argv: list[str] | None = None) -> int:
    """Print class and probability per image; a bad file gets its own error line, the rest still run."""
    parser = argparse.ArgumentParser(prog="foodvision-predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files or URLs")
    parser.add_argument("--model", type=Path, help="the exported model (default: paths.onnx of ./dvc.yaml)")
    args = parser.parse_args(argv)
    try:
        model = args.model or Path(required_project_paths().onnx)
        predictor = OnnxClassifier(model)
    except FoodVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    with tempfile.TemporaryDirectory(prefix="foodvision-predict.") as tmp:
        for i, source in enumerate(args.images):
            try:
                path = _materialise(source, Path(tmp) / f"{i}_{source_name(source)}")
                probs = predictor.probabilities(predictor.load(path))
            except (FoodVisionError, OSError, ValueError) as exc:
                print(f"error: {redact(source)}: {exc}", file=sys.stderr)
                failed += 1
                continue
            result = describe(probs, predictor.classes, source, None)
            print(f"{redact(source)}\t{result['pred']}\t{result['prob']:.3f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
