"""evaluate stage: test-set loss, accuracy (top-5 too, with many classes), macro and per-class F1 as DVC metrics;
per-class precision, recall, F1 and support as a table; the confusion matrix; the test images the model gets
most wrong as a contact sheet.

The metrics file holds what users compare across experiments (each key a column of `dvc exp show`); the
table holds the rest, once.

The head in eval mode is one matrix product, so this stage runs it in NumPy on the stored features:
no torch to import (seconds of every experiment), the same logits to float32 rounding (a test checks).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from foodvision.checkpoint import head_logits, head_weights, read_checkpoint
from foodvision.core.errors import ModelError, listed
from foodvision.core.files import write_csv, write_json
from foodvision.features import FeatureIndex, load_index, open_split, rows_per_read
from foodvision.images import open_rgb
from foodvision.store import ImageStore

TOP_K = 5  # reported when there are more classes than this
HARDEST = 12  # test images on the contact sheet: the highest losses


def classification_report(actual: list[int], predicted: list[int], classes: list[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support from the confusion matrix, plus macro F1."""
    n = len(classes)
    matrix = [[0] * n for _ in range(n)]
    for a, p in zip(actual, predicted):
        matrix[a][p] += 1
    per_class = {}
    for i, name in enumerate(classes):
        tp = matrix[i][i]
        predicted_i = sum(matrix[r][i] for r in range(n))
        support = sum(matrix[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(precision, 6), "recall": round(recall, 6),
                           "f1": round(f1, 6), "support": support}
    macro_f1 = sum(c["f1"] for c in per_class.values()) / n
    accuracy = sum(matrix[i][i] for i in range(n)) / max(len(actual), 1)
    return {"accuracy": round(accuracy, 6), "macro_f1": round(macro_f1, 6), "per_class": per_class, "matrix": matrix}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float64: no overflow, no loss of the small terms."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Summed cross-entropy of a block."""
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].sum())


def test_features(model_path: Path, ckpt: dict[str, Any], features_dir: Path, index: FeatureIndex,
                  device: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(features, labels) blocks of the test split as the checkpoint's backbone sees them.

    A frozen backbone is the pretrained one `featurize` ran: its stored rows, read in blocks of a fixed memory
    budget, no image decoded. A fine-tuned one runs on the decoded test images (torch, only then)."""
    if ckpt.get("finetuned"):
        from foodvision.backbone import checkpoint_body, split_features
        from foodvision.core.device import pick_device

        body, _ = checkpoint_body(model_path)
        yield from split_features(body, index, "test", ckpt["transform"], pick_device(device))
        return
    test = open_split(features_dir, index, "test")
    yield from test.batches(rows_per_read(test.cols))
    test.close()


def evaluate(model_path: Path, features_dir: Path, *, device: str, metrics_out: Path, per_class_csv: Path,
             confusion_csv: Path, confusion_png: Path, hardest_png: Path,
             leaked: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Score the trained model on the test split; write the metrics, the per-class table, the confusion
    matrix (CSV and PNG) and the contact sheet of the hardest test images.

    For a frozen backbone the stored test features are what the checkpoint's backbone makes of the test
    images (a test checks the logits against the whole model on the images), so no image is decoded here.
    """
    index = load_index(features_dir)
    ckpt = read_checkpoint(model_path)
    if ckpt["class_names"] != index.classes or ckpt["model_name"] != index.model:
        raise ModelError(f"{model_path} is a {ckpt['model_name']!r} model for {_few(ckpt['class_names'])}, but "
                         f"{features_dir} holds {index.model!r} features for {_few(index.classes)}; "
                         "run `dvc repro` so train and evaluate see the same data")
    weight, bias = head_weights(model_path, ckpt)
    classes = index.classes
    k = min(TOP_K, len(classes))
    actual, predicted, total_loss, top_k = [], [], 0.0, 0
    hardest: list[tuple[float, int, float]] = []  # a min-heap of (loss, row, probability of the prediction)
    for feats, labels in test_features(model_path, ckpt, features_dir, index, device):
        logits = head_logits(feats, weight, bias)
        log_p = log_softmax(logits)
        losses = -log_p[np.arange(len(labels)), labels]
        total_loss += float(losses.sum())
        best = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < len(classes) else None
        top_k += len(labels) if best is None else int((best == labels[:, None]).any(axis=1).sum())
        for i, loss in enumerate(losses.tolist()):
            item = (loss, len(actual) + i, float(np.exp(log_p[i].max())))
            (heapq.heappush if len(hardest) < HARDEST else heapq.heappushpop)(hardest, item)
        actual += labels.tolist()
        predicted += logits.argmax(axis=1).tolist()
    report = classification_report(actual, predicted, classes)
    test = index.split("test")
    unseen = [a == p for path, a, p in zip(test.paths, actual, predicted) if path not in leaked]
    metrics = {"accuracy": report["accuracy"], "loss": round(total_loss / len(actual), 6),
               "macro_f1": report["macro_f1"],
               # the test images the audit did not find again in train: what a leak-free test set would say
               "accuracy_leak_free": round(sum(unseen) / len(unseen), 6) if unseen else None}
    if len(classes) > TOP_K:
        metrics[f"top{TOP_K}_accuracy"] = round(top_k / len(actual), 6)
    metrics["f1"] = {name: c["f1"] for name, c in report["per_class"].items()}
    write_json(metrics_out, metrics)
    write_csv(per_class_csv, ["class", "precision", "recall", "f1", "support"],
              [[name, c["precision"], c["recall"], c["f1"], c["support"]] for name, c in report["per_class"].items()])
    write_csv(confusion_csv, ["path", "actual", "predicted"],
              [[p, classes[a], classes[q]] for p, a, q in zip(test.paths, actual, predicted)])
    from foodvision.plots import confusion, contact_sheet, tail  # matplotlib: only once the figures are in

    confusion(report["matrix"], classes, confusion_png)
    worst = sorted(hardest, reverse=True)
    store = ImageStore(Path(index.root))
    try:
        photos = [open_rgb(store.read_at(test.paths[row], test.location(row))) for _, row, _ in worst]
    finally:
        store.close()
    contact_sheet(photos, [f"{classes[actual[row]]} as {classes[predicted[row]]} {p:.2f}, loss {loss:.2f}\n"
                           f"{tail(test.paths[row])}" for loss, row, p in worst],
                  [actual[row] == predicted[row] for _, row, _ in worst], hardest_png,
                  "Test images with the highest loss: true class as predicted class, probability")
    print(f"test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, loss {metrics['loss']:.4f} "
          f"on {len(actual)} images")
    return metrics


def _few(names: list[str]) -> str:
    return f"{len(names)} classes ({listed(names)})"
