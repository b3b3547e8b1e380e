"""The docs run as written: every ```bash block of the README and docs/*.md, in page order, in a fresh project
on the synthetic dataset.

A block is marked on the line before its fence (an HTML comment, invisible on GitHub):

    <!-- docs-test: from clone -->        a sequence starts here, from the state it names
    <!-- docs-test: skip: needs a GPU --> not run, for that reason (the internet, a GPU, the setup itself, ...)

Unmarked blocks continue the sequence before them on their page; the first block a page runs must state
its state. States: `clone`, the project as a fresh clone has it (nothing run); `run`, the same after
`dvc repro`, committed. The project's params are the committed ones with the synthetic data's URLs
(the loopback server stands in for the internet); placeholders the docs use for the user's own files
(`/path/to/...`, `<repo-url>`, ...) become the test's files. The default backbone's weights come from
`model.weights_url` here, the stand-in for torchvision's URL: a switch to Lite0, whose weights come with
the setup, clears it, as a user's project (where it is null) needs not.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, kill_processes_in, make_image
from test_pipeline import copy_project, set_params, sh, sh_env

from foodvision.model import load_checkpoint

pytestmark = pytest.mark.timeout(900)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*docs-test:\s*(skip|from)\b:?\s*(.*?)\s*-->\s*$")
STATES = ("clone", "run")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the fence
    text: str
    skip: str | None  # the reason
    state: str | None  # where a sequence starts


def bash_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            end = lines.index("```", i + 1)
            mark = MARK.match(lines[i - 1].strip()) if i else None
            kind, value = (mark.group(1), mark.group(2)) if mark else (None, None)
            found.append(Block(page, i + 1, "\n".join(lines[i + 1:end]), value if kind == "skip" else None,
                               value if kind == "from" else None))
            i = end
        i += 1
    return found


def sequences() -> list[list[Block]]:
    """Each page's runnable blocks, cut where a block states where it starts from."""
    found = []
    for page in PAGES:
        for block in bash_blocks(page):
            if block.skip is not None:
                continue
            if block.state is not None or not found or found[-1][0].page != page:
                found.append([])
            found[-1].append(block)
    return found


def where(block: Block) -> str:
    return f"{block.page.relative_to(ROOT)}:{block.line}"


def test_every_block_is_run_or_skipped_for_a_reason():
    """A marked skip names why; a sequence names its starting state; no mark is misspelled."""
    problems = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, start=1):
            if line.lstrip().startswith("<!--") and "docs-test" in line and not MARK.match(line.strip()):
                problems.append(f"{page.relative_to(ROOT)}:{n}: not a docs-test mark: {line.strip()}")
        for block in bash_blocks(page):
            if block.skip == "":
                problems.append(f"{where(block)}: skipped without a reason")
            if block.state is not None and block.state not in STATES:
                problems.append(f"{where(block)}: unknown state {block.state!r} (one of {', '.join(STATES)})")
    for sequence in sequences():
        if sequence[0].state is None:
            problems.append(f"{where(sequence[0])}: the first block a page runs must say where it starts from "
                            "(<!-- docs-test: from clone|run -->)")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def states(tmp_path_factory, server_url, served, dataset_zip, backbone_file) -> dict[str, Path]:
    """The two starting states, built once; each sequence runs in its own copy."""
    base = tmp_path_factory.mktemp("docs_states")
    make_image("sushi", 3).save(served / "sushi.jpg")
    clone = copy_project(base / "clone")
    set_params(clone, data__url=f"{server_url}/{dataset_zip.name}", data__content_sha256=None,
               model__weights_url=f"{server_url}/{backbone_file.name}", train__batch_size=4, device="cpu",
               predict__num_samples=1, predict__images=[f"{server_url}/sushi.jpg"])
    sh(clone, "git", "init", "-q", "-b", "main")
    sh(clone, "git", "add", "-A")
    sh(clone, "git", "commit", "-qm", "a fresh clone")
    run = base / "run"
    shutil.copytree(clone, run, symlinks=True)
    sh(run, "dvc", "repro")
    sh(run, "git", "add", "-A")
    sh(run, "git", "commit", "-qm", "dvc repro")
    yield {"clone": clone, "run": run}
    kill_processes_in(base)


def placeholders(tmp: Path, project: Path, server_url: str, dataset_zip: Path, backbone_file: Path) -> dict[str, str]:
    """What the docs write for the user's own files and places, as this test has them."""
    photo = tmp / "photo.jpg"
    make_image("pizza", 4).save(photo)
    make_image("sushi", 5).save(tmp / "sushi.jpg")
    (tmp / "photos" / "dinner").mkdir(parents=True)
    make_image("steak", 6).save(tmp / "photos" / "dinner" / "steak.png")
    return {
        "/path/to/pizza_steak_sushi.zip": str(dataset_zip), "/mnt/mirror/pizza_steak_sushi.zip": str(dataset_zip),
        "/mnt/mirror/efficientnet_b0_rwightman-7f5810bc.pth": str(backbone_file),
        "/path/to/sushi.jpg": str(tmp / "sushi.jpg"), "/mnt/mirror/sushi.jpg": str(tmp / "sushi.jpg"),
        "https://example.com/dinner.png": f"{server_url}/sushi.jpg", "photo.jpg": str(photo),
        "photos/": str(tmp / "photos") + "/", "/mnt/shared/foodvision-cache": str(tmp / "remote"),
        "<repo-url>": str(project), "<commit-or-branch>": "main",
        "model.name=efficientnet_lite0": "model.name=efficientnet_lite0 -S model.weights_url=null",
    }


def substituted(text: str, table: dict[str, str]) -> str:
    for placeholder in sorted(table, key=len, reverse=True):  # the longest first: `photos/` inside a path
        text = re.sub(rf"(?<![\w/.-]){re.escape(placeholder)}(?![\w/.-])", table[placeholder], text)
    return text


SEQUENCES = sequences()


# --- what some sequences must have done, beyond running: DVC's workflow as users meet it --------------------

def exp_rows(project: Path) -> list[dict]:
    """`dvc exp show --json` flattened to one dict per row: name, params, metrics, and whether a baseline."""
    rows = []
    for commit in json.loads(sh(project, "dvc", "exp", "show", "--json").stdout):
        for exp, baseline in [(commit, True), *[(e, False) for g in commit.get("experiments") or [] for e in g["revs"]]]:
            data = exp.get("data") or {}
            params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
            metrics = {path: m.get("data", {}) for path, m in (data.get("metrics") or {}).items()}
            rows.append({"name": exp.get("name") or exp.get("rev"), "params": params, "metrics": metrics,
                         "rev": exp.get("rev"), "baseline": baseline})
    return rows


def one_experiment_compared(project: Path, output: str) -> None:
    (row,) = [r for r in exp_rows(project) if r["name"] == "drop3"]
    assert row["params"]["train"]["epochs"] == 3 and row["params"]["model"]["dropout"] == 0.3
    assert set(row["metrics"]["metrics/eval.json"]) == {"accuracy", "loss", "macro_f1", "f1"}
    train = row["metrics"]["metrics/train.json"]
    assert "train_loss" in train and "test_loss" not in train, "the test figures are evaluate's alone"
    exp_diff = json.loads(sh(project, "dvc", "exp", "diff", "main", "drop3", "--json").stdout)
    assert exp_diff["params"]["params.yaml"]["train.epochs"]["new"] == 3 and "metrics/train.json" in exp_diff["metrics"]
    params = json.loads(sh(project, "dvc", "params", "diff", "main", "drop3", "--json").stdout)["params.yaml"]
    assert (params["model.dropout"]["old"], params["model.dropout"]["new"]) == (0.2, 0.3)
    metrics = json.loads(sh(project, "dvc", "metrics", "diff", "main", "drop3", "--json").stdout)
    assert metrics["metrics/train.json"]["epoch"] == {"old": 5, "new": 3, "diff": -2}
    plots = json.loads(sh(project, "dvc", "plots", "diff", "main", "drop3", "--json").stdout)["data"]
    (loss,) = plots["Loss"]  # one chart per metric, both revisions overlaid on it
    points = {(v["rev"], v["field"], v["epoch"]) for v in loss["content"]["data"]["values"]}
    assert points == {(rev, f, str(e)) for rev, n in (("main", 5), ("drop3", 3))
                      for f in ("train_loss", "held_out_loss") for e in range(1, n + 1)}
    assert len(plots["Accuracy"]) == 1


def sweep_ran_every_combination(project: Path, output: str) -> None:
    assert sh(project, "dvc", "queue", "status").stdout.count("Success") == 2
    grid = {r["params"]["train"]["lr"] for r in exp_rows(project) if not r["baseline"] and "metrics/eval.json" in r["metrics"]}
    assert grid == {0.001, 0.01}


def fine_tunes_reuse_the_features(project: Path, output: str) -> None:
    """Each fine-tune is one experiment: no featurize, no backbone export; with a cut the metrics say val."""
    assert "Running stage 'featurize'" not in output and output.count("Stage 'featurize' didn't change") >= 3
    train = json.loads((project / "metrics/train.json").read_text())  # the last one, applied to the workspace
    assert {"val_loss", "val_acc", "best_epoch"} <= set(train) and "test_loss" not in train
    check = json.loads((project / "models/export_check.json").read_text())
    assert check["argmax_agreement"] == 1.0 and "fine-tuned" in check["torch_reference"]
    tuned = [r["name"] for r in exp_rows(project) if not r["baseline"] and r["params"]["finetune"]["blocks"] == 5]
    plots = json.loads(sh(project, "dvc", "plots", "diff", "main", *tuned, "--json").stdout)
    assert len(tuned) == 2 and not plots.get("errors"), plots.get("errors")


def shared_and_fetched(project: Path, output: str) -> None:
    """The clone pulled everything, and the registry's versions are the files the project made."""
    clone = project / "foodvision"
    for out in ("data/raw/dataset.zip", "models/pretrained/backbone.pth", "data/prepared/spec.json",
                "models/model.safetensors", "models/model.onnx", "plots/train/loss_curves.png", "plots/eval/hardest.png"):
        assert (clone / out).exists(), out
    assert "Running stage" not in sh(clone, "dvc", "repro").stdout
    for fetched, made in (("model.safetensors", "models/model.safetensors"), ("model.onnx", "models/model.onnx"),
                          ("that-model.safetensors", "models/model.safetensors")):
        assert (project / fetched).read_bytes() == (project / made).read_bytes(), fetched
    assert load_checkpoint(project / "model.safetensors")[1]["class_names"] == ["pizza", "steak", "sushi"]


CHECKS: dict[str, Callable[[Path, str], None]] = {  # a command of the sequence: what must hold after it
    "dvc exp run -n drop3": one_experiment_compared,
    "dvc exp run --queue -S 'train.lr=0.001,0.01'   #": sweep_ran_every_combination,
    "dvc exp run -S finetune.blocks=5 -S data.val_fraction=0.15": fine_tunes_reuse_the_features,
    "dvc artifacts get <repo-url> foodvision-classifier-onnx": shared_and_fetched,
}


def checks_of(sequence: list[Block]) -> list[Callable[[Path, str], None]]:
    text = "\n".join(b.text for b in sequence)
    return [check for command, check in CHECKS.items() if command in text]


def test_every_check_has_its_command_in_the_docs():
    """A doc command that changed must not silently drop what the test checks after it."""
    for command in CHECKS:
        assert sum(command in "\n".join(b.text for b in s) for s in SEQUENCES) == 1, command


@pytest.mark.parametrize("sequence", SEQUENCES, ids=[where(s[0]) for s in SEQUENCES])
def test_the_docs_commands_run_as_written(sequence, states, tmp_path, server_url, dataset_zip, backbone_file):
    project = tmp_path / "project"
    shutil.copytree(states[sequence[0].state], project, symlinks=True)
    sh(tmp_path, "git", "init", "-q", "--bare", "origin.git")  # where `git push` goes
    sh(project, "git", "remote", "add", "origin", str(tmp_path / "origin.git"))
    table = placeholders(tmp_path, project, server_url, dataset_zip, backbone_file)
    output = ""
    try:
        for block in sequence:
            script = substituted(block.text, table)
            run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=project, capture_output=True,
                                 text=True, timeout=600, env=sh_env())
            assert run.returncode == 0, (f"{where(block)} fails as written (exit {run.returncode}):\n{block.text}\n"
                                         f"--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-3000:]}")
            output += run.stdout + run.stderr
        for check in checks_of(sequence):
            check(project, output)
    finally:
        kill_processes_in(project)

