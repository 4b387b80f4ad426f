"""TeaCache: skip the transformer blocks on steps whose input barely changed, reusing the last residual.

At each step the relative L1 change of the time embedding since the previous step,
    d_i = mean|e_i - e_{i-1}| / mean|e_{i-1}|,
is mapped through the model's polynomial p (fitted so that p(d) estimates the relative change of the
model's output) and accumulated. While the sum stays below the threshold, the blocks are skipped and the
residual they added last time (blocks' output minus their input, for the video and the text stream) is
added instead. When it reaches the threshold, the blocks run and the sum starts again from zero. The first
and the last step always run.

The indicator: TeaCache's generic recipe uses the timestep-modulated input of the first block. For CogVideoX
the published implementation (and the fit of its coefficients) uses the time embedding `e` that modulates
every block (the output of the time MLP, before SiLU, plus the ofs embedding for 1.5-I2V), so we use that:
the published polynomials only mean something for the indicator they were fitted on. `e` depends on the
timestep alone, which also makes the decision the same for both halves of a CFG batch.

The decision is plain Python between the embedding and the blocks (`TeaCache.blocks`), outside anything that
is compiled: a compiled `Block` never sees it. Since `e` depends on the timestep alone, `prepare` works out
the whole schedule before the loop, from the same embeddings the loop would make, with one host sync per
request instead of one per step. Calibration (which also records the output's change) and the benchmark's
fixed schedules decide step by step.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..model import PRESETS, ModelConfig
from . import Residuals, StepCache, rel_l1

# Published coefficients, highest power first (numpy.polyval order). Numbers only, from
# https://github.com/ali-vilab/TeaCache (commit 7c10efc4702c6b619f47805f7abe4a7a08085aa0),
# TeaCache4CogVideoX1.5/teacache_sample_video.py (`coefficients_dict`); the 2B and 5B numbers also appear in
# eval/teacache/experiments/cogvideox.py there. The source lists the 5B numbers again for 5B-I2V.
PUBLISHED = {
    "cogvideox-2b": (-3.10658903e+01, 2.54732368e+01, -5.92380459e+00, 1.75769064e+00, -3.61568434e-03),
    "cogvideox-5b": (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    "cogvideox-5b-i2v": (-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02),
    "cogvideox1.5-5b": (2.50210439e+02, -1.65061612e+02, 3.57804877e+01, -7.81551492e-01, 3.58559703e-02),
    "cogvideox1.5-5b-i2v": (1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01, 3.71213220e-02),
}
# What makes a model one of the released ones: its shape. A fine-tune of the same shape is not detected,
# which is why calibrate() exists.
_SHAPE = ("num_heads", "head_dim", "num_layers", "in_channels", "out_channels", "text_embed_dim", "time_embed_dim",
          "ofs_embed_dim", "patch_size", "patch_size_t", "use_rotary_positional_embeddings",
          "use_learned_positional_embeddings")


def published_coefficients(cfg: ModelConfig) -> tuple[float, ...]:
    """The published polynomial of the released checkpoint that `cfg` is; an error for any other model."""
    ref = PRESETS[cfg.variant]
    if any(getattr(cfg, k) != getattr(ref, k) for k in _SHAPE):
        raise ValueError(f"no published TeaCache coefficients for this model: it is a {cfg.variant}-style model of "
                         f"{cfg.num_layers} layers and width {cfg.dim}, not the released {cfg.variant} "
                         f"({ref.num_layers} layers, width {ref.dim}). Fit its own with `cogrt calibrate-cache "
                         f"--model DIR` and pass the file (--teacache-coefficients FILE, or "
                         f"teacache_coefficients=FILE in the request)")
    return PUBLISHED[cfg.variant]


def read_coefficients(src) -> tuple[float, ...]:
    """A sequence of numbers, or a JSON file written by `cogrt calibrate-cache` (its "coefficients")."""
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"TeaCache coefficients file not found: {path}")
        try:
            src = json.loads(path.read_text())["coefficients"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a calibrate-cache file (a JSON object with \"coefficients\"): {e}") from e
    try:
        out = tuple(float(c) for c in src)
    except (TypeError, ValueError) as e:
        raise ValueError(f"TeaCache coefficients must be numbers, got {src!r}") from e
    if not out or not all(math.isfinite(c) for c in out):
        raise ValueError(f"TeaCache coefficients must be a non-empty list of finite numbers, got {out!r}")
    return out


def fixed_schedule(num_steps: int, computed: int) -> tuple[int, ...]:
    """BENCHMARK ONLY: `computed` of `num_steps` steps, evenly spread, first and last included.

    On random weights TeaCache's decisions mean nothing, so a speed run forces a schedule instead
    (22 of 50 is the ratio published for threshold 0.2 on 5B)."""
    if not (1 <= computed <= num_steps and (computed >= 2 or num_steps == 1)):
        raise ValueError(f"a fixed schedule computes between 2 (first and last) and {num_steps} steps, got {computed}")
    if computed == 1:
        return (0,)
    return tuple(math.floor(k * (num_steps - 1) / (computed - 1) + 0.5) for k in range(computed))


def check_fixed_steps(steps, num_steps: int) -> tuple[int, ...]:
    out = tuple(sorted({int(s) for s in steps}))
    if not out or out[0] != 0 or out[-1] != num_steps - 1:
        raise ValueError(f"fixed TeaCache steps must include the first (0) and the last ({num_steps - 1}) step, "
                         f"got {list(out)}")
    return out


class TeaCache(StepCache):
    """One request's TeaCache (the module docstring). `fixed`: BENCHMARK ONLY, compute exactly these steps;
    `trace`: calibration, record (indicator, output change) at every step after the first."""

    def __init__(self, threshold: float, coefficients: tuple[float, ...], num_steps: int,
                 fixed: frozenset[int] | None = None, trace: list | None = None, forecast: int = 0):
        super().__init__(num_steps)
        self.threshold, self.coefficients, self.fixed, self.trace = threshold, coefficients, fixed, trace
        self.residuals = Residuals(forecast)
        self.accumulated = 0.0  # the rescaled distance summed since the last computed step
        self.prev_emb: torch.Tensor | None = None  # the indicator's input at the previous step, (B, time_embed_dim)
        self.distance: float | None = None  # the indicator at the current step
        self.prev_out: torch.Tensor | None = None  # calibration: the previous step's output
        self.schedule: frozenset[int] | None = None  # the steps to compute, when worked out before the loop

    def plan(self, distances: list[float]) -> None:
        """Decide every step up front from the indicator's distances (distances[i - 1]: step i against step i - 1),
        by the rule `decide` applies step by step."""
        if len(distances) != self.num_steps - 1:
            raise ValueError(f"{len(distances)} distances for {self.num_steps} steps")
        computed, acc = {0, self.num_steps - 1}, 0.0
        for step in range(1, self.num_steps - 1):
            compute, acc = self._accumulate(acc, distances[step - 1])
            if compute:
                computed.add(step)
        self.schedule = frozenset(computed)

    def _accumulate(self, acc: float, distance: float) -> tuple[bool, float]:
        """TeaCache's rule at a middle step: add the polynomial's estimate of the output's change to `acc`;
        compute once the sum reaches the threshold, and start again from 0. -> (compute, the new sum).
        A relative distance is never negative, but the published quartics dip below zero near d = 0; clamped,
        threshold 0 computes every step and a larger threshold never computes more."""
        acc += max(0.0, float(np.polyval(self.coefficients, distance)))
        return (True, 0.0) if acc >= self.threshold else (False, acc)

    def decide(self, emb: torch.Tensor) -> bool:
        """True: run the blocks at this step."""
        step = self.step
        self.distance = None
        if self.schedule is not None:
            return step in self.schedule
        if self.prev_emb is not None and (self.fixed is None or self.trace is not None):
            self.distance = rel_l1(self.prev_emb, emb).item()
        self.prev_emb = emb
        if self.fixed is not None:
            compute = step in self.fixed
        elif step == 0 or step == self.num_steps - 1:
            compute = True
        else:
            compute, self.accumulated = self._accumulate(self.accumulated, self.distance)
        if compute:
            self.accumulated = 0.0
        return compute

    def prepare(self, model, timesteps, batch, ofs, dtype, scheduler=None) -> None:
        """plan() from the time embeddings of every step, made as the loop makes them (the same batch, so the same
        numbers); one host sync. Calibration and fixed schedules are left to decide step by step."""
        if self.fixed is not None or self.trace is not None or self.num_steps < 3:
            return
        with torch.no_grad():
            embs = [model.embed_time(t.expand(batch), ofs, dtype) for t in timesteps]  # each (B, time_embed_dim)
            d = torch.stack([rel_l1(a, b) for a, b in zip(embs, embs[1:])])
        self.plan(d.tolist())

    def blocks(self, model, emb, v, c, temb, rope):
        compute = self.decide(emb)
        step = self.step
        self._count(compute)
        if not compute:
            return self.residuals.add_to(step, v, c)
        v1, c1 = model.run_blocks(v, c, temb, rope)
        self.residuals.record(step, v1 - v, c1 - c)
        return v1, c1

    def observe(self, out: torch.Tensor) -> None:
        if self.trace is not None:
            if self.prev_out is not None:
                self.trace.append((self.distance, rel_l1(self.prev_out, out).item()))
            self.prev_out = out
