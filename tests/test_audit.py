"""The audit on stored features made to order: clusters per class, with labels flipped, copies, a leak and an
outlier planted where the test knows them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, stored

from foodvision.audit import Outputs, audit, confident_learning, stratified_folds
from foodvision.core.errors import DatasetError
from foodvision.features import FeatureIndex, NpyWriter, SplitIndex, write_index

CLASSES = ["pizza", "steak", "sushi"]
PER_CLASS = 40
FLIPPED = {5: 1, 47: 2, 90: 0}  # train row -> the wrong label it is given (its true class is row // 40)


def _rows(rng: np.random.Generator, n: int, cls: int, dim: int = 64) -> np.ndarray:
    """Rows around the class's own direction: as features of photos of one dish are, mostly alike."""
    centre = np.zeros(dim, dtype=np.float32)
    centre[cls * 8:(cls + 1) * 8] = 3.0
    return (centre + rng.normal(0, 1.0, size=(n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """A features folder, spec and dataset zip with known problems."""
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    train = np.concatenate([_rows(rng, PER_CLASS, c) for c in range(3)])
    labels = [i // PER_CLASS for i in range(len(train))]
    for row, wrong in FLIPPED.items():
        labels[row] = wrong
    train[10] = train[11]  # an exact copy (same bytes: same sha256 below)
    train[20] = train[21] * 1.02 + 0.01  # a near copy: the same photo re-encoded
    test = np.concatenate([_rows(rng, 10, c) for c in range(3)])
    test[0] = train[30] * 0.99  # a test photo that is also in train: a leak
    test[15] = -6.0  # nothing like any dish: an outlier
    test_labels = [i // 10 for i in range(len(test))]
    photos = root / "photos"
    paths = {"train": [f"train/{CLASSES[i // PER_CLASS]}/{i:03d}.jpg" for i in range(len(train))],
             "test": [f"test/{CLASSES[i // 10]}/{i:03d}.jpg" for i in range(len(test))]}
    for split in paths.values():
        for i, rel in enumerate(split):
            (photos / rel).parent.mkdir(parents=True, exist_ok=True)
            make_image(rel.split("/")[1], i, (24, 24)).save(photos / rel)
    raw = stored(photos, root / "raw.zip")
    features = root / "features"
    features.mkdir()
    for split, rows in (("train", train), ("test", test)):
        writer = NpyWriter(features / f"{split}.npy", len(rows), rows.shape[1])
        writer.write(rows)
        writer.close()
    write_index(features, FeatureIndex("efficientnet_b0", "classifier", 64, 0, CLASSES, str(raw), "fp32", "torch",
                                       {"train": SplitIndex(paths["train"], labels, [None] * len(train)),
                                        "test": SplitIndex(paths["test"], test_labels, [None] * len(test))}, []))
    sha = {p: f"{i:064x}" for i, p in enumerate(paths["train"] + paths["test"])}
    sha[paths["train"][10]] = sha[paths["train"][11]]
    spec = {"splits": {s: [{"path": p, "sha256": sha[p]} for p in paths[s]] for s in paths}}
    (root / "spec.json").write_text(json.dumps(spec))
    return {"root": root, "features": features, "spec": root / "spec.json", "paths": paths}


def run_audit(planted: dict, out: Path, **given) -> tuple[dict, list[dict]]:
    outputs = Outputs(out / "audit.json", out / "issues.csv", out / "labels.png", out / "pairs.png")
    metrics = audit(planted["features"], planted["spec"], outputs, **{"folds": 5, "near_duplicate": 0.95, "seed": 42,
                                                                      **given})
    return metrics, list(csv.DictReader(outputs.issues.open()))


@pytest.fixture(scope="module")
def audited(planted) -> tuple[dict, list[dict], Path]:
    """One audit of the planted data with the default params, shared by the tests that read it."""
    out = planted["root"] / "out"
    return (*run_audit(planted, out), out)


def test_flipped_labels_are_the_suspects_with_their_true_class_suggested(planted, audited):
    metrics, issues, _ = audited
    labels = [i for i in issues if i["issue"] == "label"]
    train = planted["paths"]["train"]
    found = {i["path"]: i["suggested"] for i in labels}
    assert found == {train[row]: CLASSES[row // PER_CLASS] for row in FLIPPED}, found
    scores = [float(i["score"]) for i in labels]
    assert scores == sorted(scores), "worst (lowest probability of the given label) first"
    assert metrics["label_issues"] == 3 and sum(metrics["label_issues_by_class"].values()) == 3


def test_copies_leaks_and_an_outlier_are_named_with_their_match(planted, audited):
    metrics, issues, _ = audited
    train, test = planted["paths"]["train"], planted["paths"]["test"]
    by_kind = {}
    for i in issues:
        by_kind.setdefault(i["issue"], []).append(i)
    assert [(i["path"], i["match"]) for i in by_kind["exact_duplicate"]] == [(train[10], train[11])]
    assert [(i["path"], i["match"]) for i in by_kind["near_duplicate"]] == [(train[20], train[21])]
    (leak,) = by_kind["leak"]
    assert (leak["path"], leak["match"]) == (test[0], train[30]), "a leak names the test image, then its copy"
    assert [i["path"] for i in by_kind["outlier"]] == [test[15]]
    assert (metrics["exact_duplicates"], metrics["near_duplicates"], metrics["leaks"], metrics["outliers"]) == (1, 1, 1, 1)
    kinds = [i["issue"] for i in issues]
    assert kinds[:3] == ["label"] * 3 and kinds[-1] == "outlier", "label errors first, then pairs, outliers last"
    pairs = [float(i["score"]) for i in issues if i["match"]]
    assert pairs == sorted(pairs, reverse=True), "the closest pair first"


def test_distinct_photos_of_one_dish_are_not_pairs(audited):
    """The threshold separates copies from look-alikes: the clusters are alike, their rows are not the same."""
    _, issues, _ = audited
    assert len([i for i in issues if i["match"]]) == 3, "only the planted copy, near copy and leak"


def test_the_audit_is_the_same_bytes_every_run(planted, audited, tmp_path):
    run_audit(planted, tmp_path)
    for name in ("audit.json", "issues.csv", "labels.png", "pairs.png"):
        assert (tmp_path / name).read_bytes() == (audited[2] / name).read_bytes(), name


def test_the_contact_sheets_are_pngs(audited):
    from PIL import Image

    for name in ("labels.png", "pairs.png"):
        with Image.open(audited[2] / name) as sheet:
            assert sheet.format == "PNG" and sheet.width >= 600


@pytest.mark.parametrize(("train", "said"), [(7, "make 3 folds of two or more, not audit.folds = 5"),
                                             (3, "make 1 folds of two or more, not audit.folds = 5; too few")])
def test_a_tiny_dataset_is_audited_with_the_folds_it_allows(tmp_path, capsys, train, said):
    """A toy dataset (a class subset of a test's 12 photos) is audited, not refused: fewer folds, and no label
    check below two; the pairs are still found."""
    features = tmp_path / "features"
    features.mkdir()
    rng = np.random.default_rng(3)
    rows = {"train": rng.normal(size=(train, 4)).astype(np.float32), "test": rng.normal(size=(2, 4)).astype(np.float32)}
    rows["test"][0] = rows["train"][0]  # a leak
    for split, block in rows.items():
        writer = NpyWriter(features / f"{split}.npy", len(block), 4)
        writer.write(block)
        writer.close()
    photos = tmp_path / "photos"
    paths = {"train": [f"train/pizza/{i}.jpg" for i in range(train)], "test": ["test/pizza/a.jpg", "test/pizza/b.jpg"]}
    for rel in paths["train"] + paths["test"]:
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        make_image("pizza", 1, (16, 16)).save(photos / rel)
    write_index(features, FeatureIndex("efficientnet_b0", "classifier", 4, 0, CLASSES, str(stored(photos, tmp_path / "r.zip")),
                                       "fp32", "torch",
                                       {"train": SplitIndex(paths["train"], [i % 3 for i in range(train)], [None] * train),
                                        "test": SplitIndex(paths["test"], [0, 1], [None] * 2)}, []))
    (tmp_path / "spec.json").write_text(json.dumps({"splits": {}}))
    outputs = Outputs(*(tmp_path / n for n in ("a.json", "i.csv", "l.png", "p.png")))
    metrics = audit(features, tmp_path / "spec.json", outputs, folds=5, near_duplicate=0.95, seed=0)
    assert said in capsys.readouterr().out
    assert metrics["leaks"] == 1 and all((tmp_path / n).exists() for n in ("a.json", "i.csv", "l.png", "p.png"))


def test_folds_spread_every_class_and_confident_learning_uses_per_class_thresholds():
    labels = np.array([0] * 10 + [1] * 3)
    fold = stratified_folds(labels, 3, seed=1)
    assert sorted(np.bincount(fold[labels == 0])) == [3, 3, 4] and sorted(np.bincount(fold[labels == 1])) == [1, 1, 1]
    # class 1's images get low probabilities everywhere (a hard class): its threshold is low, so a row labelled 0
    # whose class-1 probability reaches it is suspect, though 0.3 would fail any global cut of 0.5
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.75, 0.25], [0.7, 0.3]])
    suspect, suggested = confident_learning(probs, np.array([0, 0, 0, 1, 1]))
    assert suspect.tolist() == [False, False, True, False, False] and suggested[2] == 1


def test_evaluate_without_the_audits_list_is_one_line(tmp_path):
    """`python stages/evaluate.py` before `audit` ran (by hand, or a project from before the stage): no traceback."""
    from foodvision.audit import leaked_test_images

    with pytest.raises(DatasetError, match=r"issues.csv not found: run `dvc repro audit`"):
        leaked_test_images(tmp_path / "plots" / "audit" / "issues.csv")
