"""Training the head: on the stored features (every head-only experiment) or, with `train.augment`, on images.

The backbone is frozen and in eval mode and the eval transform is deterministic, so the head sees the
same features in every epoch: `featurize` computed them once, and `fit_features` reads them back by row,
never decoding an image or running the backbone (nor importing torchvision). With `train.augment` every
epoch needs new random crops of the images, so `fit_images` runs the full loop on images instead. Both
give the same results without augmentation (a test checks, to 1e-4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from foodvision.core.params import TrainParams
from foodvision.features import FeatureFile, FeatureIndex, rows_per_read
from foodvision.loop import Cut, EpochHook, Keeper, image_loaders, record, run_epoch


class Adam:
    """torch.optim.Adam(fused=True) with its defaults, through torch's own functional `adam`, without the
    Optimizer base class: its methods import torch._dynamo on first call, a cost in every train process.
    The same kernel, so the same bytes (a test checks against torch.optim.Adam). Fused: one kernel per step
    instead of seven operations per tensor (docs/scale.md has the figures)."""

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


def head_epochs(net: nn.Module, trainable: str, train_batches: Callable[[], Iterable], held_out: Callable[[], Iterable],
            params: TrainParams, device: torch.device, on_epoch: EpochHook | None,
            keeper: Keeper | None) -> list[dict[str, Any]]:
    """`params.epochs` passes, or fewer when `keeper` (a validation split) says stop; then its best epoch's weights."""
    optimizer = Adam([p for p in net.parameters() if p.requires_grad], lr=params.lr)

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    split = "test" if keeper is None else "val"
    history: list[dict[str, Any]] = []
    for epoch in tqdm(range(1, params.epochs + 1), desc="epochs", unit="epoch", disable=None):
        train = run_epoch(net, train_batches(), device, step=step, trained=(trainable,), desc=f"train {epoch}")
        scores = run_epoch(net, held_out(), device, desc=f"{split} {epoch}")
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
    return head_epochs(head, "", lambda: loader, lambda: _in_order(held_out, block), params, device, on_epoch, keeper)


def fit_images(model: nn.Module, head: str, index: FeatureIndex, transform: dict[str, Any], params: TrainParams,
               seed: int, device: torch.device, on_epoch: EpochHook | None = None, cut: Cut | None = None,
               keeper: Keeper | None = None) -> list[dict[str, Any]]:
    """The full loop on images: each epoch decodes every image and runs the frozen backbone.

    Needed with `train.augment` (random crops change every epoch); without it, it is the reference
    that `fit_features` must match. `cut`: (train rows, validation rows) of the train split, with its `keeper`.
    """
    from foodvision.data import EvalTransform, augment_transform

    train_tf = augment_transform(transform) if params.augment else EvalTransform(transform)
    train_loader, held_out_loader = image_loaders(index, transform, train_tf, cut, params.batch_size, seed, device)
    return head_epochs(model, head, lambda: train_loader, lambda: held_out_loader, params, device, on_epoch, keeper)
