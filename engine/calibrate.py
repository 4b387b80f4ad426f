"""`cogrt calibrate-cache`: fit TeaCache's polynomial on a model's own trajectories."""
from __future__ import annotations

import numpy as np

from .request import GenerationRequest
from .teacache import TeaCacheState

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
        state = TeaCacheState(0.0, (), steps, fixed=frozenset(range(steps)), trace=[])
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

