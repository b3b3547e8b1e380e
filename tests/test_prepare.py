import json
import shutil
from pathlib import Path

import pytest
from conftest import prepare_spec, stored, write_dataset
from PIL import Image

from foodvision.model import eval_transform
from foodvision.prepare import DatasetError
from foodvision.store import ImageStore


def run(raw: Path, tmp_path: Path, **kwargs) -> dict:
    """prepare on the folder `raw` as `download` stores it."""
    return prepare_spec(stored(raw, tmp_path / "raw.zip"), tmp_path / "spec.json", seed=7, **kwargs)


def test_spec_is_a_plain_index_of_classes_and_samples(tmp_path):
    write_dataset(tmp_path / "raw")
    spec = run(tmp_path / "raw", tmp_path)
    assert json.loads((tmp_path / "spec.json").read_text()) == spec
    assert spec["classes"] == ["pizza", "steak", "sushi"]
    assert spec["layout"] == "train/test"
    assert spec["counts"] == {"train": {"pizza": 4, "steak": 4, "sushi": 4}, "test": {"pizza": 2, "steak": 2, "sushi": 2}}
    first = spec["splits"]["test"][0]
    assert {k: first[k] for k in ("path", "label")} == {"path": "test/pizza/000.jpg", "label": 0}
    store = ImageStore(tmp_path / "raw.zip")  # where it lies in the zip: its bytes, read without the zip's directory
    assert store.read_at(first["path"], first["at"]).read() == (tmp_path / "raw" / first["path"]).read_bytes()
    assert spec["ignored_files"] == 1  # the .DS_Store
    assert not {"transform", "batch_size", "seed"} & set(spec), "what later stages choose is not in the index"


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
    (tmp_path / "raw" / "test" / "steak" / "notes.txt").write_text("no photos yet")
    with pytest.raises(DatasetError, match="no images for test/steak"):
        run(tmp_path / "raw", tmp_path)
    for split in ("train", "test"):
        for cls in ("steak", "sushi"):
            shutil.rmtree(tmp_path / "raw" / split / cls)
    with pytest.raises(DatasetError, match="has 1 class"):
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
    (tmp_path / "raw" / "train" / "a" / "x.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="holds 0 class folder.*no train/ and test/"):
        run(tmp_path / "raw", tmp_path)


def test_other_image_formats_are_found(tmp_path):
    write_dataset(tmp_path / "raw")
    Image.new("RGBA", (30, 30), (1, 2, 3, 4)).save(tmp_path / "raw" / "train" / "steak" / "x.PNG")
    assert run(tmp_path / "raw", tmp_path)["counts"]["train"]["steak"] == 5


def test_prepare_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = "import sys, foodvision.prepare; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "prepare should start in well under a second"


def write_food101(root: Path, classes=("apple_pie", "pizza", "steak", "sushi"), n_train=3, n_test=2) -> None:
    """Food-101's own layout: images/<class>/<id>.jpg, meta/{train,test}.txt of `<class>/<id>` lines."""
    from conftest import make_image

    (root / "meta").mkdir(parents=True)
    lines = {"train": [], "test": []}
    for c, cls in enumerate(classes):
        (root / "images" / cls).mkdir(parents=True)
        for i in range(n_train + n_test):
            make_image(("pizza", "steak", "sushi")[c % 3], 10 * c + i).save(root / "images" / cls / f"{100 + i}.jpg")
            lines["train" if i < n_train else "test"].append(f"{cls}/{100 + i}")
    for split, rows in lines.items():
        (root / "meta" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "README.txt").write_text("Food-101")


def test_food101_layout_under_its_top_folder_and_a_class_subset(tmp_path):
    write_food101(tmp_path / "raw" / "food-101")
    spec = run(tmp_path / "raw", tmp_path)
    assert spec["layout"] == "food-101" and spec["classes"] == ["apple_pie", "pizza", "steak", "sushi"]
    assert spec["counts"]["train"]["apple_pie"] == 3 and spec["counts"]["test"]["sushi"] == 2
    assert spec["splits"]["test"][0]["path"] == "food-101/images/apple_pie/103.jpg"
    assert spec["splits"]["test"][0]["label"] == 0
    subset = run(tmp_path / "raw", tmp_path, classes=("sushi", "pizza", "steak"))
    assert subset["classes"] == ["pizza", "steak", "sushi"]
    assert subset["counts"]["train"] == {"pizza": 3, "steak": 3, "sushi": 3}
    assert {s["label"] for s in subset["splits"]["train"]} == {0, 1, 2}
    with pytest.raises(DatasetError, match="data.classes names ramen, not in .*its classes are apple_pie, pizza"):
        run(tmp_path / "raw", tmp_path, classes=("pizza", "ramen"))


def test_food101_listing_naming_a_missing_image(tmp_path):
    write_food101(tmp_path / "raw")
    (tmp_path / "raw" / "images" / "pizza" / "100.jpg").unlink()
    with pytest.raises(DatasetError, match="1 unreadable image.*images/pizza/100.jpg"):
        run(tmp_path / "raw", tmp_path)


def test_plain_class_folders_are_split_stratified_and_seeded(tmp_path):
    from conftest import make_image

    for cls, n in (("pizza", 8), ("steak", 4), ("sushi", 5)):
        (tmp_path / "raw" / "photos" / cls).mkdir(parents=True)
        for i in range(n):
            make_image(cls, i).save(tmp_path / "raw" / "photos" / cls / f"{i}.jpg")
    spec = run(tmp_path / "raw", tmp_path, test_fraction=0.25)
    assert spec["layout"] == "class folders"
    assert spec["counts"] == {"train": {"pizza": 6, "steak": 3, "sushi": 4}, "test": {"pizza": 2, "steak": 1, "sushi": 1}}
    train = {s["path"] for s in spec["splits"]["train"]}
    test = {s["path"] for s in spec["splits"]["test"]}
    assert not train & test and len(train | test) == 17
    assert run(tmp_path / "raw", tmp_path, test_fraction=0.25) == spec, "same seed, same split"
    other = prepare_spec(tmp_path / "raw.zip", tmp_path / "other.json", seed=8, test_fraction=0.25)
    assert {s["path"] for s in other["splits"]["test"]} != test, "another seed, another split"
