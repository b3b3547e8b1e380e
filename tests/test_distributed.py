"""featurize on more than one process: torchrun ranks, one node or two, failures and reruns."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    ROOT,
    ctrl_c_as_in_a_terminal,
    default_params_text,
    free_port,
    prepare_spec,
    stored,
    write_dataset,
    write_pipeline,
)

FEATURES = ("data/features/train.npy", "data/features/test.npy", "data/features/index.json", "models/summary.txt")


def project(folder: Path, spec: Path, trained, processes: int = 1) -> Path:
    """A folder with params.yaml pointing at `spec` and the trained fixture's pretrained backbone."""
    params = yaml.safe_load(default_params_text())
    params["featurize"].update(batch_size=4, processes=processes, cache_dir=str(folder / "cache"))  # its own, cold
    params["device"] = "cpu"
    paths = write_pipeline(folder)
    for key, source in (("spec", spec), ("pretrained", trained.pretrained), ("transform", trained.transform)):
        link = folder / paths[key]  # paths.* must lie inside the project: links to the fixture's files
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return folder


def featurize_in(folder: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "stages" / "featurize.py")], cwd=folder, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def same_outputs(a: Path, b: Path) -> None:
    for name in FEATURES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_two_torchrun_processes_write_the_same_bytes_as_one(trained, tmp_path):
    code1, _, err1 = finish(featurize_in(project(tmp_path / "one", trained.spec, trained)))
    code2, out2, err2 = finish(featurize_in(project(tmp_path / "two", trained.spec, trained, processes=2)))
    assert code1 == 0, err1[-2000:]
    assert code2 == 0, err2[-2000:]
    assert "rank 1/2" in out2 + err2, "two ranks really ran"
    same_outputs(tmp_path / "one", tmp_path / "two")
    assert not list((tmp_path / "two").rglob("*.tmp")), "no part files left"
    # the ranks filled the cache: a rerun on two ranks computes nothing and writes the same bytes
    (tmp_path / "two" / "data" / "features" / "train.npy").unlink()
    code3, out3, err3 = finish(featurize_in(tmp_path / "two"))
    assert code3 == 0, err3[-2000:]
    rows = json.loads((tmp_path / "two" / "data" / "feature_rows.json").read_text())
    assert [r["computed"] for r in rows.values()] == [0] * len(rows), out3
    same_outputs(tmp_path / "one", tmp_path / "two")


def test_a_failing_rank_is_one_line_naming_it(trained, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(trained.spec.read_text()[:100])  # a truncated spec: every rank fails reading it
    code, _, err = finish(featurize_in(project(tmp_path / "two", spec, trained, processes=2)))
    assert code == 1
    # both ranks fail; which one torchrun records first is a race, so either may be named
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: featurize rank [01] of 2 failed: DatasetError: cannot read", lines[0]), err
    assert not (tmp_path / "two" / "data" / "features").exists()


@pytest.fixture(scope="module")
def bigger_spec(tmp_path_factory) -> Path:
    """120 train images: each rank of two needs seconds, time enough to kill one mid-way."""
    root = tmp_path_factory.mktemp("bigger")
    write_dataset(root / "raw", n_train=40, n_test=4)
    prepare_spec(stored(root / "raw", root / "raw.zip"), root / "spec.json", seed=0)
    return root / "spec.json"


def rank_pid(folder: Path, rank: int) -> int | None:
    """The pid of torchrun's rank `rank` working in `folder` (Linux /proc), or None: a child of the
    torchrun agent, not one of its DataLoader workers (which inherit RANK and the working directory)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if Path(os.readlink(proc / "cwd")) != folder.resolve():
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
            parent = (proc / "stat").read_text().rpartition(")")[2].split()[1]
            launcher = Path(f"/proc/{parent}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"torch.distributed.run" in launcher:
            return int(proc.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc")
def test_a_killed_rank_leaves_nothing_train_would_accept_and_a_rerun_recovers(trained, bigger_spec, tmp_path):
    folder = project(tmp_path / "two", bigger_spec, trained, processes=2)
    stage = featurize_in(folder)
    deadline = time.monotonic() + 120
    while not list(folder.glob("data/.features.*.parts.tmp/train.computed.1.npy")):  # rank 1 is writing its part
        assert stage.poll() is None and time.monotonic() < deadline, "rank 1 never started writing"
        time.sleep(0.02)
    pid = rank_pid(folder, 1)
    assert pid is not None, "rank 1's process not found"
    os.kill(pid, signal.SIGKILL)
    code, _, err = finish(stage)
    assert code != 0
    # rank 1's SIGKILL, or rank 0's broken collective if torchrun saw that first: one line either way
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    named = re.match(r"error: featurize rank ([01]) of 2 failed: (.+)", lines[0])
    assert named and (named.group(1) == "0" or named.group(2).startswith("Signal 9 (SIGKILL)")), err
    assert not (folder / "data" / "features").exists(), "no output that looks complete"

    code, _, err = finish(featurize_in(folder))  # the rerun
    assert code == 0, err[-2000:]
    clean = project(tmp_path / "clean", bigger_spec, trained)
    assert finish(featurize_in(clean))[0] == 0
    same_outputs(clean, folder)
    assert not list(folder.rglob("*.tmp")), "the killed run's parts are cleaned up"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc")
def test_sigkill_to_the_process_group_leaves_no_orphan_rank_nor_log_folder(trained, bigger_spec, tmp_path):
    """What Ctrl-\\ or a CI timeout does to `dvc repro`: torchrun starts its ranks in sessions of their own,
    so without care they would run on as orphans; they must die with the stage, and the next run clean up."""
    import tempfile

    folder = project(tmp_path / "two", bigger_spec, trained, processes=2)
    stage = featurize_in(folder, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (rank_pid(folder, 0) and rank_pid(folder, 1)):
        assert stage.poll() is None and time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.05)
    ranks = [rank_pid(folder, 0), rank_pid(folder, 1)]
    logs = f"foodvision-torchrun.{stage.pid}."
    assert any(p.name.startswith(logs) for p in Path(tempfile.gettempdir()).iterdir())
    os.killpg(stage.pid, signal.SIGKILL)
    stage.wait()
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
              for pid in ranks if Path(f"/proc/{pid}/stat").exists()):
        assert time.monotonic() < deadline, "a rank outlived the killed stage by 5 s"
        time.sleep(0.1)
    finish(featurize_in(project(tmp_path / "again", bigger_spec, trained, processes=2)))
    assert not any(p.name.startswith(logs) for p in Path(tempfile.gettempdir()).iterdir()), "its logs cleaned up"


def test_two_nodes_with_c10d_rendezvous_write_the_same_bytes_as_one_process(trained, tmp_path):
    """Two torchrun agents on loopback stand in for two machines sharing the project's filesystem."""
    one = project(tmp_path / "one", trained.spec, trained)
    assert finish(featurize_in(one))[0] == 0
    nodes = project(tmp_path / "nodes", trained.spec, trained)
    for _attempt in range(3):  # the endpoint's port is chosen before torchrun binds it: another process may win
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=foodvision-test",
               str(ROOT / "stages" / "featurize.py")]
        agents = [subprocess.Popen(cmd, cwd=nodes, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                  for _ in range(2)]
        results = [a.communicate(timeout=300) for a in agents]
        if not any("address already in use" in err.lower() for _out, err in results):
            break
    for agent, (_out, err) in zip(agents, results):
        assert agent.returncode == 0, err[-3000:]
    assert "rank 1/2" in "".join(out + err for out, err in results)
    same_outputs(one, nodes)
    assert not list(nodes.rglob("*.tmp"))


def test_ctrl_c_with_two_processes_is_one_line_and_exit_130(trained, bigger_spec, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the launcher, torchrun and both ranks."""
    folder = project(tmp_path / "two", bigger_spec, trained, processes=2)
    stage = featurize_in(folder, start_new_session=True, preexec_fn=ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + 120
    while not list(folder.glob("data/.features.*.parts.tmp/train.computed.1.npy")):  # both ranks at work
        assert stage.poll() is None and time.monotonic() < deadline, "rank 1 never started writing"
        time.sleep(0.02)
    os.killpg(stage.pid, signal.SIGINT)
    code, _, err = finish(stage)
    assert code == 130 and err.strip().splitlines() == ["interrupted"], err[-2000:]
    assert not (folder / "data" / "features").exists()
