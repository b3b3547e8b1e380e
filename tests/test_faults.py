"""Bad input and faults: each ends in one clear error, and nothing half-written survives."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
from conftest import download, prepare_spec, store, stored, write_dataset
from PIL import Image

from foodvision.core.errors import ModelError
from foodvision.download import ArchiveError
from foodvision.fetch import FetchError, fetch
from foodvision.images import open_rgb
from foodvision.store import ImageStore


@pytest.fixture
def stalling_url():
    """A server that sends headers and half the body, then goes silent."""

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(2**20))
            self.end_headers()
            self.wfile.write(b"PK" + b"\0" * 2**10)
            self.wfile.flush()
            time.sleep(30)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data.zip"
    httpd.shutdown()
    httpd.server_close()


def test_stalled_server_times_out_and_leaves_nothing(stalling_url, tmp_path):
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"after 2 attempts \(.*(Timeout|timed out)"):
        fetch(stalling_url, tmp_path / "a.zip", timeout=0.5, retries=1)
    assert time.monotonic() - start < 20, "cut off long before the server's 30 s stall ends (loose: a loaded CI machine)"
    assert list(tmp_path.iterdir()) == []


def test_killed_download_leaves_nothing_and_the_next_run_recovers(stalling_url, dataset_zip, tmp_path):
    target = tmp_path / "raw" / "food.zip"
    code = ("import sys; from pathlib import Path; from foodvision.download import download_dataset; "
            "download_dataset(sys.argv[1], Path(sys.argv[2]), sha256=None, content_sha256=None, max_extract_mb=5000, "
            "max_download_mb=10000)")
    proc = subprocess.Popen([sys.executable, "-c", code, stalling_url, str(target)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(target.parent.glob(".food.zip.*.download.*.tmp/*")):  # the server then stalls for 30 s
        assert proc.poll() is None and time.monotonic() < deadline, "the download never started"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists(), "a killed download must not look complete"
    assert any(target.parent.glob(".food.zip.*.tmp")), "the kill really happened mid-download"
    download(str(dataset_zip), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["food.zip"], "stale temporaries are cleaned up"
    assert len([n for n in ImageStore(target).names() if n.endswith(".jpg")]) == 18


def test_corrupt_member_is_a_clear_error(dataset_zip, tmp_path):
    data = bytearray(dataset_zip.read_bytes())
    with zipfile.ZipFile(dataset_zip) as zf:
        info = zf.infolist()[3]
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10
    data[start:start + 64] = bytes(64)  # damage compressed bytes, keep the directory intact
    broken = tmp_path / "broken.zip"
    broken.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="is a corrupt archive"):
        store(broken, tmp_path / "out.zip")
    assert not (tmp_path / "out.zip").exists()


def test_truncated_zip(dataset_zip, tmp_path):
    half = tmp_path / "half.zip"
    half.write_bytes(dataset_zip.read_bytes()[: dataset_zip.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="is not a zip or tar archive"):
        store(half, tmp_path / "out.zip")


def test_zip_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("test/a/x.jpg", b"x")
        zf.writestr("train/a/x.jpg", bytes(3 * 2**20))
    assert bomb.stat().st_size < 2**16
    with pytest.raises(ArchiveError, match=r"inflate to 3 MB, over data.max_extract_mb \(2 MB\)"):
        store(bomb, tmp_path / "out.zip", max_bytes=2 * 2**20)
    assert not (tmp_path / "out.zip").exists()
    store(bomb, tmp_path / "out.zip", max_bytes=4 * 2**20)


def test_corrupt_images_can_be_skipped_and_are_listed(tmp_path, backbone_file):
    """A broken header is caught by prepare; pixel data cut short is caught by featurize, which decodes anyway."""
    import json

    from foodvision.core.errors import DatasetError
    from foodvision.featurize import featurize
    from foodvision.model import eval_transform

    write_dataset(tmp_path / "raw")
    good = (tmp_path / "raw" / "train" / "sushi" / "000.jpg").read_bytes()
    (tmp_path / "raw" / "train" / "sushi" / "cut.jpg").write_bytes(good[:300])  # header cut: prepare
    (tmp_path / "raw" / "test" / "steak" / "short.jpg").write_bytes(good[:-400])  # scan data cut: featurize
    (tmp_path / "t.json").write_text(json.dumps(eval_transform("efficientnet_b0", "DEFAULT")))
    spec = prepare_spec(stored(tmp_path / "raw", tmp_path / "raw.zip"), tmp_path / "spec.json", seed=1, skip_corrupt=True)
    assert spec["skipped_corrupt"] == ["train/sushi/cut.jpg"]
    assert spec["counts"]["train"]["sushi"] == 4 and spec["counts"]["test"]["steak"] == 3
    assert all(s["path"] != "train/sushi/cut.jpg" for s in spec["splits"]["train"])

    kwargs = dict(model_name="efficientnet_b0", batch_size=4, device="cpu", summary_out=tmp_path / "s.txt", precision="fp32", engine="auto")
    with pytest.raises(DatasetError, match=r"1 image\(s\) in .* do not decode: test/steak/short.jpg; .*skip_corrupt"):
        featurize(tmp_path / "spec.json", backbone_file, tmp_path / "t.json", tmp_path / "features",
                  skip_corrupt=False, **kwargs)
    assert not (tmp_path / "features").exists()
    index = featurize(tmp_path / "spec.json", backbone_file, tmp_path / "t.json", tmp_path / "features",
                      skip_corrupt=True, **kwargs)
    assert index.skipped_corrupt == ["test/steak/short.jpg"]
    assert "test/steak/short.jpg" not in index.split("test").paths and len(index.split("test").paths) == 6
    assert np.load(tmp_path / "features" / "test.npy").shape == (6, 1280)


def test_sixteen_bit_and_float_images_keep_their_brightness(tmp_path):
    for mode, value, expected in (("I;16", 32896, 128), ("I", 65535, 255), ("F", 0.5, 128)):
        path = tmp_path / f"{mode.replace(';', '')}.tiff"
        Image.fromarray(np.full((8, 8), value, dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]),
                        mode if mode != "I;16" else None).save(path)
        im = open_rgb(path)
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (expected,) * 3, mode


def test_featurize_refuses_an_unknown_backbone_before_any_work(tmp_path):
    from foodvision.featurize import featurize

    with pytest.raises(ModelError, match="model.name 'efficientnet_b9'.*accepted"):
        featurize(tmp_path / "missing-spec.json", tmp_path / "missing.pth", tmp_path / "t.json", tmp_path / "f",
                  model_name="efficientnet_b9", batch_size=4, device="cpu", skip_corrupt=False,
                  summary_out=tmp_path / "s.txt", precision="fp32", engine="auto")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_outputs_are_removed(tmp_path):
    from foodvision.core.files import write_text

    (tmp_path / ".model.pt.abc123.tmp").write_bytes(b"half a model")
    (tmp_path / ".other.txt.x.tmp").write_bytes(b"not ours to touch")
    write_text(tmp_path / "model.pt", "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.txt.x.tmp", "model.pt"]


def test_cleanup_spares_the_temporaries_of_live_writers(tmp_path):
    from foodvision.core.files import write_text

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    live = tmp_path / f".model.pt.{os.getpid()}.abc.tmp"  # another run, still writing
    live.write_bytes(b"half a model, still being written")
    killed = tmp_path / f".model.pt.{gone.pid}.abc.tmp"
    killed.write_bytes(b"half a model, its writer is gone")
    write_text(tmp_path / "model.pt", "done")
    assert live.exists() and not killed.exists()


def test_ctrl_c_right_after_a_temporary_is_made_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C lands between bytecodes: right after the temporary file or folder exists is one such point
    (a train stage interrupted in CI left `.train.json.<pid>.<random>.tmp` there)."""
    from foodvision.core.files import atomic_dir, write_json

    def then_interrupted(real):
        def call(*args, **kwargs):
            real(*args, **kwargs)
            raise KeyboardInterrupt
        return call

    with monkeypatch.context() as patched:
        patched.setattr(os, "close", then_interrupted(os.close))
        with pytest.raises(KeyboardInterrupt):
            write_json(tmp_path / "metrics.json", {"epoch": 1})
    (tmp_path / "features").mkdir()
    with monkeypatch.context() as patched:
        patched.setattr(os, "mkdir", then_interrupted(os.mkdir))
        with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "features"):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["features"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(tmp_path):
    """Writes that hit ENOSPC (here: the temporary file is /dev/full) name the output; nothing stays."""
    from foodvision.core.files import OutputError, atomic_path, write_json

    dest = tmp_path / "metrics" / "eval.json"
    with pytest.raises(OutputError, match=f"^cannot write {dest}: no space left on the device; free space"):
        with atomic_path(dest) as tmp:
            tmp.unlink()
            tmp.symlink_to("/dev/full")
            with open(tmp, "w") as f:
                f.write("{}" * 100_000)
    assert list(dest.parent.iterdir()) == []
    write_json(dest, {"ok": 1})  # the next run writes normally
    assert dest.read_text() == '{\n  "ok": 1\n}\n'


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as Linux applies it")
def test_a_file_size_limit_is_one_line_naming_the_output(tmp_path):
    """`ulimit -f` (EFBIG: Python ignores SIGXFSZ, so the write fails instead of killing the process) and a
    name too long for the file system (ENAMETOOLONG) end a stage in one line naming the output, no traceback."""
    code = ("import resource, sys\n"
            "from pathlib import Path\n"
            "from foodvision.core.files import write_text\n"
            "from foodvision.core.stage import run\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "out = Path(sys.argv[1])\n"
            "run(lambda: write_text(out, 'x' * 100_000))\n")
    for dest, reason in ((tmp_path / "metrics" / "train.json", "file too large for this process's file-size limit"),
                         (tmp_path / ("x" * 300) / "train.json", "a name in its path is too long")):
        done = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-2000:]
        assert done.stderr.startswith(f"error: cannot write {dest}: {reason}"), done.stderr
    assert not list((tmp_path / "metrics").iterdir()), "nothing half-written stays"


def test_ctrl_c_inside_a_constructor_is_still_one_line():
    """Ctrl-C can land inside a constructor (tqdm's, seen in CI): the half-built object's destructor fails as
    the interrupt unwinds, and the user must still see only `interrupted` and exit 130, no traceback."""
    code = ("from foodvision.core.stage import run\n"
            "class Half:\n"
            "    def __init__(self):\n"
            "        raise KeyboardInterrupt\n"
            "    def __del__(self):\n"
            "        self.pos\n"
            "run(Half)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "interrupted\n")


def test_a_stage_exits_fast_with_its_output_flushed_and_exit_handlers_run(tmp_path):
    """Stages leave with os._exit (the interpreter's teardown cost a torch process up to 1.5 s): everything
    printed must still reach the pipe, exit handlers (logging's, multiprocessing's) must still run, and the
    exit code must be the stage's."""
    code = ("import atexit, sys\n"
            "from pathlib import Path\n"
            "from foodvision.core.errors import DatasetError\n"
            "from foodvision.core.stage import run\n"
            "atexit.register(lambda: Path(sys.argv[1]).write_text('ran'))\n"
            "def main():\n"
            "    sys.stdout.write('x' * 300_000)\n"  # more than a pipe holds: buffered, unflushed at exit
            "    sys.stderr.write('partial line')\n"
            "    if sys.argv[2] == 'fail':\n"
            "        raise DatasetError('bad input')\n"
            "run(main)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # pipes are block-buffered then
    for mode, rc in (("ok", 0), ("fail", 1)):
        marker = tmp_path / mode
        done = subprocess.run([sys.executable, "-c", code, str(marker), mode], capture_output=True, text=True,
                              timeout=60, env=env)
        assert done.returncode == rc
        assert done.stdout == "x" * 300_000
        assert done.stderr == "partial line" + ("error: bad input\n" if mode == "fail" else "")
        assert marker.read_text() == "ran"


def test_a_stages_outputs_change_together_or_not_at_all(tmp_path):
    """A failure after some outputs were rewritten puts every one back (a created one is removed); success keeps
    the new ones; either way no copy is left beside them."""
    from foodvision.core.files import OutputError, outputs_together, write_json, write_text

    model, metrics, history, new = (tmp_path / n for n in ("model.bin", "train.json", "history.csv", "curves.png"))
    folder = tmp_path / "examples"
    folder.mkdir()
    (folder / "a.jpg").write_text("old photo")
    for f, text in ((model, "old model"), (metrics, "old metrics"), (history, "old history")):
        f.write_text(text)
    outs = [model, metrics, history, new, folder]
    for failure in (OutputError("cannot write model.bin: no space left on the device"), KeyboardInterrupt()):
        with pytest.raises(type(failure)):
            with outputs_together(outs):
                write_json(metrics, {"epoch": 5})
                write_text(history, "new history")
                write_text(new, "new curves")
                write_text(folder / "a.jpg", "new photo")
                raise failure
        assert [f.read_text() for f in (model, metrics, history)] == ["old model", "old metrics", "old history"]
        assert not new.exists() and (folder / "a.jpg").read_text() == "old photo"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["examples", "history.csv", "model.bin", "train.json"]
    with pytest.raises(SystemExit), outputs_together(outs):  # sys.exit(0), as featurize's torchrun launcher
        write_text(model, "new model")
        write_text(new, "new curves")
        sys.exit(0)
    assert model.read_text() == "new model" and new.read_text() == "new curves" and metrics.read_text() == "old metrics"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "examples", "history.csv", "model.bin",
                                                          "train.json"]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as Linux applies it")
def test_train_failing_on_its_model_leaves_the_old_metrics_and_history(trained, tmp_path):
    """train rewrites its metrics and history every epoch; when the checkpoint then cannot be written (here a
    file-size limit, as a full disk), all four outputs are the previous run's again, with no copy beside them."""
    import shutil

    from conftest import ROOT, default_params_text, write_pipeline

    paths = write_pipeline(tmp_path)
    (tmp_path / "params.yaml").write_text(default_params_text())
    shutil.copytree(trained.features, tmp_path / paths["features"])
    for src, key in ((trained.pretrained, "pretrained"), (trained.transform, "transform"), (trained.model, "model"),
                     (trained.metrics, "train_metrics"), (trained.history, "history"), (trained.curves, "curves")):
        (tmp_path / paths[key]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, tmp_path / paths[key])
    outs = [tmp_path / paths[k] for k in ("model", "train_metrics", "history", "curves")]
    before = [o.read_bytes() for o in outs]
    limit = outs[0].stat().st_size // 2  # the metrics, history and curves fit; the checkpoint does not
    code = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"runpy.run_path({str(ROOT / 'stages' / 'train.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith(f"error: cannot write {paths['model']}"), \
        done.stderr[-2000:]
    assert "trained the head" in done.stdout, "it failed after training, with new metrics and history written"
    assert [o.read_bytes() for o in outs] == before, "every output as it was"
    assert not [p for o in outs for p in o.parent.glob(".*.tmp")], "no copy left beside them"


def test_an_output_folder_that_is_a_mount_point_is_one_line(tmp_path):
    """A folder output that is itself a mount point cannot be swapped for the new one (EBUSY): one line naming it,
    the mount's contents untouched. Needs a private mount namespace (root or user namespaces)."""
    import shutil

    if not shutil.which("unshare") or subprocess.run(["unshare", "--mount", "--map-root-user", "true"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("no private mount namespace here")
    dest = tmp_path / "examples"
    dest.mkdir()
    code = ("import sys; from pathlib import Path; from foodvision.core.files import atomic_dir; "
            "from foodvision.core.stage import run\n"
            "def main():\n"
            "    with atomic_dir(Path(sys.argv[1])) as tmp:\n"
            "        (tmp / 'a.jpg').write_text('new')\n"
            "run(main)\n")
    script = (f"mount -t tmpfs none {dest} || exit 77; echo old > {dest}/a.jpg; "
              f"{sys.executable} -c \"$0\" {dest}; code=$?; cat {dest}/a.jpg; exit $code")
    done = subprocess.run(["unshare", "--mount", "--map-root-user", "sh", "-c", script, code], capture_output=True,
                          text=True, timeout=60)
    if done.returncode == 77:
        pytest.skip("mounting a tmpfs is not allowed here")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert done.stderr.startswith(f"error: cannot write {dest}: the output is busy"), done.stderr
    assert done.stdout == "old\n", "the mount's contents untouched"
