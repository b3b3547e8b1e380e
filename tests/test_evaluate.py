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


@pytest.mark.parametrize("n", [3, 101, 560])
def test_confusion_png_stays_bounded_with_many_classes(tmp_path, n):
    from PIL import Image

    from foodvision.plots import confusion

    matrix = [[(i * 7 + j) % 5 if i != j else 20 for j in range(n)] for i in range(n)]
    confusion(matrix, [f"class_{i:03d}" for i in range(n)], tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as im:
        width, height = im.size
    assert max(width, height) <= 1600
    assert (width, height) == ((660, 560) if n == 3 else (1600, 1600))


def test_top5_accuracy_with_more_than_five_classes(tmp_path):
    """Seven classes: metrics gain top5_accuracy, computed from the head's logits on the stored features."""
    import numpy as np

    from foodvision.atomic import write_json
    from foodvision.checkpoint import new_head, save_checkpoint
    from foodvision.features import NpyWriter

    classes = [f"c{i}" for i in range(7)]
    feats = tmp_path / "features"
    feats.mkdir()
    # an identity head on features that rank class j first, then j+1, j+2, ...; label (j+k) % 7 sits at rank k+1
    labels = [(j + k) % 7 for j in range(7) for k in range(7)]
    rows = np.array([[7 - (c - j) % 7 for c in range(7)] for j in range(7) for _ in range(7)], dtype=np.float32)
    writer = NpyWriter(feats / "test.npy", len(rows), 7)
    writer.write(rows)
    writer.close()
    write_json(feats / "index.json", {"model": "efficientnet_b0", "classes": classes, "root": ".",
                                      "splits": {"test": {"paths": [f"{i}.jpg" for i in range(49)], "labels": labels}}})
    head = new_head(7, 7, 0.2)
    with torch.no_grad():
        head[1].weight.copy_(torch.eye(7))
        head[1].bias.zero_()
    save_checkpoint(tmp_path / "model.pt", {f"classifier.{k}": v for k, v in head.state_dict().items()},
                    name="efficientnet_b0", head="classifier", dropout=0.2, class_names=classes, transform={})
    m = evaluate(tmp_path / "model.pt", feats, device="cpu", metrics_out=tmp_path / "e.json",
                 confusion_csv=tmp_path / "c.csv", confusion_png=tmp_path / "c.png")
    assert m["accuracy"] == round(7 / 49, 6)
    assert m["top5_accuracy"] == round(35 / 49, 6)
    assert set(m["per_class"]) == set(classes)


def test_other_format_versions_and_unknown_backbones_are_named(trained, tmp_path):
    from foodvision.model import load_checkpoint

    ckpt = torch.load(trained.model, weights_only=True)
    other = tmp_path / "model.pt"
    torch.save({**ckpt, "format": 2}, other)
    with pytest.raises(ModelError, match="model.pt is a FoodVision checkpoint of format 2, but this version reads format 1"):
        load_checkpoint(other)
    torch.save({**ckpt, "model_name": "efficientnet_b99"}, other)
    with pytest.raises(ModelError, match="holds a 'efficientnet_b99' model, which this torchvision does not have"):
        load_checkpoint(other)
    torch.save({k: v for k, v in ckpt.items() if k != "format"}, other)
    with pytest.raises(ModelError, match=r"is not a FoodVision checkpoint \(missing format\)"):
        load_checkpoint(other)
