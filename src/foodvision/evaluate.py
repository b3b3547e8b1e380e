"""evaluate stage: test-set loss, accuracy, per-class precision/recall/F1 and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from foodvision.atomic import write_csv, write_json
from foodvision.data import load_spec, loader_workers, make_loader
from foodvision.model import ModelError, for_inference, load_checkpoint, pick_device
from foodvision.plots import confusion


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


def evaluate(model_path: Path, spec_path: Path, *, device: str, metrics_out: Path, confusion_csv: Path,
             confusion_png: Path) -> dict[str, Any]:
    """Score the trained model on the spec's test split; write metrics JSON, confusion CSV and PNG."""
    spec = load_spec(spec_path)
    trained, ckpt = load_checkpoint(model_path)
    if ckpt["class_names"] != spec["classes"]:
        raise ModelError(f"{model_path} was trained on classes {ckpt['class_names']}, but {spec_path} has "
                         f"{spec['classes']}; run `dvc repro` so train and evaluate see the same data")
    dev = pick_device(device)
    model = for_inference(trained).to(dev)
    loader = make_loader(spec, "test", shuffle=False, seed=spec["seed"], workers=loader_workers(dev))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    actual, predicted, total_loss = [], [], 0.0
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc="evaluate", unit="batch"):
            logits = model(images.to(dev, memory_format=torch.channels_last))
            total_loss += loss_fn(logits, labels.to(dev)).item()
            actual += labels.tolist()
            predicted += logits.argmax(dim=1).cpu().tolist()
    classes = spec["classes"]
    report = classification_report(actual, predicted, classes)
    metrics = {"loss": round(total_loss / len(actual), 6), "accuracy": report["accuracy"],
               "macro_f1": report["macro_f1"], "samples": len(actual), "per_class": report["per_class"]}
    write_json(metrics_out, metrics)

    write_csv(confusion_csv, ["path", "actual", "predicted"],
              [[s["path"], classes[a], classes[p]] for s, a, p in zip(spec["splits"]["test"], actual, predicted)])
    confusion(report["matrix"], classes, confusion_png)
    print(f"test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, loss {metrics['loss']:.4f} "
          f"on {metrics['samples']} images")
    return metrics
