"""The x0 cache: the first block decides, and a skipped step's output is the sampler's own forecast.

The decision is the probe cache's with the held probe (FirstBlockCache's rule): every step runs the first block,
and while its residual stays within `threshold` of the last computed step's the step is skipped. What a skipped
step returns is not the block stack's held or forecast residual pushed through the head, but the model output
that a multistep sampler would use there. The computed steps' outputs give clean-sample estimates
    x0 = α_t x_t − σ_t v     (v-prediction, α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t)),
and between them x0 is extrapolated linearly in the log-SNR λ = log(α/σ) from the last two computed steps, to the
middle of the step being skipped (DPM-Solver++(2M)'s correction, spread over the skipped run). Under CogVideoX's
DPM scheduler, which makes that correction itself, the forecast stops at the step's own λ. The output is then the
v that puts the scheduler's step on that x0: with ε = (x_t − α_t x0) / σ_t, v = α_t ε − σ_t x0. Until two steps
after the first have been computed, x0 is held (a plain DDIM jump).

Forecasting the trajectory where the sampler lives, instead of the residual deep in the stack, holds up over long
skipped runs: on the bundled tiny model it is 2–4 dB above FirstBlockCache, which holds the residual, at 20%, 30%
and 55% of steps computed (bench/RESULTS.md). Besides the probe's residual it keeps two latents, no residuals of
the whole token stream. It needs the scheduler (`prepare(..., scheduler=)`): its ᾱ table and step, and
v-prediction, which every CogVideoX checkpoint uses.
"""
from __future__ import annotations

import math

import torch

from .probe import ProbeCache


class X0Cache(ProbeCache):
    def __init__(self, threshold: float, num_steps: int, max_skips: int | None = None, damp: float = 1.0,
                 short: int = 0):
        """`short`: the first `short` skipped steps of each skipped run take the block stack's residual forecast
        to order 2 (the probe cache's) instead of the x0 forecast: the residual's is the better one over short
        gaps, x0's over long ones (bench/RESULTS.md). 0 keeps no residuals."""
        super().__init__(threshold, num_steps, order=2 if short else 0, max_skips=max_skips, decide="last")
        self.damp = damp  # 1: the full linear extrapolation in λ; 0: x0 held
        self.short = short
        self.by_residual: set[int] = set()  # skipped steps whose output came from the residual forecast
        self.history: list[tuple[int, torch.Tensor]] = []  # (timestep, x0 fp32) at the last two computed steps
        self.abar: list[float] = []
        self.ts: list[int] = []
        self.stride = 0  # the scheduler's step in training timesteps: the next one is t - stride
        self.final = 1.0  # ᾱ past the last step
        self.to_midpoint = True  # a one-step sampler (DDIM) takes x0 as given: forecast it to the middle of the step

    def prepare(self, model, timesteps, batch, ofs, dtype, scheduler=None) -> None:
        if scheduler is None or getattr(scheduler.config, "prediction_type", None) != "v_prediction":
            raise ValueError("the x0 cache needs the request's scheduler, with v-prediction")
        self.abar = scheduler.alphas_cumprod.double().tolist()
        self.ts = [int(t) for t in timesteps.tolist()]  # one host sync, here rather than in every step
        # the next timestep as the scheduler's step works it out (not the list's next entry, which rounds apart
        # from it where the step count does not divide the training timesteps)
        self.stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        self.final = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
        # a multistep sampler (CogVideoX's DPM-Solver++(2M)) extrapolates x0 to the middle of the step itself, from
        # the last step's x0: there the forecast stops at this step's own λ, or it would be extrapolated twice
        self.to_midpoint = type(scheduler).__name__ != "CogVideoXDPMScheduler"

    def _lambda(self, t: int) -> float:
        a = self.abar[t] if t >= 0 else self.final
        if a <= 0.0:
            return -math.inf  # the zero-SNR first step
        return 0.5 * math.log(a / (1.0 - a)) if a < 1.0 else math.inf

    def blocks(self, model, emb, v, c, temb, rope):
        if not self.abar:
            raise RuntimeError("X0Cache.prepare was not called: the pipeline passes the scheduler there")
        step = self.step
        v0, c0 = model.run_blocks(v, c, temb, rope, blocks=model.blocks[:1])
        r = v0 - v
        compute = step == 0 or step == self.num_steps - 1 or not self.probes.steps
        if not compute:
            d = self._distances([self.probes.v[-1]], r)[0]
            self.distances.append(d)
            compute = d >= self.threshold or (self.max_skips is not None and self.skips >= self.max_skips)
        self._count(compute)
        if not compute:
            self.skips += 1
            if self.skips <= self.short:
                self.by_residual.add(step)
                return self.residuals.add_to(step, v0, c0)
            return v0, c0  # the head runs on it, and output() replaces what it gives
        self.skips = 0
        self.probes.record(step, r, r[:, :0])
        v1, c1 = model.run_blocks(v0, c0, temb, rope, blocks=model.blocks[1:])
        if self.short:
            self.residuals.record(step, v1 - v0, c1 - c0)
        return v1, c1

    def output(self, x: torch.Tensor, timestep: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        t = self.ts[self.step - 1]  # blocks() has counted this step
        a = self.abar[t]
        alpha, sigma = math.sqrt(a), math.sqrt(1.0 - a)
        xt = x[:, :, :out.shape[2]].float()  # I2V inputs carry the image latents after the noisy ones
        if not self.skipped or self.skipped[-1] != self.step - 1:  # this step computed its blocks
            x0 = alpha * xt - sigma * out.float()
            self.history = (self.history + [(t, x0)])[-2:]
            return out
        if self.step - 1 in self.by_residual:  # the head ran on the forecast residual: its output stands
            return out
        t1, x1 = self.history[-1]
        x0 = x1
        if len(self.history) == 2:
            t2, x2 = self.history[0]
            l1, l2 = self._lambda(t1), self._lambda(t2)
            mid = 0.5 * (self._lambda(t) + self._lambda(t - self.stride)) if self.to_midpoint else self._lambda(t)
            if math.isfinite(l2) and math.isfinite(mid) and l1 != l2:
                x0 = x1 + self.damp * (mid - l1) / (l1 - l2) * (x1 - x2)
        eps = (xt - alpha * x0) / sigma
        return (alpha * eps - sigma * x0).to(out.dtype)
