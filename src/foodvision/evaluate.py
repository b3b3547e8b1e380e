"""evaluate stage: test-set loss, accuracy (top-5 too, with many classes), per-class precision/recall/F1, confusion.

The head in eval mode is one matrix product, so this stage runs it in NumPy on the stored features:
no torch to import (seconds of every experiment), the same logits to float32 rounding (a test checks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from foodvision.checkpoint import head_logits, head_weights, read_checkpoint
from foodvision.core.errors import ModelError, listed
from foodvision.core.files import write_csv, write_json
from foodvision.features import FeatureIndex, load_index, open_split, rows_per_read

TOP_K = 5  # reported when there are more classes than this


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


def cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Summed cross-entropy of a block (log-softmax in float64: no overflow, no loss of the small terms)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(labels)), labels]).sum())


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


def evaluate(model_path: Path, features_dir: Path, *, device: str, metrics_out: Path, confusion_csv: Path,
             confusion_png: Path) -> dict[str, Any]:
    """Score the trained model on the test split; write metrics JSON, confusion CSV and PNG.

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
    for feats, labels in test_features(model_path, ckpt, features_dir, index, device):
        logits = head_logits(feats, weight, bias)
        total_loss += cross_entropy_sum(logits, labels)
        best = np.argpartition(-logits, k - 1, axis=1)[:, :k] if k < len(classes) else None
        top_k += len(labels) if best is None else int((best == labels[:, None]).any(axis=1).sum())
        actual += labels.tolist()
        predicted += logits.argmax(axis=1).tolist()
    report = classification_report(actual, predicted, classes)
    metrics = {"loss": round(total_loss / len(actual), 6), "accuracy": report["accuracy"],
               "macro_f1": report["macro_f1"], "samples": len(actual), "per_class": report["per_class"]}
    if len(classes) > TOP_K:
        metrics[f"top{TOP_K}_accuracy"] = round(top_k / len(actual), 6)
    write_json(metrics_out, metrics)
    paths = index.split("test").paths
    write_csv(confusion_csv, ["path", "actual", "predicted"],
              [[p, classes[a], classes[q]] for p, a, q in zip(paths, actual, predicted)])
    from foodvision.plots import confusion  # matplotlib: only once the figures are in

    confusion(report["matrix"], classes, confusion_png)
    print(f"test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, loss {metrics['loss']:.4f} "
          f"on {metrics['samples']} images")
    return metrics


def _few(names: list[str]) -> str:
    return f"{len(names)} classes ({listed(names)})"
