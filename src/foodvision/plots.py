"""The PNGs: loss/accuracy curves, confusion matrix, the hardest test images, one titled photo per prediction."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: stages run in terminals and CI
import matplotlib.pyplot as plt
from PIL import Image

from foodvision.core.files import atomic_path

# No "Software" text chunk: the PNG bytes then depend only on the pixels, not the matplotlib version.
PNG_METADATA = {"Software": None}
# zlib level 1 instead of 6: faster saves for a few more bytes (docs/scale.md).
PNG_OPTIONS = {"compress_level": 1}
# Class names and file names are text, never TeX: a class folder named `$^^$` must not crash a stage.
PLAIN_TEXT = {"text.parse_math": False, "text.usetex": False}


def _save(fig: plt.Figure, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=PNG_METADATA, pil_kwargs=PNG_OPTIONS)
    plt.close(fig)


@plt.rc_context(PLAIN_TEXT)
def loss_curves(history: list[dict[str, Any]], dest: Path, held_out: str = "test", finetune_from: int = 0) -> None:
    """Two panels as in the article: loss and accuracy per epoch, train against the held-out split (`test`, or
    `val` with a validation cut); a dashed line where fine-tuning starts (`finetune_from`, an epoch; 0 = none)."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], marker="o", label=f"train_{key}")
        ax.plot(epochs, [r[f"held_out_{key}"] for r in history], marker="o", label=f"{held_out}_{key}")
        if finetune_from:
            ax.axvline(finetune_from - 0.5, color="grey", linestyle="--", label="fine-tune starts")
        ax.set_title(title)
        ax.set_xlabel("Epoch")
        ax.set_xticks(epochs if len(epochs) <= 15 else epochs[::-(-len(epochs) // 15)])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, dest)


MAX_ANNOTATED = 20  # classes up to which every cell gets its count
MAX_LABELLED = 150  # classes up to which every row and column gets its name (Food-101's 101 at 7 pt)
MAX_INCHES = 16.0  # the figure stops growing here (101 classes: 16 x 16 in at 100 dpi)


@plt.rc_context(PLAIN_TEXT)
def confusion(matrix: list[list[int]], classes: list[str], dest: Path) -> None:
    """Counts in the cells for a few classes; for many, colour alone, on a figure of bounded size.

    The size is capped, so 101 or 1,000 classes give a PNG of at most 1600 x 1600 pixels; the exact
    numbers are in the CSV beside it (and `dvc plots show` draws that as an interactive matrix).
    """
    n = len(classes)
    side = min(1.2 * n + 3, MAX_INCHES)
    fig, ax = plt.subplots(figsize=(side, side - 1 if n <= MAX_ANNOTATED else side))
    ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    if n <= MAX_ANNOTATED:
        peak = max(max(row) for row in matrix) or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                        color="white" if matrix[i][j] > peak / 2 else "black")
    if n <= MAX_LABELLED:
        fontsize = max(4.0, min(10.0, 700 / n))  # 16 inches hold 101 rows of 7-point names
        ax.set_xticks(range(n), classes, rotation=45 if n <= MAX_ANNOTATED else 90, ha="right", fontsize=fontsize)
        ax.set_yticks(range(n), classes, fontsize=fontsize)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title(f"Confusion matrix (test, {n} classes)" if n > MAX_ANNOTATED else "Confusion matrix (test)")
    fig.tight_layout()
    _save(fig, dest)


@plt.rc_context(PLAIN_TEXT)
def prediction(image: Image.Image, title: str, correct: bool | None, dest: Path) -> None:
    """The photo, titled `Pred: sushi | Prob: 0.943` (+ `| True: ...`), green/red when known."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(image)
    ax.set_title(title, color={True: "green", False: "red", None: "black"}[correct])
    ax.axis("off")
    fig.tight_layout()
    _save(fig, dest)


SHEET_COLUMNS = 4


def tail(path: str, width: int = 34) -> str:
    """A member path short enough for a tile's caption, its end kept: the file name finds the photo."""
    return path if len(path) <= width else "…" + path[-(width - 1):]


@plt.rc_context(PLAIN_TEXT)
def contact_sheet(photos: list[Image.Image], titles: list[str], correct: list[bool], dest: Path, title: str,
                  columns: int = SHEET_COLUMNS) -> None:
    """Photos in a grid, each under its title (red where something is wrong): where to look first for label
    errors, copies, and what the model cannot tell apart. No photo: the title says there is nothing to show."""
    rows = max(1, -(-len(photos) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, photo, text, ok in zip(axes.flat, photos, titles, correct):
        photo.thumbnail((256, 256))
        ax.imshow(photo)
        ax.set_title(text, fontsize=9, color="green" if ok else "red")
    # wrapped to the figure's width: a 2-column sheet is 6 inches, too narrow for a long title on one line
    fig.suptitle(textwrap.fill(title if photos else f"{title}: none found", width=9 * 3 * columns))
    fig.tight_layout()
    _save(fig, dest)
