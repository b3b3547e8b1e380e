"""evaluate stage: test-set loss, accuracy (top-5 too, with many classes), per-class precision/recall/F1, confusion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from foodvision.atomic import write_csv, write_json
from foodvision.checkpoint import ModelError, head_from_checkpoint, pick_device, read_checkpoint
from foodvision.features import load_index, open_split, rows_per_read
from foodvision.plots import confusion

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


def evaluate(model_path: Path, features_dir: Path, *, device: str, metrics_out: Path,
             confusion_csv: Path, confusion_png: Path) -> dict[str, Any]:
    """Score the trained head on the stored test features; write metrics JSON, confusion CSV and PNG.

    The features are what the backbone in models/model.pt makes of the test images (a test checks the
    logits against the whole model on the images), so no image is decoded here.
    """
    index = load_index(features_dir)
    ckpt = read_checkpoint(model_path)
    if ckpt["class_names"] != index["classes"] or ckpt["model_name"] != index["model"]:
        raise ModelError(f"{model_path} is a {ckpt['model_name']!r} model for {_few(ckpt['class_names'])}, but "
                         f"{features_dir} holds {index['model']!r} features for {_few(index['classes'])}; "
                         "run `dvc repro` so train and evaluate see the same data")
    dev = pick_device(device)
    head = head_from_checkpoint(model_path, ckpt).to(dev)
    test = open_split(features_dir, index, "test")
    classes = index["classes"]
    k = min(TOP_K, len(classes))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    batch_size = rows_per_read(test.cols)  # a fixed memory budget, not a fixed row count
    actual, predicted, total_loss, top_k = [], [], 0.0, 0
    with torch.inference_mode():
        batches = tqdm(test.batches(batch_size), desc="evaluate", total=-(-len(test) // batch_size), unit="batch",
                       leave=False)
        for feats, labels in batches:
            logits, labels = head(feats.to(dev)), labels.to(dev)
            total_loss += loss_fn(logits, labels).item()
            top_k += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().item()
            actual += labels.tolist()
            predicted += logits.argmax(dim=1).cpu().tolist()
    test.close()
    report = classification_report(actual, predicted, classes)
    metrics = {"loss": round(total_loss / len(actual), 6), "accuracy": report["accuracy"],
               "macro_f1": report["macro_f1"], "samples": len(actual), "per_class": report["per_class"]}
    if len(classes) > TOP_K:
        metrics[f"top{TOP_K}_accuracy"] = round(top_k / len(actual), 6)
    write_json(metrics_out, metrics)
    paths = index["splits"]["test"]["paths"]
    write_csv(confusion_csv, ["path", "actual", "predicted"],
              [[p, classes[a], classes[q]] for p, a, q in zip(paths, actual, predicted)])
    confusion(report["matrix"], classes, confusion_png)
    print(f"test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, loss {metrics['loss']:.4f} "
          f"on {metrics['samples']} images")
    return metrics


def _few(names: list[str]) -> str:
    return f"{len(names)} classes ({', '.join(names[:5])}{', …' if len(names) > 5 else ''})"
