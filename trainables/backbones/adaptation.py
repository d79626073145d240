"""How much of a backbone a trial trains: the `adaptation` factor, and LoRA.

Four arms (`ADAPTATIONS`), each a recipe of the fine-tuning literature:

- ``decoder``: the mask decoder (and, with `train_prompt_encoder`, the prompt encoder) on the
  frozen encoder's cached output. The default, and what every trial did before.
- ``late_blocks``: also the last ``blocks`` encoder blocks and everything after them (the neck;
  TinyViT's last patch merging where it follows a tuned block; SAM 2's ``conv_s0``/``conv_s1``,
  which then run in the trial). The frozen prefix's output is cached (`Backbone.cache_features`).
- ``lora``: low-rank adapters (`add_lora`) on the attention projections (``attn.qkv``, ``attn.proj``) of
  the encoder blocks — every block (``lora_blocks: all``; the encoder runs in the trial, no cache)
  or the last ``blocks`` (``lora_blocks: last``; the prefix before them is cached) — plus the
  decoder. The pretrained weights stay as they are.
- ``full``: every parameter but the prompt encoder's (unless `train_prompt_encoder`); the encoder
  runs in the trial.

What a "block" is, per family (`Backbone.encoder_blocks`): a ViT block of segment-anything's
``ImageEncoderViT.blocks`` (SAM, micro-sam, MedSAM: 12/24/32 for B/L/H); a ``MultiScaleBlock``
of SAM 2's Hiera trunk (12/16/24/48 for T/S/B+/L); a ``TinyViTBlock`` of LiteMedSAM's three
attention stages (2 + 6 + 2 = 10; the first stage is convolutional, it is part of the prefix).

LoRA (Hu et al. 2022): a linear layer y = W x + b gets y = W x + b + (alpha / r) B A x with A
(r x in) drawn as `nn.Linear` draws its weights and B (out x r) zero, so an untrained adapter
changes nothing. A and B are registered on the linear layer itself as ``lora_a``/``lora_b``,
so the pretrained parameters keep their official names and a trial's checkpoint loads onto the
official model (`add_lora` first, then the trained state); `merge_lora` folds B A into W and
removes the adapters, giving a plain model of the official architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

ADAPTATIONS = ("decoder", "late_blocks", "lora", "full")
LORA_TARGETS = ("attn.qkv", "attn.proj")  # the attention projections of a block, in every family

Source = Literal["embeddings", "prefix", "pixels"]


@dataclass(frozen=True)
class Adaptation:
    """One trial's adaptation arm and its settings (grid factors of the same names)."""

    kind: str = "decoder"
    blocks: int = 2  # adapt_blocks: the tuned blocks of late_blocks and of lora with lora_blocks "last"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_blocks: str = "all"  # all | last

    def __post_init__(self):
        if self.kind not in ADAPTATIONS:
            raise ValueError(f"unknown adaptation {self.kind!r}; choose from {', '.join(ADAPTATIONS)}")

    @property
    def source(self) -> Source:
        """What a trial's features come from: the cached encoder output (``embeddings``), the cached
        output of the frozen prefix before the last `blocks` blocks (``prefix``), or the images,
        the whole encoder running in the trial (``pixels``)."""
        if self.kind == "decoder":
            return "embeddings"
        if self.kind == "late_blocks" or (self.kind == "lora" and self.lora_blocks == "last"):
            return "prefix"
        return "pixels"

    @property
    def cached_blocks(self) -> int | None:
        """The tuned blocks whose frozen prefix the cache holds (`source` prefix), else None."""
        return self.blocks if self.source == "prefix" else None

    def first_tuned_block(self, depth: int) -> int:
        """The index of the first block the trial runs: 0 when the whole encoder runs, `depth` when
        none does (the decoder arm)."""
        return {"embeddings": depth, "prefix": depth - self.blocks, "pixels": 0}[self.source]

    def describe(self) -> str:
        if self.kind == "late_blocks":
            return f"the last {self.blocks} encoder blocks, the neck and the decoder"
        if self.kind == "lora":
            where = "every encoder block" if self.lora_blocks == "all" else f"the last {self.blocks} encoder blocks"
            return f"LoRA rank {self.lora_rank}, alpha {self.lora_alpha:g} on the attention of {where}, and the decoder"
        if self.kind == "full":
            return "the whole encoder and the decoder"
        return "the mask decoder"


def _lora_forward_hook(module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    x = inputs[0]
    return output + (x @ module.lora_a.t() @ module.lora_b.t()) * module.lora_scale


def add_lora(blocks: list[nn.Module], rank: int, alpha: float) -> list[nn.Parameter]:
    """Add LoRA adapters to the `LORA_TARGETS` linear layers of `blocks`; returns their parameters.

    A is initialised like a linear layer's weight (Kaiming uniform, a = sqrt(5)), B with zeros.
    The adapters are parameters of the linear layer (``<layer>.lora_a``, ``<layer>.lora_b``) and
    a forward hook adds their term, so the layer's own parameters keep their names.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    parameters = []
    for block in blocks:
        for name, layer in block.named_modules():
            if not name.endswith(LORA_TARGETS) or not isinstance(layer, nn.Linear):
                continue
            if hasattr(layer, "lora_a"):
                raise ValueError(f"{name} already has a LoRA adapter")
            weight = layer.weight
            layer.lora_a = nn.Parameter(torch.empty(rank, layer.in_features, device=weight.device, dtype=weight.dtype))
            nn.init.kaiming_uniform_(layer.lora_a, a=math.sqrt(5))
            layer.lora_b = nn.Parameter(torch.zeros(layer.out_features, rank, device=weight.device, dtype=weight.dtype))
            layer.lora_scale = alpha / rank
            layer.lora_hook = layer.register_forward_hook(_lora_forward_hook)
            parameters += [layer.lora_a, layer.lora_b]
    if not parameters:
        raise ValueError(f"no {' or '.join(LORA_TARGETS)} linear layer in the blocks to adapt")
    return parameters


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter of `model` into its layer's weight (W += alpha / r * B A) and remove
    it; the model then has the official architecture and parameter names. Returns the layers merged."""
    merged = 0
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and hasattr(layer, "lora_a"):
            layer.weight += (layer.lora_b @ layer.lora_a) * layer.lora_scale
            layer.lora_hook.remove()
            del layer.lora_a, layer.lora_b, layer.lora_scale, layer.lora_hook
            merged += 1
    return merged
