from pathlib import Path

import pytest
import yaml
from conftest import default_params_text

from foodvision.params import ParamsError, load_params


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_project_params_load_with_the_article_recipe(tmp_path):
    p = load_params(write(tmp_path, default_params_text()))
    assert (p.seed, p.model.name, p.model.weights, p.model.dropout) == (42, "efficientnet_b0", "DEFAULT", 0.2)
    assert (p.train.epochs, p.train.batch_size, p.train.lr, p.train.device) == (5, 32, 0.001, "auto")
    assert p.predict.num_samples == 3 and len(p.predict.images) == 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["train"].update(epoch=3), "unknown key train.epoch"),
        (lambda p: p.update(sed=1), "unknown key sed"),
        (lambda p: p["train"].update(epochs="five"), "train.epochs must be int"),
        (lambda p: p["train"].update(epochs=0), "train.epochs must be a positive integer"),
        (lambda p: p["train"].update(batch_size=-1), "train.batch_size must be a positive integer"),
        (lambda p: p["train"].update(lr=0), "train.lr must be > 0"),
        (lambda p: p["train"].update(device="tpu"), "train.device must be one of auto, cpu, cuda, mps"),
        (lambda p: p["model"].update(dropout=1.0), "model.dropout must be in [0, 1)"),
        (lambda p: p["data"].update(sha256="abc"), "data.sha256 must be 64 hex digits"),
        (lambda p: p["data"].pop("url"), "missing key data.url"),
        (lambda p: p["predict"].update(images="a.jpg"), "predict.images must be a list of strings"),
    ],
)
def test_bad_params_name_the_key(tmp_path, edit, message):
    params = yaml.safe_load(default_params_text())
    edit(params)
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_params(write(tmp_path, yaml.safe_dump(params)))


def test_empty_image_list_and_int_lr_are_accepted(tmp_path):
    p = load_params(write(tmp_path, "data: {url: x.zip}\ntrain: {lr: 1}\npredict:\n  images:\n"))
    assert p.predict.images == () and p.train.lr == 1.0 and isinstance(p.train.lr, float)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "data: [unclosed"))
