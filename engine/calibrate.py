"""`cogrt calibrate-cache`: fit TeaCache's polynomial on a model's own trajectories."""
from __future__ import annotations

import numpy as np

from .request import GenerationRequest
from .caches.teacache import TeaCache

DEFAULT_PROMPTS = (
    "a red fox running through fresh snow in a pine forest",
    "a busy city street at night with neon signs and passing cars",
    "waves rolling onto a sandy beach at sunset",
    "a close-up of a chef slicing vegetables on a wooden board",
)


def calibrate(pipe, prompts=DEFAULT_PROMPTS, steps: int = 50, degree: int = 4, seed: int = 0, **request_kw) -> dict:
    """Run full trajectories (no step skipped) and fit p with numpy.polyfit so that p(indicator change) estimates
    the relative L1 change of the transformer output between consecutive steps.

    request_kw go to each GenerationRequest (loras, num_frames, height, width, guidance_scale, image...).
    Returns the coefficients with the fit quality (R^2 and the mean relative residual) and the raw points."""
    if steps - 1 <= degree:
        raise ValueError(f"a degree-{degree} fit needs more than {degree + 1} steps, got {steps}")
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    points = []
    for k, prompt in enumerate(prompts):
        req = GenerationRequest(prompt=prompt, num_inference_steps=steps, seed=seed + k, **request_kw)
        state = TeaCache(0.0, (), steps, fixed=frozenset(range(steps)), trace=[])
        pipe.run(req, cache=state)
        points += state.trace
    x, y = np.array(points).T  # (N,) each
    coefficients = np.polyfit(x, y, degree)
    fit = np.polyval(coefficients, x)
    r2 = 1.0 - float(((y - fit) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))
    rel_residual = float((np.abs(y - fit) / np.maximum(np.abs(y), 1e-12)).mean())
    return {"coefficients": [float(c) for c in coefficients], "degree": degree, "steps": steps,
            "prompts": len(prompts), "r2": r2, "mean_relative_residual": rel_residual,
            "points": [[float(a), float(b)] for a, b in zip(x, y)]}



def calibrate_levels(pipe, prompts=DEFAULT_PROMPTS, steps: int = 50, targets: dict | None = None, order: int = 2,
                     kind: str = "probe", seed: int = 0, lo: float = 1e-3, hi: float = 2.0, iters: int = 10, log=None,
                     margin_db: float = 0.0, **request_kw) -> dict:
    """For each quality level (engine.caches.LEVELS: name -> mean PSNR target in dB), the largest threshold of
    the `kind` cache ("probe", with its forecast `order`, or "x0") whose frames keep that mean PSNR against the
    uncached run on `prompts` (plus `margin_db`), found by bisection in log
    space over [lo, hi]. Every threshold is tried on all prompts; results are shared between the levels.
    Returns the levels file's content (engine.caches.read_levels reads it back)."""
    import math

    from .caches import LEVEL_KINDS, LEVELS, level_cache
    from .video import psnr
    if kind not in LEVEL_KINDS:  # here, not after the uncached runs
        raise ValueError(f"no {kind!r} cache has quality levels; valid: {', '.join(LEVEL_KINDS)}")
    targets = dict(targets or LEVELS)
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    reqs = lambda: [GenerationRequest(prompt=p, num_inference_steps=steps, seed=seed + k, **request_kw)  # noqa: E731
                    for k, p in enumerate(prompts)]
    refs = [pipe.run(r).frames for r in reqs()]
    tried: dict[float, tuple[float, float]] = {}

    def at(th: float) -> tuple[float, float]:  # (mean PSNR, mean fraction of steps computed)
        if th not in tried:
            db, frac = [], []
            for ref, req in zip(refs, reqs()):
                res = pipe.run(req, cache=level_cache(kind, th, steps, order))
                db.append(min(psnr(ref, res.frames), 100.0))  # an identical video counts as 100 dB, not inf
                frac.append(len(res.steps_computed) / steps)
            tried[th] = (float(np.mean(db)), float(np.mean(frac)))
            if log:
                log(f"threshold {th:.4g}: {tried[th][0]:.2f} dB, {tried[th][1]:.0%} of steps computed")
        return tried[th]

    levels = {}
    for name, target in sorted(targets.items(), key=lambda kv: -kv[1]):
        a, b, good = math.log(lo), math.log(hi), lo
        for _ in range(iters):
            mid = math.exp((a + b) / 2)
            if at(mid)[0] >= target + margin_db:
                a, good = math.log(mid), mid
            else:
                b = math.log(mid)
        db, frac = at(good)
        levels[name] = {"threshold": good, "target_db": target, "psnr_db": db, "steps_frac": frac}
    return {"kind": kind, "order": order, "steps": steps, "prompts": len(prompts), "seed": seed,
            "margin_db": margin_db, "levels": levels}
