import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image
from PIL import Image

from foodvision.images import open_rgb
from foodvision.predict import main, predict
from foodvision.store import ImageStore


def onnx(exported) -> Path:
    return exported[0] / "model.onnx"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_any_pillow_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / f"x_{mode.replace(';', '')}.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    make_image("sushi", 0).convert(mode).save(path)
    im = open_rgb(path)
    assert im.mode == "RGB" and im.size == (48, 40)


def test_exif_rotated_photo_is_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    make_image("pizza", 0, size=(60, 20)).save(path, exif=exif)
    assert open_rgb(path).size == (20, 60)


def test_predict_stage_writes_titled_pngs_and_json(trained, exported, tmp_path):
    own = tmp_path / "own.png"
    make_image("sushi", 5).convert("RGBA").save(own)
    results = predict(onnx(exported), trained.features, num_samples=2, images=(str(own),), seed=42,
                      out_dir=tmp_path / "predictions", json_out=tmp_path / "predictions.json",
                      photos_dir=tmp_path / "photos")
    assert json.loads((tmp_path / "predictions.json").read_text()) == results
    assert [r["true"] is None for r in results] == [False, False, True]
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == sorted(r["plot"] for r in results)
    for r in results[:2]:  # the test photos themselves, which foodvision-serve offers as examples
        assert Path(r["path"]).parent == tmp_path / "photos"
        assert Path(r["path"]).read_bytes() == ImageStore(trained.raw).read(r["source"])
    for r in results:
        assert r["pred"] in ("pizza", "steak", "sushi") and r["prob"] == max(r["probs"].values())
        assert abs(sum(r["probs"].values()) - 1) < 1e-4
    again = predict(onnx(exported), trained.features, num_samples=2, images=(), seed=42,
                    out_dir=tmp_path / "p2", json_out=tmp_path / "p2.json", photos_dir=tmp_path / "ph2")
    assert [r["source"] for r in again] == [r["source"] for r in results[:2]], "the seed picks the samples"


def test_predict_fetches_image_urls(trained, exported, tmp_path, served, server_url):
    make_image("steak", 9).save(served / "steak photo.jpg")
    (r,) = predict(onnx(exported), trained.features, num_samples=0, images=(f"{server_url}/steak%20photo.jpg",), seed=1,
                   out_dir=tmp_path / "p", json_out=tmp_path / "p.json", photos_dir=tmp_path / "ph")
    assert r["plot"] == "image_0_steak photo.png" and (tmp_path / "p" / r["plot"]).is_file()


def test_cli_prints_each_image_and_reports_bad_ones(trained, exported, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main([str(good), str(tmp_path / "missing.jpg"), str(empty), str(text), "--model", str(onnx(exported))])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.startswith(f"{good}\t") and out.count("\n") == 1
    assert len(err.strip().splitlines()) == 3 and "missing.jpg" in err and "notes.txt" in err
    assert f"error: {empty}: a folder with no photos in it" in err


def test_a_folder_is_every_photo_below_it_with_the_top_k_in_csv_or_json(trained, exported, tmp_path, capsys):
    """As fastai's and Ultralytics' users expect: a folder (recursively, hidden files left out), the K most
    likely classes per photo, and a file to open in a spreadsheet or a script; a bad photo is a row with its
    error, and the exit code says some failed."""
    import csv
    import json

    photos = tmp_path / "photos"
    for rel, cls in (("a/1.jpg", "pizza"), ("a/b/2.png", "sushi"), ("3.JPG", "steak")):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        make_image(cls, 5).save(photos / rel, format="PNG" if rel.endswith("png") else "JPEG")
    (photos / ".hidden").mkdir()
    make_image("pizza", 6).save(photos / ".hidden" / "x.jpg")
    (photos / "._3.jpg").write_bytes(b"\0\0macOS metadata")
    (photos / "notes.txt").write_text("not a photo")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    model = str(onnx(exported))
    rc = main([str(photos), "--model", model, "--top", "2", "--output", str(tmp_path / "out.csv")])
    out, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1 and "broken.jpg" in err
    names = [line.split("\t")[0] for line in out.splitlines()]
    assert names == [str(photos / n) for n in ("3.JPG", "a/1.jpg", "a/b/2.png")]
    assert all(len(line.split("\t")) == 5 for line in out.splitlines()), "path, then 2 x (class, probability)"
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert list(rows[0]) == ["path", "class_1", "probability_1", "class_2", "probability_2", "error"]
    assert [r["path"] for r in rows] == [str(photos / n) for n in ("3.JPG", "a/1.jpg", "a/b/2.png", "broken.jpg")]
    good = rows[0]
    assert float(good["probability_1"]) >= float(good["probability_2"]) and good["class_1"] != good["class_2"]
    assert rows[-1]["class_1"] == "" and rows[-1]["error"]

    assert main([str(photos / "a"), "--model", model, "--top", "9", "--output", str(tmp_path / "out.json")]) == 0
    results = json.loads((tmp_path / "out.json").read_text())
    assert [r["path"] for r in results] == [str(photos / "a/1.jpg"), str(photos / "a/b/2.png")]
    assert [t["class"] for t in results[0]["top"]] == sorted(("pizza", "steak", "sushi"),
                                                              key=lambda c: -dict(
                                                                  (t["class"], t["probability"])
                                                                  for t in results[0]["top"])[c])
    assert len(results[0]["top"]) == 3 and abs(sum(t["probability"] for t in results[0]["top"]) - 1) < 1e-4


def test_cli_all_good_exits_zero_and_bad_model_is_clear(trained, exported, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    assert main([str(good), "--model", str(onnx(exported))]) == 0
    assert main([str(good), "--model", str(tmp_path / "nope.onnx")]) == 2
    assert "nope.onnx not found: run `dvc repro export`" in capsys.readouterr().err


def test_the_command_finds_the_model_params_yaml_names(trained, exported, tmp_path, monkeypatch, capsys):
    """Inside a project, the default model is paths.onnx of its dvc.yaml (a moved model is still found);
    outside one, no guess: one line asking for --model."""
    from conftest import default_params_text, write_pipeline

    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    project = tmp_path / "project"
    (project / "elsewhere").mkdir(parents=True)
    shutil.copy(onnx(exported), project / "elsewhere" / "classifier.onnx")
    (project / "params.yaml").write_text(default_params_text())
    write_pipeline(project, onnx="elsewhere/classifier.onnx")
    monkeypatch.chdir(project)
    assert main([str(good)]) == 0
    assert capsys.readouterr().out.startswith(f"{good}\t")
    monkeypatch.chdir(tmp_path)
    assert main([str(good)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: no dvc.yaml in {tmp_path}: run inside the project, or give "
                                                "--model MODEL.onnx")


def test_predict_refuses_broken_or_foreign_model_files(trained, exported, tmp_path, capsys):
    from foodvision.core.errors import FoodVisionError

    broken = tmp_path / "model.onnx"
    broken.write_bytes(onnx(exported).read_bytes()[:5000])
    with pytest.raises(FoodVisionError, match=r"model.onnx is not a FoodVision ONNX export \(.*\); run `dvc repro export`"):
        predict(broken, trained.features, num_samples=1, images=(), seed=1, out_dir=tmp_path / "p",
                json_out=tmp_path / "p.json",
                photos_dir=tmp_path / "photos")
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.json").exists()
    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    backbone_only = exported[0] / "backbone.onnx"  # ONNX, but without our classes and transform
    assert main([str(good), "--model", str(backbone_only)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "backbone.onnx is not a FoodVision ONNX export" in err


def test_a_decompression_bomb_gets_one_line_and_the_other_photos_are_predicted(trained, exported, tmp_path, capsys):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb, optimize=True)  # 200 megapixels in a few KB
    assert bomb.stat().st_size < 100_000
    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    assert main([str(bomb), str(good), "--model", str(onnx(exported))]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"error: {bomb}: ") and "178,956,970-pixel limit" in err
    assert "decompression bomb" in err
    assert out.startswith(str(good))


def test_the_stage_and_the_command_import_neither_torch_nor_torchvision():
    """Every experiment pays predict's imports: the exported model needs ONNX Runtime, Pillow and numpy."""
    import subprocess
    import sys

    code = "import sys, foodvision.predict; sys.exit('torch' in sys.modules or 'torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_credentials_in_an_image_url_stay_out_of_the_tracked_json(trained, exported, tmp_path, served, server_url):
    make_image("sushi", 9).save(served / "dinner.png")
    url = server_url.replace("http://", "http://bob:pa55@") + "/dinner.png?token=abc123"
    results = predict(onnx(exported), trained.features, num_samples=0, images=(url,), seed=1,
                      out_dir=tmp_path / "predictions", json_out=tmp_path / "predictions.json",
                photos_dir=tmp_path / "photos")
    text = (tmp_path / "predictions.json").read_text()
    assert "pa55" not in text and "abc123" not in text
    assert results[0]["source"] == server_url.replace("http://", "http://bob:***@") + "/dinner.png?token=***"


def test_predict_refuses_a_model_trained_on_other_classes(trained, exported, tmp_path):
    import json as js

    from foodvision.core.errors import FoodVisionError

    features = tmp_path / "features"
    features.mkdir()
    index = js.loads((trained.features / "index.json").read_text())
    index["classes"] = ["pizza", "steak", "ramen"]
    (features / "index.json").write_text(js.dumps(index))
    with pytest.raises(FoodVisionError, match="was trained on other classes than .*index.json lists"):
        predict(onnx(exported), features, num_samples=1, images=(), seed=1,
                out_dir=tmp_path / "p", json_out=tmp_path / "p.json",
                photos_dir=tmp_path / "photos")
    assert not (tmp_path / "p.json").exists()


def test_the_stage_gives_the_torch_models_probabilities(trained, exported, tmp_path):
    """ONNX Runtime on the export against the trained checkpoint in torch, on a photo decoded at reduced scale."""
    import torch

    from foodvision.data import build_transform
    from foodvision.images import open_photo
    from foodvision.model import load_checkpoint

    photo = tmp_path / "big.jpg"
    make_image("sushi", 3, size=(1600, 1200)).save(photo)
    (result,) = predict(onnx(exported), trained.features, num_samples=0, images=(str(photo),), seed=1,
                        out_dir=tmp_path / "p", json_out=tmp_path / "p.json",
                photos_dir=tmp_path / "photos")
    model, ckpt = load_checkpoint(trained.model)
    with torch.inference_mode():
        x = build_transform(ckpt["transform"])(open_photo(photo, ckpt["transform"])).unsqueeze(0)
        probs = torch.softmax(model(x), dim=1)[0]
    for cls, p in zip(ckpt["class_names"], probs.tolist()):
        assert abs(result["probs"][cls] - p) < 1e-4, cls


def test_the_command_reads_an_iphone_heic_photo(exported, tmp_path, capsys):
    """pillow-heif encodes a real HEIC here; `foodvision-predict` (and the stage, which decodes alike) reads it."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    photo = tmp_path / "IMG_0001.HEIC"
    make_image("sushi", 2, (400, 300)).save(photo, "HEIF", quality=90)
    assert photo.read_bytes()[4:8] == b"ftyp"
    assert main([str(photo), "--model", str(onnx(exported))]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{photo}\t") and line.split("\t")[1] in ("pizza", "steak", "sushi")


def test_transparent_pixels_decode_onto_white():
    """RGBA, LA and palette transparency are composited onto white (not black), without a second RGBA copy."""
    import io

    import numpy as np

    rgba = Image.new("RGBA", (4, 1))
    rgba.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (0, 0, 255, 128), (0, 0, 0, 255)])
    palette = rgba.convert("RGB").convert("P")
    palette.info["transparency"] = palette.getpixel((1, 0))
    for image in (rgba, rgba.convert("LA"), palette):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        pixels = np.asarray(open_rgb(io.BytesIO(buffer.getvalue())))
        assert pixels.shape == (1, 4, 3) and pixels[0, 1].tolist() == [255, 255, 255], image.mode
    assert np.asarray(open_rgb(io.BytesIO(_png(rgba))))[0].tolist() == [[255, 0, 0], [255, 255, 255],
                                                                        [127, 127, 255], [0, 0, 0]]


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_predict_and_exports_sample_read_test_images_where_prepare_found_them(trained, exported, tmp_path):
    """Neither parses the dataset zip's whole directory (a cost that grows with the dataset): with the directory
    gone, both still read their test images, by the locations in the features index."""
    from foodvision.export import export

    data = trained.raw.read_bytes()
    directory = data.index(b"PK\x01\x02")
    raw = tmp_path / "dataset.zip"
    raw.write_bytes(data[:directory] + b"\0" * (len(data) - directory))
    features = tmp_path / "features"
    shutil.copytree(trained.features, features)
    index = json.loads((features / "index.json").read_text())
    assert len(index["splits"]["test"]["at"]) == len(index["splits"]["test"]["paths"])
    (features / "index.json").write_text(json.dumps({**index, "root": raw.as_posix()}))
    results = predict(onnx(exported), features, num_samples=3, images=(), seed=1, out_dir=tmp_path / "out",
                      json_out=tmp_path / "out.json", photos_dir=tmp_path / "photos")
    for r in results:
        assert Path(r["path"]).read_bytes() == ImageStore(trained.raw).read(r["source"])
    out = exported[0]
    figures = export(trained.model, features, out / "backbone.onnx", out / "check", onnx_out=tmp_path / "model.onnx",
                     metrics_out=tmp_path / "export.json")
    assert figures["sample_images"] > 0 and figures["sample_argmax_agreement"] == 1.0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_or_a_device_is_one_line_and_the_other_photos_run(trained, exported, tmp_path):
    """Opening a FIFO for reading waits for a writer, forever: it is refused from the file system's word,
    before anything opens it (a hang would fail this test at its timeout, not the run)."""
    good = tmp_path / "ok.jpg"
    make_image("pizza", 1).save(good)
    fifo = tmp_path / "f.jpg"
    os.mkfifo(fifo)
    run = subprocess.run([sys.executable, "-m", "foodvision.predict", str(fifo), "/dev/null", str(good), "--model",
                          str(onnx(exported))], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stdout.startswith(f"{good}\t") and run.stdout.count("\n") == 1
    errors = run.stderr.strip().splitlines()
    assert len(errors) == 2 and "is a named pipe (FIFO), not a file" in errors[0]
    assert "/dev/null is a character device, not a file" in errors[1]
