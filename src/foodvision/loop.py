"""The training loop's pieces, shared by every loop that trains: the head on stored features or on images
(`fit.py`), the fine-tune (`finetune.py`) and any later one (K-fold head training).

An epoch sums loss and accuracy over samples, not batches; the parts not trained stay in eval mode, so
frozen BatchNorm statistics never drift; a validation cut is the same share of every class, drawn with the
seed; the keeper remembers the epoch with the lowest validation loss; each epoch is one row of the curves.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from foodvision.features import FeatureIndex
from foodvision.precision import autocast

# the curves' columns: the held-out split is validation with data.val_fraction > 0, else test (the article's curves)
HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "held_out_loss", "held_out_acc")
Cut = tuple[list[int], list[int]]  # rows of the train split: (kept for training, validation)
EpochHook = Callable[[list[dict[str, Any]]], None]
Step = Callable[[torch.Tensor], None]  # one optimiser step on a batch's loss


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Python, NumPy and torch RNGs, plus deterministic kernels on GPUs: same params, same bytes.

    Every CPU kernel the head's training runs is deterministic already; the switch matters for CUDA/MPS
    (atomics in backward passes), and on a CPU it would only cost an import of torch._inductor.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device is not None and device.type != "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def train_mode(model: nn.Module, trained: Iterable[str]) -> None:
    """Only the named submodules ("" = the whole model) in train mode, and no BatchNorm anywhere."""
    model.eval()
    for name in trained:
        model.get_submodule(name).train()
    for module in model.modules():  # statistics frozen inside the trained blocks too
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def run_epoch(model: nn.Module, batches: Iterable, device: torch.device, *, step: Step | None = None,
              trained: Iterable[str] = ("",), dtype: torch.dtype | None = None,
              memory_format: torch.memory_format = torch.preserve_format, desc: str = "") -> tuple[float, float]:
    """One pass; returns (mean loss, accuracy) over samples, not averaged over batches.

    With `step` it trains: the `trained` submodules in train mode (the rest, and every BatchNorm, in eval
    mode), and `step` called on each batch's loss; without, it scores, all in eval mode and without grads.
    `dtype`: forward and loss under autocast; `memory_format`: how inputs are laid out on the device.
    """
    training = step is not None
    train_mode(model, trained if training else ())
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for inputs, labels in tqdm(batches, desc=desc, leave=False, unit="batch", disable=None):
            inputs, labels = inputs.to(device, memory_format=memory_format), labels.to(device)
            with autocast(device, dtype):
                logits = model(inputs)
                loss = loss_fn(logits, labels)
            if training:
                step(loss)
            total_loss += loss.item() * labels.numel()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += labels.numel()
    return total_loss / seen, correct / seen


def val_cut(labels: list[int], fraction: float, seed: int) -> Cut:
    """Rows of the train split kept for training and cut for validation: the same share of every class
    (at least one image of each class with two or more), drawn with the seed. fraction 0: no cut."""
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for c in np.unique(labels_arr):
        rows = np.flatnonzero(labels_arr == c)
        k = min(max(1, round(fraction * len(rows))), len(rows) - 1) if fraction > 0 else 0
        val += rng.permutation(rows)[:k].tolist()
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


class Keeper:
    """Early stopping on a validation split: remembers the epoch with the lowest held-out loss and its weights,
    and says stop after `patience` epochs without a lower one (0 = never)."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best_loss, self.best_epoch, self.state, self.waited = patience, math.inf, 0, None, 0

    def stop_after(self, epoch: int, loss: float, module: nn.Module) -> bool:
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch
            self.rebase(module)
        else:
            self.waited += 1
        return 0 < self.patience <= self.waited

    def rebase(self, module: nn.Module) -> None:
        """Keep `module`'s weights as the best so far (also: the fine-tune's model, its head warm, goes on from
        the head's best score)."""
        self.state, self.waited = {k: v.detach().clone() for k, v in module.state_dict().items()}, 0

    def restore(self, module: nn.Module) -> None:
        if self.state is not None:
            module.load_state_dict(self.state)


def record(history: list[dict[str, Any]], epoch: int, train: tuple[float, float], held_out: tuple[float, float],
           split: str, on_epoch: EpochHook | None) -> None:
    """One row of the curves (train against the held-out split), printed and handed to `on_epoch`."""
    history.append({"epoch": epoch, "train_loss": round(train[0], 6), "train_acc": round(train[1], 6),
                    "held_out_loss": round(held_out[0], 6), "held_out_acc": round(held_out[1], 6)})
    tqdm.write(f"epoch {epoch} | train_loss {train[0]:.4f} | train_acc {train[1]:.4f} | "
               f"{split}_loss {held_out[0]:.4f} | {split}_acc {held_out[1]:.4f}")
    if on_epoch is not None:
        on_epoch(history)


def metrics_row(history: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """train.json's figures: the last epoch's, or with a validation split the kept (lowest val_loss) epoch's
    with its validation figures. The test split's are evaluate's (metrics/eval.json), not repeated here;
    every epoch's held-out figures are in the history either way."""
    kept = history[-1] if split == "test" else min(history, key=lambda r: r["held_out_loss"])
    row = {"epoch": history[-1]["epoch"], "train_loss": kept["train_loss"], "train_acc": kept["train_acc"]}
    if split == "test":
        return row
    return {**row, "val_loss": kept["held_out_loss"], "val_acc": kept["held_out_acc"], "best_epoch": kept["epoch"]}


def image_loaders(index: FeatureIndex, transform: dict[str, Any], train_tf: Callable, cut: Cut | None,
                  batch_size: int, seed: int, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """The loops on images (`train.augment`, a fine-tune): the train images, less a validation cut, through
    `train_tf` in a seeded shuffle, and the held-out ones (the cut, else test) through the eval transform."""
    from foodvision.core.device import loader_workers
    from foodvision.data import EvalTransform, make_loader, split_images

    workers = loader_workers(device.type)
    size = transform["resize_size"]
    train_rows, val_rows = cut if cut is not None else (None, None)
    train_images = split_images(index, "train", train_tf, size, train_rows)
    held_out = (split_images(index, "test", EvalTransform(transform), size) if cut is None
                else split_images(index, "train", EvalTransform(transform), size, val_rows))
    train_loader = make_loader(train_images, batch_size, shuffle=True, seed=seed, workers=workers)
    held_out_loader = make_loader(held_out, batch_size, shuffle=False, seed=seed, workers=workers)
    return train_loader, held_out_loader
