"""Weight quantization through torchao: which layers, which config, and rewriting one layer in place.

Quantized: the four matmuls of every block (`qkv`, `out`, `ff1`, `ff2`). They do more than 99.9% of 5B's
linear FLOPs (24·N·d² per block) and hold 86% of its weights (the adaLN projections hold most of the rest).

Kept in the model dtype, and why:
- whole blocks only where KEEP_BLOCKS names them (none by default; measured below);
- the adaLN projections (`norm1`, `norm2`, `norm_out`) and the time / ofs MLPs: they see one row per
  sample (M = 2 with CFG), so no GEMM gets faster, and their output scales and shifts every activation of
  a block: an error there is multiplied into everything downstream;
- `patch_proj` and `text_proj`: they run once per step (not per block) and read the raw latents and T5
  features, whose channel ranges differ wildly; quantizing them saves almost nothing;
- `proj_out`: the last layer writes the velocity the sampler integrates, 64 channels wide; its error goes
  straight into every step's update;
- the LayerNorms, positional tables and biases: not matmuls.

torchao's quantized layers are slow without torch.compile (ANCHORS.md: fp8 eager 2.1 s against 1.2 s
compiled for a 5B step), which is why the modes compile on GPUs.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .modes import QUANTS

QUANTIZED = ("qkv", "out", "ff1", "ff2")
# Blocks kept whole in the model dtype under fp8 (negative: from the end), such as (0, -1): the first reads the raw
# patch and text embeddings, the last writes the velocity. None by default: on the bundled tiny model (8 prompts,
# H200, bench/fp8_ablation.py) keeping those two gave 29.3 dB against exact where quantizing all gave 29.1, and
# 30.1 once with fp32 accumulation; prompt to prompt the PSNR moves by 5-10 dB, so 8 prompts cannot tell these
# apart, and on 5B the two blocks cost 0.6% of the fp8 step. int8 never keeps any (35 dB on its own), nor does a
# model of fewer than 3 blocks per kept one, so that the kept ones are never most of the model.
KEEP_BLOCKS: tuple[int, ...] = ()
# Hopper's fast fp8 accumulation (torchao's default). fp32 accumulation measured no better on the tiny model
# (29.0 against 29.1 dB, bench/fp8_ablation.py), so the fast one stays.
FP8_FAST_ACCUM = True


@contextlib.contextmanager
def overrides(**settings):
    """These module settings (KEEP_BLOCKS, FP8_FAST_ACCUM) changed inside the block, put back after it: what the
    benchmarks use to weigh a choice. They are read when a model is quantized."""
    module = globals()
    saved = {k: module[k] for k in settings}
    module.update(settings)
    try:
        yield
    finally:
        module.update(saved)


def config(kind: str):
    """torchao's config for `kind`. set_inductor_config=False: torchao would otherwise switch on Inductor's
    coordinate-descent tuning for the whole process, which re-benchmarks kernels at every start (130 runs in a
    warm 5B start, measured) for a few percent on the small kernels around the GEMMs."""
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Float8MMConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, PerRow)
    if kind == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False,
                                                         mm_config=Float8MMConfig(use_fast_accum=FP8_FAST_ACCUM))
    if kind == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if kind == "int8-weight-only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"unknown quantization {kind!r}; valid: {', '.join(QUANTS)}")


def targets(model: nn.Module, kind: str) -> dict[str, nn.Linear]:
    """The transformer's linear layers that quantization `kind` replaces, by name."""
    n = len(model.blocks)
    keep = {i % n for i in KEEP_BLOCKS} if kind == "fp8" and n >= 3 * len(KEEP_BLOCKS) else set()
    return {f"blocks.{i}.{name}": getattr(b, name) for i, b in enumerate(model.blocks) if i not in keep
            for name in QUANTIZED}


def quantize(model: nn.Module, kind: str) -> None:
    from torchao.quantization import quantize_
    names = set(targets(model, kind))
    quantize_(model, config(kind), filter_fn=lambda m, name: name in names)


def quantize_text_encoder(encoder: nn.Module) -> None:
    """T5 with int8 weights (activations stay in the model dtype): 4.7 GB instead of 9.5 GB for T5-XXL. It runs
    once per request, so its speed hardly matters; its memory does."""
    from torchao.quantization import quantize_
    quantize_(encoder, config("int8-weight-only"))


def is_quantized(linear: nn.Linear) -> bool:
    return type(linear.weight) not in (torch.Tensor, nn.Parameter)


def write_weight(linear: nn.Linear, weight: torch.Tensor, kind: str | None) -> None:
    """Set `linear`'s weight to `weight` (high precision), quantized as `kind`, in place: the tensors keep
    their storage, so a compiled block (or a captured CUDA graph) that holds them sees the new values."""
    with torch.no_grad():
        if kind is None:
            linear.weight.copy_(weight)
            return
        from torchao.quantization import quantize_
        fresh = nn.Linear(1, 1, bias=False, device="meta")
        fresh.weight = nn.Parameter(weight, requires_grad=False)
        quantize_(fresh, config(kind))
        old, new = linear.weight, fresh.weight
        names = old.__tensor_flatten__()[0]
        layout = lambda w: (type(w), [(n, getattr(w, n).shape, getattr(w, n).dtype) for n in names])
        if layout(new) != layout(old):
            raise RuntimeError(f"re-quantized weight differs in layout from the loaded one: {layout(new)} vs "
                               f"{layout(old)}")
        for n in names:  # the quantized data and its scales
            getattr(old, n).copy_(getattr(new, n))
