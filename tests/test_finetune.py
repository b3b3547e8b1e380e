"""The validation cut (data.val_fraction, train.patience) and the opt-in fine-tune (finetune.*), on the tiny data:
what is kept, what is never read, and that evaluate, export and the ONNX file follow a fine-tuned backbone."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import project_params
from torch import nn

from foodvision.checkpoint import head_logits, head_weights, read_checkpoint
from foodvision.core.errors import DatasetError
from foodvision.core.params import ParamsError
from foodvision.evaluate import cross_entropy_sum, evaluate
from foodvision.export import export
from foodvision.features import NpyWriter, load_index, open_split
from foodvision.featurize import check_backbone
from foodvision.finetune import backbone_blocks, unfreeze
from foodvision.loop import Keeper, val_cut
from foodvision.model import build_backbone, load_checkpoint, replace_head
from foodvision.statedict import load_state_dict_file
from foodvision.train import TrainOutputs, train


def run_train(trained, out: Path, *, features: Path | None = None, blocks: int = 0, val_fraction: float = 0.0,
              epochs: int = 2, lr: float = 0.01, patience: int = 0, seed: int = 42) -> dict:
    """train() as the stage calls it, on the tiny run's features; returns train.json."""
    p = project_params()
    out.mkdir(parents=True, exist_ok=True)
    train(features or trained.features, trained.pretrained, trained.transform, p.model,
          dataclasses.replace(p.train, epochs=epochs, batch_size=4, lr=lr, patience=patience),
          dataclasses.replace(p.finetune, blocks=blocks, epochs=1, batch_size=4), seed=seed,
          val_fraction=val_fraction, device="cpu",
          out=TrainOutputs(out / "model.safetensors", out / "train.json", out / "history.csv", out / "curves.png"))
    return json.loads((out / "train.json").read_text())


def history(out: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader((out / "history.csv").open())]


@pytest.fixture(scope="module")
def tuned(trained, tmp_path_factory) -> Path:
    """The tiny run fine-tuned: 2 epochs of the head on stored features, then 1 with the last block (features.8)."""
    out = tmp_path_factory.mktemp("tuned")
    run_train(trained, out, blocks=1)
    return out


def test_the_val_cut_takes_the_same_share_of_every_class_with_the_seed():
    labels = [0] * 10 + [1] * 20 + [2] * 3 + [3]
    keep, val = val_cut(labels, 0.2, seed=42)
    assert sorted(keep + val) == list(range(len(labels))) and not set(keep) & set(val)
    assert [sum(labels[i] == c for i in val) for c in range(4)] == [2, 4, 1, 0]  # at least 1; never a class's last
    assert val_cut(labels, 0.2, seed=42) == (keep, val) and val_cut(labels, 0.2, seed=7)[1] != val
    assert val_cut(labels, 0.0, seed=42) == (list(range(len(labels))), [])


def test_the_keeper_keeps_the_lowest_val_loss_and_stops_after_patience():
    module = nn.Linear(2, 1)
    keeper, stopped = Keeper(patience=2), None
    for epoch, loss in enumerate([3.0, 2.0, 2.5, 2.0, 1.0], start=1):
        with torch.no_grad():
            module.weight.fill_(epoch)
        if keeper.stop_after(epoch, loss, module):
            stopped = epoch
            break
    assert (stopped, keeper.best_epoch) == (4, 2), "equal is not better: two epochs without a lower loss stop it"
    keeper.restore(module)
    assert module.weight.detach().eq(2).all()
    assert not any(Keeper(patience=0).stop_after(e, 5.0, module) for e in range(1, 50)), "0 = run every epoch"


def test_with_a_val_cut_the_kept_head_is_the_epoch_with_the_lowest_val_loss(trained, tmp_path):
    metrics = run_train(trained, tmp_path, val_fraction=0.34, epochs=12, lr=0.5, patience=3)
    rows = history(tmp_path)
    best = min(rows, key=lambda r: r["held_out_loss"])
    assert metrics["best_epoch"] == best["epoch"] and metrics["val_loss"] == best["held_out_loss"]
    assert metrics["epoch"] == rows[-1]["epoch"] and "test_loss" not in metrics and "test_acc" not in metrics
    if len(rows) < 12:  # stopped early: the last `patience` epochs were no better
        assert rows[-1]["epoch"] - best["epoch"] == 3
    # the checkpoint's head, scored on the validation rows by NumPy, is that epoch's head
    index = load_index(trained.features)
    _, val = val_cut(index.split("train").labels, 0.34, 42)
    ckpt = read_checkpoint(tmp_path / "model.safetensors")
    rows_file = open_split(trained.features, index, "train")
    logits = head_logits(rows_file.take(val), *head_weights(tmp_path / "model.safetensors", ckpt))
    loss = cross_entropy_sum(logits, rows_file.labels[val]) / len(val)
    assert loss == pytest.approx(best["held_out_loss"], abs=1e-5)


def test_with_a_val_cut_train_never_reads_the_test_split(trained, tmp_path):
    """Not its feature rows, not its images: the test split is evaluate's alone, even when fine-tuning."""
    features = tmp_path / "features"
    shutil.copytree(trained.features, features)
    (features / "test.npy").write_bytes(b"not a feature file")
    index = json.loads((features / "index.json").read_text())
    index["splits"]["test"]["paths"] = [f"test/missing/{i}.jpg" for i in range(6)]
    (features / "index.json").write_text(json.dumps(index))
    metrics = run_train(trained, tmp_path / "tuned", features=features, val_fraction=0.34, blocks=1)
    assert {"val_loss", "val_acc", "best_epoch"} <= set(metrics)
    with pytest.raises(DatasetError, match="test.npy"):  # the same run without the cut reads test every epoch
        run_train(trained, tmp_path / "frozen", features=features)


def test_a_val_cut_of_classes_with_one_train_image_each_is_one_line(trained, tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    index = json.loads((trained.features / "index.json").read_text())
    for split in ("train", "test"):
        index["splits"][split] = {"paths": ["a.jpg", "b.jpg", "c.jpg"], "labels": [0, 1, 2]}
        writer = NpyWriter(features / f"{split}.npy", 3, index["feature_dim"])
        writer.write(np.zeros((3, index["feature_dim"]), np.float32))
        writer.close()
    (features / "index.json").write_text(json.dumps(index))
    with pytest.raises(ParamsError, match=r"^data.val_fraction is 0.2, but no class has two train images"):
        run_train(trained, tmp_path / "out", features=features, val_fraction=0.2)


def test_blocks_are_the_backbones_stages_and_batchnorm_stays_frozen():
    model = build_backbone("efficientnet_b0")
    head = replace_head(model, 3, 0.2)
    assert backbone_blocks(model, head) == [f"features.{i}" for i in range(9)]
    assert unfreeze(model, head, 2, "efficientnet_b0") == ["features.7", "features.8"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("features.7.", "features.8.", "classifier.")) for n in trainable)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not any(p.requires_grad for m in batchnorms for p in m.parameters())
    assert "features.7.0.block.0.0.weight" in trainable  # the convolutions inside do train
    resnet = build_backbone("resnet18")
    assert backbone_blocks(resnet, replace_head(resnet, 3, 0.2))[-2:] == ["layer3", "layer4"]
    with pytest.raises(ParamsError, match=r"^finetune.blocks is 10, but efficientnet_b0 has 9 blocks"):
        unfreeze(model, head, 10, "efficientnet_b0")


def test_too_many_blocks_fail_before_any_training(trained, tmp_path):
    with pytest.raises(ParamsError, match="use 1 to 9"):
        run_train(trained, tmp_path, blocks=12)
    assert not (tmp_path / "history.csv").exists(), "nothing was trained"


def test_a_fine_tune_changes_only_the_last_blocks_and_the_head(trained, tuned):
    ckpt = read_checkpoint(tuned / "model.safetensors")
    assert ckpt["finetuned"] == ["features.8"]
    pretrained = {k: v.numpy() for k, v in load_state_dict_file(trained.pretrained).items()}
    state = ckpt["state_dict"]
    backbone = {k for k in pretrained if not k.startswith("classifier.")}  # the ImageNet head was replaced
    changed = {k for k, v in state.items() if k in backbone and not np.array_equal(v, pretrained[k])}
    assert changed and all(k.startswith("features.8.0.weight") for k in changed), sorted(changed)
    frozen_head = read_checkpoint(trained.model)["state_dict"]["classifier.1.weight"]
    assert not np.array_equal(state["classifier.1.weight"], frozen_head), "the head trained on in the fine-tune"
    rows = history(tuned)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and json.loads((tuned / "train.json").read_text())["epoch"] == 3
    assert "finetuned" not in read_checkpoint(trained.model), "a frozen checkpoint keeps its bytes: no new key"


def test_same_seed_same_fine_tuned_bytes(trained, tuned, tmp_path):
    run_train(trained, tmp_path, blocks=1)
    assert (tmp_path / "model.safetensors").read_bytes() == (tuned / "model.safetensors").read_bytes()
    assert (tmp_path / "history.csv").read_bytes() == (tuned / "history.csv").read_bytes()


def torch_logits_on_test_images(trained, model_path: Path) -> tuple[torch.Tensor, np.ndarray]:
    from foodvision.data import ImageSamples, build_transform
    from foodvision.spec import load_transform

    index = load_index(trained.features)
    transform = load_transform(trained.transform)
    images = ImageSamples(trained.raw, [{"path": p, "label": 0} for p in index.split("test").paths],
                          build_transform(transform), transform["resize_size"])
    model, _ = load_checkpoint(model_path)
    with torch.inference_mode():
        return model(torch.stack([images[i][0] for i in range(len(images))])), np.array(index.split("test").labels)


def test_evaluate_scores_the_fine_tuned_backbone_on_the_test_images(trained, tuned, tmp_path):
    metrics = evaluate(tuned / "model.safetensors", trained.features, device="cpu", metrics_out=tmp_path / "e.json",
                       per_class_csv=tmp_path / "p.csv", confusion_csv=tmp_path / "c.csv",
                       confusion_png=tmp_path / "c.png", hardest_png=tmp_path / "h.png")
    logits, labels = torch_logits_on_test_images(trained, tuned / "model.safetensors")
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item()
    assert metrics["loss"] == pytest.approx(loss, abs=1e-4) and len(labels) == 6
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == labels).mean()))


def test_export_follows_the_fine_tuned_backbone_and_checks_it(trained, tuned, tmp_path):
    check_backbone(trained.pretrained, trained.transform, trained.features, model_name="efficientnet_b0",
                    onnx_out=tmp_path / "backbone.onnx", check_dir=tmp_path / "check")
    pretrained_check = (tmp_path / "check" / "test.npy").read_bytes()
    figures = export(tuned / "model.safetensors", trained.features, tmp_path / "backbone.onnx", tmp_path / "check",
                     onnx_out=tmp_path / "model.onnx", metrics_out=tmp_path / "export.json")
    assert figures["torch_reference"].startswith("fine-tuned float32 backbone (features.8)")
    assert figures["argmax_agreement"] == figures["sample_argmax_agreement"] == 1.0
    assert max(figures["max_abs_diff"], figures["sample_max_abs_diff"], figures["backbone_max_abs_diff"]) <= 1e-4
    assert (tmp_path / "check" / "test.npy").read_bytes() == pretrained_check, "featurize's check folder untouched"
    logits, _ = torch_logits_on_test_images(trained, tuned / "model.safetensors")
    from foodvision.data import build_transform
    from foodvision.images import open_rgb
    from foodvision.spec import load_transform
    from foodvision.store import ImageStore

    transform = load_transform(trained.transform)
    store = ImageStore(trained.raw)
    images = torch.stack([build_transform(transform)(open_rgb(store.open(p), transform["resize_size"]))
                          for p in load_index(trained.features).split("test").paths])
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    assert np.abs(got - logits.numpy()).max() <= 1e-4, "the ONNX file is the fine-tuned model, not the pretrained one"
