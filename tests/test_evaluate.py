import csv
import json

import numpy as np
import pytest
import torch
from conftest import make_image, stored
from safetensors.numpy import save

from foodvision.checkpoint import read_checkpoint
from foodvision.core.errors import ModelError
from foodvision.evaluate import classification_report, evaluate


def test_report_on_a_hand_checked_example():
    # actual:    a a a b b c ; predicted: a a b b c c
    r = classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert r["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["accuracy"] == round(4 / 6, 6)
    assert r["per_class"]["a"] == {"precision": 1.0, "recall": round(2 / 3, 6), "f1": 0.8, "support": 3}
    assert r["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["per_class"]["c"]["f1"] == round(2 * 0.5 * 1 / 1.5, 6)
    assert r["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3, abs=1e-6)


def outputs(tmp_path) -> dict:
    return {"metrics_out": tmp_path / "eval.json", "per_class_csv": tmp_path / "per_class.csv",
            "confusion_csv": tmp_path / "confusion.csv", "confusion_png": tmp_path / "confusion.png",
            "hardest_png": tmp_path / "hardest.png"}


def test_evaluate_writes_metrics_and_confusion(trained, tmp_path):
    m = evaluate(trained.model, trained.features, device="cpu", **outputs(tmp_path))
    assert json.loads((tmp_path / "eval.json").read_text()) == m
    # what users compare, once each: a column of `dvc exp show` per key; the rest is in the table
    assert list(m) == ["accuracy", "loss", "macro_f1", "accuracy_leak_free", "f1"]
    assert list(m["f1"]) == ["pizza", "steak", "sushi"] and m["accuracy_leak_free"] == m["accuracy"], "no leak given"
    table = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    assert [r["class"] for r in table] == ["pizza", "steak", "sushi"] and sum(int(r["support"]) for r in table) == 6
    assert {r["class"]: float(r["f1"]) for r in table} == m["f1"]
    assert m["macro_f1"] == pytest.approx(sum(m["f1"].values()) / 3, abs=1e-6)
    rows = list(csv.DictReader((tmp_path / "confusion.csv").open()))
    assert [r["path"] for r in rows][:2] == ["test/pizza/000.jpg", "test/pizza/001.jpg"]
    assert m["accuracy"] == round(sum(r["actual"] == r["predicted"] for r in rows) / 6, 6)
    # the same test accuracy and loss the last training epoch's held-out curve reported
    last = list(csv.DictReader(trained.history.open()))[-1]
    assert m["accuracy"] == float(last["held_out_acc"])
    assert m["loss"] == pytest.approx(float(last["held_out_loss"]), abs=1e-5)
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_the_hardest_test_images_are_the_highest_losses(trained, tmp_path, monkeypatch):
    """The contact sheet shows the test images the model gets most wrong, worst first, each with its true and
    predicted class, its probability and its file: where a user looks for label errors."""
    from foodvision import evaluate as module

    shown = {}
    monkeypatch.setattr("foodvision.plots.contact_sheet",
                        lambda photos, titles, correct, dest, title: shown.update(photos=photos, titles=titles, ok=correct))
    monkeypatch.setattr(module, "HARDEST", 4)
    m = evaluate(trained.model, trained.features, device="cpu", **outputs(tmp_path))
    rows = list(csv.DictReader((tmp_path / "confusion.csv").open()))
    losses = [float(t.split("loss ")[1].split("\n")[0]) for t in shown["titles"]]
    assert len(losses) == 4 and losses == sorted(losses, reverse=True)
    assert sum(losses) / 4 >= m["loss"] - 1e-6, "the highest losses, not any four"
    for title, ok in zip(shown["titles"], shown["ok"]):
        actual, rest = title.split(" as ")
        path = title.split("\n")[1]
        (row,) = [r for r in rows if r["path"] == path]
        assert (row["actual"], row["predicted"]) == (actual, rest.split(" ")[0]) and ok == (row["actual"] == row["predicted"])
    assert all(p.mode == "RGB" for p in shown["photos"])


def test_test_images_found_in_train_are_scored_apart(trained, tmp_path):
    """The audit's leaks: accuracy on the rest is what a clean test set would have said."""
    m = evaluate(trained.model, trained.features, device="cpu", **outputs(tmp_path))
    rows = list(csv.DictReader((tmp_path / "confusion.csv").open()))
    right = [r["path"] for r in rows if r["actual"] == r["predicted"]]
    wrong = [r["path"] for r in rows if r["actual"] != r["predicted"]]
    leaked = frozenset(right[:1] or wrong[:1])
    rest = [r for r in rows if r["path"] not in leaked]
    m2 = evaluate(trained.model, trained.features, device="cpu", leaked=leaked, **outputs(tmp_path / "b"))
    assert m2["accuracy"] == m["accuracy"], "the plain accuracy counts every test image"
    assert m2["accuracy_leak_free"] == round(sum(r["actual"] == r["predicted"] for r in rest) / len(rest), 6)
    everything = frozenset(r["path"] for r in rows)
    assert evaluate(trained.model, trained.features, device="cpu", leaked=everything,
                    **outputs(tmp_path / "c"))["accuracy_leak_free"] is None


def test_the_contact_sheet_is_a_png(trained, tmp_path):
    evaluate(trained.model, trained.features, device="cpu", **outputs(tmp_path))
    from PIL import Image

    with Image.open(tmp_path / "hardest.png") as sheet:
        assert sheet.format == "PNG" and sheet.width >= 1000  # 4 tiles across


def rewritten(source, dest, **changes):
    """`source`'s checkpoint with some metadata (or the state dict) changed, written as safetensors to `dest`."""
    ckpt = read_checkpoint(source)
    state = changes.pop("state_dict", ckpt.pop("state_dict"))
    dest.write_bytes(save(state, metadata={"foodvision": json.dumps({**ckpt, **changes})}))
    return dest


def test_truncated_or_foreign_checkpoint(trained, tmp_path):
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(trained.model.read_bytes()[:1000])
    kwargs = dict(device="cpu", **outputs(tmp_path))
    with pytest.raises(ModelError, match="model.safetensors is not a readable safetensors file"):
        evaluate(truncated, trained.features, **kwargs)
    torch.save(torch.load(trained.pretrained, weights_only=True), truncated)  # a torch pickle, not safetensors
    with pytest.raises(ModelError, match="model.safetensors is not a readable safetensors file"):
        evaluate(truncated, trained.features, **kwargs)
    rewritten(trained.model, truncated, class_names=["a", "b"])
    with pytest.raises(ModelError, match="model for 2 classes .* holds 'efficientnet_b0' features for 3 classes"):
        evaluate(truncated, trained.features, **kwargs)
    state = read_checkpoint(trained.model)["state_dict"]
    del state["classifier.1.weight"]
    rewritten(trained.model, truncated, state_dict=state)
    with pytest.raises(ModelError, match="model.safetensors has no head for its 3 classes"):
        evaluate(truncated, trained.features, **kwargs)
    with pytest.raises(ModelError, match="not found"):
        evaluate(tmp_path / "none.safetensors", trained.features, **kwargs)
    assert not (tmp_path / "e.json").exists()


def test_numpy_head_gives_torch_logits(trained):
    """evaluate and export run the head in NumPy: the logits are torch's own, to float32 rounding."""
    from foodvision.checkpoint import head_logits, head_weights
    from foodvision.head import new_head

    ckpt = read_checkpoint(trained.model)
    weight, bias = head_weights(trained.model, ckpt)
    torch_head = new_head(weight.shape[1], weight.shape[0], ckpt["dropout"])  # train's own module, in eval mode
    torch_head[1].load_state_dict({"weight": torch.from_numpy(weight.copy()), "bias": torch.from_numpy(bias.copy())})
    torch_head.eval()
    # rows at the scale of real features (the random test backbone's are about 1e-13)
    feats = np.random.default_rng(0).standard_normal((64, weight.shape[1])).astype(np.float32)
    with torch.inference_mode():
        want = torch_head(torch.from_numpy(feats)).numpy()
    got = head_logits(feats, *head_weights(trained.model, ckpt))
    assert got.dtype == want.dtype and abs(want).max() > 1.0
    assert abs(got - want).max() <= 1e-5 * abs(want).max()


def test_checkpoint_bytes_depend_only_on_the_weights(trained, tmp_path):
    """Saved twice, anywhere, the checkpoint has the same bytes: a forced rerun of train changes no md5."""
    from foodvision.checkpoint import save_checkpoint

    ckpt = read_checkpoint(trained.model)
    state = ckpt.pop("state_dict")
    keep = {"name": ckpt["model_name"], "head": ckpt["head"], "dropout": ckpt["dropout"],
            "class_names": ckpt["class_names"], "transform": ckpt["transform"]}
    save_checkpoint(tmp_path / "a" / "one.safetensors", {k: torch.from_numpy(v.copy()) for k, v in state.items()},
                    **keep)
    save_checkpoint(tmp_path / "b.safetensors", state, **keep)
    assert (tmp_path / "a" / "one.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert (tmp_path / "b.safetensors").read_bytes() == trained.model.read_bytes()


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

    from foodvision.checkpoint import save_checkpoint
    from foodvision.features import FeatureIndex, NpyWriter, SplitIndex, write_index
    from foodvision.head import new_head

    classes = [f"c{i}" for i in range(7)]
    feats = tmp_path / "features"
    feats.mkdir()
    # an identity head on features that rank class j first, then j+1, j+2, ...; label (j+k) % 7 sits at rank k+1
    labels = [(j + k) % 7 for j in range(7) for k in range(7)]
    rows = np.array([[7 - (c - j) % 7 for c in range(7)] for j in range(7) for _ in range(7)], dtype=np.float32)
    writer = NpyWriter(feats / "test.npy", len(rows), 7)
    writer.write(rows)
    writer.close()
    test = SplitIndex([f"{i}.jpg" for i in range(49)], labels, [None] * 49)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(49):
        make_image("pizza", i, (16, 16)).save(photos / f"{i}.jpg")
    raw = stored(photos, tmp_path / "raw.zip")  # the contact sheet shows the hardest of them
    write_index(feats, FeatureIndex("efficientnet_b0", "classifier", 7, 0, classes, str(raw), "fp32", "torch",
                                    {"test": test}, []))
    head = new_head(7, 7, 0.2)
    with torch.no_grad():
        head[1].weight.copy_(torch.eye(7))
        head[1].bias.zero_()
    save_checkpoint(tmp_path / "model.safetensors", {f"classifier.{k}": v for k, v in head.state_dict().items()},
                    name="efficientnet_b0", head="classifier", dropout=0.2, class_names=classes, transform={})
    m = evaluate(tmp_path / "model.safetensors", feats, device="cpu", **outputs(tmp_path))
    assert m["accuracy"] == round(7 / 49, 6)
    assert m["top5_accuracy"] == round(35 / 49, 6)
    assert list(m["f1"]) == classes


def test_other_format_versions_and_unknown_backbones_are_named(trained, tmp_path):
    from foodvision.model import load_checkpoint

    other = rewritten(trained.model, tmp_path / "model.safetensors", format=3)
    with pytest.raises(ModelError, match="model.safetensors is a FoodVision checkpoint of format 3, but this version "
                                         "reads format 2"):
        load_checkpoint(other)
    rewritten(trained.model, other, model_name="efficientnet_b99")
    with pytest.raises(ModelError, match="holds a 'efficientnet_b99' model, which this torchvision does not have"):
        load_checkpoint(other)


def test_class_names_are_plain_text_in_every_png(tmp_path):
    """Folder names become class names: `$^^$` would be TeX to matplotlib, and crash the stage."""
    from PIL import Image

    from foodvision.plots import confusion, loss_curves, prediction

    names = ["$^^$", "_", "100%", "{}", "\u05e9\u05dc\u05d5\u05dd", "a$b"]
    matrix = [[3 if i == j else 1 for j in range(len(names))] for i in range(len(names))]
    confusion(matrix, names, tmp_path / "c.png")
    prediction(Image.new("RGB", (64, 48), "red"), "Pred: $^^$ | Prob: 0.500 | True: a_b$", False, tmp_path / "p.png")
    loss_curves([{"epoch": 1, "train_loss": 1.0, "held_out_loss": 1.1, "train_acc": 0.5, "held_out_acc": 0.4}],
                tmp_path / "l.png")
    for name in ("c.png", "p.png", "l.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
