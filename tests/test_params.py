import re
from pathlib import Path

import pytest
import yaml
from conftest import default_params_text, default_paths

from foodvision.core.params import ParamsError, load_params, load_paths


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_project_params_load_with_the_article_recipe(tmp_path):
    p = load_params(write(tmp_path, default_params_text()))
    assert (p.seed, p.model.name, p.model.weights, p.model.dropout) == (42, "efficientnet_b0", "DEFAULT", 0.2)
    assert (p.train.epochs, p.train.batch_size, p.train.lr, p.device) == (5, 32, 0.001, "auto")
    assert p.predict.num_samples == 3 and len(p.predict.images) == 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["train"].update(epoch=3), "unknown key train.epoch"),
        (lambda p: p.update(sed=1), "unknown key sed"),
        (lambda p: p["train"].update(epochs="five"), "train.epochs must be int"),
        (lambda p: p["train"].update(epochs=0), "train.epochs must be a positive integer"),
        (lambda p: p["train"].update(batch_size=-1), "train.batch_size must be a positive integer"),
        (lambda p: p["train"].update(lr=0), "train.lr must be a finite number > 0"),
        (lambda p: p["train"].update(lr=float("inf")), "train.lr must be a finite number > 0, got inf"),
        (lambda p: p["train"].update(lr=float("nan")), "train.lr must be a finite number > 0, got nan"),
        (lambda p: p["train"].update(lr="fast"), "train.lr must be float, got 'fast'"),
        (lambda p: p.update(device="tpu"), "device must be one of auto, cpu, cuda, mps"),
        (lambda p: p.update(device="cuda:abc"), "device must be one of auto, cpu, cuda, mps (or cuda:N), got 'cuda:abc'"),
        (lambda p: p.update(device="mps:1"), "device must be one of auto, cpu, cuda, mps (or cuda:N), got 'mps:1'"),
        (lambda p: p["train"].update(device="cpu"), "train.device moved to the top-level key device: move the line there"),
        (lambda p: p.update(paths={"raw": "data/raw/dataset.zip"}), "paths moved to dvc.yaml's `vars:` block"),
        (lambda p: p.pop("device"), "missing key device in params.yaml"),
        (lambda p: p["train"].pop("epochs"), "missing key train.epochs in params.yaml"),
        (lambda p: p.update(seed=-1), "seed must be between 0 and 4294967295 (2**32 - 1), got -1"),
        (lambda p: p.update(seed=2**40), "seed must be between 0 and 4294967295 (2**32 - 1), got 1099511627776"),
        (lambda p: p["data"].update(test_fraction=1.0), "data.test_fraction must be between 0 and 1"),
        (lambda p: p["data"].update(classes=["pizza"]), "data.classes must list at least 2 distinct class names"),
        (lambda p: p["featurize"].update(batch_size=0), "featurize.batch_size must be a positive integer"),
        (lambda p: p["featurize"].update(processes=0), "featurize.processes must be a positive integer"),
        (lambda p: p["featurize"].update(precision="int8"), "featurize.precision must be fp32, bf16 or fp16, got 'int8'"),
        (lambda p: p["featurize"].update(engine="onnx"),
         "featurize.engine must be one of auto, torch, onnxruntime, openvino, got 'onnx'"),
        (lambda p: p["model"].update(dropout=1.0), "model.dropout must be in [0, 1)"),
        (lambda p: p["data"].update(sha256="abc"), "data.sha256 must be 64 hex digits"),
        (lambda p: p["data"].pop("url"), "missing key data.url"),
        (lambda p: p["predict"].update(images="a.jpg"), "predict.images must be a list of strings"),
        (lambda p: p["audit"].update(folds=1), "audit.folds must be an integer from 2 to 20, got 1"),
        (lambda p: p["audit"].update(near_duplicate=1.5), "audit.near_duplicate must be a cosine similarity in (0, 1]"),
        (lambda p: p["audit"].update(near_dup=0.9), "unknown key audit.near_dup; did you mean audit.near_duplicate?"),
        (lambda p: p["featurize"].update(batch_size=10**12), "featurize.batch_size must be a positive integer up to "
                                                             "1,024 (images per forward pass), got 1000000000000"),
        (lambda p: p["featurize"].update(processes=1000), "featurize.processes must be a positive integer up to 64"),
        (lambda p: p["train"].update(batch_size=10**6), "train.batch_size must be a positive integer up to 65,536"),
        (lambda p: p["train"].update(batch_size=4096, augment=True), "up to 1,024 (images per step with train.augment)"),
    ],
)
def test_bad_params_name_the_key(tmp_path, edit, message):
    params = yaml.safe_load(default_params_text())
    edit(params)
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_params(write(tmp_path, yaml.safe_dump(params)))


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"model": ""}, "paths.model must be a relative path inside the project, got ''"),
        ({"spec": "/tmp/spec.json"}, "paths.spec must be a relative path inside the project"),
        ({"spec": "../spec.json"}, "paths.spec must be a relative path inside the project"),
        ({"onnx": "models/./model.safetensors"}, "paths.onnx and paths.model are both 'models/model.safetensors'"),
        ({"confusoin_png": "x.png"}, "unknown key paths.confusoin_png; did you mean paths.confusion_png?"),
        ({"export_metrics": "m.json", "export_check": None}, "paths.export_metrics is now paths.export_check"),
    ],
)
def test_bad_paths_in_dvc_yaml_name_the_key(tmp_path, changed, message):
    """paths live in dvc.yaml's `vars:` (configuration, not columns of `dvc exp show`): checked as strictly."""
    paths = {**default_paths(), **changed}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"vars": [{"paths": {k: v for k, v in paths.items() if v is not None}}]}))
    with pytest.raises(ParamsError, match=re.escape(message)):
        load_paths(tmp_path / "dvc.yaml")


def test_paths_missing_from_dvc_yaml_are_one_line(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ParamsError, match=re.escape("must have one `paths:` mapping under `vars:`")):
        load_paths(tmp_path / "dvc.yaml")


def edited(**lines: str) -> str:
    """The committed params.yaml with some `  key: value` lines replaced, as a user edits it by hand."""
    text = default_params_text()
    for key, value in lines.items():
        text, n = re.subn(rf"^  {key}:.*$", f"  {key}: {value}", text, count=1, flags=re.M)
        assert n == 1, key
    return text


def test_empty_image_list_and_int_lr_are_accepted(tmp_path):
    text = re.sub(r"^    - .*\n", "", edited(lr="1"), flags=re.M)  # `images:` with nothing under it
    p = load_params(write(tmp_path, text))
    assert p.predict.images == () and p.train.lr == 1.0 and isinstance(p.train.lr, float)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "data: [unclosed"))


def test_yaml_1_1_exponents_are_floats_and_odd_keys_are_named(tmp_path):
    """PyYAML reads `1e-3` as a string (YAML 1.1); users write it anyway."""
    p = load_params(write(tmp_path, edited(lr="1e-3", dropout="5E-1")))
    assert p.train.lr == 0.001 and p.model.dropout == 0.5
    with pytest.raises(ParamsError, match=r"^unknown key train.1; accepted keys here: train.epochs"):
        load_params(write(tmp_path, edited(lr="0.1\n  1: a\n  null: b")))


def test_an_alias_bomb_gives_a_short_message(tmp_path):
    """Nine levels of nine aliases: a few hundred bytes of YAML whose repr would be 9**9 items long."""
    levels = ["&l0 [x, x, x, x, x, x, x, x, x]"] + [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = edited(lr="[" + ", ".join(levels) + "]")
    with pytest.raises(ParamsError, match=r"^train.lr must be float, got \[\[") as raised:
        load_params(write(tmp_path, text))
    assert len(str(raised.value)) <= 120


@pytest.mark.parametrize(("content", "message"), [
    (b"seed: 42\ntrain:\n  lr: 0.001 \xff\n", "is not UTF-8 text (byte 0xff at offset 28): save it as UTF-8"),
    (b"x: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nests more than 50 levels deep: not a params file"),
    (b"x:\n" + b"".join(b"  " * i + b"k:\n" for i in range(1, 200)), "nests more than 50 levels deep"),
    (b"seed: [1, 2\n", "is not valid YAML"),
])
def test_a_params_file_that_is_not_one_is_one_line(tmp_path, content, message):
    """Not UTF-8, nested 100,000 deep (PyYAML would recurse into a 3,000-line RecursionError), broken YAML:
    one line naming the file, from params.yaml's reader and dvc.yaml's alike."""
    for name, load in (("params.yaml", load_params), ("dvc.yaml", load_paths)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ParamsError) as raised:
            load(tmp_path / name)
        assert message in str(raised.value) and "\n" not in str(raised.value) and name in str(raised.value)
