"""Fine-tuning (`finetune.blocks` > 0): after the head, the backbone's last N blocks train with it on images.

The frozen features are the accuracy ceiling of the article's recipe; this lifts it, opt-in. Choices, and why:
- warm start: the head trained on the stored features comes first, so no random head sends large
  gradients into pretrained blocks;
- random resized crops and flips every epoch (torchvision's training preset): the images, not stored
  features, because the unfrozen blocks change what every image becomes;
- AdamW with a lower learning rate for the blocks than for the head, and a cosine schedule per step, as
  torchvision's reference recipes;
- BatchNorm layers stay in eval mode with their affine parameters frozen: batches of 32 are too small to
  re-estimate statistics the pretrained weights depend on;
- on CUDA, autocast (bf16 where the GPU has it, else fp16 with a gradient scaler).

Downstream, a fine-tuned checkpoint says so (`finetuned` in its metadata): `evaluate` and `export` then
run its own backbone on the test images (`tuned.py`) instead of reading the pretrained backbone's stored features.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from foodvision.core.params import FinetuneParams, ParamsError
from foodvision.data import augment_transform
from foodvision.model import build_backbone, for_inference
from foodvision.train import Cut, EpochHook, Keeper, image_loaders, record, run_epoch


def backbone_blocks(model: nn.Module, head: str) -> list[str]:
    """The backbone's blocks, input to output: the stages of `features` (EfficientNet, MobileNet, ConvNeXt, VGG),
    a ViT's encoder layers, else the top-level modules with weights (ResNet's conv1, ..., layer4)."""
    if isinstance(getattr(model, "features", None), nn.Sequential):
        prefix, parent = "features.", model.features
    elif isinstance(getattr(getattr(model, "encoder", None), "layers", None), nn.Sequential):
        prefix, parent = "encoder.layers.", model.encoder.layers
    else:
        prefix, parent = "", model
    return [prefix + name for name, module in parent.named_children()
            if prefix + name != head and any(True for _ in module.parameters())]


def last_blocks(model: nn.Module, head: str, blocks: int, model_name: str) -> list[str]:
    """The names of the last `blocks` blocks; a one-line error naming the key when the model has fewer."""
    names = backbone_blocks(model, head)
    if blocks > len(names):
        raise ParamsError(f"finetune.blocks is {blocks}, but {model_name} has {len(names)} blocks "
                          f"({names[0]} ... {names[-1]}); use 1 to {len(names)}")
    return names[len(names) - blocks:]


def check_blocks(model_name: str, head: str, blocks: int) -> None:
    """`last_blocks` on the bare architecture, before any training: a wrong finetune.blocks fails in a second.
    Its random init draws from a forked RNG, so the run's own random stream is untouched."""
    with torch.random.fork_rng():
        last_blocks(build_backbone(model_name), head, blocks, model_name)


def unfreeze(model: nn.Module, head: str, blocks: int, model_name: str) -> list[str]:
    """Gradients for the head and the last `blocks` blocks, none for BatchNorm; returns the blocks' names."""
    trained = last_blocks(model, head, blocks, model_name)
    for pname, param in model.named_parameters():
        param.requires_grad = any(pname.startswith(n + ".") for n in (head, *trained))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.requires_grad_(False)
    return trained


def _train_mode(model: nn.Module, trained: list[str]) -> None:
    model.eval()
    for name in trained:
        model.get_submodule(name).train()
    for module in model.modules():  # statistics frozen inside the trained blocks too
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: CPUs and MPS train in float32."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _epoch(model: nn.Module, trained: list[str], loader: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
           scaler: torch.amp.GradScaler, device: torch.device, dtype: torch.dtype | None,
           desc: str) -> tuple[float, float]:
    _train_mode(model, trained)
    loss_fn = nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, unit="batch"):
        images, labels = images.to(device, memory_format=torch.channels_last), labels.to(device)
        with _autocast(device, dtype):
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += loss.item() * labels.numel()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += labels.numel()
    return total_loss / seen, correct / seen


def finetune(model: nn.Module, head: str, trained: list[str], index: dict[str, Any], transform: dict[str, Any],
             params: FinetuneParams, *, cut: Cut | None, keeper: Keeper | None, seed: int, device: torch.device,
             history: list[dict[str, Any]], on_epoch: EpochHook | None) -> None:
    """Train `model` (its head warm, `trained` blocks unfrozen by `unfreeze`); appends to `history`, keeps the best
    validation epoch when `keeper` is given (starting from the warm model's score)."""
    model.to(device, memory_format=torch.channels_last)  # 1.7x faster steps than contiguous on a CPU (Lite0)
    loader, held_out_loader = image_loaders(index, transform, augment_transform(transform), cut, params.batch_size,
                                            seed, device)
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(head + ".")],
               "lr": params.lr},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(head + ".")],
               "lr": params.backbone_lr}]
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs * len(loader))
    dtype = autocast_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if keeper is not None:
        keeper.rebase(model)
    split, first = ("val" if keeper is not None else "test"), len(history) + 1
    for epoch in tqdm(range(first, first + params.epochs), desc="fine-tune epochs", unit="epoch"):
        scores = _epoch(model, trained, loader, optimizer, scheduler, scaler, device, dtype, f"fine-tune {epoch}")
        with _autocast(device, dtype):  # BatchNorm folded, as featurize runs it: 1.7x faster than the model as is
            held = run_epoch(for_inference(model), held_out_loader, nn.CrossEntropyLoss(), device,
                             desc=f"{split} {epoch}")
        record(history, epoch, scores, held, split, on_epoch)
        if keeper is not None and keeper.stop_after(epoch, held[0], model):
            break
    if keeper is not None:
        keeper.restore(model)
