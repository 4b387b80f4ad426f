"""The runner: owns the loaded transformer and applies its transforms in one ordered place:
LoRA fuse → quantize → attention backend (+ fused norm kernels) → sequence split (several devices) → compile.

- LoRAs are fused per request (`switch_loras`), after quantization in time but before it in effect: a
  switched layer is rebuilt from its high-precision original and quantized again.
- A quantization that fails half-way puts the originals back before the error leaves.
- Compile is regional: each block is compiled (one graph serves all of them, since they share code and
  shapes), not the whole model, which keeps the first compile short and leaves the TeaCache decision,
  the embeddings and the head in eager PyTorch. Compiled code is cached on disk (`cache_dir`), so a
  restarted replica skips Inductor's code generation and autotuning. A compile that fails, at warm-up or
  later, turns compile off for every block with a warning: the pipeline never runs half-compiled.
"""
from __future__ import annotations

import dataclasses
import os
import logging
import time
from pathlib import Path

import torch

from . import quant
from .attention import set_attention
from .fused import fuse_norms
from .lora import LoraState, host_copy
from .modes import Transforms


log = logging.getLogger(__name__)


def compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compile raises. A function, so that importing the engine does not import Dynamo (seconds):
    load_pipeline imports it in a thread beside the checkpoint's read. FailOnRecompileLimitHit
    is not a TorchDynamoException (torch 2.11), and fullgraph=True raises it."""
    import torch._dynamo
    exc = torch._dynamo.exc
    return (exc.TorchDynamoException, *[e for e in (getattr(exc, "FailOnRecompileLimitHit", None),) if e is not None])

# Every block of every compiled pipeline in the process runs the same code object, so each (shape, dtype,
# transforms) a process serves is one entry in Dynamo's cache for it. The default limit of 8 is reached by a
# replica that serves a few sizes in two modes; past it, fullgraph=True makes the call fail.
RECOMPILE_LIMIT = 64


def default_cache_dir() -> Path:
    """$COGRT_CACHE/compile, else ~/.cache/cogrt/compile. Point COGRT_CACHE at a persistent volume on a cluster."""
    return Path(os.environ.get("COGRT_CACHE", Path.home() / ".cache" / "cogrt")) / "compile"


def use_compile_cache(path: str | Path) -> Path:
    """Inductor's FX-graph and autotuning caches, and Triton's kernel cache, in `path` (read at compile time)."""
    import torch._inductor.config as inductor
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    inductor.fx_graph_cache = True
    inductor.autotune_local_cache = True
    return path


def compile_options(t: Transforms) -> dict:
    """Inductor options for the blocks' compile (torch.compile takes a mode or options, not both)."""
    import torch._inductor
    opts = dict(torch._inductor.list_mode_options("reduce-overhead" if t.cuda_graphs else "default"))
    if t.quant == "int8-weight-only":
        # Inductor's pattern matcher rewrites torchao's int8 weight-only matmul (mm of the int8 weight cast to
        # bf16, times the row scales) into aten._weight_int8pack_mm, which on CUDA is a naive kernel, one thread
        # an output: a compiled 5B step took minutes (bench/RESULTS.md, "`int8-weight-only` at real size, and the
        # 5B modes again"). This turns off every pattern pass, which costs nothing measurable.
        opts["pattern_matcher"] = False
    return opts


class Runner:
    def __init__(self, model: torch.nn.Module, transforms: Transforms, cache_dir: str | Path | None = None,
                 keep_originals: bool = True, originals_source=None, parallel=None):
        """`keep_originals`: with quantization, keep access to the high-precision weights of the quantized layers,
        which LoRA switching rebuilds from; without them, LoRAs are refused. They are read from
        `originals_source` (loader.CheckpointWeights: the checkpoint file, when a LoRA first touches a layer),
        or, without one, copied to host memory before quantizing (9.5 GB for 5B, seconds at every start).
        `parallel` (engine.parallel.Parallel): this rank's place in a multi-device layout; the sequence split goes
        in after the attention backend and the fused norms, before compile."""
        self.model, self.transforms = model, transforms
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.compiled = False
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        originals = None
        if transforms.quant:
            targets = quant.targets(model, transforms.quant, transforms.keep_blocks)
            if any(quant.is_quantized(m) for m in targets.values()):
                raise ValueError("this transformer is quantized already; load a fresh one")
            if keep_originals and originals_source is not None:
                missing = [n for n in targets if n not in originals_source]
                if missing:
                    raise ValueError(f"the originals' source lacks {missing[:3]}")
                originals = {}  # filled from the source as LoRAs touch layers
            else:
                originals = {name: host_copy(m.weight) for name, m in targets.items()} if keep_originals else None
            try:
                quant.quantize(model, transforms.quant, transforms.keep_blocks, transforms.fp8_fast_accum)
            except Exception:
                self._restore(targets, originals, originals_source)
                raise
        self.lora_ready = originals is not None or not transforms.quant
        def write(linear, w):  # a switched layer is rebuilt from its original and quantized again
            kind = transforms.quant if quant.is_quantized(linear) else None
            quant.write_weight(linear, w, kind, transforms.fp8_fast_accum)
        self.loras = LoraState(model, write=write, originals=originals,
                               source=originals_source if keep_originals else None)
        self.timings["quantize"] = time.perf_counter() - t0
        if transforms.attention.startswith("triton-fp8") and model.cfg.head_dim < 32:
            # int8 tensor-core MMAs take 32 values along the head: tiny test models (d = 16) cannot use them
            log.warning("head_dim %d is too small for the triton-fp8 attention kernel (needs 32+); using the bf16 "
                        "'triton' kernel", model.cfg.head_dim)
            self.transforms = transforms = dataclasses.replace(transforms, attention="triton")
        set_attention(model, transforms.attention)
        fuse_norms(model, transforms.fused_norms, transforms.fused_ff)
        if parallel is not None:
            from .parallel import split_sequence
            split_sequence(model, parallel)
        if transforms.compile:
            self.compile()

    @staticmethod
    def _restore(targets, originals, source=None):
        if originals is None and source is None:
            return
        with torch.no_grad():
            for name, m in targets.items():
                if quant.is_quantized(m):  # copies where there are some, else the source (checked complete)
                    w = originals[name] if originals else source[name]
                    m.weight = torch.nn.Parameter(w.to(m.weight.device), requires_grad=False)

    # ------------------------------------------------------------------------------------------------
    def switch_loras(self, loras, key: tuple) -> float:
        """Make `loras` the fused set (see LoraState.switch); returns the seconds it took (0 when it was fused)."""
        if key == self.loras.key:
            return 0.0
        if not self.lora_ready and loras:
            raise ValueError("this pipeline was quantized without keeping its original weights "
                             "(keep_originals=False), so it cannot fuse LoRAs; load it with keep_originals=True")
        t0 = time.perf_counter()
        self.loras.switch(loras, key)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------
    def compile(self) -> None:
        use_compile_cache(self.cache_dir)
        import torch._dynamo
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * RECOMPILE_LIMIT)
        for block in self.model.blocks:
            block.compile(fullgraph=True, dynamic=False, options=compile_options(self.transforms))
        self.compiled = True

    def uncompile(self, error: BaseException | None = None) -> None:
        """Back to eager for every block. `nn.Module.compile` keeps the compiled call in `_compiled_call_impl`;
        without it the module calls its own forward."""
        for block in self.model.blocks:
            block._compiled_call_impl = None
        self.compiled = False
        if error is not None:
            log.warning("torch.compile failed, so the transformer runs eagerly (slower, same results): %s: %s",
                        type(error).__name__, str(error).splitlines()[0][:300])

    def step_begin(self) -> None:
        """With CUDA graphs, a new denoising step: the graphs may reuse the memory of the last step's outputs,
        which the pipeline has consumed by now (inside a step, each block's output feeds the next)."""
        if self.compiled and self.transforms.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def guarded(self, fn, *args, **kw):
        """fn(*args, **kw), and once more eagerly if compiling fails inside it."""
        try:
            return fn(*args, **kw)
        except compile_errors() as e:
            if not self.compiled:
                raise
            self.uncompile(e)
            return fn(*args, **kw)

    def warm_up(self, frames: int, height: int, width: int, batch: int, text_tokens: int,
                device: torch.device, dtype: torch.dtype) -> float:
        """One transformer call on random inputs of the serving shape (latent units), so that the first request
        does not pay for compiling. Returns its seconds."""
        cfg = self.model.cfg
        g = torch.Generator(device).manual_seed(0)
        x = torch.randn(batch, frames, cfg.in_channels, height, width, generator=g, device=device, dtype=dtype)
        text = torch.randn(batch, text_tokens, cfg.text_embed_dim, generator=g, device=device, dtype=dtype)
        t = torch.full((batch,), 500.0, device=device)
        ofs = torch.full((batch,), 2.0, device=device, dtype=dtype) if cfg.ofs_embed_dim else None
        # Compiling is what warm-up is for, and every block runs one compiled graph (same code, same shapes), so
        # one block compiles it for all: the other blocks' compute (~1 s for 5B) would only delay readiness.
        # CUDA graphs are recorded per block at its own calls, so with them the whole model runs.
        blocks = self.model.blocks
        one = self.compiled and not self.transforms.cuda_graphs
        t0 = time.perf_counter()
        try:
            if one:
                self.model.blocks = blocks[:1]
            with torch.no_grad():
                self.step_begin()
                self.guarded(self.model, x, text, t, ofs=ofs)
        finally:
            self.model.blocks = blocks
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timings["warm_up"] = time.perf_counter() - t0
        return self.timings["warm_up"]
