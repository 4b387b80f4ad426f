"""Step caches: skip the transformer's block stack on denoising steps where its output would barely change.

A cache is a per-request object (made for one request, thrown away with it). The model calls it once a step
in place of its block stack (`CogVideoXTransformer.forward(..., cache=)`): `blocks` either runs them or adds
back what they added at an earlier step, and the model's output passes through `output`, which may replace it
(the x0 cache does, on a skipped step). The pipeline's loop knows nothing of what a cache decides; it calls
`prepare` once before the loop, which lets a cache whose decisions depend on the timestep alone work out its
whole schedule there, with one host sync per request.

The caches: `teacache` (TeaCache's time-embedding indicator), `probe` (the first block's change decides, the
skipped residual forecast from the last computed ones), `x0` (the probe's rule decides, a skipped step's output is
the sampler's clean-sample estimate extrapolated in log-SNR). A new one is one new file with a `StepCache` subclass,
made in `new_state`.
"""
from __future__ import annotations

import abc
import json
from pathlib import Path

import torch


class StepCache(abc.ABC):
    """The interface and the bookkeeping every cache shares: which steps ran the blocks, which did not."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self.computed: list[int] = []
        self.skipped: list[int] = []
        self.parallel = None  # engine.parallel.Parallel where the request spans several ranks (the pipeline sets it)

    @property
    def step(self) -> int:
        """The step the next `blocks` call is for: steps come in order, each once."""
        return len(self.computed) + len(self.skipped)

    def prepare(self, model, timesteps: torch.Tensor, batch: int, ofs, dtype, scheduler=None) -> None:
        """Before the loop; `timesteps` are the request's scheduler's (`scheduler`, set for them)."""

    @abc.abstractmethod
    def blocks(self, model, emb: torch.Tensor, v: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, rope):
        """The block stack's output for video tokens v (B, S, D) and text tokens c (B, T, D) at this step; emb is
        the time embedding before SiLU (B, time_embed_dim), temb after it."""

    def output(self, x: torch.Tensor, timestep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The model's output at this step, for its input latents x: `out` as the head gave it, or what the cache
        puts in its place (the x0 cache, on a skipped step)."""
        self.observe(out)
        return out

    def observe(self, out: torch.Tensor) -> None:
        """The model's output at this step (calibration records it)."""

    def _count(self, compute: bool) -> None:
        if self.step >= self.num_steps:
            raise RuntimeError(f"{type(self).__name__} got a step past its {self.num_steps}: a state serves one "
                               f"request, step by step")
        (self.computed if compute else self.skipped).append(self.step)


def rel_l1(prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """mean|cur - prev| / mean|prev|, in fp32, on the device."""
    prev, cur = prev.float(), cur.float()
    return (cur - prev).abs().mean() / prev.abs().mean()


class Residuals:
    """What the skipped blocks would have added, from what they added at the last computed steps.

    order 0 adds the last residual as it is (TeaCache, FirstBlockCache). order k forecasts it with Newton's
    divided differences over the last k + 1 computed steps, in the step index: a Taylor expansion of the
    residual along the trajectory (TaylorSeer's idea), which follows its drift between computed steps instead
    of holding it still."""

    def __init__(self, order: int = 0):
        if order not in (0, 1, 2):
            raise ValueError(f"a residual forecast of order {order}: 0, 1 or 2")
        self.order = order
        self.steps: list[int] = []
        self.v: list[torch.Tensor] = []  # the video stream's residual at those steps, each (B, S, D)
        self.c: list[torch.Tensor] = []  # the text stream's, each (B, T, D)

    def record(self, step: int, rv: torch.Tensor, rc: torch.Tensor) -> None:
        keep = self.order + 1
        self.steps, self.v, self.c = (self.steps + [step])[-keep:], (self.v + [rv])[-keep:], (self.c + [rc])[-keep:]

    def predict(self, step: int, xs: list[torch.Tensor]) -> torch.Tensor:
        ts = self.steps
        out, diffs, basis = xs[-1], list(xs), 1.0
        # divided differences, newest point first: f[t_n], f[t_n, t_n-1], ...
        for k in range(1, len(xs)):
            diffs = [(diffs[i + 1] - diffs[i]) / (ts[i + k] - ts[i]) for i in range(len(diffs) - 1)]
            basis = basis * (step - ts[-k])
            out = out + diffs[-1] * basis
        return out

    def add_to(self, step: int, v: torch.Tensor, c: torch.Tensor, hold: bool = False):
        """v and c with the residuals added: forecast to `step`, or (hold) the last ones as they are."""
        if not self.steps:
            raise RuntimeError("a step was skipped before any was computed")
        if hold:
            return v + self.v[-1], c + self.c[-1]
        return v + self.predict(step, self.v), c + self.predict(step, self.c)


# Quality levels, by the mean PSNR (dB) of the frames against the uncached run that `cogrt calibrate-cache` finds
# a threshold for on the model's own trajectories. `fast` aims above 30 dB so that held-out prompts stay there.
LEVELS = {"safe": 40.0, "balanced": 35.0, "fast": 32.0}
LEVELS_FILE = "step_cache.json"  # in the model's folder, beside teacache_coefficients.json
LEVEL_KINDS = ("probe", "x0")  # the caches a levels file can calibrate: both decide by the probe's threshold


def read_levels(path) -> dict:
    """A `cogrt calibrate-cache` levels file: {"kind": "probe" or "x0", "order": k (probe), "levels": {name:
    {"threshold": ..., and optionally its own "kind" and "order"}}}. A level's own kind wins over the file's, so
    that one file can hold the best cache for each level (`calibrate-cache --levels --merge`).
    -> {"kind", "order" (the file's, for raw thresholds), "thresholds", "kinds", "orders" (each level's)}."""
    path = Path(path)
    try:
        out = json.loads(path.read_text())
        order = int(out.get("order", 2))
        kind = out.get("kind", "probe")
        levels = out["levels"]
        thresholds = {k: float(v["threshold"]) for k, v in levels.items()}
        kinds = {k: v.get("kind", kind) for k, v in levels.items()}
        orders = {k: int(v.get("order", order)) for k, v in levels.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} is not a calibrate-cache levels file: {e}") from e
    for k in {kind, *kinds.values()}:
        if k not in LEVEL_KINDS:
            raise ValueError(f"{path} is for a {k!r} cache; valid: {', '.join(LEVEL_KINDS)}")
    unknown = set(thresholds) - set(LEVELS)
    if unknown:
        raise ValueError(f"{path} names unknown levels {sorted(unknown)}; valid: {', '.join(LEVELS)}")
    return {"kind": kind, "order": order, "thresholds": thresholds, "kinds": kinds, "orders": orders}


def merge_levels(old: dict, new: dict) -> dict:
    """Two levels files' contents as one: `new`'s levels replace `old`'s of the same name, and every level keeps the
    kind (and probe order) it was calibrated with, in its own entry. The file's own kind and order (what a raw
    threshold gets) stay `old`'s, so that merging a level in changes no other request; its other fields are `new`'s."""
    def tagged(content):
        return {name: {"kind": content.get("kind", "probe"), "order": content.get("order", 2),
                       "margin_db": content.get("margin_db", 0.0), **v}
                for name, v in content["levels"].items()}
    levels = {**tagged(old), **tagged(new)}
    merged = {**new, "kind": old.get("kind", "probe"), "order": old.get("order", 2),
              "levels": {k: levels[k] for k in LEVELS if k in levels}}
    merged.pop("margin_db", None)  # each level says its own
    return merged


def level_cache(kind: str, threshold: float, num_steps: int, order: int = 2) -> StepCache:
    """A cache of a kind a levels file can name (LEVEL_KINDS), at `threshold`: the probe cache with its forecast
    `order`, or the x0 cache."""
    from .probe import ProbeCache
    from .x0 import X0Cache
    if kind not in LEVEL_KINDS:
        raise ValueError(f"no {kind!r} cache has quality levels; valid: {', '.join(LEVEL_KINDS)}")
    return X0Cache(threshold, num_steps) if kind == "x0" else ProbeCache(threshold, num_steps, order=order)


def new_state(req, num_steps: int, levels: dict | None = None) -> StepCache | None:
    """The step cache for a request (engine.request.GenerationRequest), or None when it computes every step.
    `levels`: the model's read_levels(), which a request's quality level needs."""
    from .teacache import TeaCache
    if req.teacache_fixed_steps is not None:
        return TeaCache(0.0, (), num_steps, fixed=frozenset(req.teacache_fixed_steps))
    if req.teacache is not None:
        return TeaCache(float(req.teacache), tuple(req.teacache_coefficients), num_steps)
    if req.cache is None and req.cache_threshold is None:
        return None
    kind, order = kind_and_order(req, levels)
    return level_cache(kind, threshold(req, levels), num_steps, order)


def kind_and_order(req, levels: dict | None) -> tuple[str, int]:
    """The cache kind (and probe order) a request gets: its level's in the model's `levels`, else the file's (a raw
    threshold), else the probe cache's."""
    if not levels:
        return "probe", 2
    if req.cache in levels["kinds"]:
        return levels["kinds"][req.cache], levels["orders"][req.cache]
    return levels["kind"], levels["order"]


def threshold(req, levels: dict | None) -> float:
    """The probe or x0 cache's threshold for a request: its own, or its quality level's in the model's `levels`; a
    ValueError naming the fix where the model has no such level."""
    if req.cache_threshold is not None:
        return float(req.cache_threshold)
    if not levels or req.cache not in levels["thresholds"]:
        raise ValueError(f"this model has no calibrated {req.cache!r} step-cache level; run `cogrt calibrate-cache "
                         f"--model DIR --levels` (it writes {LEVELS_FILE} beside the model), or pass a "
                         f"cache_threshold")
    return float(levels["thresholds"][req.cache])
