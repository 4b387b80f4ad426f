"""CogVideoX's DPM-Solver++ (2M) step without a host sync, with its noise drawn while the GPU is busy.

diffusers' `CogVideoXDPMScheduler.step` (5B, 1.5-5B) indexes its CPU `alphas_cumprod` with the CUDA timestep and
compares it with 0, which waits for the step's forward to finish, and only then draws its one or two noise tensors
of the latent's size from the request's CPU generator (about 15 ms each) and copies them over. The GPU idles
through all of that: 50-90 ms a 5B step (bench/RESULTS.md, issue 19). Here the same arithmetic runs from
coefficients computed once a request, on the CPU, by the scheduler's own `get_variables` and `get_mult`, and the
pipeline draws the step's noise right after launching its forward, in the order and from the generator that
diffusers' step would use: the latents come out bit for bit the same (tests/test_dpm.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Coefs:
    """A step's coefficients as 0-d float32 CPU tensors, like diffusers' own: a CUDA op reads such a tensor as a
    scalar on the host (no sync), and on the CPU a bf16 op rounds it to bf16 where a Python float would not, so
    only the same type gives the same bits everywhere."""
    sqrt_a: torch.Tensor  # √ᾱ_t
    sqrt_b: torch.Tensor  # √(1 − ᾱ_t)
    mult: tuple[torch.Tensor, ...]  # get_mult's: (m1, m2) at first order, (m1, m2, m3, m4) with a step back
    noise: torch.Tensor  # the noise's multiplier
    second_order: bool  # whether the step uses the last step's x0 (and draws a second noise)


class DPMSteps:
    """The request's steps: `noise(i, ...)` draws step i's noise, `step(i, ...)` makes it."""

    def __init__(self, sched, timesteps: list[int]):
        self.prediction = sched.config.prediction_type
        if self.prediction not in ("v_prediction", "epsilon", "sample"):
            raise ValueError(f"unknown prediction type {self.prediction!r}")
        a = sched.alphas_cumprod  # float32 on the CPU, as diffusers' step computes with it
        k = sched.config.num_train_timesteps // sched.num_inference_steps
        self.coefs = []
        for i, t in enumerate(timesteps):
            prev, back = t - k, timesteps[i - 1] if i > 0 else None
            a_t = a[t]
            a_prev = a[prev] if prev >= 0 else sched.final_alpha_cumprod
            a_back = a[back] if back is not None else None
            h, r, _, _ = sched.get_variables(a_t, a_prev, a_back)
            mult = sched.get_mult(h, r, a_t, a_prev, a_back)
            noise = (1 - a_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
            self.coefs.append(Coefs(a_t ** 0.5, (1 - a_t) ** 0.5, tuple(mult), noise, i > 0 and prev >= 0))

    def noise(self, i: int, shape, gen: torch.Generator, dtype) -> list[torch.Tensor]:
        """Step i's draws, as diffusers' step makes them (randn_tensor on the generator's device): one, or two
        where the step is of second order (the first is then drawn and not used)."""
        n = 2 if self.coefs[i].second_order else 1
        return [torch.randn(shape, generator=gen, device=gen.device, dtype=dtype) for _ in range(n)]

    def step(self, i: int, v: torch.Tensor, old_x0: torch.Tensor | None, sample: torch.Tensor,
             noise: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the next sample, this step's x0), as `sched.step(v, old_x0, t, back, sample)` returns them."""
        c = self.coefs[i]
        if self.prediction == "v_prediction":  # every CogVideoX checkpoint
            x0 = c.sqrt_a * sample - c.sqrt_b * v
        elif self.prediction == "epsilon":
            x0 = (sample - c.sqrt_b * v) / c.sqrt_a
        else:
            x0 = v
        noise = [n.to(sample.device) for n in noise]
        if old_x0 is None or not c.second_order:
            return c.mult[0] * sample - c.mult[1] * x0 + c.noise * noise[0], x0
        d = c.mult[2] * x0 - c.mult[3] * old_x0
        return c.mult[0] * sample - c.mult[1] * d + c.noise * noise[1], x0
