"""End to end: the real `dvc` commands in a fresh git repo, on the tiny dataset served over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import QuietHandler, default_params_text, make_image

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = [
    "data/raw/dataset.zip", "models/pretrained/backbone.pth", "models/pretrained/transform.json",
    "data/prepared/spec.json", "data/features/train.npy", "data/features/test.npy", "data/features/index.json",
    "models/model.safetensors", "models/summary.txt", "metrics/train.json", "plots/train/history.csv",
    "plots/train/loss_curves.png", "metrics/eval.json", "plots/eval/confusion.csv", "plots/eval/confusion.png",
    "plots/eval/per_class.csv", "plots/eval/hardest.png", "metrics/audit.json", "plots/audit/issues.csv",
    "plots/audit/label_issues.png", "plots/audit/duplicates.png",
    "plots/predictions.json", "plots/predictions/image_0_own.png",
]


def copy_project(dest: Path) -> Path:
    """The project's tracked and new (not ignored) files, as a fresh clone would have them."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file() and not rel.startswith("tests/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    (dest / "params.yaml").write_text(default_params_text())
    return dest


def sh(cwd: Path, *args: str, check: bool = True, timeout: float = 300,
       log: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command with a hard time limit; a stuck `dvc` fails this test, by name, instead of the run.

    `log`: send the output to this file instead of a pipe. Commands that leave daemons behind (`dvc
    queue start`) must use it: a daemon inherits the pipe and would keep `subprocess.run` waiting.
    """
    env = sh_env()
    try:
        if log is None:
            result = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        else:
            with open(log, "a") as out:
                result = subprocess.run(list(args), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{' '.join(args)} did not finish within {timeout:.0f} s (stuck?)") from None
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def sh_env() -> dict[str, str]:
    """The environment commands run in: this venv's commands first, a git identity."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def set_params(project: Path, **changes: object) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = params
        for p in parents:
            node = node[p]
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stages_to_run(project: Path) -> set[str]:
    status = json.loads(sh(project, "dvc", "status", "--json").stdout)
    return set(status)


@pytest.fixture(scope="module")
def project(tmp_path_factory, server_url, dataset_zip, backbone_file):
    project = copy_project(tmp_path_factory.mktemp("project"))
    own = project / "own.png"
    make_image("sushi", 3).convert("P").save(own)
    set_params(project, data__url=f"{server_url}/{dataset_zip.name}", data__content_sha256=None,
               model__weights_url=f"{server_url}/{backbone_file.name}", train__epochs=2, train__batch_size=4,
               device="cpu", predict__num_samples=2, predict__images=["own.png"])
    sh(project, "git", "init", "-q")
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "init")
    sh(project, "dvc", "repro")
    return project


def test_repro_writes_every_declared_output(project):
    missing = [o for o in OUTPUTS if not (project / o).exists()]
    assert missing == []
    assert len(list((project / "plots/predictions").glob("*.png"))) == 3


def test_second_repro_runs_nothing(project):
    out = sh(project, "dvc", "repro").stdout
    assert "Running stage" not in out and "up to date" in out
    assert stages_to_run(project) == set()


def test_metrics_show_lists_the_figures(project):
    shown = json.loads(sh(project, "dvc", "metrics", "show", "--json").stdout)
    (workspace,) = shown.values()
    data = workspace["data"]
    assert list(data) == ["metrics/eval.json", "metrics/train.json", "metrics/audit.json"], "the test figures first"
    assert set(data["metrics/eval.json"]["data"]) == {"accuracy", "macro_f1", "loss", "f1"}
    assert set(data["metrics/train.json"]["data"]) == {"epoch", "train_loss", "train_acc"}
    table = sh(project, "dvc", "metrics", "show").stdout
    assert "accuracy" in table and "f1.sushi" in table and "precision" not in table


def test_plots_show_renders_every_plot(project):
    sh(project, "dvc", "plots", "show", "-o", "dvc_plots")
    html = (project / "dvc_plots/index.html").read_text()
    for name in ("Loss", "Accuracy", "Confusion matrix", "train_loss", "held_out_loss", "loss_curves.png",
                 "confusion.png", "image_0_own.png"):
        assert name in html, name


def test_the_confusion_plot_puts_predicted_across_and_actual_down_as_the_png_does(project):
    shown = json.loads(sh(project, "dvc", "plots", "show", "--json").stdout)["data"]
    encoding = shown["Confusion matrix"][0]["content"]["spec"]["encoding"]
    assert (encoding["x"]["field"], encoding["y"]["field"]) == ("predicted", "actual"), encoding


def test_param_changes_rerun_only_what_reads_them(project):
    original = (project / "params.yaml").read_text()
    try:
        set_params(project, predict__num_samples=1)
        assert stages_to_run(project) == {"params", "predict"}  # `params` checks the whole file whenever it changes
        set_params(project, model__dropout=0.3)
        assert "train" in stages_to_run(project) and not stages_to_run(project) & {"prepare", "featurize"}
        diff = json.loads(sh(project, "dvc", "params", "diff", "--json").stdout)["params.yaml"]
        assert (diff["model.dropout"]["old"], diff["model.dropout"]["new"]) == (0.2, 0.3)
        assert (diff["predict.num_samples"]["old"], diff["predict.num_samples"]["new"]) == (2, 1)
        (project / "params.yaml").write_text(original)
        set_params(project, train__batch_size=2)  # the spec no longer holds the batch size: nothing is rescanned
        assert stages_to_run(project) == {"params", "train"}
        (project / "params.yaml").write_text(original)
        set_params(project, featurize__batch_size=2)
        assert stages_to_run(project) == {"params", "featurize"}
    finally:
        (project / "params.yaml").write_text(original)


def test_a_head_only_experiment_reuses_the_stored_features(project, tmp_path):
    """`-S train.lr=...`: train, evaluate, export and predict rerun (the first two on the stored features); featurize does not."""
    copy = tmp_path / "copy"  # a copy of the repository and its DVC cache: the shared project stays as it is
    shutil.copytree(project, copy, symlinks=True)
    features = (copy / "data/features/train.npy").read_bytes()
    set_params(copy, train__lr=0.05, train__epochs=1)
    out = sh(copy, "dvc", "repro").stdout
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"params", "train", "evaluate", "export", "predict"}, out
    assert (copy / "data/features/train.npy").read_bytes() == features
    assert json.loads((copy / "metrics/train.json").read_text())["epoch"] == 1


def test_editing_a_local_input_reruns_what_reads_it(project):
    """Files under inputs/ are stage deps: the same name with other pixels reruns predict, and only predict."""
    original = (project / "params.yaml").read_text()
    photo = project / "inputs" / "images" / "mine.png"
    try:
        make_image("pizza", 11).save(photo)
        set_params(project, predict__images=["inputs/images/mine.png"])
        first = sh(project, "dvc", "repro")
        assert "note:" not in first.stderr and stages_to_run(project) == set()
        make_image("steak", 12).save(photo)
        assert stages_to_run(project) == {"predict"}
    finally:
        photo.unlink(missing_ok=True)
        (project / "params.yaml").write_text(original)
        restored = sh(project, "dvc", "repro")
    assert "note: predict.images entry own.png is outside inputs/images/" in restored.stderr + restored.stdout
    assert stages_to_run(project) == set()


def test_bad_params_fail_the_stage_with_one_line(project, tmp_path):
    clone = copy_project(tmp_path)
    shutil.copy2(project / "params.yaml", clone / "params.yaml")
    set_params(clone, train__epoch=3)
    result = sh(clone, sys.executable, "stages/train.py", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown key train.epoch; did you mean train.epochs? accepted keys here: train.epochs, "
        "train.batch_size, train.lr, train.augment, train.patience"]


def test_a_misspelled_key_fails_the_run_where_no_stage_would_rerun(project, tmp_path):
    """`epoch: 10` beside `epochs:` changes no stage's params: the `params` stage still fails `dvc repro` and
    `dvc exp run` in one line naming the key, and the key it probably meant."""
    clone = tmp_path / "clone"  # a copy of the repository and its DVC cache: the shared project stays as it is
    shutil.copytree(project, clone, symlinks=True)
    text = (clone / "params.yaml").read_text()
    (clone / "params.yaml").write_text(text.replace("  epochs: 2\n", "  epochs: 2\n  epoch: 10\n", 1))
    assert "epoch: 10" in (clone / "params.yaml").read_text()
    for command in (["dvc", "repro"], ["dvc", "exp", "run"]):
        result = sh(clone, *command, check=False)
        assert result.returncode != 0, result.stdout
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: unknown")]
        assert errors == ["error: unknown key train.epoch; did you mean train.epochs? accepted keys here: "
                          "train.epochs, train.batch_size, train.lr, train.augment, train.patience"], result.stdout
        assert "Running stage 'train'" not in result.stdout
    (clone / "params.yaml").write_text(text)
    result = sh(clone, "dvc", "exp", "run", "-S", "+train.epoch=3", check=False)  # DVC's own advice for a new key
    assert result.returncode != 0 and "did you mean train.epochs?" in result.stdout + result.stderr


def test_rerun_from_scratch_is_byte_identical(project):
    files = ["metrics/train.json", "metrics/eval.json", "plots/train/history.csv", "plots/eval/confusion.csv",
             "plots/predictions.json", "models/summary.txt", "data/prepared/spec.json", "data/features/train.npy",
             "data/features/test.npy", "data/features/index.json", "models/model.safetensors"]
    before = {f: (project / f).read_bytes() for f in files}
    lock = outputs_in_lock(project)  # the md5 of every output, folders and PNGs included
    out = sh(project, "dvc", "repro", "--force").stdout
    assert "Running stage 'download'" in out and "Running stage 'train'" in out
    assert {f: (project / f).read_bytes() for f in files} == before
    after = outputs_in_lock(project)
    for stage, entry in lock["stages"].items():
        assert after["stages"][stage] == entry, f"stage {stage} differs"
    assert after == lock
    rows = json.loads((project / "data" / "feature_rows.json").read_text())
    assert [r["computed"] for r in rows.values()] == [0] * len(rows), "a forced rerun takes every row from the cache"


def outputs_in_lock(project: Path) -> dict:
    """dvc.lock's outputs, but featurize's count of cached and computed rows: the one output that says how the
    same bytes were made (computed the first time, from the cache the next)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    featurize = lock["stages"]["featurize"]
    featurize["outs"] = [o for o in featurize["outs"] if o["path"] != "data/feature_rows.json"]
    return lock


def test_a_stage_forced_alone_writes_the_same_bytes(project):
    """`dvc repro -f -s train` with nothing changed: the checkpoint's md5 stays, so nothing downstream reruns."""
    lock = (project / "dvc.lock").read_text()
    out = sh(project, "dvc", "repro", "-f", "-s", "train").stdout
    assert "Running stage 'train'" in out
    assert (project / "dvc.lock").read_text() == lock
    assert stages_to_run(project) == set()


class _PlotDivs(HTMLParser):
    """Which of the page's vega plot <div>s got a rendered <canvas>/<svg>, and any vega-embed error."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__()
        self.ids, self.stack, self.rendered, self.errors = ids, [], set(), []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "div":
            self.stack.append(attrs.get("id"))
        if tag in ("canvas", "svg"):
            self.rendered.update(i for i in self.stack if i in self.ids)
        if "error" in (attrs.get("class") or ""):
            self.errors.append(attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self.stack:
            self.stack.pop()


def test_plots_page_renders_offline_in_headless_chromium(project, tmp_path):
    """What a user sees: every chart of `dvc plots show` drawn by Vega, served from node_modules."""
    import http.server
    import re
    import threading
    from functools import partial

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    vendor = ROOT / "node_modules" / "vega-embed" / "build" / "vega-embed.min.js"
    if not chromium or not vendor.is_file():
        missing = "chromium" if not chromium else "node_modules (npm ci)"
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is missing; the README's setup installs it")
        pytest.skip(f"{missing} is not installed (see the README's plot-viewing setup)")
    if not (project / "node_modules").exists():
        (project / "node_modules").symlink_to(ROOT / "node_modules")
    sh(project, "dvc", "plots", "show")
    page = (project / "dvc_plots" / "index.html").read_text()
    ids = set(re.findall(r"vegaEmbed\('#([^']+)'", page))
    assert ids == {"Loss", "Accuracy", "Confusion_matrix", "Per-class_F1"}, "each once"
    specs = [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\n", page)]
    assert len(specs) == 4 and all(len(spec["data"]["values"]) >= 3 for spec in specs), "no empty chart"
    assert "cdn.jsdelivr" not in page.split("if (!window.vegaEmbed)")[0], "libraries load locally first"
    images = re.findall(r'<img src="([^"]+)"', page)
    # curves, confusion, the hardest, the audit's two sheets, 2 test samples, the own photo
    assert len(images) == len(set(images)) == 8
    assert all((project / "dvc_plots" / src).stat().st_size > 1000 for src in images)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(project)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/dvc_plots/index.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--window-size=1300,2600"]
    try:
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "plots.png"
        subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    finally:
        httpd.shutdown()
        httpd.server_close()
    divs = _PlotDivs(ids)
    divs.feed(dom)
    assert divs.rendered == ids, f"not drawn: {sorted(ids - divs.rendered)}"
    assert divs.errors == []
    assert shot.stat().st_size > 50_000, "a screenshot with charts in it"


def test_a_backbone_typo_fails_before_the_dataset_download(tmp_path, server_url, dataset_zip):
    clone = copy_project(tmp_path)
    set_params(clone, data__url=f"{server_url}/{dataset_zip.name}", model__name="efficientnet_b00")
    sh(clone, "git", "init", "-q")
    result = sh(clone, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert "error: model.name 'efficientnet_b00' is not a known classification backbone; accepted:" in result.stderr
    assert not (clone / "data/raw").exists()
