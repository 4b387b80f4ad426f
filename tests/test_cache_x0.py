"""The x0 cache's forecast: a skipped step's output from x0 along log-SNR (test_caches.py runs it in the pipeline)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cogrt.engine import caches
from cogrt.engine.caches.x0 import X0Cache
from cogrt.engine.request import GenerationRequest

PROMPT = "a lighthouse in a storm"


def _ddim(steps=10, kind="CogVideoXDDIMScheduler"):
    import diffusers
    s = getattr(diffusers, kind)(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                 beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=True)
    s.set_timesteps(steps)
    return s


def _lam(sched, t):
    a = float(sched.alphas_cumprod[t]) if t >= 0 else 1.0
    return 0.5 * math.log(a / (1 - a)) if a < 1 else math.inf


@pytest.mark.parametrize("damp,kind", [(1.0, "CogVideoXDDIMScheduler"), (0.0, "CogVideoXDDIMScheduler"),
                                       (1.0, "CogVideoXDPMScheduler")])
def test_a_skipped_step_follows_x0_linear_in_log_snr(damp, kind):
    """Where the clean-sample estimate moves linearly in λ, the full forecast (damp 1) puts the skipped step's
    output exactly on it: at the middle of that step for DDIM (the next timestep as its step computes it, which
    at 30 steps is not the list's next one), at the step's own λ for the DPM scheduler, whose multistep update
    extrapolates to the middle itself. Damp 0 holds the last computed one (a DDIM jump)."""
    sched = _ddim(30, kind)
    ts = [int(t) for t in sched.timesteps]
    cache = X0Cache(0.5, len(ts), damp=damp)
    cache.prepare(None, sched.timesteps, 1, None, torch.float32, scheduler=sched)
    torch.manual_seed(0)
    base, slope = torch.randn(1, 2, 4, 3, 3), torch.randn(1, 2, 4, 3, 3)
    x0_at = lambda lam: base + lam * slope  # noqa: E731

    def v_for(t, x, x0):  # the v whose x0 estimate at (t, x) is x0
        a = float(sched.alphas_cumprod[t])
        return (math.sqrt(a) * x - x0) / math.sqrt(1 - a)

    for _ in range(2):  # steps 0 and 1, computed without their outputs reaching the cache
        cache._count(True)
    for t in ts[2:4]:  # two computed steps
        x = torch.randn(1, 2, 4, 3, 3)
        cache._count(True)  # what blocks() does before the head runs
        v = v_for(t, x, x0_at(_lam(sched, t)))
        assert cache.output(x, torch.tensor([t]), v) is v  # a computed step's output passes through
    t, nxt = ts[4], ts[4] - 1000 // 30  # 866 -> 833 (the list's next is 832)
    assert nxt != ts[5]
    x = torch.randn(1, 2, 4, 3, 3)
    cache._count(False)
    v = cache.output(x, torch.tensor([t]), torch.zeros_like(x))
    a = float(sched.alphas_cumprod[t])
    got = math.sqrt(a) * x - math.sqrt(1 - a) * v
    if not damp:
        want = x0_at(_lam(sched, ts[3]))
    elif kind == "CogVideoXDPMScheduler":
        want = x0_at(_lam(sched, t))
    else:
        want = x0_at((_lam(sched, t) + _lam(sched, nxt)) / 2)
    assert torch.allclose(got, want, atol=1e-4)


def test_it_needs_a_v_prediction_scheduler():
    sched = _ddim()
    with pytest.raises(ValueError, match="v-prediction"):
        X0Cache(0.1, 10).prepare(None, sched.timesteps, 1, None, torch.float32)
    sched.register_to_config(prediction_type="epsilon")
    with pytest.raises(ValueError, match="v-prediction"):
        X0Cache(0.1, 10).prepare(None, sched.timesteps, 1, None, torch.float32, scheduler=sched)


def test_levels_file_chooses_the_kind(tmp_path):
    path = tmp_path / caches.LEVELS_FILE
    path.write_text(json.dumps({"kind": "x0", "levels": {"fast": {"threshold": 0.2}}}))
    levels = caches.read_levels(path)
    state = caches.new_state(GenerationRequest(PROMPT, cache="fast"), 50, levels)
    assert isinstance(state, X0Cache) and state.threshold == 0.2
    path.write_text(json.dumps({"kind": "teacache", "levels": {"fast": {"threshold": 0.2}}}))
    with pytest.raises(ValueError, match="probe, x0"):
        caches.read_levels(path)


def test_kind_needs_levels(capsys):
    from cogrt.engine.cli import main
    assert main(["calibrate-cache", "--kind", "x0"]) == 2
    assert "--levels" in capsys.readouterr().err


def test_each_level_can_name_its_own_kind(tmp_path):
    """A levels file merged from two calibrations (`calibrate-cache --levels --merge`) serves each level with the
    cache it was calibrated for; a raw threshold gets the file's own kind, as before the merge."""
    probe = {"kind": "probe", "order": 2, "levels": {"safe": {"threshold": 0.09}, "fast": {"threshold": 0.14}}}
    x0 = {"kind": "x0", "order": 2, "margin_db": 3.0, "levels": {"fast": {"threshold": 0.31}}}
    merged = caches.merge_levels(probe, x0)
    assert list(merged["levels"]) == ["safe", "fast"]
    assert merged["levels"]["safe"]["kind"] == "probe" and merged["levels"]["fast"]["kind"] == "x0"
    assert merged["levels"]["fast"]["margin_db"] == 3.0 and merged["levels"]["safe"]["margin_db"] == 0.0
    path = tmp_path / caches.LEVELS_FILE
    path.write_text(json.dumps(merged))
    levels = caches.read_levels(path)
    fast = caches.new_state(GenerationRequest(PROMPT, cache="fast"), 50, levels)
    safe = caches.new_state(GenerationRequest(PROMPT, cache="safe"), 50, levels)
    raw = caches.new_state(GenerationRequest(PROMPT, cache_threshold=0.2), 50, levels)
    assert isinstance(fast, X0Cache) and fast.threshold == 0.31
    assert type(safe).__name__ == "ProbeCache" and safe.threshold == 0.09
    assert type(raw).__name__ == "ProbeCache" and raw.threshold == 0.2  # the file's kind, which merging keeps
    merged["levels"]["safe"]["kind"] = "teacache"
    path.write_text(json.dumps(merged))
    with pytest.raises(ValueError, match="probe, x0"):
        caches.read_levels(path)


def test_only_and_merge_need_levels(capsys):
    from cogrt.engine.cli import main
    for flags in (["--only", "fast"], ["--merge"]):
        assert main(["calibrate-cache", *flags]) == 2
        assert "--levels" in capsys.readouterr().err
