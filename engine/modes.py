"""Modes: named sets of transforms, each of which also has its own switch.

The runner (engine/runner.py) applies the transforms in one order: LoRA fuse → quantize → attention backend
(+ fused norm kernels) → compile. A mode only picks their settings:

| mode               | linear layers          | attention                | step cache   | T5          | VAE  |
|--------------------|------------------------|--------------------------|--------------|-------------|------|
| `exact`            | model dtype (bf16)     | fastest exact backend    | off          | model dtype | auto |
| `fp8`              | fp8 row-wise dynamic   | FA4, else `triton-fp8`   | off          | int8 (w)    | auto |
| `fast`             | fp8 row-wise dynamic   | FA4, else `triton-fp8`   | `fast` level | int8 (w)    | auto |
| `int8-dynamic`     | int8 dynamic           | fastest exact backend    | off          | int8 (w)    | auto |
| `int8-weight-only` | int8 weight-only       | fastest exact backend    | off          | int8 (w)    | auto |

The fastest exact backend on Hopper and newer is FlashAttention 4 (`flash-attn-4`) where its package is installed
(`pip install 'cogrt[fa4]'`), else our `triton` kernel; elsewhere PyTorch's SDPA. FA4 is also faster than our
low-precision `triton-fp8` (14.2 against 16.0 ms a call at 5B on the H200, bench/RESULTS.md), so `fp8` and `fast` take
it too where it is installed: their attention is then exact, and only their linear layers are quantized.

`fast`'s step cache: the calibrated cache (probe or x0, as step_cache.json names it for that level) at the model's `fast` level
(engine/caches/, `cogrt calibrate-cache --levels`) where its folder has one, else TeaCache at threshold 0.2 (the published fit for the
released checkpoints).

On a CUDA GPU every mode also turns on the fused norm kernels (and the FF's GELU fused: `fused_ff`,
engine/fused.py) and a regional torch.compile of the blocks (with a persistent cache). On the CPU the modes keep PyTorch's own attention, no Triton and no compile:
the interpreter is for tests, and a compile costs more than it saves on a tiny model there. fp8 needs fp8
tensor cores (compute capability 8.9 or newer); asking for it elsewhere is an error, not a silent fallback,
so that nobody benchmarks a mode they are not running. The int8 modes are for GPUs without fp8 (A100, L40).

The quantized modes shrink T5 to int8 weights, and every mode tiles the VAE decode where the untiled one would
not fit in the memory left (`auto`, within a per-process memory fraction if one is set), so that 5B at
49 x 480 x 720 fits in 16 GB end to end while a large GPU decodes untiled, a second faster (bench/RESULTS.md,
"The VAE decode: tiling and cuDNN's algorithm search").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

QUANTS = ("fp8", "int8-dynamic", "int8-weight-only")
TEXT_ENCODER = ("full", "int8", "offload")  # full: the model dtype, on the device


@dataclass(frozen=True)
class Transforms:
    quant: str | None = None  # one of QUANTS, or None: linear layers stay in the model dtype
    attention: str = "sdpa"  # an engine/attention.py backend
    fused_norms: bool = False  # adaLN, QK norm + RoPE and gated residuals through kernels/
    fused_ff: bool = False  # with fused_norms: the FF's GELU in a GEMM epilogue, or in fp8 our activation quantization
    compile: bool = False  # regional torch.compile of the transformer blocks
    cuda_graphs: bool = False  # compile with CUDA graphs ("reduce-overhead"); needs compile
    text_encoder: str = "full"  # one of TEXT_ENCODER
    vae_tiling: bool | None = None  # None: tile when the untiled decode would not fit
    teacache: float | None = None  # the threshold a request gets when it names none
    keep_blocks: tuple[int, ...] = ()  # fp8: blocks kept whole in the model dtype (engine/quant.py)
    fp8_fast_accum: bool = True  # fp8: Hopper's fast accumulation (engine/quant.py)

    def __post_init__(self):
        if self.quant is not None and self.quant not in QUANTS:
            raise ValueError(f"unknown quantization {self.quant!r}; valid: {', '.join(QUANTS)} (or none)")
        if self.text_encoder not in TEXT_ENCODER:
            raise ValueError(f"unknown text encoder setting {self.text_encoder!r}; valid: {', '.join(TEXT_ENCODER)}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile")

    @property
    def weights(self) -> tuple:
        """What is baked into the loaded weights: requests may only ask for modes that share it."""
        return self.quant, self.attention, self.fused_norms

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


MODES = ("exact", "fp8", "fast", "int8-dynamic", "int8-weight-only")
FAST_TEACACHE = 0.2  # TeaCache's published "fast" setting for 5B (2.4x there); see bench/RESULTS.md for ours


def has_fp8(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def has_tma(device: torch.device) -> bool:
    """Our Triton attention kernels use Hopper's tensor memory accelerator."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def default_attention(device: torch.device, quant: str | None) -> str:
    """The attention backend a mode gets: see the module docstring's table."""
    from . import attention
    if not has_tma(device):
        return "sdpa"
    if "flash-attn-4" in attention.available():
        return "flash-attn-4"
    return "triton-fp8" if quant == "fp8" else "triton"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def transforms_for(mode: str, device: torch.device, **overrides) -> Transforms:
    """The transforms of `mode` on `device`; `overrides` (None values ignored) set single transforms."""
    check_mode(mode)
    device = torch.device(device)
    gpu = device.type == "cuda"
    quant = {"fp8": "fp8", "fast": "fp8"}.get(mode, mode if mode in QUANTS else None)
    if quant == "fp8" and not has_fp8(device):
        name = torch.cuda.get_device_name(device) if gpu else "the CPU"
        raise ValueError(f"mode {mode!r} needs a GPU with fp8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                         f"Blackwell); this is {name}. Use mode 'int8-dynamic' or 'int8-weight-only' (or 'exact')")
    t = Transforms(
        quant=quant,
        attention=default_attention(device, quant),
        fused_norms=gpu,
        fused_ff=gpu,
        compile=gpu,
        text_encoder="full" if quant is None else "int8",
        vae_tiling=None,  # every mode: tiled only where the untiled decode would not fit
        teacache=FAST_TEACACHE if mode == "fast" else None,
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("quant") == "none":
        overrides["quant"] = None
    if overrides.get("quant") == "fp8" and not has_fp8(device):
        raise ValueError("fp8 quantization needs a GPU with fp8 tensor cores (compute capability 8.9+)")
    return dataclasses.replace(t, **overrides)


def request_modes(loaded: str, t: Transforms) -> tuple[str, ...]:
    """The modes a request may name on a pipeline loaded in `loaded` with transforms `t`: those that differ
    from it only in per-request settings (`fp8` and `fast` differ only in TeaCache)."""
    if loaded in ("fp8", "fast"):
        return ("fp8", "fast")
    return (loaded,)
