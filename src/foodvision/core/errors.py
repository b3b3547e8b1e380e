"""One exception type for every failure a user can fix, so stages can print it as one line."""

from __future__ import annotations

MAX_LISTED = 10  # names shown in one error line


class FoodVisionError(Exception):
    """A problem with the user's input (params, files, URLs): the message says what to do."""


class DatasetError(FoodVisionError):
    """The dataset or a file a stage wrote from it is missing, damaged or not what the params say."""


def listed(names: list[str]) -> str:
    """The first MAX_LISTED names, and how many there are in all: an error stays one readable line."""
    return ", ".join(names[:MAX_LISTED]) + (f" … ({len(names)} in all)" if len(names) > MAX_LISTED else "")
