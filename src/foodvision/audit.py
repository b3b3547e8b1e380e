"""audit stage: what is likely wrong with the data, from the stored features alone.

- Label errors by confident learning (Northcutt, Jiang and Chuang, JAIR 2021) on out-of-sample
  probabilities: K heads, each trained on the other folds' stored train rows with train's own loop, predict
  their fold. Per-class thresholds (a class's mean probability on its own images), not one global cut.
- Exact duplicates by content (the sha256 `prepare` recorded), near-duplicates by the cosine similarity of
  two images' features: inside a split, and between test and train (leakage, which inflates test accuracy).
  A copy is close to one image; a photo of a dish that looks like many is close to many: a pair counts when
  its similarity reaches `audit.near_duplicate` and stands MARGIN above the image's 10 next-nearest (or
  reaches SURE, for a photo with several copies). Calibrated on real photos (benchmarks/audit.py): edited
  copies (re-encoded, halved, cropped by 10%, flipped) of the article's photos scored 0.857-0.99 with
  Lite0, while 60 look-alike daisies reached 0.87 with their nearest but not the margin.
- Outliers: images whose nearest neighbours in feature space are much farther than everyone else's.

Implemented here rather than taken from cleanlab, the reference for these checks, because cleanlab is
AGPL-3.0 and this project ships under MIT; `benchmarks/audit.py` measures the two side by side.
No image is decoded except the few on the contact sheets.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import heapq
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from foodvision.core.errors import DatasetError
from foodvision.core.files import write_csv, write_json
from foodvision.core.params import TrainParams
from foodvision.features import FeatureFile, FeatureIndex, load_index, open_split
from foodvision.spec import load_spec

# The audit's own head recipe (the article's): fixed, so a head-only experiment never reruns the audit. At least
# 300 steps: a small dataset's few steps per epoch would leave the heads unfit, and an unfit head doubts every
# label.
HEAD = TrainParams(epochs=5, batch_size=32, lr=0.001, augment=False, patience=0)
MIN_STEPS = 300
DROPOUT = 0.2
NEIGHBOURS = 10  # an image's outlier score: 1 - the mean similarity of its 10 nearest neighbours
MARGIN = 0.15  # a pair's similarity above the mean of the image's next 10 nearest: one match, not a crowd
SURE = 0.95  # a pair from here whatever the neighbourhood: a photo with several copies is close to all of them
OUTLIER_MADS = 6.0  # flagged: a score more than 6 median absolute deviations above the median
BLOCK = 2048  # rows per block of the all-pairs similarity: memory stays flat in N
SHEET = 12  # suspects on each contact sheet
ISSUE_FIELDS = ["issue", "path", "label", "suggested", "score", "match"]


@dataclass(frozen=True)
class Outputs:
    """Where `audit` writes (paths.audit_metrics, paths.audit_issues, paths.audit_labels, paths.audit_pairs)."""

    metrics: Path
    issues: Path
    label_sheet: Path
    pair_sheet: Path


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold, every class spread evenly over the folds in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        fold[rows] = (np.arange(len(rows)) + offset) % folds
        offset += len(rows)  # classes smaller than K do not all start in fold 0
    return fold


def out_of_sample(train: FeatureFile, n_classes: int, folds: int, seed: int) -> np.ndarray:
    """(N, C) probabilities of each train row from the head trained on the other folds (train's loop)."""
    import torch  # here, not at the top: evaluate reads the issue list through this module without torch

    from foodvision.fit import FeatureRows, fit_features
    from foodvision.head import new_head

    fold = stratified_folds(train.labels, folds, seed)
    probs = np.zeros((len(train), n_classes), dtype=np.float32)
    dev = torch.device("cpu")  # a head on stored rows: the CPU is as fast as any device for 1,280 x C
    for k in range(folds):
        held = np.flatnonzero(fold == k).tolist()
        rest = np.flatnonzero(fold != k).tolist()
        steps = -(-len(rest) // HEAD.batch_size)
        recipe = dataclasses.replace(HEAD, epochs=max(HEAD.epochs, -(-MIN_STEPS // steps)))
        torch.manual_seed(seed + k)
        net = new_head(train.cols, n_classes, DROPOUT)
        with contextlib.redirect_stdout(io.StringIO()):  # train's per-epoch lines would call the fold "test"
            history = fit_features(net, FeatureRows(train, rest), FeatureRows(train, held), recipe, seed + k, dev)
        net.eval()
        with torch.inference_mode():
            for start in range(0, len(held), 4096):
                rows = held[start:start + 4096]
                probs[rows] = torch.softmax(net(torch.from_numpy(train.take(rows))), dim=1).numpy()
        print(f"audit fold {k + 1}/{folds}: {recipe.epochs} epochs on {len(rest)} rows, accuracy on its "
              f"{len(held)} held-out rows {history[-1]['held_out_acc']:.3f}")
    return probs


def confident_learning(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confident learning's off-diagonal of the confident joint: a row is suspect when some other class's
    probability reaches that class's threshold (its mean probability on the rows labelled with it) and beats
    every other class that does. Returns (suspect mask, suggested label)."""
    n_classes = probs.shape[1]
    thresholds = np.array([probs[labels == c, c].mean() if (labels == c).any() else 1.0 for c in range(n_classes)])
    above = probs >= thresholds[None, :] - 1e-6
    candidate = np.where(above, probs, -1.0)
    suggested = candidate.argmax(axis=1)
    confident = above.any(axis=1)
    return confident & (suggested != labels), suggested


def _blocks(files: list[FeatureFile], first: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first row, file number, L2-normalised block) over the files as one sequence of rows, from the block
    that starts at row `first` (one this yields: the inner loop of `similar_pairs` reads nothing before it)."""
    start = 0
    for number, file in enumerate(files):
        skip = min(max(first - start, 0), len(file))
        start += skip
        for feats, _ in file.batches(BLOCK, skip):
            norms = np.linalg.norm(feats, axis=1, keepdims=True)
            yield start, number, feats / np.maximum(norms, 1e-12)
            start += len(feats)


def similar_pairs(files: list[FeatureFile], threshold: float) -> tuple[list[tuple[int, int, float]], np.ndarray]:
    """Each row's most similar other row in every file (cosine similarity) where it reaches `threshold`, as
    pairs (i < j, each once) where it also stands MARGIN above the row's next NEIGHBOURS nearest (or reaches
    SURE), and each row's mean similarity to its NEIGHBOURS nearest others.

    Blocked, two blocks of rows in memory at a time, and a few numbers kept per row: memory flat in N, and
    at most one pair per row and file however many copies a photo has."""
    total = sum(len(f) for f in files)
    k = min(NEIGHBOURS + 1, max(total - 1, 1))
    nearest = np.full((total, k), -1.0, dtype=np.float32)  # the k highest similarities of each row
    best_sim = np.full((len(files), total), -np.inf, dtype=np.float32)  # per file: each row's closest in it
    best_row = np.zeros((len(files), total), dtype=np.int64)
    for a0, a_file, a in _blocks(files):
        for b0, b_file, b in _blocks(files, a0):
            sims = a @ b.T
            if a0 == b0:
                np.fill_diagonal(sims, -np.inf)  # an image is not its own neighbour
            _keep_nearest(nearest, a0, sims)
            _keep_best(best_sim[b_file], best_row[b_file], a0, b0, sims)
            if b0 != a0:
                _keep_nearest(nearest, b0, sims.T)
                _keep_best(best_sim[a_file], best_row[a_file], b0, a0, sims.T)
    top = nearest.max(axis=1)
    crowd = (nearest.sum(axis=1) - top) / max(k - 1, 1)  # the next nearest after the closest
    pairs = {}
    for file in range(len(files)):
        sims = best_sim[file]
        for i in np.flatnonzero((sims >= threshold) & ((sims - crowd >= MARGIN) | (sims >= SURE))).tolist():
            j = int(best_row[file, i])
            pairs[(min(i, j), max(i, j))] = float(sims[i])
    mean_sim = (nearest.sum(axis=1) - nearest.min(axis=1)) / max(k - 1, 1) if total > 2 else \
        np.ones(total, dtype=np.float32)
    return [(i, j, sim) for (i, j), sim in sorted(pairs.items())], mean_sim


def _keep_best(best_sim: np.ndarray, best_row: np.ndarray, start: int, col_start: int, sims: np.ndarray) -> None:
    """Rows start.. keep their most similar column so far (the first one on a tie: the same in every run)."""
    cols = sims.argmax(axis=1)
    top = sims[np.arange(len(sims)), cols]
    rows = slice(start, start + len(sims))
    better = top > best_sim[rows]
    best_sim[rows] = np.where(better, top, best_sim[rows])
    best_row[rows] = np.where(better, cols + col_start, best_row[rows])


def _keep_nearest(nearest: np.ndarray, start: int, sims: np.ndarray) -> None:
    k = nearest.shape[1]
    rows = nearest[start:start + len(sims)]
    both = np.concatenate([rows, sims.astype(np.float32)], axis=1)
    top = np.partition(both, both.shape[1] - k, axis=1)[:, -k:] if both.shape[1] > k else both
    rows[:] = top


def outliers(scores: np.ndarray) -> np.ndarray:
    """Scores far above the rest: more than OUTLIER_MADS median absolute deviations above the median."""
    median = np.median(scores)
    mad = np.median(np.abs(scores - median))
    return scores > median + OUTLIER_MADS * max(mad, 1e-6)


def audit(features_dir: Path, spec_path: Path, out: Outputs, *, folds: int, near_duplicate: float,
          seed: int) -> dict[str, Any]:
    """Find the likely label errors, duplicates, leaks and outliers; write the metrics, the issue list (worst
    first) and the contact sheets."""
    index = load_index(features_dir)
    train, test = open_split(features_dir, index, "train"), open_split(features_dir, index, "test")
    paths = index.split("train").paths + index.split("test").paths
    labels = np.concatenate([train.labels, test.labels])
    n_train = len(train)
    usable = min(folds, n_train // 2)  # folds of two images or more
    if usable < folds:
        print(f"audit: {n_train} training images make {usable} folds of two or more, not audit.folds = {folds}"
              + ("; too few to check labels" if usable < 2 else ""))
    if usable >= 2:
        probs = out_of_sample(train, len(index.classes), usable, seed)
        suspect, suggested = confident_learning(probs, train.labels)
    else:
        probs = np.eye(len(index.classes), dtype=np.float32)[train.labels]
        suspect, suggested = np.zeros(n_train, dtype=bool), train.labels
    pairs, neighbour_sim = similar_pairs([train, test], near_duplicate)
    train.close()
    test.close()
    issues = _issues(index, paths, labels, n_train, probs, suspect, suggested, pairs, 1.0 - neighbour_sim,
                     _sha256s(spec_path))
    write_csv(out.issues, ISSUE_FIELDS, [[i[f] for f in ISSUE_FIELDS] for i in issues])
    metrics = _metrics(issues, index.classes, len(paths))
    write_json(out.metrics, metrics)
    _sheets(index, issues, out)
    print(f"audit: {metrics['label_issues']} likely label errors, {metrics['exact_duplicates']} exact and "
          f"{metrics['near_duplicates']} near duplicates, {metrics['leaks']} test images also in train, "
          f"{metrics['outliers']} outliers, of {len(paths)} images")
    return metrics


def _sha256s(spec_path: Path) -> dict[str, str]:
    spec = load_spec(spec_path)
    return {s["path"]: s.get("sha256", "") for split in spec["splits"].values() for s in split}


def _issues(index: FeatureIndex, paths: list[str], labels: np.ndarray, n_train: int, probs: np.ndarray,
            suspect: np.ndarray, suggested: np.ndarray, pairs: list[tuple[int, int, float]], outlier_scores: np.ndarray,
            sha256s: dict[str, str]) -> list[dict[str, Any]]:
    """One row per finding, each kind worst first: label errors by the given label's probability (lowest
    first), pairs by similarity, outliers by score."""
    classes = index.classes
    found: list[dict[str, Any]] = []
    for i in sorted(np.flatnonzero(suspect).tolist(), key=lambda i: probs[i, labels[i]]):
        found.append({"issue": "label", "path": paths[i], "label": classes[labels[i]],
                      "suggested": classes[suggested[i]], "score": round(float(probs[i, labels[i]]), 6), "match": ""})
    for i, j, sim in sorted(pairs, key=lambda p: -p[2]):
        same = sha256s.get(paths[i]) and sha256s.get(paths[i]) == sha256s.get(paths[j])
        kind = "leak" if (i < n_train) != (j < n_train) else "exact_duplicate" if same else "near_duplicate"
        first, second = (j, i) if kind == "leak" and j >= n_train else (i, j)  # a leak names the test image
        found.append({"issue": kind, "path": paths[first], "label": classes[labels[first]],
                      "suggested": classes[labels[second]], "score": round(min(sim, 1.0), 6), "match": paths[second]})
    flagged = np.flatnonzero(outliers(outlier_scores))
    for i in sorted(flagged.tolist(), key=lambda i: -outlier_scores[i]):
        found.append({"issue": "outlier", "path": paths[i], "label": classes[labels[i]], "suggested": "",
                      "score": round(float(outlier_scores[i]), 6), "match": ""})
    return found


def _metrics(issues: list[dict[str, Any]], classes: list[str], images: int) -> dict[str, Any]:
    def count(kind: str) -> int:
        return sum(i["issue"] == kind for i in issues)

    return {"label_issues": count("label"), "exact_duplicates": count("exact_duplicate"),
            "near_duplicates": count("near_duplicate"), "leaks": count("leak"), "outliers": count("outlier"),
            "images": images,
            "label_issues_by_class": {c: sum(i["issue"] == "label" and i["label"] == c for i in issues)
                                      for c in classes}}


def leaked_test_images(issues_csv: Path) -> set[str]:
    """The test images the audit found again in train (exactly or nearly): evaluate scores the rest apart."""
    try:
        with open(issues_csv, newline="", encoding="utf-8") as f:
            return {row["path"] for row in csv.DictReader(f) if row["issue"] == "leak"}
    except FileNotFoundError:
        raise DatasetError(f"{issues_csv} not found: run `dvc repro audit` (evaluate scores the test images the "
                           "audit found in train apart)") from None


def _sheets(index: FeatureIndex, issues: list[dict[str, Any]], out: Outputs) -> None:
    """The worst label suspects, and the closest pairs side by side, as contact sheets."""
    from foodvision.images import open_rgb
    from foodvision.plots import contact_sheet, tail
    from foodvision.store import ImageStore

    labels = [i for i in issues if i["issue"] == "label"][:SHEET]
    pairs = heapq.nlargest(SHEET // 2, (i for i in issues if i["match"]), key=lambda i: i["score"])
    locations = {path: split.location(row) for split in (index.split("train"), index.split("test"))
                 for row, path in enumerate(split.paths)}  # as featurize recorded them: no zip directory read
    store = ImageStore(Path(index.root))
    try:
        def photo(path: str) -> Any:
            return open_rgb(store.read_at(path, locations.get(path)))

        contact_sheet([photo(i["path"]) for i in labels],
                      [f"{i['label']}, likely {i['suggested']}\np({i['label']}) = {i['score']:.2f}\n{tail(i['path'])}"
                       for i in labels], [False] * len(labels), out.label_sheet,
                      "Likely label errors: given label, suggested label (worst first)")
        contact_sheet([photo(p) for i in pairs for p in (i["path"], i["match"])],
                      [f"{i['issue'].replace('_', ' ')} {i['score']:.3f}\n{tail(p)}" for i in pairs
                       for p in (i["path"], i["match"])], [True] * 2 * len(pairs), out.pair_sheet,
                      "Duplicates and leaks: each pair side by side (cosine similarity)", columns=2)
    finally:
        store.close()

