"""predict stage and command: class and probability for test samples and the user's own photos.

    foodvision-predict IMAGE|FOLDER|URL [...] [--model MODEL.onnx] [--top K] [--output FILE.csv|FILE.json]

A folder stands for every photo below it (recursively, hidden files left out, in sorted order).

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
from foodvision.core.files import atomic_dir, write_csv, write_json
from foodvision.core.params import required_project_paths
from foodvision.features import load_index
from foodvision.fetch import fetch, local_path, redact, regular_file, source_name
from foodvision.spec import IMG_EXTENSIONS, hidden
from foodvision.store import ImageStore

MAX_IMAGE_MB = 200  # a photo, not a video
PHOTO_EXTENSIONS = (*IMG_EXTENSIONS, ".heic", ".heif", ".avif", ".gif")  # a folder's photos: what the web page takes


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
    """An http(s) URL is fetched to `dest`; a path or file:// URL is read where it is, if it is a file (a named
    pipe would block the read forever)."""
    path = local_path(source)
    if path is not None:
        return regular_file(path, "image")
    fetch(source, dest, what="image", max_bytes=MAX_IMAGE_MB * 2**20, limit_name=f"{MAX_IMAGE_MB} MB for one image")
    return dest


def expand(sources: list[str]) -> list[str]:
    """Each folder replaced by the photos below it, sorted; files, URLs and a folder without photos (an
    error line of its own: "nothing to predict" must not pass silently) as given."""
    found = []
    for source in sources:
        folder = Path(source)
        photos = sorted(str(f) for f in folder.rglob("*") if f.suffix.lower() in PHOTO_EXTENSIONS and f.is_file()
                        and not any(hidden(part) for part in f.relative_to(folder).parts)) if _is_folder(source) else []
        found += photos or [source]
    return found


def _is_folder(source: str) -> bool:
    return local_path(source) is not None and Path(source).is_dir()


def top(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The k most likely classes, most likely first (ties in class order)."""
    order = sorted(range(len(classes)), key=lambda i: (-float(probs[i]), i))[:k]
    return [(classes[i], round(float(probs[i]), 6)) for i in order]


def write_results(dest: Path, results: list[dict[str, Any]], k: int) -> None:
    """CSV (one row per photo: path, class_1, probability_1, ... class_k, probability_k, error) or JSON."""
    if dest.suffix.lower() == ".json":
        write_json(dest, results)
        return
    header = ["path", *(f"{c}_{r}" for r in range(1, k + 1) for c in ("class", "probability")), "error"]
    rows = [[r["path"], *(v for pair in r.get("top", []) for v in pair),
             *([""] * (2 * (k - len(r.get("top", []))))), r.get("error", "")] for r in results]
    write_csv(dest, header, rows)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="foodvision-predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files, folders (every photo below them) or URLs")
    parser.add_argument("--model", type=Path, help="the exported model (default: paths.onnx of ./dvc.yaml)")
    parser.add_argument("--top", type=int, default=1, metavar="K", help="the K most likely classes (default 1)")
    parser.add_argument("--output", type=Path, metavar="FILE",
                        help="also write every result to FILE: .csv (one row per photo) or .json")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be 1 or more, got {args.top}")
    if args.output is not None and args.output.suffix.lower() not in (".csv", ".json"):
        parser.error(f"--output must end in .csv or .json, got {args.output}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the top classes per image; a bad file gets its own error line, the rest still run."""
    args = _arguments(argv)
    sources = expand(args.images)
    try:
        model = args.model or Path(required_project_paths().onnx)
        predictor = OnnxClassifier(model)
    except FoodVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    k = min(args.top, len(predictor.classes))
    results = []
    with tempfile.TemporaryDirectory(prefix="foodvision-predict.") as tmp:
        for i, source in enumerate(sources):
            shown = redact(source)
            try:
                if _is_folder(source):
                    raise FoodVisionError(f"a folder with no photos in it ({', '.join(PHOTO_EXTENSIONS)})")
                path = _materialise(source, Path(tmp) / f"{i}_{source_name(source)}")
                probs = predictor.probabilities(predictor.load(path))
            except (FoodVisionError, OSError, ValueError) as exc:
                print(f"error: {shown}: {exc}", file=sys.stderr)
                results.append({"path": shown, "error": str(exc)})
                continue
            best = top(probs, predictor.classes, k)
            results.append({"path": shown, "top": best})
            print("\t".join([shown, *(f"{c}\t{p:.3f}" for c, p in best)]))
    if args.output is not None:
        try:
            write_results(args.output, [_named(r) for r in results] if args.output.suffix.lower() == ".json"
                          else results, k)
        except OSError as exc:
            print(f"error: cannot write {args.output}: {exc}", file=sys.stderr)
            return 1
    return 1 if any("error" in r for r in results) else 0


def _named(result: dict[str, Any]) -> dict[str, Any]:
    """JSON's form: {"path", "top": [{"class", "probability"}, ...]} or {"path", "error"}."""
    if "top" not in result:
        return result
    return {"path": result["path"], "top": [{"class": c, "probability": p} for c, p in result["top"]]}


if __name__ == "__main__":
    sys.exit(main())
