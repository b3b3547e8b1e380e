"""train stage: a new head (Dropout + Linear) trained with Adam + cross-entropy on the stored features.

The backbone is frozen and in eval mode and the eval transform is deterministic, so the head sees the
same features in every epoch: `featurize` computed them once, and this stage reads them back by row,
never decoding an image or running the backbone (nor importing torchvision). With `train.augment` every
epoch needs new random crops of the images, so it runs the full loop on images instead. Both paths give
the same results without augmentation (a test checks, to 1e-4). Metrics and history are rewritten after
every epoch, so `dvc exp show` and plot viewers follow a long run.
"""

from __future__ import annotations

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
from foodvision.core.params import ModelParams, TrainParams
from foodvision.features import FeatureFile, load_index, open_split
from foodvision.head import load_state_dict_file, new_head
from foodvision.spec import load_spec, load_transform

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
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
    """torch.optim.Adam's update with its defaults, through torch's own functional `adam`, without the
    Optimizer base class: its methods import torch._dynamo on first call, over a second of every train
    process on a CPU. The same arithmetic, so the same bytes (a test checks against torch.optim.Adam)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.tensor(0.0, dtype=torch.get_default_dtype()) for _ in self.params]

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
             differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=False)


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


def _epochs(net: nn.Module, trainable: str, train_batches: Callable[[], Iterable], test_batches: Callable[[], Iterable],
            params: TrainParams, device: torch.device, on_epoch: EpochHook | None) -> list[dict[str, Any]]:
    loss_fn = nn.CrossEntropyLoss()
    optimizer = Adam([p for p in net.parameters() if p.requires_grad], lr=params.lr)
    history: list[dict[str, Any]] = []
    for epoch in tqdm(range(1, params.epochs + 1), desc="epochs", unit="epoch"):
        train_loss, train_acc = run_epoch(net, train_batches(), loss_fn, device, optimizer, trainable, f"train {epoch}")
        test_loss, test_acc = run_epoch(net, test_batches(), loss_fn, device, desc=f"test {epoch}")
        history.append({"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                        "test_loss": round(test_loss, 6), "test_acc": round(test_acc, 6)})
        tqdm.write(f"epoch {epoch} | train_loss {train_loss:.4f} | train_acc {train_acc:.4f} | "
                   f"test_loss {test_loss:.4f} | test_acc {test_acc:.4f}")
        if on_epoch is not None:
            on_epoch(history)
    return history


class FeatureRows(Dataset):
    """Stored feature rows as a torch Dataset: `__getitems__` serves a whole batch, one small read per row,
    in the sampling order a DataLoader over in-memory tensors with the same generator would draw."""

    def __init__(self, rows: FeatureFile) -> None:
        self.file = rows

    def __len__(self) -> int:
        return len(self.file)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.file.take(indices)), torch.from_numpy(self.file.labels[list(indices)])


def _as_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch  # `__getitems__` already made it


def _in_order(rows: FeatureFile, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    return ((torch.from_numpy(x), torch.from_numpy(y)) for x, y in rows.batches(batch_size))


def fit_features(head: nn.Module, train_set: FeatureFile, test_set: FeatureFile, params: TrainParams, seed: int,
                 device: torch.device, on_epoch: EpochHook | None = None) -> list[dict[str, Any]]:
    """Train `head` on stored features; the shuffle order is the one a DataLoader over images would draw."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(FeatureRows(train_set), batch_size=params.batch_size, shuffle=True, generator=generator,
                        collate_fn=_as_batch)
    return _epochs(head, "", lambda: loader, lambda: _in_order(test_set, params.batch_size), params, device, on_epoch)


def fit_images(model: nn.Module, head: str, spec: dict[str, Any], transform: dict[str, Any], params: TrainParams,
               seed: int, device: torch.device, on_epoch: EpochHook | None = None) -> list[dict[str, Any]]:
    """The full loop on images: each epoch decodes every image and runs the frozen backbone.

    Needed with `train.augment` (random crops change every epoch); without it, it is the reference
    that `fit_features` must match.
    """
    from foodvision.core.device import loader_workers
    from foodvision.data import ImageSamples, augment_transform, build_transform, make_loader

    workers = loader_workers(device.type)
    root, size = Path(spec["root"]), transform["resize_size"]
    train_tf = augment_transform(transform) if params.augment else build_transform(transform)
    train_loader = make_loader(ImageSamples(root, spec["splits"]["train"], train_tf, size), params.batch_size,
                               shuffle=True, seed=seed, workers=workers)
    test_loader = make_loader(ImageSamples(root, spec["splits"]["test"], build_transform(transform), size),
                              params.batch_size, shuffle=False, seed=seed, workers=workers)
    return _epochs(model, head, lambda: train_loader, lambda: test_loader, params, device, on_epoch)


def train(features_dir: Path, pretrained_path: Path, transform_path: Path, spec_path: Path, model_params: ModelParams,
          train_params: TrainParams, *, seed: int, device: str, model_out: Path, metrics_out: Path, history_out: Path,
          curves_out: Path) -> list[dict[str, Any]]:
    """Train the head; write the checkpoint, metrics, history CSV (both after every epoch) and curves."""
    dev = pick_device(device)
    index = load_index(features_dir)
    if index["model"] != model_params.name:
        raise ModelError(f"{features_dir} holds features of {index['model']!r}, but model.name is "
                         f"{model_params.name!r}; run `dvc repro featurize`")
    transform = load_transform(transform_path)
    classes = index["classes"]
    seed_everything(seed, dev)
    head_params = index["feature_dim"] * len(classes) + len(classes)
    extra = {"seed": seed, "params_total": index["backbone_params"] + head_params, "params_trainable": head_params}

    def checkpoint_progress(history: list[dict[str, Any]]) -> None:
        # the history first: whoever sees epoch n in the metrics finds n rows in the history
        write_csv(history_out, list(HISTORY_FIELDS), [[row[k] for k in HISTORY_FIELDS] for row in history])
        write_json(metrics_out, {**history[-1], **extra})

    start = time.perf_counter()
    if train_params.augment:
        from foodvision.model import classifier_for

        model, head = classifier_for(model_params.name, pretrained_path, len(classes), model_params.dropout, seed)
        model.to(dev)
        history = fit_images(model, head, load_spec(spec_path), transform, train_params, seed, dev,
                             checkpoint_progress)
        state = model.state_dict()
    else:
        head = index["head"]
        torch.manual_seed(seed)
        net = new_head(index["feature_dim"], len(classes), model_params.dropout).to(dev)
        train_set, test_set = (open_split(features_dir, index, s) for s in ("train", "test"))
        # one thread: the head's steps are tiny (32 x 1280 by default), so threads gain nothing alone (7.1 vs 6.8 s
        # for 5 epochs of 24,000 rows on 2 cores) and lose 5x when another process holds a core (36 vs 7 s: a
        # queued experiment, CI); the same bytes either way (a test checks)
        with torch_threads(1) if dev.type == "cpu" else nullcontext():
            history = fit_features(net, train_set, test_set, train_params, seed, dev, checkpoint_progress)
        backbone = load_state_dict_file(pretrained_path)
        state = {k: v for k, v in backbone.items() if not k.startswith(head + ".")}
        state.update({f"{head}.{k}": v for k, v in net.state_dict().items()})
    mode = "full loop on images, augmented" if train_params.augment else "stored features"
    print(f"trained {train_params.epochs} epoch(s) on {dev} ({mode}) in {time.perf_counter() - start:.1f} s")
    save_checkpoint(model_out, state, name=model_params.name, head=head, dropout=model_params.dropout,
                    class_names=classes, transform=transform)
    from foodvision.plots import loss_curves  # matplotlib: only once, at the end

    loss_curves(history, curves_out)
    return history
