import json

import pytest
from conftest import make_image
from PIL import Image

from foodvision.images import open_rgb
from foodvision.predict import main, predict


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


def test_predict_stage_writes_titled_pngs_and_json(trained, tmp_path):
    own = tmp_path / "own.png"
    make_image("sushi", 5).convert("RGBA").save(own)
    results = predict(trained.model, trained.features, num_samples=2, images=(str(own),), seed=42, device="cpu",
                      out_dir=tmp_path / "predictions", json_out=tmp_path / "predictions.json")
    assert json.loads((tmp_path / "predictions.json").read_text()) == results
    assert [r["true"] is None for r in results] == [False, False, True]
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == sorted(r["plot"] for r in results)
    for r in results:
        assert r["pred"] in ("pizza", "steak", "sushi") and r["prob"] == max(r["probs"].values())
        assert abs(sum(r["probs"].values()) - 1) < 1e-4
    again = predict(trained.model, trained.features, num_samples=2, images=(), seed=42, device="cpu",
                    out_dir=tmp_path / "p2", json_out=tmp_path / "p2.json")
    assert [r["source"] for r in again] == [r["source"] for r in results[:2]], "the seed picks the samples"


def test_predict_fetches_image_urls(trained, tmp_path, served, server_url):
    make_image("steak", 9).save(served / "steak photo.jpg")
    (r,) = predict(trained.model, trained.features, num_samples=0, images=(f"{server_url}/steak%20photo.jpg",), seed=1,
                   device="cpu", out_dir=tmp_path / "p", json_out=tmp_path / "p.json")
    assert r["plot"] == "image_0_steak photo.png" and (tmp_path / "p" / r["plot"]).is_file()


def test_cli_prints_each_image_and_reports_bad_ones(trained, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    rc = main([str(good), str(tmp_path / "missing.jpg"), str(tmp_path), str(text), "--model", str(trained.model),
               "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.startswith(f"{good}\t") and out.count("\n") == 1
    assert len(err.strip().splitlines()) == 3 and "missing.jpg" in err and "notes.txt" in err


def test_cli_all_good_exits_zero_and_bad_model_is_clear(trained, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    assert main([str(good), "--model", str(trained.model)]) == 0
    assert main([str(good), "--model", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt not found" in capsys.readouterr().err


def test_predict_refuses_broken_or_foreign_checkpoints(trained, tmp_path, capsys):
    import torch

    from foodvision.model import ModelError

    broken = tmp_path / "model.pt"
    broken.write_bytes(trained.model.read_bytes()[:5000])
    with pytest.raises(ModelError, match="model.pt is not a readable PyTorch weights file"):
        predict(broken, trained.features, num_samples=1, images=(), seed=1, device="cpu", out_dir=tmp_path / "p",
                json_out=tmp_path / "p.json")
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.json").exists()
    foreign = torch.load(trained.model, weights_only=True)
    foreign["model_name"] = "resnet18"
    torch.save(foreign, broken)
    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    assert main([str(good), "--model", str(broken)]) == 2
    assert "does not match its own backbone 'resnet18'" in capsys.readouterr().err


def test_a_decompression_bomb_gets_one_line_and_the_other_photos_are_predicted(trained, tmp_path, capsys):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb, optimize=True)  # 200 megapixels in a few KB
    assert bomb.stat().st_size < 100_000
    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    assert main([str(bomb), str(good), "--model", str(trained.model), "--device", "cpu"]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"error: {bomb}: ") and "178,956,970-pixel limit" in err
    assert "decompression bomb" in err
    assert out.startswith(str(good))


def test_an_unknown_device_on_the_command_line_is_one_line(trained, tmp_path, capsys):
    good = tmp_path / "good.jpg"
    make_image("pizza", 1).save(good)
    assert main([str(good), "--model", str(trained.model), "--device", "tpu"]) == 2
    assert capsys.readouterr().err == "error: device 'tpu' is not one of auto, cpu, cuda, cuda:N, mps\n"


def test_credentials_in_an_image_url_stay_out_of_the_tracked_json(trained, tmp_path, served, server_url):
    make_image("sushi", 9).save(served / "dinner.png")
    url = server_url.replace("http://", "http://bob:pa55@") + "/dinner.png?token=abc123"
    results = predict(trained.model, trained.features, num_samples=0, images=(url,), seed=1, device="cpu",
                      out_dir=tmp_path / "predictions", json_out=tmp_path / "predictions.json")
    text = (tmp_path / "predictions.json").read_text()
    assert "pa55" not in text and "abc123" not in text
    assert results[0]["source"] == server_url.replace("http://", "http://bob:***@") + "/dinner.png?token=***"


def test_predict_refuses_a_model_trained_on_other_classes(trained, tmp_path):
    import torch

    from foodvision.errors import FoodVisionError

    ckpt = torch.load(trained.model, weights_only=True)
    ckpt["class_names"] = ["pizza", "steak", "ramen"]
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(FoodVisionError, match="was trained on other classes than .*index.json lists"):
        predict(tmp_path / "model.pt", trained.features, num_samples=1, images=(), seed=1, device="cpu",
                out_dir=tmp_path / "p", json_out=tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
