"""One exception type for every failure a user can fix, so stages can print it as one line."""

from __future__ import annotations

import reprlib
from typing import Any

MAX_LISTED = 10  # names shown in one error line
SHOWN = 80  # characters of a value quoted in an error message


class FoodVisionError(Exception):
    """A problem with the user's input (params, files, URLs): the message says what to do."""


class DatasetError(FoodVisionError):
    """The dataset or a file a stage wrote from it is missing, damaged or not what the params say."""


class ModelError(FoodVisionError):
    """A model, weights or ONNX file, or the precision and hardware to run it, is missing, damaged or does not fit."""


def listed(names: list[str]) -> str:
    """The first MAX_LISTED names, and how many there are in all: an error stays one readable line."""
    return ", ".join(names[:MAX_LISTED]) + (f" … ({len(names)} in all)" if len(names) > MAX_LISTED else "")


def shown(value: Any, quote: bool = True) -> str:
    """A value as an error message quotes it: at most SHOWN characters (an alias bomb is megabytes)."""
    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlist, short.maxdict, short.maxlevel = SHOWN, SHOWN, 6, 6, 2
    text = short.repr(value)
    text = text if quote or not isinstance(value, str) else value
    return text if len(text) <= SHOWN else text[:SHOWN - 1] + "…"
