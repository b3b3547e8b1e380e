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
run its own backbone on the test images (`backbone.checkpoint_body`) instead of reading the pretrained backbone's
stored features.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from foodvision.core.params import FinetuneParams, ParamsError
from foodvision.data import augment_transform
from foodvision.features import FeatureIndex
from foodvision.loop import Cut, EpochHook, Keeper, image_loaders, record, run_epoch
from foodvision.model import build_backbone, for_inference
from foodvision.precision import autocast_dtype, training_precision


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


def finetune(model: nn.Module, head: str, trained: list[str], index: FeatureIndex, transform: dict[str, Any],
             params: FinetuneParams, *, cut: Cut | None, keeper: Keeper | None, seed: int, device: torch.device,
             history: list[dict[str, Any]], on_epoch: EpochHook | None) -> None:
    """Train `model` (its head warm, `trained` blocks unfrozen by `unfreeze`); appends to `history`, keeps the best
    validation epoch when `keeper` is given (starting from the warm model's score)."""
    model.to(device, memory_format=torch.channels_last)  # faster steps than contiguous on a CPU (docs/scale.md)
    loader, held_out_loader = image_loaders(index, transform, augment_transform(transform), cut, params.batch_size,
                                            seed, device)
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(head + ".")],
               "lr": params.lr},
              {"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(head + ".")],
               "lr": params.backbone_lr}]
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=params.epochs * len(loader))
    dtype = autocast_dtype(training_precision(device), device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

    if keeper is not None:
        keeper.rebase(model)
    split, first = ("val" if keeper is not None else "test"), len(history) + 1
    for epoch in tqdm(range(first, first + params.epochs), desc="fine-tune epochs", unit="epoch", disable=None):
        scores = run_epoch(model, loader, device, step=step, trained=trained, dtype=dtype,
                           memory_format=torch.channels_last, desc=f"fine-tune {epoch}")
        # BatchNorm folded, as featurize runs it: faster than the model as is (docs/scale.md)
        held = run_epoch(for_inference(model), held_out_loader, device, dtype=dtype, desc=f"{split} {epoch}")
        record(history, epoch, scores, held, split, on_epoch)
        if keeper is not None and keeper.stop_after(epoch, held[0], model):
            break
    if keeper is not None:
        keeper.restore(model)
