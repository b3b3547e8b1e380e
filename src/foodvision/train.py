"""train stage: a frozen pretrained backbone, a new head, Adam + cross-entropy, per-epoch history.

The backbone is frozen and kept in eval mode and, without augmentation, the eval transform is
deterministic: every image's features are the same in every epoch. So train computes each split's
features once and trains the head on those tensors; with `train.augment` it runs the full loop.
Both give the same metrics (within float tolerance), which a test checks.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchinfo import summary
from tqdm import tqdm

from foodvision.atomic import write_csv, write_json, write_text
from foodvision.data import augment_transform, load_spec, loader_workers, make_loader
from foodvision.model import (classifier_for, for_inference, pick_device, resolve_weights, save_checkpoint,
                              set_train_mode)
from foodvision.params import ModelParams, TrainParams
from foodvision.plots import loss_curves

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs plus deterministic kernels: same params, same bytes."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def run_epoch(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device,
              optimizer: torch.optim.Optimizer | None = None, head: str = "", desc: str = "") -> tuple[float, float]:
    """One pass; returns (mean loss, accuracy) over samples, not averaged over batches.

    `head` names the trainable part ("" = all of `model`, as when it is the head alone).
    """
    training = optimizer is not None
    if training:
        set_train_mode(model, head)
    else:
        model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for inputs, labels in tqdm(loader, desc=desc, leave=False, unit="batch"):
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


def head_inputs(body: nn.Module, loader: DataLoader, device: torch.device,
                desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's features (what the head sees), once: batched, inference mode.

    `body` is the model without its head, e.g. `for_inference(model)` with the head set to Identity.
    """
    feats, labels = [], []
    with torch.inference_mode():
        for images, target in tqdm(loader, desc=desc, leave=False, unit="batch"):
            feats.append(body(images.to(device, memory_format=torch.channels_last)).float().cpu())
            labels.append(target)
    return torch.cat(feats), torch.cat(labels)


def model_summary(model: nn.Module, batch_size: int, crop_size: int) -> str:
    """torchinfo's table as in the article; eval mode, so summarising never touches BN stats."""
    stats = summary(model, input_size=(batch_size, 3, crop_size, crop_size), verbose=0, mode="eval",
                    col_names=["input_size", "output_size", "num_params", "trainable"],
                    col_width=20, row_settings=["var_names"], device="cpu")
    return str(stats) + "\n"


def fit(model: nn.Module, head: str, spec: dict[str, Any], params: TrainParams, seed: int,
        device: torch.device, cache_features: bool | None = None) -> list[dict[str, Any]]:
    """Train the head for `params.epochs`; return the per-epoch history.

    `cache_features` defaults to "unless augmenting"; tests force the full loop to compare both.
    """
    if cache_features is None:
        cache_features = not params.augment
    workers = loader_workers(device)
    if not cache_features:
        transform = augment_transform(spec["transform"]) if params.augment else None
        train_loader = make_loader(spec, "train", shuffle=True, seed=seed, workers=workers, transform=transform)
        test_loader = make_loader(spec, "test", shuffle=False, seed=seed, workers=workers)
        net, trainable = model, head
    else:
        batches = {split: make_loader(spec, split, shuffle=False, seed=seed, workers=workers)
                   for split in ("train", "test")}
        body = for_inference(model)
        body.set_submodule(head, nn.Identity())
        train_x, train_y = head_inputs(body, batches["train"], device, desc="features train")
        test_x, test_y = head_inputs(body, batches["test"], device, desc="features test")
        del body
        generator = torch.Generator().manual_seed(seed)  # the same shuffle order the image loader draws
        train_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=spec["batch_size"], shuffle=True,
                                  generator=generator)
        test_loader = DataLoader(TensorDataset(test_x, test_y), batch_size=spec["batch_size"])
        net, trainable = model.get_submodule(head), ""
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=params.lr)
    history = []
    for epoch in tqdm(range(1, params.epochs + 1), desc="epochs", unit="epoch"):
        train_loss, train_acc = run_epoch(net, train_loader, loss_fn, device, optimizer, trainable, f"train {epoch}")
        test_loss, test_acc = run_epoch(net, test_loader, loss_fn, device, desc=f"test {epoch}")
        history.append({"epoch": epoch, "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
                        "test_loss": round(test_loss, 6), "test_acc": round(test_acc, 6)})
        tqdm.write(f"epoch {epoch} | train_loss {train_loss:.4f} | train_acc {train_acc:.4f} | "
                   f"test_loss {test_loss:.4f} | test_acc {test_acc:.4f}")
    return history


def train(spec_path: Path, pretrained_path: Path, model_params: ModelParams, train_params: TrainParams, *,
          seed: int, model_out: Path, summary_out: Path, metrics_out: Path, history_out: Path,
          curves_out: Path) -> list[dict[str, Any]]:
    """Train the head; write the checkpoint, summary, metrics, history CSV and curves; return history."""
    resolve_weights(model_params.name, model_params.weights)  # a bad name fails before any work
    device = pick_device(train_params.device)
    spec = load_spec(spec_path)
    seed_everything(seed)
    model, head = classifier_for(model_params.name, pretrained_path, len(spec["classes"]),
                                 model_params.dropout, seed)
    write_text(summary_out, model_summary(model, spec["batch_size"], spec["transform"]["crop_size"]))
    model.to(device)
    start = time.perf_counter()
    history = fit(model, head, spec, train_params, seed, device)
    mode = "full loop, augmented" if train_params.augment else "features computed once"
    print(f"trained {train_params.epochs} epoch(s) on {device} ({mode}) in {time.perf_counter() - start:.1f} s")

    save_checkpoint(model_out, model.cpu(), name=model_params.name, head=head, dropout=model_params.dropout,
                    class_names=spec["classes"], transform=spec["transform"])
    params_total = sum(p.numel() for p in model.parameters())
    params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    write_json(metrics_out, {**history[-1], "seed": seed, "params_total": params_total,
                             "params_trainable": params_trainable})
    write_csv(history_out, list(HISTORY_FIELDS), [[row[k] for k in HISTORY_FIELDS] for row in history])
    loss_curves(history, curves_out)
    return history
