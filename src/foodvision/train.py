"""train stage: a new head (Dropout + Linear) trained with Adam + cross-entropy on the stored features.

The backbone is frozen and in eval mode and the eval transform is deterministic, so the head sees the
same features in every epoch: `featurize` computed them once, and this stage reads them back by row,
never decoding an image or running the backbone (nor importing torchvision). With `train.augment` every
epoch needs new random crops of the images, so it runs the full loop on images instead. Both paths give
the same results without augmentation (a test checks, to 1e-4). Metrics and history are rewritten after
every epoch, so `dvc exp show` and plot viewers follow a long run.

With `data.val_fraction` a seeded per-class cut of the train rows is held out: the curves show it instead
of test, the epoch with the lowest validation loss is kept (`train.patience` stops early), and the test
split is left to `evaluate`. With `finetune.blocks` the trained head is the warm start of `finetune.py`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from foodvision.checkpoint import ModelError, save_checkpoint
from foodvision.core.device import pick_device, torch_threads
from foodvision.core.files import write_csv, write_json
from foodvision.core.params import FinetuneParams, ModelParams, ParamsError, TrainParams
from foodvision.features import FeatureFile, load_index, open_split, rows_per_read
from foodvision.head import load_state_dict_file, new_head
from foodvision.spec import load_transform

# the curves' columns: the held-out split is validation with data.val_fraction > 0, else test (the article's curves)
HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "held_out_loss", "held_out_acc")
Cut = tuple[list[int], list[int]]  # rows of the train split: (kept for training, validation)
EpochHook = Callable[[list[dict[str, Any]]], None]


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Python, NumPy and torch RNGs, plus deterministic kernels on GPUs: same params, same bytes.

    Every CPU kernel this stage runs is deterministic already; the switch matters for CUDA/MPS
    (atomics in backward passes), and on a CPU it would only cost an import of torch._inductor (0.75 s).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device is not None and device.type != "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


class Adam:
    """torch.optim.Adam(fused=True) with its defaults, through torch's own functional `adam`, without the
    Optimizer base class: its methods import torch._dynamo on first call, over a second of every train
    process on a CPU. The same kernel, so the same bytes (a test checks against torch.optim.Adam). Fused: one
    kernel per step instead of seven operations per tensor, 35 against 95 microseconds per head step on a CPU."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.tensor(0.0, dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        from torch.optim.adam import adam

        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        adam([self.params[i] for i in live], [self.params[i].grad for i in live], [self.exp_avgs[i] for i in live],
             [self.exp_avg_sqs[i] for i in live], [], [self.steps[i] for i in live], amsgrad=False, beta1=0.9,
             beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8, maximize=False, foreach=None, capturable=False,
             differentiable=False, fused=True, grad_scale=None, found_inf=None, has_complex=False)


def run_epoch(model: nn.Module, batches: Iterable, loss_fn: nn.Module, device: torch.device,
              optimizer: Adam | None = None, head: str = "", desc: str = "") -> tuple[float, float]:
    """One pass; returns (mean loss, accuracy) over samples, not averaged over batches.

    `head` names the trainable part of `model` ("" = all of it, as when it is the head alone); the rest
    stays in eval mode, so frozen BatchNorm statistics never drift.
    """
    training = optimizer is not None
    model.eval()
    if training:
        model.get_submodule(head).train()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for inputs, labels in tqdm(batches, desc=desc, leave=False, unit="batch"):
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs)
            loss = loss_fn(logits, labels)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total_loss += loss.item() * labels.numel()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += labels.numel()
    return total_loss / seen, correct / seen


def val_cut(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
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


def _epochs(net: nn.Module, trainable: str, train_batches: Callable[[], Iterable], held_out: Callable[[], Iterable],
            params: TrainParams, device: torch.device, on_epoch: EpochHook | None,
            keeper: Keeper | None) -> list[dict[str, Any]]:
    """`params.epochs` passes, or fewer when `keeper` (a validation split) says stop; then its best epoch's weights."""
    loss_fn = nn.CrossEntropyLoss()
    optimizer = Adam([p for p in net.parameters() if p.requires_grad], lr=params.lr)
    split = "test" if keeper is None else "val"
    history: list[dict[str, Any]] = []
    for epoch in tqdm(range(1, params.epochs + 1), desc="epochs", unit="epoch"):
        train = run_epoch(net, train_batches(), loss_fn, device, optimizer, trainable, f"train {epoch}")
        scores = run_epoch(net, held_out(), loss_fn, device, desc=f"{split} {epoch}")
        record(history, epoch, train, scores, split, on_epoch)
        if keeper is not None and keeper.stop_after(epoch, scores[0], net):
            break
    if keeper is not None:
        keeper.restore(net)
    return history


class FeatureRows(Dataset):
    """Stored feature rows (all, or the given `rows` of the file) as a torch Dataset: `__getitems__` serves a
    whole batch, one small read per row, in the sampling order a DataLoader over in-memory tensors with the same
    generator would draw."""

    def __init__(self, file: FeatureFile, rows: list[int] | None = None) -> None:
        self.file, self.rows = file, rows

    def __len__(self) -> int:
        return len(self.file) if self.rows is None else len(self.rows)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = list(indices) if self.rows is None else [self.rows[i] for i in indices]
        return torch.from_numpy(self.file.take(rows)), torch.from_numpy(self.file.labels[rows])


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # `__getitems__` already made it


def _in_order(rows: FeatureRows, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if rows.rows is None:
        return ((torch.from_numpy(x), torch.from_numpy(y)) for x, y in rows.file.batches(batch_size))
    return (rows.__getitems__(list(range(i, min(i + batch_size, len(rows))))) for i in range(0, len(rows), batch_size))


def fit_features(head: nn.Module, train_set: FeatureRows, held_out: FeatureRows, params: TrainParams, seed: int,
                 device: torch.device, on_epoch: EpochHook | None = None,
                 keeper: Keeper | None = None) -> list[dict[str, Any]]:
    """Train `head` on stored features; the shuffle order is the one a DataLoader over images would draw.

    `held_out` is the validation cut when `keeper` is given (early stopping, best epoch kept), else test. It is
    scored in blocks of memory's size, not train.batch_size: the same scores to float rounding, a few matrix
    products instead of N / 32 steps."""
    train_set.file.read_ahead()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=params.batch_size, shuffle=True, generator=generator,
                        collate_fn=_as_batch)
    block = rows_per_read(held_out.file.cols)
    return _epochs(head, "", lambda: loader, lambda: _in_order(held_out, block), params, device, on_epoch, keeper)


def image_loaders(index: dict[str, Any], transform: dict[str, Any], train_tf: Callable, cut: Cut | None,
                  batch_size: int, seed: int, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """The loops on images (`train.augment`, a fine-tune): the train images, less a validation cut, through
    `train_tf` in a seeded shuffle, and the held-out ones (the cut, else test) through the eval transform."""
    from foodvision.core.device import loader_workers
    from foodvision.data import ImageSamples, build_transform, image_samples, make_loader

    workers = loader_workers(device.type)
    root, size = Path(index["root"]), transform["resize_size"]
    train_rows, val_rows = cut if cut is not None else (None, None)
    held_out = image_samples(index, "test") if cut is None else image_samples(index, "train", val_rows)
    train_loader = make_loader(ImageSamples(root, image_samples(index, "train", train_rows), train_tf, size),
                               batch_size, shuffle=True, seed=seed, workers=workers)
    held_out_loader = make_loader(ImageSamples(root, held_out, build_transform(transform), size),
                                  batch_size, shuffle=False, seed=seed, workers=workers)
    return train_loader, held_out_loader


def fit_images(model: nn.Module, head: str, index: dict[str, Any], transform: dict[str, Any], params: TrainParams,
               seed: int, device: torch.device, on_epoch: EpochHook | None = None, cut: Cut | None = None,
               keeper: Keeper | None = None) -> list[dict[str, Any]]:
    """The full loop on images: each epoch decodes every image and runs the frozen backbone.

    Needed with `train.augment` (random crops change every epoch); without it, it is the reference
    that `fit_features` must match. `cut`: (train rows, validation rows) of the train split, with its `keeper`.
    """
    from foodvision.data import augment_transform, build_transform

    train_tf = augment_transform(transform) if params.augment else build_transform(transform)
    train_loader, held_out_loader = image_loaders(index, transform, train_tf, cut, params.batch_size, seed, device)
    return _epochs(model, head, lambda: train_loader, lambda: held_out_loader, params, device, on_epoch, keeper)


def metrics_row(history: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """train.json's figures: the last epoch's, or with a validation split the kept (lowest val_loss) epoch's."""
    kept = history[-1] if split == "test" else min(history, key=lambda r: r["held_out_loss"])
    row = {"epoch": history[-1]["epoch"], "train_loss": kept["train_loss"], "train_acc": kept["train_acc"],
           f"{split}_loss": kept["held_out_loss"], f"{split}_acc": kept["held_out_acc"]}
    return row if split == "test" else {**row, "best_epoch": kept["epoch"]}


def train(features_dir: Path, pretrained_path: Path, transform_path: Path, model_params: ModelParams,
          train_params: TrainParams, finetune_params: FinetuneParams, *, seed: int, val_fraction: float, device: str,
          model_out: Path, metrics_out: Path, history_out: Path, curves_out: Path) -> list[dict[str, Any]]:
    """Train the head (then, with finetune.blocks, the last blocks too); write the checkpoint, metrics, history
    CSV (both after every epoch) and curves."""
    dev = pick_device(device)
    index = load_index(features_dir)
    if index["model"] != model_params.name:
        raise ModelError(f"{features_dir} holds features of {index['model']!r}, but model.name is "
                         f"{model_params.name!r}; run `dvc repro featurize`")
    transform = load_transform(transform_path)
    classes = index["classes"]
    seed_everything(seed, dev)
    cut = val_cut(index["splits"]["train"]["labels"], val_fraction, seed) if val_fraction > 0 else None
    if cut is not None and not cut[1]:
        raise ParamsError(f"data.val_fraction is {val_fraction}, but no class has two train images to cut one "
                          "from; set data.val_fraction: 0")
    if finetune_params.blocks > 0:
        from foodvision.finetune import check_blocks

        check_blocks(model_params.name, index["head"], finetune_params.blocks)
    keeper = Keeper(train_params.patience) if cut is not None else None
    split = "test" if cut is None else "val"
    head_params = index["feature_dim"] * len(classes) + len(classes)
    extra = {"seed": seed, "params_total": index["backbone_params"] + head_params, "params_trainable": head_params}

    def checkpoint_progress(history: list[dict[str, Any]]) -> None:
        # the history first: whoever sees epoch n in the metrics finds n rows in the history
        write_csv(history_out, list(HISTORY_FIELDS), [[row[k] for k in HISTORY_FIELDS] for row in history])
        write_json(metrics_out, {**metrics_row(history, split), **extra})

    start = time.perf_counter()
    if train_params.augment:
        from foodvision.model import classifier_for

        model, head = classifier_for(model_params.name, pretrained_path, len(classes), model_params.dropout, seed)
        model.to(dev)
        history = fit_images(model, head, index, transform, train_params, seed, dev, checkpoint_progress, cut, keeper)
    else:
        head = index["head"]
        torch.manual_seed(seed)
        net = new_head(index["feature_dim"], len(classes), model_params.dropout).to(dev)
        train_file = open_split(features_dir, index, "train")
        train_set = FeatureRows(train_file, None if cut is None else cut[0])
        held_out = (FeatureRows(open_split(features_dir, index, "test")) if cut is None
                    else FeatureRows(train_file, cut[1]))
        # one thread: the head's steps are tiny (32 x 1280 by default), so threads gain nothing alone (7.1 vs 6.8 s
        # for 5 epochs of 24,000 rows on 2 cores) and lose 5x when another process holds a core (36 vs 7 s: a
        # queued experiment, CI); the same bytes either way (a test checks)
        with torch_threads(1) if dev.type == "cpu" else nullcontext():
            history = fit_features(net, train_set, held_out, train_params, seed, dev, checkpoint_progress, keeper)
        model = None
    mode = "full loop on images, augmented" if train_params.augment else "stored features"
    print(f"trained the head {len(history)} epoch(s) on {dev} ({mode}) in {time.perf_counter() - start:.1f} s")
    finetuned, head_epochs = None, len(history)
    if finetune_params.blocks > 0:
        from foodvision.finetune import finetune, unfreeze
        from foodvision.model import classifier_for

        if model is None:  # the head trained on stored features, put on the pretrained backbone: the warm start
            model, head = classifier_for(model_params.name, pretrained_path, len(classes), model_params.dropout, seed)
            model.get_submodule(head).load_state_dict(net.state_dict())
        finetuned = unfreeze(model, head, finetune_params.blocks, model_params.name)
        extra["params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        start = time.perf_counter()
        finetune(model, head, finetuned, index, transform, finetune_params, cut=cut, keeper=keeper, seed=seed,
                 device=dev, history=history, on_epoch=checkpoint_progress)
        print(f"fine-tuned the head and {', '.join(finetuned)} {len(history) - head_epochs} epoch(s) on {dev} "
              f"in {time.perf_counter() - start:.1f} s")
    if model is not None:
        state = model.state_dict()
    else:
        backbone = load_state_dict_file(pretrained_path)
        state = {k: v for k, v in backbone.items() if not k.startswith(head + ".")}
        state.update({f"{head}.{k}": v for k, v in net.state_dict().items()})
    save_checkpoint(model_out, state, name=model_params.name, head=head, dropout=model_params.dropout,
                    class_names=classes, transform=transform, finetuned=finetuned)
    from foodvision.plots import loss_curves  # matplotlib: only once, at the end

    loss_curves(history, curves_out, split, head_epochs + 1 if finetuned else 0)
    return history
