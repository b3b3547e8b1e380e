"""What every stage script shares: a one-line error and a non-zero exit for problems users can fix, and
Ctrl-C as one line and exit 130. Outputs are written to temporaries and renamed, so nothing half-written stays,
and a stage's outputs (its `outs:` in dvc.yaml) change together or not at all."""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from foodvision.core.errors import FoodVisionError
from foodvision.core.files import outputs_together
from foodvision.core.params import stage_outputs


def under_torchrun() -> bool:
    """A rank torchrun started (featurize.processes > 1): the launching process owns the stage's outputs."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def run(main: Callable[[], object], stage: str | None = None) -> NoReturn:
    """Run a stage's `main`; with `stage`, its outputs in dvc.yaml are restored if it fails (by the launching
    process only: its ranks' failures end it too)."""
    try:
        with outputs_together(stage_outputs(stage) if stage and not under_torchrun() else []):
            main()
        code = 0
    except FoodVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        # Ctrl-C can land inside a constructor (tqdm's): that half-built object's destructor then fails as the
        # interrupt unwinds, which Python would print after this line as "Exception ignored ... Traceback"
        sys.unraisablehook = _ignore
        print("interrupted", file=sys.stderr)
        code = 130
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Exit without tearing the interpreter down. Freeing torch's and torchvision's modules and the model's
    tensors, memory the OS takes back anyway, cost a stage process time after its work was done
    (docs/scale.md); mypy exits the same way. Exit handlers still run and both streams are flushed: every
    file a stage writes is closed and renamed before `main` returns, and its threads are joined or daemons."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _ignore(unraisable: object) -> None:
    pass
