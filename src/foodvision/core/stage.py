"""What every stage script shares: a one-line error and a non-zero exit for problems users can fix, and
Ctrl-C as one line and exit 130 (outputs are written to temporaries and renamed, so nothing half-written stays)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from foodvision.core.errors import FoodVisionError


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except FoodVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C can land inside a constructor (tqdm's): that half-built object's destructor then fails as the
        # interrupt unwinds, which Python would print after this line as "Exception ignored ... Traceback"
        sys.unraisablehook = _ignore
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _ignore(unraisable: object) -> None:
    pass
