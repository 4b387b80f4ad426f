"""Weight quantization through torchao: which layers, which config, and rewriting one layer in place.

Quantized: the four matmuls of every block (`qkv`, `out`, `ff1`, `ff2`). They do more than 99.9% of 5B's
linear FLOPs (24·N·d² per block) and hold 86% of its weights (the adaLN projections hold most of the rest).

Kept in the model dtype, and why:
- whole blocks only where `keep_blocks` names them (none by default: keeping the first and last gained
  nothing, bench/RESULTS.md "fp8 on the tiny model: which choice costs quality");
- the adaLN projections (`norm1`, `norm2`, `norm_out`) and the time / ofs MLPs: they see one row per
  sample (M = 2 with CFG), so no GEMM gets faster, and their output scales and shifts every activation of
  a block: an error there is multiplied into everything downstream;
- `patch_proj` and `text_proj`: they run once per step (not per block) and read the raw latents and T5
  features, whose channel ranges differ wildly; quantizing them saves almost nothing;
- `proj_out`: the last layer writes the velocity the sampler integrates, 64 channels wide; its error goes
  straight into every step's update;
- the LayerNorms, positional tables and biases: not matmuls.

torchao's quantized layers are slow without torch.compile, which is why the modes compile on GPUs.
"""
from __future__ import annotations

import contextlib
import logging
import sys

import torch
from torch import nn

from .modes import QUANTS

QUANTIZED = ("qkv", "out", "ff1", "ff2")


def import_torchao():
    """torchao's quantization API. On machines without its optional CUDA extensions (a CPU, another GPU) torchao
    logs that it could not load them, which concerns no user of ours; so its loggers are quietened first."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torchao.quantization
    return torchao.quantization


@contextlib.contextmanager
def torchao_hidden():
    """diffusers and transformers import torchao as they load, wherever it is installed (a second's import, and its
    log lines), to offer their own torchao quantizers, which we never use. Within this block torchao looks
    uninstalled to them (a None in sys.modules makes find_spec answer None); where it is imported already, or
    once the block ends, nothing changes: engine/quant.py imports it itself when a mode quantizes."""
    if "torchao" in sys.modules:
        yield
        return
    sys.modules["torchao"] = None
    try:
        yield
    finally:
        if sys.modules.get("torchao", 0) is None:
            del sys.modules["torchao"]


def config(kind: str, fast_accum: bool = True):
    """torchao's config for `kind`. `fast_accum`: Hopper's fast fp8 accumulation (torchao's default; fp32
    accumulation measured no better, bench/RESULTS.md "fp8 on the tiny model: which choice costs quality").
    set_inductor_config=False: torchao would otherwise switch on Inductor's coordinate-descent tuning for the
    whole process, which re-benchmarks kernels at every start for a few percent on the small kernels around the
    GEMMs."""
    q = import_torchao()
    if kind == "fp8":
        return q.Float8DynamicActivationFloat8WeightConfig(granularity=q.PerRow(), set_inductor_config=False,
                                                           mm_config=q.Float8MMConfig(use_fast_accum=fast_accum))
    if kind == "int8-dynamic":
        return q.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if kind == "int8-weight-only":
        return q.Int8WeightOnlyConfig(set_inductor_config=False)
    raise ValueError(f"unknown quantization {kind!r}; valid: {', '.join(QUANTS)}")


def targets(model: nn.Module, kind: str, keep_blocks: tuple[int, ...] = ()) -> dict[str, nn.Linear]:
    """The transformer's linear layers that quantization `kind` replaces, by name. `keep_blocks` (fp8 only;
    negative: from the end) stay whole in the model dtype, unless the model has fewer than 3 blocks per kept one,
    so that the kept ones are never most of it."""
    n = len(model.blocks)
    keep = {i % n for i in keep_blocks} if kind == "fp8" and n >= 3 * len(keep_blocks) else set()
    return {f"blocks.{i}.{name}": getattr(b, name) for i, b in enumerate(model.blocks) if i not in keep
            for name in QUANTIZED}


def quantize(model: nn.Module, kind: str, keep_blocks: tuple[int, ...] = (), fast_accum: bool = True) -> None:
    names = set(targets(model, kind, keep_blocks))
    import_torchao().quantize_(model, config(kind, fast_accum), filter_fn=lambda m, name: name in names)


def quantize_text_encoder(encoder: nn.Module) -> None:
    """T5 with int8 weights (activations stay in the model dtype): 4.7 GB instead of 9.5 GB for T5-XXL. It runs
    once per request, so its speed hardly matters; its memory does."""
    import_torchao().quantize_(encoder, config("int8-weight-only"))


def is_quantized(linear: nn.Linear) -> bool:
    return type(linear.weight) not in (torch.Tensor, nn.Parameter)


def write_weight(linear: nn.Linear, weight: torch.Tensor, kind: str | None, fast_accum: bool = True) -> None:
    """Set `linear`'s weight to `weight` (high precision), quantized as `kind`, in place: the tensors keep
    their storage, so a compiled block (or a captured CUDA graph) that holds them sees the new values."""
    with torch.no_grad():
        if kind is None:
            linear.weight.copy_(weight)
            return
        fresh = nn.Linear(1, 1, bias=False, device="meta")
        fresh.weight = nn.Parameter(weight, requires_grad=False)
        import_torchao().quantize_(fresh, config(kind, fast_accum))
        old, new = linear.weight, fresh.weight
        names = old.__tensor_flatten__()[0]
        layout = lambda w: (type(w), [(n, getattr(w, n).shape, getattr(w, n).dtype) for n in names])
        if layout(new) != layout(old):
            raise RuntimeError(f"re-quantized weight differs in layout from the loaded one: {layout(new)} vs "
                               f"{layout(old)}")
        for n in names:  # the quantized data and its scales
            getattr(old, n).copy_(getattr(new, n))


def is_fp8(linear: nn.Linear) -> bool:
    return is_quantized(linear) and getattr(linear.weight, "qdata", None) is not None \
        and linear.weight.qdata.dtype == torch.float8_e4m3fn


def fp8_operands(linear: nn.Linear) -> tuple:
    """What torch._scaled_mm needs of torchao's fp8 row-wise layer: its e4m3 weight (out, in), the weight's row
    scales (out, 1), the bias and whether it accumulates fast. The tensors are torchao's own (not copies), which
    `write_weight` overwrites in place when a LoRA switches, so holders of these see the new weights."""
    w = linear.weight
    if tuple(w.scale.shape) != (w.qdata.shape[0], 1):
        raise ValueError(f"not a row-wise fp8 weight: scales of shape {tuple(w.scale.shape)}")
    return w.qdata, w.scale, linear.bias, bool(w.mm_config.use_fast_accum)
