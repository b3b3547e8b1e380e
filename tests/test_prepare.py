import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_dataset
from foodvision.model import eval_transform
from foodvision.prepare import DatasetError, prepare

TRANSFORM = eval_transform("efficientnet_b0", "DEFAULT")


def run(raw: Path, tmp_path: Path) -> dict:
    (tmp_path / "transform.json").write_text(json.dumps(TRANSFORM))
    return prepare(raw, tmp_path / "spec.json", transform_path=tmp_path / "transform.json", batch_size=8, seed=7)


def test_spec_pins_classes_samples_and_the_weights_transform(tmp_path):
    write_dataset(tmp_path / "raw")
    spec = run(tmp_path / "raw", tmp_path)
    assert json.loads((tmp_path / "spec.json").read_text()) == spec
    assert spec["classes"] == ["pizza", "steak", "sushi"]
    assert spec["class_to_idx"] == {"pizza": 0, "steak": 1, "sushi": 2}
    assert spec["counts"] == {"train": {"pizza": 4, "steak": 4, "sushi": 4}, "test": {"pizza": 2, "steak": 2, "sushi": 2}}
    assert spec["splits"]["test"][0] == {"path": "test/pizza/000.jpg", "label": 0}
    assert spec["ignored_files"] == 1  # the .DS_Store
    assert spec["transform"] == {"resize_size": 256, "crop_size": 224, "interpolation": "bicubic",
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "antialias": True}
    assert (spec["batch_size"], spec["seed"]) == (8, 7)


def test_other_weights_give_their_own_transform():
    t = eval_transform("efficientnet_b3", "IMAGENET1K_V1")
    assert (t["resize_size"], t["crop_size"], t["interpolation"]) == (320, 300, "bicubic")
    assert eval_transform("resnet18", None)["interpolation"] == "bilinear"


def test_class_mismatch_empty_class_single_class(tmp_path):
    write_dataset(tmp_path / "raw")
    shutil.rmtree(tmp_path / "raw" / "test" / "steak")
    with pytest.raises(DatasetError, match=r"only in train: \['steak'\]"):
        run(tmp_path / "raw", tmp_path)
    (tmp_path / "raw" / "test" / "steak").mkdir()
    with pytest.raises(DatasetError, match="no images in .*test/steak"):
        run(tmp_path / "raw", tmp_path)
    for split in ("train", "test"):
        for cls in ("steak", "sushi"):
            shutil.rmtree(tmp_path / "raw" / split / cls)
    with pytest.raises(DatasetError, match="has 1 class folder"):
        run(tmp_path / "raw", tmp_path)
    assert not (tmp_path / "spec.json").exists()


def test_unreadable_images_are_named(tmp_path):
    write_dataset(tmp_path / "raw")
    good = tmp_path / "raw" / "train" / "sushi" / "000.jpg"
    bad = tmp_path / "raw" / "train" / "sushi" / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:200])
    (tmp_path / "raw" / "test" / "pizza" / "fake.png").write_text("not an image")
    with pytest.raises(DatasetError, match="2 unreadable image.*(broken.jpg.*fake.png|fake.png.*broken.jpg).*data.skip_corrupt: true"):
        run(tmp_path / "raw", tmp_path)


def test_missing_split_folder(tmp_path):
    (tmp_path / "raw" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="test is missing"):
        run(tmp_path / "raw", tmp_path)


def test_other_image_formats_are_found(tmp_path):
    write_dataset(tmp_path / "raw")
    Image.new("RGBA", (30, 30), (1, 2, 3, 4)).save(tmp_path / "raw" / "train" / "steak" / "x.PNG")
    assert run(tmp_path / "raw", tmp_path)["counts"]["train"]["steak"] == 5


def test_missing_transform_record(tmp_path):
    write_dataset(tmp_path / "raw")
    with pytest.raises(DatasetError, match="run `dvc repro pretrained`"):
        prepare(tmp_path / "raw", tmp_path / "spec.json", transform_path=tmp_path / "nope.json", batch_size=8, seed=7)


def test_prepare_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = "import sys, foodvision.prepare; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "prepare should start in well under a second"
