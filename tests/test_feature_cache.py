"""featurize's cache: a changed dataset computes only the images the cache lacks, and the files are the same
bytes as a run without it; a damaged entry is reported and recomputed, never used."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, prepare_spec, stored

from foodvision.feature_cache import FeatureCache, evict, recipe_digest
from foodvision.featurize import Cache, featurize

RECIPE = recipe_digest({"test": 1})
COLS = 8


def _rows(n: int, seed: int = 0) -> tuple[list[bytes], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [bytes([seed]) + rng.bytes(31) for _ in range(n)], rng.standard_normal((n, COLS)).astype(np.float32)


def _fill(root: Path, keys: list[bytes], rows: np.ndarray) -> Path:
    writer = FeatureCache(root, RECIPE, COLS).writer()
    writer.add(keys, rows)
    writer.close()
    return next((root / RECIPE).glob("*.shard")) if len(list((root / RECIPE).glob("*.shard"))) == 1 else root


def test_rows_come_back_as_stored(tmp_path):
    keys, rows = _rows(10)
    _fill(tmp_path, keys, rows)
    cache = FeatureCache(tmp_path, RECIPE, COLS)
    found = cache.find([keys[3], b"\0" * 32, keys[7]])
    assert found.hits == 2 and found.where[1] is None and not found.damaged
    assert np.array_equal(cache.rows([found.where[0], found.where[2]]), rows[[3, 7]])


@pytest.mark.parametrize("damage", ["flipped bit", "other key", "truncated", "other width", "other recipe"])
def test_a_damaged_entry_is_reported_and_never_used(tmp_path, damage):
    keys, rows = _rows(10)
    shard = _fill(tmp_path, keys, rows)
    data = bytearray(shard.read_bytes())
    cols, expect = COLS, "its digest does not match"
    if damage == "flipped bit":
        data[-5] ^= 0x10  # inside the last row
    elif damage == "other key":
        data[48 + 32 * 9:48 + 32 * 10] = keys[0]  # the last row now claims to be the first image's
    elif damage == "truncated":
        del data[-100:]
        expect = "truncated"
    elif damage == "other width":
        cols, expect = COLS + 1, f"rows of {COLS} values, not {COLS + 1}"
    shard.write_bytes(bytes(data))
    recipe = RECIPE
    if damage == "other recipe":
        recipe = recipe_digest({"test": 2})
        (tmp_path / recipe).mkdir()
        shard.rename(tmp_path / recipe / shard.name)
        expect = "another recipe's shard"
    found = FeatureCache(tmp_path, recipe, cols).find(keys)
    assert len(found.damaged) == 1 and expect in found.damaged[0], found.damaged
    if damage == "flipped bit":
        assert found.where[9] is None and found.hits == 9, "only the damaged row is recomputed"
    elif damage == "other key":
        assert found.where[0] is None and found.where[9] is None and found.hits == 8
    else:
        assert found.hits == 0 and not list((tmp_path / recipe).glob("*.shard")), "the bad shard is gone"


def test_the_least_recently_used_shards_go_first(tmp_path):
    for seed in range(3):
        _fill(tmp_path, *_rows(100, seed))
    shards = sorted((tmp_path / RECIPE).glob("*.shard"), key=lambda p: p.read_bytes()[48])  # by the first key's seed
    for age, shard in zip((300, 200, 100), shards, strict=True):
        os.utime(shard, (time.time() - age, time.time() - age))
    FeatureCache(tmp_path, RECIPE, COLS).find(_rows(1, 0)[0])  # the oldest is used now
    size = shards[0].stat().st_size
    removed = evict(tmp_path, 2 * size)
    assert removed == [shards[1]], "the one unused longest goes; the one just used stays"


def _write_many(root: str, seed: int) -> None:
    for _ in range(20):
        writer = FeatureCache(Path(root), RECIPE, COLS).writer()
        writer.add(*_rows(50, seed))
        writer.close()


def test_two_writers_at_once_neither_corrupt_nor_block(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(tmp_path), seed)) for seed in (1, 2)]
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):  # a reader meanwhile only ever sees whole shards
        assert not FeatureCache(tmp_path, RECIPE, COLS).find(_rows(50, 1)[0]).damaged
    assert all(w.exitcode == 0 for w in writers)
    cache = FeatureCache(tmp_path, RECIPE, COLS)
    for seed in (1, 2):
        keys, rows = _rows(50, seed)
        found = cache.find(keys)
        assert found.hits == 50 and not found.damaged
        assert np.array_equal(cache.rows(found.where), rows)


# The stage: incremental runs against cold ones on the same final dataset.

def _photos(folder: Path, per_class: int = 8) -> Path:
    for c, cls in enumerate(("pizza", "steak", "sushi")):
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            make_image(cls, seed=100 * c + i, size=(60 + i, 50)).save(folder / cls / f"{i:02d}.jpg", quality=90)
    return folder


def _run(trained, photos: Path, out: Path, cache: Path | None, pretrained: Path | None = None, engine: str = "torch",
         check: bool = False, **split) -> tuple[dict[str, bytes], dict]:
    """featurize in `out` on `photos`, paths relative to it as in a project (the index names the dataset zip as
    the spec does); returns the files that must match a cold run's, and how many rows were cached or computed."""
    out.mkdir(parents=True)
    here = Path.cwd()
    os.chdir(out)
    try:
        prepare_spec(stored(photos, Path("raw.zip")), Path("spec.json"), **split)
        featurize(Path("spec.json"), pretrained or trained.pretrained, trained.transform, Path("features"),
                  model_name="efficientnet_b0", batch_size=4, device="cpu", skip_corrupt=False,
                  summary_out=Path("summary.txt"), precision="fp32", engine=engine,
                  onnx_out=Path("backbone.onnx") if check else None, check_dir=Path("check") if check else None,
                  cache=Cache(cache, 2**30) if cache is not None else None, rows_out=Path("rows.json"))
    finally:
        os.chdir(here)
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.parts[len(out.parts)] in ("features", "check", "backbone.onnx")}
    return files, json.loads((out / "rows.json").read_text())


def _edit(base: Path, dest: Path, how: str) -> Path:
    shutil.copytree(base, dest)
    if how == "add":
        make_image("steak", seed=999, size=(70, 55)).save(dest / "steak" / "new.jpg", quality=90)
    elif how == "remove":
        (dest / "sushi" / "03.jpg").unlink()
    elif how == "relabel":
        (dest / "pizza" / "05.jpg").rename(dest / "sushi" / "moved.jpg")
    return dest


@pytest.fixture(scope="module")
def warm(trained, tmp_path_factory):
    """A cache that has seen the base dataset once, and that dataset's photos."""
    work = tmp_path_factory.mktemp("cache")
    base = _photos(work / "base")
    _run(trained, base, work / "first", work / "cache")
    return work, base


@pytest.mark.parametrize(("how", "split", "computed"), [
    ("add", {}, 1), ("remove", {}, 0), ("relabel", {}, 0), ("same", {"seed": 7, "test_fraction": 0.5}, 0),
    ("same", {"classes": ("pizza", "sushi")}, 0)],
    ids=["add a photo", "remove a photo", "relabel a photo", "re-split", "class subset"])
def test_a_changed_dataset_computes_only_what_changed_and_gives_the_cold_runs_bytes(trained, warm, tmp_path, how,
                                                                                   split, computed):
    work, base = warm
    cache = tmp_path / "cache"
    shutil.copytree(work / "cache", cache)  # each case starts from the cache the base dataset left
    photos = _edit(base, tmp_path / "photos", how)
    incremental, rows = _run(trained, photos, tmp_path / "incremental", cache, **split)
    cold, cold_rows = _run(trained, photos, tmp_path / "cold", None, **split)
    assert incremental == cold, "byte for byte the files of a run without the cache"
    assert sum(r["computed"] for r in rows.values()) == computed
    assert sum(r["cached"] for r in rows.values()) == sum(r["computed"] for r in cold_rows.values()) - computed


def test_switching_back_to_an_earlier_backbone_computes_nothing(trained, warm, tmp_path):
    work, base = warm
    cache = tmp_path / "cache"
    shutil.copytree(work / "cache", cache)
    state = torch.load(trained.pretrained, weights_only=True)
    other = tmp_path / "other.pth"
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, other)
    other_files, other_rows = _run(trained, base, tmp_path / "other", cache, pretrained=other)
    assert sum(r["cached"] for r in other_rows.values()) == 0, "other weights: nothing of theirs was cached"
    back, rows = _run(trained, base, tmp_path / "back", cache)
    assert sum(r["computed"] for r in rows.values()) == 0
    assert back["features/test.npy"] != other_files["features/test.npy"]
    assert back == _run(trained, base, tmp_path / "cold", None)[0]


def test_the_backbone_check_reuses_the_graph_and_rows_and_stays_strict(trained, tmp_path, capsys):
    """On ONNX Runtime with its check: a second dataset that adds one photo exports nothing, runs ONNX Runtime on
    that photo only and torch on the test images it had not seen (the re-split moves some); the check folder and
    graph are the same bytes as a run without the cache."""
    base = _photos(tmp_path / "base")
    _run(trained, base, tmp_path / "first", tmp_path / "cache", engine="auto", check=True)
    assert "exported the efficientnet_b0 backbone" in capsys.readouterr().out
    photos = _edit(base, tmp_path / "photos", "add")
    incremental, rows = _run(trained, photos, tmp_path / "incremental", tmp_path / "cache", engine="auto", check=True)
    out = capsys.readouterr().out
    assert "ONNX graph from the cache" in out and "exported" not in out
    test_paths = [{s["path"] for s in json.loads((tmp_path / run / "spec.json").read_text())["splits"]["test"]}
                  for run in ("first", "incremental")]
    assert rows["train"]["computed"] + rows["test"]["computed"] == 1, "the new photo, on ONNX Runtime"
    assert rows["check torch"]["computed"] == len(test_paths[1] - test_paths[0]), "torch: only new test images"
    assert rows["check torch"]["computed"] < len(test_paths[1])
    cold, _ = _run(trained, photos, tmp_path / "cold", None, engine="auto", check=True)
    assert incremental == cold
    assert json.loads(incremental["check/check.json"])["backbone_max_abs_diff"] <= 1e-4
