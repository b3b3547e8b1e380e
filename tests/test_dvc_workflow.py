"""The DVC workflow users live in, with the real `dvc` commands in a temp git repo on generated data:
experiments and their comparison, a queued sweep, push/pull through a remote, and the model artifact."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import kill_processes_in, make_image
from test_pipeline import copy_project, set_params, sh

from foodvision.model import load_checkpoint

# A stuck `dvc` (a queue worker that never exits) fails one test with pytest-timeout's message, not the run.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, server_url, dataset_zip, backbone_file) -> Path:
    """A committed project whose pipeline has run once (1 epoch), with a local-directory remote."""
    base = tmp_path_factory.mktemp("workflow")
    project = copy_project(base / "repo")
    make_image("sushi", 3).save(project / "own.png")
    set_params(project, data__url=f"{server_url}/{dataset_zip.name}", data__content_sha256=None,
               model__weights_url=f"{server_url}/{backbone_file.name}", train__epochs=1, train__batch_size=4,
               device="cpu", predict__num_samples=1, predict__images=["own.png"])
    sh(project, "git", "init", "-q", "-b", "main")
    sh(project, "dvc", "remote", "add", "-d", "store", str(base / "remote"))
    sh(project, "dvc", "repro")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "baseline")
    yield project
    kill_processes_in(project)  # whatever a failed test left behind: no worker outlives the module


def exp_rows(project: Path) -> list[dict]:
    """`dvc exp show --json` flattened to one dict per experiment: name, params, metrics."""
    rows = []
    for commit in json.loads(sh(project, "dvc", "exp", "show", "--json").stdout):
        for exp in [commit, *[e for group in commit.get("experiments") or [] for e in group["revs"]]]:
            data = exp.get("data") or {}
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
            rows.append({"name": exp.get("name") or exp.get("rev"), "params": params, "metrics": metrics,
                         "rev": exp.get("rev")})
    return rows


def test_experiment_runs_and_compares(repo):
    sh(repo, "dvc", "exp", "run", "--temp", "-n", "longer", "-S", "train.epochs=2", "-S", "model.dropout=0.3")
    (row,) = [r for r in exp_rows(repo) if r["name"] == "longer"]
    assert row["params"]["train"]["epochs"] == 2 and row["params"]["model"]["dropout"] == 0.3
    evaluation = row["metrics"]["metrics/eval.json"]
    assert {"accuracy", "loss", "macro_f1"} <= set(evaluation)
    train = row["metrics"]["metrics/train.json"]
    assert "train_loss" in train and "test_loss" not in train, "the test figures are evaluate's alone"

    exp_diff = json.loads(sh(repo, "dvc", "exp", "diff", "HEAD", "longer", "--json").stdout)
    assert exp_diff["params"]["params.yaml"]["train.epochs"]["new"] == 2
    assert "metrics/train.json" in exp_diff["metrics"]
    params = json.loads(sh(repo, "dvc", "params", "diff", "HEAD", "longer", "--json").stdout)["params.yaml"]
    assert (params["model.dropout"]["old"], params["model.dropout"]["new"]) == (0.2, 0.3)
    metrics = json.loads(sh(repo, "dvc", "metrics", "diff", "HEAD", "longer", "--json").stdout)
    assert metrics["metrics/train.json"]["epoch"] == {"old": 1, "new": 2, "diff": 1}

    plots = json.loads(sh(repo, "dvc", "plots", "diff", "HEAD", "longer", "--json").stdout)["data"]
    (loss,) = plots["Loss"]  # one chart per metric, both experiments overlaid on it
    assert loss["revisions"] == ["HEAD", "longer"]
    points = {(v["rev"], v["field"], v["epoch"]) for v in loss["content"]["data"]["values"]}
    assert points == {("HEAD", f, "1") for f in ("train_loss", "held_out_loss")} | {
        ("longer", f, e) for f in ("train_loss", "held_out_loss") for e in ("1", "2")}
    assert len(plots["Accuracy"]) == 1


def test_a_validated_fine_tune_is_one_experiment_that_reuses_the_features(repo):
    """The opt-in path from the shell: no featurize, no backbone export; metrics say val, plots still compare."""
    run = sh(repo, "dvc", "exp", "run", "--temp", "-n", "tuned", "-S", "data.val_fraction=0.34", "-S",
             "train.patience=1", "-S", "finetune.blocks=1", "-S", "finetune.epochs=1", "-S", "finetune.batch_size=4")
    assert "Stage 'featurize' didn't change, skipping" in run.stdout
    (row,) = [r for r in exp_rows(repo) if r["name"] == "tuned"]
    train = row["metrics"]["metrics/train.json"]
    assert {"val_loss", "val_acc", "best_epoch"} <= set(train) and "test_loss" not in train
    assert "metrics/export.json" not in row["metrics"], "the export check's figures are not metrics"
    check = json.loads(sh(repo, "git", "show", f"{row['rev']}:models/export_check.json").stdout)
    assert check["argmax_agreement"] == 1.0 and "fine-tuned" in check["torch_reference"]
    plots = json.loads(sh(repo, "dvc", "plots", "diff", "HEAD", "tuned", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    fields = {(v["rev"], v["field"]) for v in plots["data"]["Loss"][0]["content"]["data"]["values"]}
    assert fields == {(rev, f) for rev in ("HEAD", "tuned") for f in ("train_loss", "held_out_loss")}


def test_queued_sweep_runs_every_combination(repo, tmp_path):
    # up to `evaluate`, as docs/experiments.md suggests for sweeps: export and predict are not what is compared
    sh(repo, "dvc", "exp", "run", "--queue", "-S", "model.weights=null", "-S", "model.weights_url=null",
       "-S", "model.name=efficientnet_b0,mobilenet_v3_small", "-S", "train.lr=0.001,0.01", "evaluate")
    assert sh(repo, "dvc", "queue", "status").stdout.count("Queued") == 4
    try:
        # the workers are daemons: their output goes to a file, never to a pipe this test would wait on
        sh(repo, "dvc", "queue", "start", "--jobs", "2", log=tmp_path / "queue.log")
        deadline = time.monotonic() + 780  # under the module's 900 s timeout: a slow CPU needs minutes
        while time.monotonic() < deadline:
            status = sh(repo, "dvc", "queue", "status").stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(3)
    finally:
        sh(repo, "dvc", "queue", "stop", "--kill", check=False, timeout=60)
        kill_processes_in(repo)
    assert status.count("Success") == 4, status
    grid = {(r["params"]["model"]["name"], r["params"]["train"]["lr"]) for r in exp_rows(repo)
            if r["params"].get("model", {}).get("weights") is None and "metrics/eval.json" in r["metrics"]}
    assert grid == {("efficientnet_b0", 0.001), ("efficientnet_b0", 0.01),
                    ("mobilenet_v3_small", 0.001), ("mobilenet_v3_small", 0.01)}


def test_push_then_pull_in_a_fresh_clone_restores_everything(repo, tmp_path):
    sh(repo, "dvc", "push")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models/model.safetensors").exists()
    sh(clone, "dvc", "pull")
    for out in ("data/raw/dataset.zip", "models/pretrained/backbone.pth",
                "data/prepared/spec.json", "models/model.safetensors", "models/model.onnx", "plots/train/loss_curves.png",
                "plots/predictions/image_0_own.png"):
        assert (clone / out).exists(), out
    assert "up to date" in sh(clone, "dvc", "status").stdout
    assert "Running stage" not in sh(clone, "dvc", "repro").stdout


def test_model_artifact_of_a_revision_can_be_fetched(repo, tmp_path):
    sh(repo, "dvc", "push")
    # a registered version is a Git tag in the model registry's (GTO's) `name@vX.Y.Z` form
    sh(repo, "git", "tag", "-a", "foodvision-classifier@v1.0.0", "-m", "baseline model")
    sh(tmp_path, "dvc", "artifacts", "get", str(repo), "foodvision-classifier", "--rev", "v1.0.0", "-o", "fetched.safetensors")
    model, ckpt = load_checkpoint(tmp_path / "fetched.safetensors")
    assert ckpt["class_names"] == ["pizza", "steak", "sushi"]
    assert (tmp_path / "fetched.safetensors").read_bytes() == (repo / "models/model.safetensors").read_bytes()
    sh(tmp_path, "dvc", "get", str(repo), "models/model.safetensors", "--rev", "main", "-o", "via-get.safetensors")
    assert (tmp_path / "via-get.safetensors").read_bytes() == (repo / "models/model.safetensors").read_bytes()
    sh(repo, "git", "tag", "-a", "foodvision-classifier-onnx@v1.0.0", "-m", "its ONNX export")
    sh(tmp_path, "dvc", "artifacts", "get", str(repo), "foodvision-classifier-onnx", "--rev", "v1.0.0",
       "-o", "fetched.onnx")
    assert (tmp_path / "fetched.onnx").read_bytes() == (repo / "models/model.onnx").read_bytes()
