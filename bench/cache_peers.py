"""Other projects' step caches, applied to a plain diffusers `CogVideoXPipeline`, for `cogrt bench caches`
(bench/caches.py), which brings each one to a target compute fraction by bisecting its knob.

    peer = PEERS["diffusers-fbcache"]
    peer.apply(pipe, 0.1, steps=50)          # removes whatever cache was on `pipe` first
    with Meter(pipe) as m:
        pipe(prompt=..., num_inference_steps=50, ...)
    peer.remove(pipe)
    m.steps_fraction, m.block_fraction

The peers, each with its own defaults except where a line below says otherwise:
- diffusers-fbcache: FirstBlockCache; knob = threshold on the first block's relative residual change.
- diffusers-magcache: MagCache; knob = threshold on the accumulated magnitude-ratio error. Its `mag_ratios` are
  the model's own, from MagCache's calibration mode run on this model (`calibrate_magcache`).
- diffusers-taylorseer: TaylorSeerCache on every block's attention and feed-forward (its default patterns,
  "^transformer_blocks.*attn" under re.fullmatch, match no module of CogVideoX, whose attention is `attn1`);
  knob = cache_interval, rounded.
- diffusers-pab: Pyramid Attention Broadcast on the spatial (joint) attention, timestep range (100, 800) as in
  diffusers' CogVideoX example; knob = spatial_attention_block_skip_range, rounded.
- diffusers-fastercache: FasterCache with diffusers' documented CogVideoX settings (attention skip range 2,
  weight 0.3, BFCHW); knob = unconditional_batch_skip_range, rounded (1 = the CFG branch is never skipped, and
  then attention is never skipped either: FasterCache only reuses attention on steps without the CFG branch).
- cache-dit-dbcache / cache-dit-dbcache-taylorseer: cache-dit's DBCache F1B0, without and with its TaylorSeer
  calibrator (order 1); knob = residual_diff_threshold. cache-dit is imported only when one of them is applied;
  without it, apply() raises PeerUnavailable (an ImportError) and the bench makes that a "skipped" row.

The knob of every peer here gives more compute when lower, and its lowest meaningful value computes every step
exactly: threshold 0, interval or skip range 1 (tests/test_cache_peers.py checks the output is then identical
to the uncached one). lo/hi are the range for the bench's bisection, which works in log space, so lo > 0.

What was computed is measured, not taken from the peers' own counts: see Meter. For PAB and FasterCache the two
measures part: a step whose attention was reused is not a computed step, yet its feed-forward ran (PAB at 50% of
steps does about 75% of the block work), so at equal compute they are to be matched on block_fraction.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# bench/caches.py's geometry: what calibrate_magcache uses when apply() has to calibrate on its own
CALIB_FRAMES, CALIB_SIZE, CALIB_GUIDANCE, CALIB_SEED = 49, 128, 6.0, 1234


class PeerUnavailable(ImportError):
    """The peer's package is missing or does not import."""


# ------------------------------------------------------------------------------------------------------------
# measuring


class Meter:
    """Counts the block-stack work that really ran in the transformer calls made inside `with Meter(pipe) as m:`.

    Every peer replaces forwards (of blocks, attention or feed-forward modules, the transformer) with its own,
    which may return a cached or predicted result instead, so hooks on those modules would fire either way.
    The Meter instead hooks one leaf Linear inside each unit, the first projection of the attention (`to_q`)
    and of the feed-forward: a leaf only runs when the real unit runs, and its input shows how many rows
    (batch) and tokens it ran on.

    - block_fraction: multiply-accumulates of the attention and feed-forward units that ran (projections and
      the attention's two S x S matmuls, from the rows and tokens seen), over what an uncached run does in the
      same number of transformer calls. The adaLN linears on the time embedding (one row per batch entry, not
      per token) and the norms are left out: 0.2% of a block at 9 x 64 x 64, 0.03% at 49 x 128 x 128. The CFG batch is one batch of 2 in
      CogVideoX's pipeline; a unit that ran on the conditional half only (FasterCache's skipped unconditional
      branch) ran on one row of two and so counts as half of that unit's work.
    - steps_fraction: the fraction of transformer calls (one per step) in which the whole block stack ran,
      i.e. the last block's attention and feed-forward both really ran on the full batch. For the step-level
      caches (FirstBlockCache, MagCache, DBCache) that is "the last block ran"; for those that cache submodules
      (PAB, FasterCache, TaylorSeer) a step whose attention was reused, or whose CFG branch was skipped,
      does not count, while its feed-forward work still counts in block_fraction.
    """

    def __init__(self, pipe: Any):
        self.transformer = pipe.transformer
        self.blocks = list(self.transformer.transformer_blocks)
        self.calls: list[dict] = []  # per transformer call: batch, work done, tokens, rows of the last block's units
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # per-row, per-token costs of the units, from the block's own shapes (all blocks are alike)
        attn, ff = self.blocks[0].attn1, self.blocks[0].ff
        self._attn_lin = sum(m.in_features * m.out_features for m in _linears(attn))
        self._ff_lin = sum(m.in_features * m.out_features for m in _linears(ff))
        self._inner = _linears(attn)[0].out_features  # heads x head_dim, the width of the S x S matmuls

    def attn_cost(self, rows: int, tokens: int) -> int:
        """Multiply-accumulates of one block's attention on `rows` sequences of `tokens` tokens."""
        return rows * tokens * self._attn_lin + 2 * rows * tokens * tokens * self._inner  # QK^T and AV

    def ff_cost(self, rows: int, tokens: int) -> int:
        """The same for its feed-forward."""
        return rows * tokens * self._ff_lin

    def __enter__(self) -> Meter:
        self._handles.append(self.transformer.register_forward_pre_hook(self._on_call, with_kwargs=True))
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            for unit, module in (("attn", block.attn1), ("ff", block.ff)):
                hook = self._unit_hook(unit, i == last)
                self._handles.append(_linears(module)[0].register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _on_call(self, module, args, kwargs) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.calls.append(dict(batch=int(x.shape[0]), work=0, tokens=None, last={}))

    def _unit_hook(self, unit: str, is_last: bool) -> Callable:
        def hook(module, args) -> None:
            if not self.calls:  # a block run outside a transformer call: not ours to count
                return
            x, call = args[0], self.calls[-1]
            rows, tokens = int(x.shape[0]), int(x.shape[-2])  # (batch, text + video tokens, width)
            call["work"] += self.attn_cost(rows, tokens) if unit == "attn" else self.ff_cost(rows, tokens)
            call["tokens"] = tokens
            if is_last:
                call["last"][unit] = rows
        return hook

    @property
    def computed_steps(self) -> list[bool]:
        """Per transformer call: did the whole block stack run (see steps_fraction)."""
        return [c["last"].get("attn") == c["batch"] and c["last"].get("ff") == c["batch"] for c in self.calls]

    @property
    def steps_fraction(self) -> float:
        return sum(self.computed_steps) / self._n_calls()

    @property
    def block_fraction(self) -> float:
        self._n_calls()
        seen = [c["tokens"] for c in self.calls if c["tokens"] is not None]
        if not seen:
            return 0.0
        tokens = max(seen)  # a call in which no unit ran has the same sequence as the others
        full = sum(len(self.blocks) * (self.attn_cost(c["batch"], tokens) + self.ff_cost(c["batch"], tokens))
                   for c in self.calls)
        return sum(c["work"] for c in self.calls) / full

    def _n_calls(self) -> int:
        if not self.calls:
            raise ValueError("the Meter saw no transformer call")
        return len(self.calls)


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def compute_fraction(pipe: Any, peer: Peer | None, knob: float = 0.0, **call_kwargs) -> tuple[float, float]:
    """(steps_fraction, block_fraction) of one generation `pipe(**call_kwargs)` with `peer` at `knob` (None:
    uncached). The peer is removed afterwards."""
    steps = int(call_kwargs.get("num_inference_steps", 50))
    if peer is not None:
        peer.apply(pipe, knob, steps)
    try:
        with Meter(pipe) as m:
            pipe(**call_kwargs)
    finally:
        if peer is not None:
            peer.remove(pipe)
    return m.steps_fraction, m.block_fraction


# ------------------------------------------------------------------------------------------------------------
# the peers


@dataclass
class Peer:
    name: str
    knob: str  # what the knob means, for the table
    lo: float  # the knob's range for the bench's bisection to a target compute fraction (log space: lo > 0)
    hi: float
    more_compute_when_lower: bool
    enable: Callable[[Any, float, int], None] = field(repr=False)  # (pipe, knob, steps), on a pipe with no cache

    def apply(self, pipe: Any, knob: float, steps: int) -> None:
        """Enable this peer on `pipe` for generations of `steps` steps, after removing whatever cache was on it."""
        remove_all(pipe)
        self.enable(pipe, float(knob), int(steps))

    def remove(self, pipe: Any) -> None:
        remove_all(pipe)


def remove_all(pipe: Any) -> None:
    """Take any diffusers or cache-dit cache off `pipe`; a no-op on a plain one."""
    tr = pipe.transformer
    # cache-dit marks the transformer instance (its pipeline marks are on the class, shared by every instance)
    if "_original_forward" in vars(tr) or "_is_cached" in vars(tr):
        cache_dit = _import_cache_dit()
        with _quiet("cache_dit"):
            cache_dit.disable_cache(pipe)
    if tr.is_cache_enabled:
        tr.disable_cache()


def _int_knob(knob: float) -> int:
    return max(1, round(knob))


def _fbcache(pipe, knob: float, steps: int) -> None:
    from diffusers import FirstBlockCacheConfig
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=knob))


def _magcache(pipe, knob: float, steps: int) -> None:
    from diffusers import MagCacheConfig
    ratios = _mag_ratios.get(pipe.transformer, {}).get(steps)
    if ratios is None:
        ratios = calibrate_magcache(pipe, steps)
    # MagCache's own defaults otherwise: max_skip_steps 3, retention_ratio 0.2 (the first 20% of steps always
    # run), so at most 3 of every 4 later steps are skipped: it cannot go below about 40% of steps
    pipe.transformer.enable_cache(MagCacheConfig(threshold=knob, num_inference_steps=steps, mag_ratios=ratios))


# MagCache's ratios per transformer and step count (they depend on the schedule, so on the number of steps)
_mag_ratios: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def calibrate_magcache(pipe: Any, steps: int, prompt: str | None = None, **call_kwargs) -> list[float]:
    """The model's own MagCache ratios for `steps` steps, from MagCache's calibration mode: one uncached
    generation (MagCacheConfig(calibrate=True) skips nothing and records, per step, the mean over tokens of
    |residual_t| / |residual_t-1| of the block stack), read from the log line MagCache writes at the end.

    The generation is one prompt of the synthetic world's training split (not a test prompt), seed CALIB_SEED,
    at bench/caches.py's geometry unless `call_kwargs` say otherwise (the tests calibrate at their small one).
    The result is kept for this transformer and step count, and used by every later apply()."""
    from diffusers import MagCacheConfig
    if prompt is None:
        from cogrt.train.synthetic import caption, sample_scenes
        prompt = caption(sample_scenes(1, CALIB_SEED, "train")[0])
    kw = dict(negative_prompt="", num_frames=CALIB_FRAMES, height=CALIB_SIZE, width=CALIB_SIZE,
              guidance_scale=CALIB_GUIDANCE, output_type="latent")
    kw.update(call_kwargs)
    kw.setdefault("generator", torch.Generator("cpu").manual_seed(CALIB_SEED))

    remove_all(pipe)
    found: list[list[float]] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = re.search(r"Calibration Results: (\[.*\])", record.getMessage())
            if m:
                found.append([float(v) for v in m.group(1).strip("[]").split(",") if v.strip()])

    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level, propagate = Catch(), log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # its INFO lines are for us, not the console
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it also prints the ratios
            pipe(prompt=prompt, num_inference_steps=steps, **kw)
    finally:
        pipe.transformer.disable_cache()
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate
    if not found or len(found[-1]) != steps:
        raise RuntimeError(f"MagCache calibration gave no ratios for {steps} steps (log lines: {found})")
    _mag_ratios.setdefault(pipe.transformer, {})[steps] = found[-1]
    return found[-1]


def _taylorseer(pipe, knob: float, steps: int) -> None:
    from diffusers import TaylorSeerCacheConfig
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(
        cache_interval=_int_knob(knob),
        # its defaults: steps 0-2 always computed, order 1; the factors kept in the model's dtype
        cache_identifiers=[r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"],
        taylor_factors_dtype=pipe.transformer.dtype))


def _pab(pipe, knob: float, steps: int) -> None:
    from diffusers import PyramidAttentionBroadcastConfig
    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=_int_knob(knob),
        spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: pipe.current_timestep))


def _fastercache(pipe, knob: float, steps: int) -> None:
    from diffusers import FasterCacheConfig
    with _quiet("diffusers.hooks.faster_cache"):  # "purely experimental" warning on every apply
        pipe.transformer.enable_cache(FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 681),
            low_frequency_weight_update_timestep_range=(99, 641),
            high_frequency_weight_update_timestep_range=(-1, 301),
            unconditional_batch_skip_range=_int_knob(knob),
            unconditional_batch_timestep_skip_range=(-1, 641),
            spatial_attention_block_identifiers=("transformer_blocks",),
            attention_weight_callback=lambda _: 0.3,
            tensor_format="BFCHW",  # CogVideoX's latents are (batch, frames, channels, height, width)
            current_timestep_callback=lambda: pipe.current_timestep))


def _import_cache_dit():
    try:
        import cache_dit
    except Exception as e:  # noqa: BLE001 (any failure to import is "not available", with its reason)
        raise PeerUnavailable(f"cache-dit does not import ({type(e).__name__}: {e}); pip install cache-dit") from e
    return cache_dit


def _dbcache(taylorseer: bool) -> Callable[[Any, float, int], None]:
    def enable(pipe, knob: float, steps: int) -> None:
        cache_dit = _import_cache_dit()
        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=knob,
            # its default 8 warm-up steps (always computed) are for ~50 steps: kept in proportion to `steps`
            max_warmup_steps=max(1, round(8 * steps / 50)),
            num_inference_steps=steps,
            enable_separate_cfg=False)  # CogVideoX runs CFG as one batch of 2 (cache-dit would say so too)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        with _quiet("cache_dit"):
            cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
    return enable


def cache_dit_cached_steps(pipe: Any) -> list[int]:
    """The steps cache-dit itself says it served from cache in the last generation (cache_dit.summary)."""
    cache_dit = _import_cache_dit()
    with _quiet("cache_dit"):
        return list(cache_dit.summary(pipe, logging=False)[-1].cached_steps)


@contextlib.contextmanager
def _quiet(prefix: str):
    """Only errors from the loggers named `prefix` or `prefix.*` while inside (cache-dit sets a level on each of
    its loggers, so the parent's level alone would not do)."""
    logs = [logging.getLogger(prefix)] + [lg for name, lg in logging.root.manager.loggerDict.items()
                                          if name.startswith(prefix + ".") and isinstance(lg, logging.Logger)]
    levels = [lg.level for lg in logs]
    for lg in logs:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(logs, levels):
            lg.setLevel(level)


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("diffusers-fbcache", "threshold (first block's relative residual change)", 1e-3, 1.0, True, _fbcache),
    Peer("diffusers-magcache", "threshold (accumulated magnitude-ratio error; ratios calibrated on the model)",
         1e-3, 1.0, True, _magcache),
    Peer("diffusers-taylorseer", "cache_interval (steps per full compute, order 1)", 1.0, 12.0, True, _taylorseer),
    Peer("diffusers-pab", "spatial attention skip range (timesteps 100-800)", 1.0, 10.0, True, _pab),
    Peer("diffusers-fastercache", "unconditional-branch skip range (attention skip range 2)", 1.0, 10.0, True,
         _fastercache),
    Peer("cache-dit-dbcache", "residual_diff_threshold (F1B0)", 1e-3, 1.0, True, _dbcache(False)),
    Peer("cache-dit-dbcache-taylorseer", "residual_diff_threshold (F1B0, TaylorSeer order 1)", 1e-3, 1.0, True,
         _dbcache(True)),
)}
