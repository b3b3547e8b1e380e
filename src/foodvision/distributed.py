"""More than one process for `featurize`, through torchrun (`torch.distributed.run`), never a launcher of ours.

With `featurize.processes: N > 1` the stage script re-runs itself under
`torchrun --standalone --nproc_per_node N`; each rank featurises a contiguous slice of each split and
rank 0 writes the final files in the dataset's order. Across machines, run the same script under
`torchrun --nnodes M --rdzv-backend c10d --rdzv-endpoint host:port` yourself (docs/scale.md).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from foodvision.core.device import cpu_count
from foodvision.core.errors import FoodVisionError
from foodvision.core.files import pid_alive

LOG_PREFIX = "foodvision-torchrun."
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class Rank:
    """Where this process stands: rank, world size, local rank (its GPU on this node), ranks on this node."""

    rank: int = 0
    world: int = 1
    local: int = 0
    local_world: int = 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def slice(self, n: int, unit: int = 1) -> tuple[int, int]:
        """This rank's contiguous share of n items, in whole units (batches): no padding and no duplicates
        (unlike DistributedSampler), and every batch holds the same images as in a single process."""
        units = -(-n // unit)
        return min(n, units * self.rank // self.world * unit), min(n, units * (self.rank + 1) // self.world * unit)


def current() -> Rank:
    """The rank torchrun gave this process (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or a single process."""
    env = os.environ
    return Rank(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                int(env.get("LOCAL_WORLD_SIZE", 1)))


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies. torchrun starts each rank in a session of its
    own, so a SIGKILL to `dvc repro`'s process group would otherwise leave the ranks running as orphans;
    with this in the launcher's child (torchrun) and in each rank, the whole tree goes down with it."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(137)


def _remove_stale_logs() -> None:
    """Log folders of launchers that were killed (their pid is in the name and no longer runs)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{LOG_PREFIX}*"):
        pid = folder.name[len(LOG_PREFIX):].partition(".")[0]
        if pid.isdigit() and not pid_alive(pid):  # a folder without a pid is not ours to judge
            shutil.rmtree(folder, ignore_errors=True)


def launch(script: Path, processes: int) -> int:
    """Run `script` under `torchrun --standalone --nproc_per_node processes`; return its exit code.

    A failing rank is reported in one line, from the error file torchrun's `record` writes for it.
    """
    cores = cpu_count()
    if processes > max(cores, 1):
        raise FoodVisionError(f"featurize.processes is {processes}, but this machine gives this process {cores} "
                              "core(s): each rank needs one; lower it")
    _remove_stale_logs()
    with tempfile.TemporaryDirectory(prefix=f"{LOG_PREFIX}{os.getpid()}.") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               f"--log-dir={logs}", str(script)]
        result = subprocess.run(cmd, stdout=None, stderr=subprocess.PIPE, text=True, check=False,
                                preexec_fn=die_with_parent)
        if result.returncode == 0:
            return 0
        print(f"error: {failure(Path(logs), processes, result.stderr)}", file=sys.stderr)
    return result.returncode or 1


def failure(logs: Path, processes: int, stderr: str = "") -> str:
    """One line naming the rank torchrun reports as the root cause, with its own error (the last line of
    the error file `record` wrote for it) or, for a rank that was killed and wrote none, its signal.

    The root cause comes first: when one rank dies, the others fail too, on the broken collective."""
    cause = stderr.partition("Root Cause")[2]
    found = re.search(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)", cause, re.MULTILINE)
    files = sorted(logs.rglob("error.json"))
    if found:
        files = [f for f in files if f.parent.name == found.group(2)]
    for error_file in files:
        try:
            message = json.loads(error_file.read_text())["message"]
        except (OSError, ValueError, KeyError):
            continue
        text = message.get("message", "") if isinstance(message, dict) else str(message)
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no message)"]
        rank = found.group(1) if found else error_file.parent.name
        return f"featurize rank {rank} of {processes} failed: {last[0].strip()[:300]}"
    how = re.search(r"^\s*traceback\s*:\s*(.+)$", cause, re.MULTILINE)
    again = "the features were not written, run it again"
    if found:
        what = how.group(1).strip() if how else "it exited"
        return f"featurize rank {found.group(1)} of {processes} failed: {what}; {again}"
    return f"featurize under torchrun with {processes} processes failed; {again}"
