"""LoRA files → weight deltas fused into the transformer for one request, then restored.

A diffusers-format LoRA has keys `transformer.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r).
Its scale is alpha/r read from the `lora_adapter_metadata` header, exactly as diffusers' `load_lora_weights`
applies it, or 1.0 when the header is absent; the request's weight multiplies that scale.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .loader import CheckpointError, engine_name, qkv_rows


@dataclass
class LoraFile:
    path: str
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]  # diffusers module name -> (A (r, in), B (out, r))
    scales: dict[str, float]  # module name -> alpha / r

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.pairs.values())


def _pattern_value(module: str, patterns: dict, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module name or a dotted suffix of it."""
    for key, v in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return v
    return default


def read_lora(path: str | Path) -> LoraFile:
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"corrupt or unreadable LoRA file {path}: {e}") from e
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        if not k.startswith("transformer."):
            continue
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.weight"
            if k.endswith(tag):
                pairs.setdefault(k[len("transformer."):-len(tag)], {})[part] = t
    if not pairs:
        raise CheckpointError(f"{path} has no 'transformer.*.lora_A/B.weight' keys; found e.g. {sorted(sd)[:3]}")
    broken = [m for m, p in pairs.items() if len(p) != 2]
    if broken:
        raise CheckpointError(f"{path}: lora_A without lora_B (or the reverse) for {broken[:3]}")
    cfg = {}
    if "lora_adapter_metadata" in meta:
        raw = json.loads(meta["lora_adapter_metadata"])
        cfg = {k[len("transformer."):]: v for k, v in raw.items() if k.startswith("transformer.")}
    scales = {}
    for m, p in pairs.items():
        r = p["lora_A"].shape[0]
        if "lora_alpha" in cfg:
            r_m = _pattern_value(m, cfg.get("rank_pattern"), cfg.get("r", r))
            scales[m] = _pattern_value(m, cfg.get("alpha_pattern"), cfg["lora_alpha"]) / r_m
        else:
            scales[m] = 1.0
    return LoraFile(str(path), {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}, scales)


class FusedLoras:
    """Adds the deltas of several weighted LoRAs into the model's weights; `restore()` puts the originals back.

    Every shape is checked before any weight is touched, so a bad file leaves the model as it was.
    """

    def __init__(self, model: torch.nn.Module, loras: list[tuple[LoraFile, float]]):
        self.model, self.saved = model, {}
        modules = dict(model.named_modules())
        dim = model.cfg.dim
        plan = []
        for lf, weight in loras:
            for m, (a, b) in lf.pairs.items():
                target = modules.get(engine_name(m))
                if not isinstance(target, torch.nn.Linear):
                    raise CheckpointError(f"{lf.path}: LoRA targets {m!r}, which this model does not have")
                rows = qkv_rows(m, dim) or slice(0, target.out_features)
                want = (rows.stop - rows.start, target.in_features)
                if a.dim() != 2 or b.dim() != 2 or (b.shape[0], a.shape[1]) != want or a.shape[0] != b.shape[1]:
                    raise CheckpointError(f"{lf.path}: LoRA for {m!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                                          f"which do not fit the model's {want[0]}x{want[1]} weight")
                plan.append((engine_name(m), target, rows, a, b, weight * lf.scales[m]))
        with torch.no_grad():
            for name, target, rows, a, b, s in plan:
                w = target.weight
                if name not in self.saved:  # kept in host memory: a 5B attention LoRA touches ~3 GB of weights
                    self.saved[name] = w.detach().to("cpu", copy=True)
                delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
                w[rows] = (w[rows].float() + s * delta).to(w.dtype)

    def restore(self) -> None:
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, w in self.saved.items():
                modules[name].weight.copy_(w)
        self.saved.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
