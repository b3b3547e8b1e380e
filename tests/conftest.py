"""Fixtures: a tiny generated image dataset and backbone file, served by a real loopback HTTP server.

The real download and loading code runs against them; only the bytes are local.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from foodvision.core.params import Params, parse
from foodvision.download import download_dataset, store_dataset
from foodvision.featurize import featurize
from foodvision.model import build_backbone
from foodvision.prepare import prepare
from foodvision.pretrained import fetch_pretrained
from foodvision.train import TrainOutputs, train

CLASSES = ("pizza", "steak", "sushi")
COLOURS = {"pizza": (200, 60, 40), "steak": (90, 50, 30), "sushi": (240, 240, 230)}
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    """A TCP port nothing listens on now, for a server a test starts on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctrl_c_as_in_a_terminal() -> None:
    """preexec_fn for a child a test will Ctrl-C: SIGINT's default action, as a terminal's command has. A shell
    starts a background job (`pytest &`, CI scripts) with SIGINT ignored, every child inherits that, and Python
    then never raises KeyboardInterrupt: the test would wait for an interrupt that cannot come."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def default_params_text() -> str:
    """The committed params.yaml: the tests check the product's defaults, not the experiment a
    developer last applied to the workspace (`dvc exp run` rewrites params.yaml)."""
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (ROOT / "params.yaml").read_text()


def default_pipeline_text() -> str:
    """The committed dvc.yaml, whose `vars:` hold `paths:` (see default_params_text)."""
    shown = subprocess.run(["git", "show", "HEAD:dvc.yaml"], cwd=ROOT, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (ROOT / "dvc.yaml").read_text()


def default_paths() -> dict[str, str]:
    """`paths:` of the committed dvc.yaml: where each stage reads and writes, relative to a project."""
    (paths,) = [v["paths"] for v in yaml.safe_load(default_pipeline_text())["vars"] if "paths" in v]
    return dict(paths)


def write_pipeline(folder: Path, **changed: str) -> dict[str, str]:
    """The committed dvc.yaml in `folder` (stages and commands read their files' paths from it), with
    `changed` paths; returns the paths."""
    pipeline = yaml.safe_load(default_pipeline_text())
    (entry,) = [v for v in pipeline["vars"] if "paths" in v]
    entry["paths"].update(changed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return dict(entry["paths"])


@functools.cache
def project_params() -> Params:
    """The committed params.yaml, parsed: the value a test passes where the value is not its point."""
    return parse(Params, yaml.safe_load(default_params_text()), "")


def download(url: str, target: Path, **given: object) -> Path:
    """download_dataset with params.yaml's limits and no pinned digests (the tests' archives are their own)."""
    d = project_params().data
    return download_dataset(url, target, **{"sha256": None, "content_sha256": None, "max_extract_mb": d.max_extract_mb,
                                            "max_download_mb": d.max_download_mb, **given})


def store(archive: Path, target: Path, **given: object) -> str:
    """store_dataset with params.yaml's size limit and no pinned digest."""
    return store_dataset(archive, target, **{"max_bytes": project_params().data.max_extract_mb * 2**20,
                                             "content_sha256": None, **given})


def prepare_spec(raw: Path, spec: Path, **given: object) -> dict:
    """prepare with params.yaml's split, seed and skip_corrupt unless the test gives its own."""
    p = project_params()
    return prepare(raw, spec, **{"classes": None, "test_fraction": p.data.test_fraction, "seed": p.seed,
                                 "skip_corrupt": p.data.skip_corrupt, **given})


def make_image(cls: str, seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A noisy patch in the class's colour: learnable by a head on random features, but not trivially."""
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[cls], dtype=np.float32)
    pixels = base + rng.normal(0, 25, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_dataset(root: Path, n_train: int = 4, n_test: int = 2) -> None:
    for s, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_image(cls, seed=1000 * s + 100 * c + i).save(folder / f"{i:03d}.jpg", quality=90)
    (root / "train" / "pizza" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")


def zip_dir(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def stored(folder: Path, dest: Path) -> Path:
    """`folder` as the dataset store `download` writes (what `prepare` and every later stage read)."""
    store(zip_dir(folder, dest.with_name(dest.name + ".src.zip")), dest)
    return dest


def save_with_hash_name(state: dict, folder: Path, stem: str) -> Path:
    """torchvision's convention: `<stem>-<first 8 hex of sha256>.pth`."""
    tmp = folder / f"{stem}.tmp"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return tmp.rename(folder / f"{stem}-{digest[:8]}.pth")


@pytest.fixture(scope="session", autouse=True)
def feature_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """featurize's default cache folder, for every test and the stages they run: never the user's own."""
    home = tmp_path_factory.mktemp("cache-home")
    os.environ["XDG_CACHE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the loopback server serves; tests drop files in it."""
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="session")
def server_url(served: Path) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def dataset_zip(served: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_dataset")
    write_dataset(folder)
    return zip_dir(folder, served / "tiny_food.zip")


@pytest.fixture(scope="session")
def backbone_file(served: Path) -> Path:
    """A randomly initialised efficientnet_b0 state dict, named the way torchvision names its files."""
    torch.manual_seed(123)
    return save_with_hash_name(build_backbone("efficientnet_b0").state_dict(), served, "efficientnet_b0_test")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "pizza_steak_sushi.zip").is_file():
        pytest.skip(f"real dataset not present at {SHARED_DATA} (only on development machines)")
    return SHARED_DATA


@dataclass(frozen=True)
class Trained:
    """A project directory where download, pretrained, prepare, featurize and train have run on the tiny data."""

    root: Path
    raw: Path
    spec: Path
    pretrained: Path
    transform: Path
    features: Path
    model: Path
    metrics: Path
    history: Path
    summary: Path
    curves: Path


def train_tiny(root: Path, archive_url: str, weights_url: str, *, epochs: int = 2, seed: int = 42) -> Trained:
    t = Trained(root, root / "raw.zip", root / "spec.json", root / "backbone.pth", root / "transform.json",
                root / "features", root / "model.safetensors", root / "train.json", root / "history.csv",
                root / "summary.txt", root / "curves.png")
    download(archive_url, t.raw)
    fetch_pretrained("efficientnet_b0", "DEFAULT", weights_url, t.pretrained, transform_out=t.transform, sha256=None)
    prepare_spec(t.raw, t.spec, seed=seed)
    featurize(t.spec, t.pretrained, t.transform, t.features, model_name="efficientnet_b0", batch_size=4,
              device="cpu", skip_corrupt=False, summary_out=t.summary, precision="fp32", engine="auto")
    p = project_params()
    train(t.features, t.pretrained, t.transform, p.model, dataclasses.replace(p.train, epochs=epochs, batch_size=4, lr=0.01),
          p.finetune, seed=seed, val_fraction=0.0, device="cpu", out=TrainOutputs(t.model, t.metrics, t.history, t.curves))
    return t


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, server_url: str, dataset_zip: Path, backbone_file: Path) -> Trained:
    return train_tiny(tmp_path_factory.mktemp("trained"), f"{server_url}/{dataset_zip.name}",
                      f"{server_url}/{backbone_file.name}")


@pytest.fixture(scope="session")
def exported(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The trained fixture's model exported in two parts, as the stages do: a folder with backbone.onnx and the
    check folder (featurize.check_backbone), model.onnx and export.json (export); returns it and export's figures."""
    from foodvision.export import export
    from foodvision.featurize import check_backbone

    out = tmp_path_factory.mktemp("export")
    check_backbone(trained.pretrained, trained.transform, trained.features, model_name="efficientnet_b0",
                    onnx_out=out / "backbone.onnx", check_dir=out / "check")
    return out, export(trained.model, trained.features, out / "backbone.onnx", out / "check",
                       onnx_out=out / "model.onnx", metrics_out=out / "export.json")


def kill_processes_in(folder: Path) -> list[int]:
    """SIGKILL every process whose working directory is inside `folder` (e.g. `dvc queue` workers).

    DVC's queue workers are daemons; one that misses the shutdown message lives on with an empty
    queue. Linux-only (/proc); elsewhere nothing is killed.
    """
    folder = folder.resolve()
    killed = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if (cwd == folder or folder in cwd.parents) and int(proc.name) != os.getpid():
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
            except ProcessLookupError:
                pass
    return killed
