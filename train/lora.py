"""Trainable LoRA adapters on our transformer, and their export in the diffusers format that serving reads.

Our q/k/v live in one fused `qkv` layer, but a diffusers LoRA has separate to_q / to_k / to_v adapters.
`LoraLinear` therefore holds one (A, B) pair per row slice of its base layer, so that what is trained is
exactly what `engine.lora` fuses at serving time: ΔW[rows] = (alpha / r) · B @ A for each diffusers module.
The scale alpha/r goes into the file's `lora_adapter_metadata` header, so neither our engine nor diffusers'
`load_lora_weights` needs the user to pass a number.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from cogrt.engine.loader import engine_name, qkv_rows
from cogrt.engine.lora import save_lora_file

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_SUFFIX = {"to_q": "attn1.to_q", "to_k": "attn1.to_k", "to_v": "attn1.to_v", "to_out.0": "attn1.to_out.0",
           "ff.net.0.proj": "ff.net.0.proj", "ff.net.2": "ff.net.2"}


class LoraLinear(nn.Module):
    """base(x) + (alpha/r) · [B_i A_i x for each row slice i], the slices tiling the output in order."""

    def __init__(self, base: nn.Linear, names: list[str], slices: list[slice], r: int, alpha: float):
        super().__init__()
        self.base, self.names, self.slices = base, list(names), list(slices)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        dev = base.weight.device
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(r, base.in_features, device=dev)) for _ in slices)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(s.stop - s.start, r, device=dev)) for s in slices)
        for a in self.lora_A:  # peft's default: A kaiming-uniform, B zero, so training starts at the base model
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # one low-precision copy, shared by base and LoRA
        elif x.dtype != self.lora_A[0].dtype:
            x = x.to(self.lora_A[0].dtype)
        y = self.base(x.to(self.base.weight.dtype))
        # all down-projections in one GEMM, then all up-projections in one GEMM with a block-placed B, so no
        # per-slice outputs are concatenated: (.., in) -> (.., k*r) -> (.., out)
        a = torch.cat(list(self.lora_A))  # (k*r, in)
        b = a.new_zeros(self.base.out_features, a.shape[0])
        for i, (s, bi) in enumerate(zip(self.slices, self.lora_B)):
            b[s, i * self.r:(i + 1) * self.r] = bi
        return y + (self.scale * ((x @ a.t()) @ b.t())).to(y.dtype)


def add_lora(model: nn.Module, r: int, alpha: float, targets=ATTENTION) -> list[LoraLinear]:
    """Wrap the targeted layers of every block; the base weights are frozen, only A and B train."""
    unknown = [t for t in targets if t not in _SUFFIX]
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {sorted(_SUFFIX)}")
    model.requires_grad_(False)
    dim, wrapped = model.cfg.dim, []
    for i, block in enumerate(model.blocks):
        groups: dict[str, list[str]] = {}
        for t in targets:
            name = f"transformer_blocks.{i}.{_SUFFIX[t]}"
            groups.setdefault(engine_name(name).split(".")[-1], []).append(name)
        for attr, names in groups.items():
            names.sort(key=lambda n: (qkv_rows(n, dim) or slice(0, 0)).start)
            base = getattr(block, attr)
            slices = [qkv_rows(n, dim) or slice(0, base.out_features) for n in names]
            lora = LoraLinear(base, names, slices, r, alpha)
            setattr(block, attr, lora)
            wrapped.append(lora)
    return wrapped


def lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict (no adapters), sharing the base tensors: for validation and export."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def save_lora(path: str | os.PathLike, model: nn.Module) -> Path:
    """Write `pytorch_lora_weights.safetensors` (atomically) with the alpha/r header diffusers reads."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    pairs = {name: (a, b) for layer in layers for name, a, b in zip(layer.names, layer.lora_A, layer.lora_B)}
    return save_lora_file(path, pairs, layers[0].r, layers[0].alpha)
