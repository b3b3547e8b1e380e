import csv
import json

import pytest
import torch

from foodvision.evaluate import classification_report, evaluate
from foodvision.model import ModelError


def test_report_on_a_hand_checked_example():
    # actual:    a a a b b c ; predicted: a a b b c c
    r = classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert r["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["accuracy"] == round(4 / 6, 6)
    assert r["per_class"]["a"] == {"precision": 1.0, "recall": round(2 / 3, 6), "f1": 0.8, "support": 3}
    assert r["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["per_class"]["c"]["f1"] == round(2 * 0.5 * 1 / 1.5, 6)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3, abs=1e-6)


def test_evaluate_writes_metrics_and_confusion(trained, tmp_path):
    m = evaluate(trained.model, trained.features, device="cpu", metrics_out=tmp_path / "eval.json",
                 confusion_csv=tmp_path / "confusion.csv", confusion_png=tmp_path / "confusion.png")
    assert json.loads((tmp_path / "eval.json").read_text()) == m
    assert m["samples"] == 6 and set(m["per_class"]) == {"pizza", "steak", "sushi"}
    rows = list(csv.DictReader((tmp_path / "confusion.csv").open()))
    assert [r["path"] for r in rows][:2] == ["test/pizza/000.jpg", "test/pizza/001.jpg"]
    assert m["accuracy"] == round(sum(r["actual"] == r["predicted"] for r in rows) / 6, 6)
    # the same test accuracy and loss the last training epoch reported
    train_metrics = json.loads(trained.metrics.read_text())
    assert m["accuracy"] == train_metrics["test_acc"]
    assert m["loss"] == pytest.approx(train_metrics["test_loss"], abs=1e-5)
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_truncated_or_foreign_checkpoint(trained, tmp_path):
    truncated = tmp_path / "model.pt"
    truncated.write_bytes(trained.model.read_bytes()[:1000])
    kwargs = dict(device="cpu", metrics_out=tmp_path / "e.json", confusion_csv=tmp_path / "c.csv",
                  confusion_png=tmp_path / "c.png")
    with pytest.raises(ModelError, match="model.pt is not a readable PyTorch weights file"):
        evaluate(truncated, trained.features, **kwargs)
    ckpt = torch.load(trained.model, weights_only=True)
    ckpt["class_names"] = ["a", "b"]
    torch.save(ckpt, truncated)
    with pytest.raises(ModelError, match="model for 2 classes .* holds 'efficientnet_b0' features for 3 classes"):
        evaluate(truncated, trained.features, **kwargs)
    ckpt["class_names"] = ["pizza", "steak", "sushi"]
    del ckpt["state_dict"]["classifier.1.weight"]
    torch.save(ckpt, truncated)
    with pytest.raises(ModelError, match="model.pt has no head for its 3 classes"):
        evaluate(truncated, trained.features, **kwargs)
    with pytest.raises(ModelError, match="not found"):
        evaluate(tmp_path / "none.pt", trained.features, **kwargs)
    assert not (tmp_path / "e.json").exists()
