"""export in two parts: the backbone once per featurize, the head joined per experiment; the checks, and what a
runtime without torch finds in the joined file."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from foodvision.core.errors import FoodVisionError, ModelError
from foodvision.data import build_transform
from foodvision.export import export, sample_rows
from foodvision.featurize import check_backbone
from foodvision.images import open_rgb
from foodvision.model import load_checkpoint
from foodvision.store import ImageStore


def export_both(trained, features: Path, out: Path, model: Path | None = None) -> dict:
    check_backbone(trained.pretrained, trained.transform, features, model_name="efficientnet_b0",
                   onnx_out=out / "backbone.onnx", check_dir=out / "check")
    return export(model or trained.model, features, out / "backbone.onnx", out / "check", onnx_out=out / "model.onnx",
                  metrics_out=out / "export.json")


def copied_features(trained, tmp_path: Path) -> Path:
    features = tmp_path / "features"
    shutil.copytree(trained.features, features)
    return features


def test_every_check_agrees_and_the_metrics_say_so(exported, trained):
    out, figures = exported
    written = json.loads((out / "export.json").read_text())
    assert written == figures
    assert written["images"] == 6 and written["argmax_agreement"] == 1.0 and written["max_abs_diff"] <= 1e-4
    assert written["head_max_abs_diff"] <= 1e-5, "the head alone: the same rows through ONNX Runtime and torch"
    assert written["sample_images"] == 6 and written["sample_argmax_agreement"] == 1.0
    assert written["sample_max_abs_diff"] <= 1e-4 and written["backbone_max_abs_diff"] <= 1e-4
    assert written["max_rel_diff"] <= 1e-4
    assert written["opset"] == 18 and written["onnx_mb"] > 1
    # the features came from ONNX Runtime (featurize.engine auto on a CPU): torch runs on the images beside them
    assert written["torch_reference"] == "float32 backbone (features stored by ONNX Runtime)"
    torchs, stored = np.load(out / "check" / "reference.npy"), np.load(trained.features / "test.npy")
    assert torchs.shape == stored.shape == (6, 1280) and np.abs(torchs - stored).max() <= 1e-4


def test_the_backbone_check_keeps_onnx_runtimes_features_of_every_test_image(exported, trained):
    out, _ = exported
    ours, theirs = np.load(out / "check" / "test.npy"), np.load(trained.features / "test.npy")
    assert ours.shape == theirs.shape == (6, 1280) and np.array_equal(ours, theirs), "the stored rows are its own"


def test_after_a_torch_featurize_the_stored_features_are_torchs_side(trained, tmp_path):
    """featurize.engine torch in fp32: ONNX Runtime runs on the decoded test images against the stored rows."""
    features = copied_features(trained, tmp_path)
    index = json.loads((features / "index.json").read_text())
    index["engine"] = "torch"
    (features / "index.json").write_text(json.dumps(index))
    figures = export_both(trained, features, tmp_path)
    assert figures["torch_reference"] == "stored features"
    assert not (tmp_path / "check" / "reference.npy").exists(), "fp32 torch features are their own reference"
    ours = np.load(tmp_path / "check" / "test.npy")
    assert np.abs(ours - np.load(features / "test.npy")).max() <= 1e-4 and figures["argmax_agreement"] == 1.0


def test_the_sample_is_fixed_and_spread_over_the_split():
    assert sample_rows(6) == [0, 1, 2, 3, 4, 5]
    rows = sample_rows(25_250)
    assert len(rows) == 32 and rows[0] == 0 and rows[-1] == 25_249 and rows == sample_rows(25_250)
    assert sample_rows(1) == [0] and sample_rows(0) == []


def test_after_a_lower_precision_featurize_a_float32_backbone_is_the_reference(trained, tmp_path):
    features = copied_features(trained, tmp_path)
    index = json.loads((features / "index.json").read_text())
    index["precision"], index["engine"] = "bf16", "torch"  # no longer what the backbone computes in float32
    (features / "index.json").write_text(json.dumps(index))
    figures = export_both(trained, features, tmp_path)
    assert figures["torch_reference"].startswith("float32 backbone")
    assert (tmp_path / "check" / "reference.npy").exists()
    assert figures["images"] == 6 and figures["argmax_agreement"] == 1.0 and figures["max_abs_diff"] <= 1e-4


def test_the_joined_file_takes_any_batch_and_carries_classes_and_transform(exported, trained):
    out, _ = exported
    model = onnx.load(out / "model.onnx")
    assert not model.graph.input[1:], "one input: the images"
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    torch_model, ckpt = load_checkpoint(trained.model)
    assert meta["classes"] == ckpt["class_names"] == ["pizza", "steak", "sushi"]
    assert meta["transform"] == ckpt["transform"] and meta["backbone"] == "efficientnet_b0"
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    tf = build_transform(ckpt["transform"])
    store = ImageStore(trained.raw)
    images = [tf(open_rgb(store.open(name))) for name in store.names()[:5]]
    for batch in (torch.stack(images[:1]), torch.stack(images)):  # 1 and 5: not the traced 2
        got = session.run(["logits"], {"images": batch.numpy()})[0]
        with torch.inference_mode():
            want = torch_model(batch).numpy()  # the whole torch model, unfused, on the images
        assert got.shape == (len(batch), 3) and np.abs(got - want).max() <= 1e-4


def test_a_rerun_writes_the_same_bytes(exported, trained, tmp_path):
    out, _ = exported
    export_both(trained, trained.features, tmp_path)
    for name in ("backbone.onnx", "check/test.npy", "check/check.json", "model.onnx", "export.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_another_head_reuses_the_backbone_export(exported, trained, tmp_path):
    """A head-only experiment: only the head's weights differ in the joined file, and the checks still pass."""
    out, _ = exported
    from foodvision.checkpoint import read_checkpoint, save_checkpoint

    ckpt = read_checkpoint(trained.model)
    state = ckpt["state_dict"]
    state["classifier.1.weight"] = state["classifier.1.weight"] * 2
    other = tmp_path / "model.safetensors"
    save_checkpoint(other, state, name=ckpt["model_name"], head=ckpt["head"], dropout=ckpt["dropout"],
                    class_names=ckpt["class_names"], transform=ckpt["transform"])
    figures = export(other, trained.features, out / "backbone.onnx", out / "check", onnx_out=tmp_path / "model.onnx",
                     metrics_out=tmp_path / "export.json")
    assert figures["argmax_agreement"] == 1.0 and figures["max_abs_diff"] <= 1e-4
    assert (tmp_path / "model.onnx").read_bytes() != (out / "model.onnx").read_bytes()


def test_logits_are_held_to_their_scale_so_a_large_head_passes_and_a_wrong_feature_fails(tmp_path):
    """`-S train.lr=0.1` on 22,500 rows grows the head's weights to ~16 and its logits to ~600: the same features
    through ONNX Runtime and torch (1e-5 apart, as measured) then give logits 5e-4 apart, which failed the
    experiment under an absolute 1e-4. Held to the size of their sum they pass; a feature off by 0.01 still fails."""
    from foodvision.export import MAX_REL_DIFF, check_rows, head_onnx
    from foodvision.features import FeatureIndex, SplitIndex

    rng = np.random.default_rng(0)
    n, dim = 500, 1280
    torchs = np.maximum(rng.normal(0.3, 0.6, (n, dim)), 0).astype(np.float32)  # post-activation features
    head = (rng.normal(0, 6, (3, dim)).astype(np.float32), rng.normal(0, 6, 3).astype(np.float32))
    session = ort.InferenceSession(head_onnx(head, 8).SerializeToString(), providers=["CPUExecutionProvider"])
    labels = (torchs @ head[0].T + head[1]).argmax(1).tolist()
    test = SplitIndex([f"{i}.jpg" for i in range(n)], labels, [None] * n)
    index = FeatureIndex("m", "classifier", dim, 0, ["a", "b", "c"], "x.zip", "fp32", "torch", {"test": test}, [])

    def rows_check(onnx_features: np.ndarray) -> dict:
        (tmp_path / "f").mkdir(exist_ok=True), (tmp_path / "c").mkdir(exist_ok=True)
        np.save(tmp_path / "f" / "test.npy", torchs)
        np.save(tmp_path / "c" / "test.npy", onnx_features.astype(np.float32))
        return check_rows(head, session, tmp_path / "f", tmp_path / "c", index)

    rounding = rows_check(torchs + rng.uniform(-1e-5, 1e-5, torchs.shape))
    assert rounding["max_abs_diff"] > 1e-4 >= MAX_REL_DIFF >= rounding["rows_rel_diff"], rounding
    assert rounding["argmax_agreement"] > 0.99
    wrong = rows_check(torchs + np.float32(0.01))
    assert wrong["rows_rel_diff"] > MAX_REL_DIFF, wrong


def test_a_model_for_other_classes_is_refused_in_one_line(exported, trained, tmp_path):
    out, _ = exported
    features = copied_features(trained, tmp_path)
    index = json.loads((features / "index.json").read_text())
    index["classes"] = ["a", "b", "c"]
    (features / "index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"trained on other classes .* run `dvc repro`"):
        export(trained.model, features, out / "backbone.onnx", out / "check", onnx_out=tmp_path / "model.onnx",
               metrics_out=tmp_path / "export.json")
    assert not (tmp_path / "model.onnx").exists()


def test_a_missing_backbone_export_names_the_stage_to_run(exported, trained, tmp_path):
    with pytest.raises(FoodVisionError, match=r"check.json not found: run `dvc repro featurize`"):
        export(trained.model, trained.features, tmp_path / "backbone.onnx", tmp_path / "check",
               onnx_out=tmp_path / "model.onnx", metrics_out=tmp_path / "export.json")
    assert not (tmp_path / "model.onnx").exists()


def test_a_disagreeing_backbone_export_fails_and_writes_nothing(trained, tmp_path):
    features = copied_features(trained, tmp_path)
    np.save(features / "test.npy", np.load(features / "test.npy") + np.float32(0.01))  # torch's side now differs
    with pytest.raises(ModelError, match=r"backbone disagrees with torch .*max \|feature difference\| .*not written"):
        check_backbone(trained.pretrained, trained.transform, features, model_name="efficientnet_b0",
                        onnx_out=tmp_path / "backbone.onnx", check_dir=tmp_path / "check")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"], "nothing written, no temporary left"


def test_a_disagreeing_export_fails_the_stage_and_writes_nothing(exported, trained, tmp_path):
    out, _ = exported
    features = copied_features(trained, tmp_path)
    np.save(features / "test.npy", np.load(features / "test.npy") + np.float32(0.01))  # torch's side now differs
    with pytest.raises(ModelError, match=r"disagrees with torch .*max \|logit difference\| .*not written"):
        export(trained.model, features, out / "backbone.onnx", out / "check", onnx_out=tmp_path / "model.onnx",
               metrics_out=tmp_path / "export.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features"], "nothing written, no temporary left"


def test_a_stale_backbone_check_fails_the_export(exported, trained, tmp_path):
    """ONNX Runtime's stored features no longer what the backbone gives: the check on every image catches it."""
    out, _ = exported
    shutil.copytree(out / "check", tmp_path / "check")
    np.save(tmp_path / "check" / "test.npy", np.load(out / "check" / "test.npy") + np.float32(0.01))
    with pytest.raises(ModelError, match="disagrees with torch"):
        export(trained.model, trained.features, out / "backbone.onnx", tmp_path / "check",
               onnx_out=tmp_path / "model.onnx", metrics_out=tmp_path / "export.json")


def test_export_imports_neither_torchvision_nor_the_backbone_exporter():
    """Every experiment pays export's imports: joining a head needs torch, onnx and ONNX Runtime only."""
    code = "import sys, foodvision.export; sys.exit('torchvision' in sys.modules or 'torch.onnx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_in_place_activations_export_as_they_compute_and_stay_in_place_for_torch():
    """onnx_bytes exports a copy with in-place activations out of place (torch.export is much faster so): the
    file clips like ReLU6 does, and the caller's model keeps its in-place layers."""
    from foodvision.export_backbone import onnx_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU6(inplace=True),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    images = torch.randn(3, 3, 8, 8) * 20  # well beyond ReLU6's 0 and 6
    session = ort.InferenceSession(onnx_bytes(model, 8, "features"), providers=["CPUExecutionProvider"])
    got = session.run(["features"], {"images": images.numpy()})[0]
    with torch.inference_mode():
        expected = model(images).numpy()
    assert 0 < expected.min() and expected.max() < 6 and np.abs(got - expected).max() < 1e-5
    assert model[1].inplace


def test_the_onnx_file_is_the_same_wherever_the_code_lies(tmp_path):
    """torch's exporter notes on each node the Python stack that made it, absolute paths included: the same
    model defined in two folders must give the same file, holding neither folder nor this Python's prefix."""
    from foodvision.export_backbone import onnx_bytes

    source = ("import torch\n"
              "class Net(torch.nn.Sequential):\n"
              "    def forward(self, x):\n"
              "        return super().forward(x) * 2\n")
    files = []
    for folder in (tmp_path / "one", tmp_path / "two"):
        folder.mkdir()
        (folder / "netdef.py").write_text(source)
        spec = importlib.util.spec_from_file_location("netdef", folder / "netdef.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        net = module.Net(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        files.append(onnx_bytes(net, 8, "features"))
    assert files[0] == files[1]
    assert str(tmp_path).encode() not in files[0] and sys.prefix.encode() not in files[0]
