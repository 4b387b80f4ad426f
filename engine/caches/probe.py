"""The probe cache: the first block decides, and the skipped blocks' residual is forecast.

Every step runs the first block. How much its residual (its output minus its input, video stream) changed since
the last step that ran every block,
    d = mean|r_0 - r_0'| / mean|r_0'|,
says how much the rest of the stack would change: while d stays below the threshold the other blocks are
skipped (FirstBlockCache's rule, which probes the request's own content where TeaCache reads the timestep
alone). What the skipped blocks would have added is not the last residual held still, as in FirstBlockCache
and TeaCache, but its forecast from the last computed steps (`Residuals`, order 1 by default): along a
trajectory the residual drifts smoothly, and following that drift is what keeps quality at aggressive
settings. The first and the last step always compute.

The decision needs the probe's distance on the host: one sync a step. Under a parallel layout the distance is
summed over the CFG ranks, so that every rank makes the decision one process would.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import Residuals, StepCache, rel_l1


class ProbeCache(StepCache):
    def __init__(self, threshold: float, num_steps: int, order: int = 2, max_skips: int | None = None,
                 decide: str = "best"):
        super().__init__(num_steps)
        if decide not in ("best", "forecast", "last"):
            raise ValueError(f"decide must be 'best', 'forecast' or 'last', got {decide!r}")
        self.threshold, self.max_skips, self.decide = threshold, max_skips, decide
        self.residuals = Residuals(order)
        # the first block's residual at the computed steps, (B, S, D) each; forecast like the rest's
        self.probes = Residuals(order if decide != "last" else 0)
        self.skips = 0  # skipped in a row
        self.distances: list[float] = []

    def _distances(self, expected: list[torch.Tensor], r: torch.Tensor) -> list[float]:
        """rel_l1 of r against each expectation, over the whole CFG batch: with the `cfg` layout each rank holds
        half of it, so the sums are added over the CFG ranks (every sequence rank holds all the tokens after
        the blocks), and every rank decides on the same numbers as one process would."""
        par = self.parallel
        if par is None or par.layout.cfg == 1:
            return torch.stack([rel_l1(e, r) for e in expected]).tolist()  # one host sync for all
        r = r.float()
        sums = torch.stack([t for e in expected for t in ((r - e.float()).abs().sum(), e.float().abs().sum())])
        dist.all_reduce(sums, group=par.cfg_group)
        sums = sums.view(-1, 2)  # (expectations, [|r - e|, |e|])
        return (sums[:, 0] / sums[:, 1]).tolist()  # one host sync for all

    def blocks(self, model, emb, v, c, temb, rope):
        step = self.step
        v0, c0 = model.run_blocks(v, c, temb, rope, blocks=model.blocks[:1])
        r = v0 - v
        compute = step == 0 or step == self.num_steps - 1 or not self.probes.steps
        hold = False
        if not compute:
            last = self.probes.v[-1]  # the probe at the last computed step
            forecast = self.probes.predict(step, self.probes.v)
            if self.decide == "best":  # the forecast where it predicts the probe better than holding it still
                d_forecast, d_hold = self._distances([forecast, last], r)
                d, hold = min(d_forecast, d_hold), d_hold < d_forecast
            else:
                d, hold = self._distances([forecast if self.decide == "forecast" else last], r)[0], False
            self.distances.append(d)
            compute = d >= self.threshold or (self.max_skips is not None and self.skips >= self.max_skips)
        self._count(compute)
        if not compute:
            self.skips += 1
            return self.residuals.add_to(step, v0, c0, hold=hold)
        self.skips = 0
        self.probes.record(step, r, r[:, :0])  # the probe has no text stream of its own
        v1, c1 = model.run_blocks(v0, c0, temb, rope, blocks=model.blocks[1:])
        self.residuals.record(step, v1 - v0, c1 - c0)
        return v1, c1
