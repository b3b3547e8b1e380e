"""train stage: the head first, then (opt-in) the fine-tune; the checkpoint, metrics, history and curves.

This module only orchestrates: it checks the inputs, picks the head's loop (`fit.py`: stored features, or
images with `train.augment`), hands the trained head to the fine-tune (`finetune.py`) when
`finetune.blocks` > 0, and writes the results. Metrics and history are rewritten after every epoch, so
`dvc exp show` and plot viewers follow a long run.

With `data.val_fraction` a seeded per-class cut of the train rows is held out: the curves show it instead
of test, the epoch with the lowest validation loss is kept (`train.patience` stops early), and the test
split is left to `evaluate`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from foodvision.checkpoint import save_checkpoint
from foodvision.core.device import pick_device, torch_threads
from foodvision.core.errors import ModelError
from foodvision.core.files import write_csv, write_json
from foodvision.core.params import FinetuneParams, ModelParams, ParamsError, TrainParams
from foodvision.features import FeatureIndex, load_index, open_split
from foodvision.fit import FeatureRows, fit_features, fit_images
from foodvision.head import new_head
from foodvision.loop import HISTORY_FIELDS, Cut, Keeper, metrics_row, seed_everything, val_cut
from foodvision.spec import load_transform
from foodvision.statedict import load_state_dict_file


@dataclass(frozen=True)
class TrainOutputs:
    """Where `train` writes (paths.model, paths.train_metrics, paths.history, paths.curves)."""

    model: Path
    metrics: Path  # rewritten after every epoch, as is the history
    history: Path
    curves: Path


def train(features_dir: Path, pretrained_path: Path, transform_path: Path, model_params: ModelParams,
          train_params: TrainParams, finetune_params: FinetuneParams, *, seed: int, val_fraction: float, device: str,
          out: TrainOutputs) -> list[dict[str, Any]]:
    """Train the head (then, with finetune.blocks, the last blocks too); write the checkpoint, metrics, history
    CSV (both after every epoch) and curves."""
    dev = pick_device(device)
    index = load_index(features_dir)
    cut = _checked_cut(index, features_dir, model_params, finetune_params, val_fraction, seed)
    transform = load_transform(transform_path)
    seed_everything(seed, dev)
    keeper = Keeper(train_params.patience) if cut is not None else None
    split = "test" if cut is None else "val"
    progress = _Progress(out.history, out.metrics, split)
    start = time.perf_counter()
    model: nn.Module | None = None
    if train_params.augment:
        model, head = _classifier(model_params, pretrained_path, len(index.classes), seed)
        history = fit_images(model.to(dev), head, index, transform, train_params, seed, dev, progress, cut, keeper)
    else:
        head = index.head
        net, history = _head_on_features(features_dir, index, model_params, train_params, seed, dev, cut, keeper,
                                         progress)
    mode = "full loop on images, augmented" if train_params.augment else "stored features"
    print(f"trained the head {len(history)} epoch(s) on {dev} ({mode}) in {time.perf_counter() - start:.1f} s")
    finetuned, head_epochs = None, len(history)
    if finetune_params.blocks > 0:
        from foodvision.finetune import finetune, unfreeze

        if model is None:  # the head trained on stored features, put on the pretrained backbone: the warm start
            model, head = _classifier(model_params, pretrained_path, len(index.classes), seed)
            model.get_submodule(head).load_state_dict(net.state_dict())
        finetuned = unfreeze(model, head, finetune_params.blocks, model_params.name)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"fine-tuning {trainable:,} parameters (the head and {', '.join(finetuned)})")
        start = time.perf_counter()
        finetune(model, head, finetuned, index, transform, finetune_params, cut=cut, keeper=keeper, seed=seed,
                 device=dev, history=history, on_epoch=progress)
        print(f"fine-tuned the head and {', '.join(finetuned)} {len(history) - head_epochs} epoch(s) on {dev} "
              f"in {time.perf_counter() - start:.1f} s")
    state = model.state_dict() if model is not None else _on_pretrained(pretrained_path, head, net)
    save_checkpoint(out.model, state, name=model_params.name, head=head, dropout=model_params.dropout,
                    class_names=index.classes, transform=transform, finetuned=finetuned)
    from foodvision.plots import loss_curves  # matplotlib: only once, at the end

    loss_curves(history, out.curves, split, head_epochs + 1 if finetuned else 0)
    return history


def _checked_cut(index: FeatureIndex, features_dir: Path, model_params: ModelParams, finetune_params: FinetuneParams,
                 val_fraction: float, seed: int) -> Cut | None:
    """Every check that can fail before training, in a second; the validation cut (None without one)."""
    if index.model != model_params.name:
        raise ModelError(f"{features_dir} holds features of {index.model!r}, but model.name is "
                         f"{model_params.name!r}; run `dvc repro featurize`")
    cut = val_cut(index.split("train").labels, val_fraction, seed) if val_fraction > 0 else None
    if cut is not None and not cut[1]:
        raise ParamsError(f"data.val_fraction is {val_fraction}, but no class has two train images to cut one "
                          "from; set data.val_fraction: 0")
    if finetune_params.blocks > 0:
        from foodvision.finetune import check_blocks

        check_blocks(model_params.name, index.head, finetune_params.blocks)
    return cut


class _Progress:
    """After every epoch: the history first (whoever sees epoch n in the metrics finds n rows in the history),
    then the metrics."""

    def __init__(self, history_out: Path, metrics_out: Path, split: str) -> None:
        self.history_out, self.metrics_out, self.split = history_out, metrics_out, split

    def __call__(self, history: list[dict[str, Any]]) -> None:
        write_csv(self.history_out, list(HISTORY_FIELDS), [[row[k] for k in HISTORY_FIELDS] for row in history])
        write_json(self.metrics_out, metrics_row(history, self.split))


def _classifier(model_params: ModelParams, pretrained_path: Path, num_classes: int,
                seed: int) -> tuple[nn.Module, str]:
    from foodvision.model import classifier_for  # torchvision: only for the loops on images

    return classifier_for(model_params.name, pretrained_path, num_classes, model_params.dropout, seed)


def _head_on_features(features_dir: Path, index: FeatureIndex, model_params: ModelParams, train_params: TrainParams,
                      seed: int, dev: torch.device, cut: Cut | None, keeper: Keeper | None,
                      progress: _Progress) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A new head trained on the stored rows (less the validation cut) against test or the cut."""
    torch.manual_seed(seed)
    net = new_head(index.feature_dim, len(index.classes), model_params.dropout).to(dev)
    train_file = open_split(features_dir, index, "train")
    train_set = FeatureRows(train_file, None if cut is None else cut[0])
    held_out = FeatureRows(open_split(features_dir, index, "test")) if cut is None else FeatureRows(train_file, cut[1])
    # one thread: the head's steps are tiny (32 x 1280 by default), so threads gain little alone and lose
    # several times over when another process holds a core (a queued experiment, CI); the same bytes either
    # way (a test checks; docs/scale.md has the figures)
    with torch_threads(1) if dev.type == "cpu" else nullcontext():
        history = fit_features(net, train_set, held_out, train_params, seed, dev, progress, keeper)
    return net, history


def _on_pretrained(pretrained_path: Path, head: str, net: nn.Module) -> dict[str, Any]:
    """The whole classifier's state: the pretrained backbone's tensors with the trained head in place of its own."""
    backbone = load_state_dict_file(pretrained_path)
    state = {k: v for k, v in backbone.items() if not k.startswith(head + ".")}
    state.update({f"{head}.{k}": v for k, v in net.state_dict().items()})
    return state
