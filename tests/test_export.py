"""export: the ONNX file, its check against torch, and what a runtime without torch finds in it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from foodvision.checkpoint import ModelError
from foodvision.data import build_transform
from foodvision.export import export
from foodvision.images import open_rgb
from foodvision.model import load_checkpoint


def test_onnx_matches_torch_on_every_test_image_and_says_so_in_its_metrics(exported, trained):
    out, figures = exported
    written = json.loads((out / "export.json").read_text())
    assert written == figures
    assert written["images"] == 6 and written["argmax_agreement"] == 1.0 and written["max_abs_diff"] <= 1e-4
    assert written["opset"] == 18 and written["onnx_mb"] > 1
    assert written["torch_reference"] == "head on stored features"


def test_after_a_lower_precision_featurize_the_whole_torch_model_is_the_reference(trained, tmp_path):
    import shutil

    features = tmp_path / "features"
    shutil.copytree(trained.features, features)
    index = json.loads((features / "index.json").read_text())
    index["precision"] = "bf16"  # the stored features are no longer what model.pt computes in float32
    (features / "index.json").write_text(json.dumps(index))
    figures = export(trained.model, features, tmp_path / "model.onnx", tmp_path / "export.json")
    assert figures["torch_reference"] == "whole model"
    assert figures["images"] == 6 and figures["argmax_agreement"] == 1.0 and figures["max_abs_diff"] <= 1e-4


def test_the_onnx_file_takes_any_batch_and_carries_classes_and_transform(exported, trained):
    out, _ = exported
    model = onnx.load(out / "model.onnx")
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    torch_model, ckpt = load_checkpoint(trained.model)
    assert meta["classes"] == ckpt["class_names"] == ["pizza", "steak", "sushi"]
    assert meta["transform"] == ckpt["transform"] and meta["backbone"] == "efficientnet_b0"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    tf = build_transform(ckpt["transform"])
    images = [tf(open_rgb(p)) for p in sorted((trained.raw).rglob("*.jpg"))[:5]]
    for batch in (torch.stack(images[:1]), torch.stack(images)):  # 1 and 5: not the traced 2
        got = session.run(["logits"], {"images": batch.numpy()})[0]
        with torch.inference_mode():
            want = torch_model(batch).numpy()
        assert got.shape == (len(batch), 3) and np.abs(got - want).max() <= 1e-4


def test_a_rerun_writes_the_same_bytes(exported, trained, tmp_path):
    out, _ = exported
    export(trained.model, trained.features, tmp_path / "model.onnx", tmp_path / "export.json")
    assert (tmp_path / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_a_model_for_other_classes_is_refused_in_one_line(trained, tmp_path):
    import shutil

    features = tmp_path / "features"
    shutil.copytree(trained.features, features)
    index = json.loads((features / "index.json").read_text())
    index["classes"] = ["a", "b", "c"]
    (features / "index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"trained on other classes .* run `dvc repro`"):
        export(trained.model, features, tmp_path / "model.onnx", tmp_path / "export.json")
    assert not (tmp_path / "model.onnx").exists()


def test_a_disagreeing_export_fails_the_stage_and_writes_nothing(trained, tmp_path):
    import shutil

    features = tmp_path / "features"
    shutil.copytree(trained.features, features)
    stored = np.load(features / "test.npy")
    np.save(features / "test.npy", stored + np.float32(0.01))  # torch's side now differs from the images'
    with pytest.raises(ModelError, match=r"disagrees with torch .*max \|logit difference\| .*not written"):
        export(trained.model, features, tmp_path / "model.onnx", tmp_path / "export.json")
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "export.json").exists()
    assert not list(tmp_path.glob(".model.onnx*")), "no temporary left"
