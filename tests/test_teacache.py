"""TeaCache step skipping: decisions, residual reuse, per-request state, calibration, the fixed schedule."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_image

from cogrt.engine import cli
from cogrt.engine.caches import teacache
from cogrt.engine.model import PRESETS
from cogrt.engine.random_model import random_transformer
from cogrt.engine.request import GenerationRequest

KW = dict(num_frames=9, height=64, width=64, num_inference_steps=6, seed=0)
PROMPT = "a lighthouse in a storm"


@pytest.mark.parametrize("variant", ["5b", "2b", "1.5-5b-i2v"])
def test_threshold_zero_is_bit_identical_to_off(pipeline, variant):
    pipe = pipeline(variant)
    kw = dict(KW, image=random_image(64, 64)) if pipe.cfg.is_i2v else KW
    off = pipe.generate(PROMPT, **kw)
    # x - 1 is negative for every distance below 1: the clamp must keep threshold 0 computing every step
    on = pipe.generate(PROMPT, teacache=0.0, teacache_coefficients=[1.0, -1.0], **kw)
    assert on.steps_computed == off.steps_computed == list(range(6)) and on.steps_skipped == []
    assert np.array_equal(on.frames, off.frames) and torch.equal(on.latents, off.latents)


def test_large_threshold_skips_all_but_first_and_last(pipeline):
    pipe = pipeline("5b")
    off = pipe.generate(PROMPT, **KW)
    res = pipe.generate(PROMPT, teacache=1e9, teacache_coefficients=[1.0, 0.0], **KW)
    assert res.steps_computed == [0, 5] and res.steps_skipped == [1, 2, 3, 4]
    assert not torch.equal(res.latents, off.latents)


def _embeddings(pipe, steps):
    """The indicator's input at each step, as the denoising loop makes it (a CFG batch of 2)."""
    import diffusers
    sched = getattr(diffusers, pipe.scheduler_config["_class_name"]).from_config(pipe.scheduler_config)
    sched.set_timesteps(steps)
    with torch.no_grad():
        return [pipe.transformer.embed_time(t.expand(2), None, torch.float32) for t in sched.timesteps]


def test_decisions_follow_the_accumulated_rescaled_distance(pipeline):
    pipe, steps = pipeline("5b"), 10
    embs = _embeddings(pipe, steps)
    d = [((b - a).abs().mean() / a.abs().mean()).item() for a, b in zip(embs, embs[1:])]  # d[i-1]: step i
    coeffs = [2.0, 0.5, -0.01]  # 2d^2 + d/2 - 0.01
    threshold = 2.5 * float(np.median(np.polyval(coeffs, d)))
    want, acc = [0], 0.0
    for i in range(1, steps - 1):
        acc += max(0.0, float(np.polyval(coeffs, d[i - 1])))
        if acc >= threshold:
            want.append(i)
            acc = 0.0
    want.append(steps - 1)
    assert 3 <= len(want) <= steps - 3  # a schedule that tells decisions apart
    res = pipe.generate(PROMPT, teacache=threshold, teacache_coefficients=coeffs,
                        **{**KW, "num_inference_steps": steps})
    assert res.steps_computed == want
    assert res.steps_skipped == [i for i in range(steps) if i not in want]


def test_schedule_worked_out_before_the_loop_matches_step_by_step(pipeline, monkeypatch):
    """The planned schedule makes the same decisions as deciding at each step, with no host sync in the loop."""
    pipe, kw = pipeline("5b"), {**KW, "num_inference_steps": 12}
    embs = _embeddings(pipe, 12)
    d = [((b - a).abs().mean() / a.abs().mean()).item() for a, b in zip(embs, embs[1:])]
    req = dict(teacache=2.5 * float(np.median(d)), teacache_coefficients=[1.0, 0.0])
    planned = pipe.generate(PROMPT, **req, **kw)
    monkeypatch.setattr(teacache.TeaCache, "prepare", lambda *a, **k: None)  # back to deciding at each step
    stepwise = pipe.generate(PROMPT, **req, **kw)
    assert 2 < len(planned.steps_computed) < 12
    assert planned.steps_computed == stepwise.steps_computed and torch.equal(planned.latents, stepwise.latents)
    monkeypatch.undo()

    # the indicator is worked out before the first block runs, not step by step
    ran, rel_l1 = [], teacache.rel_l1

    def indicator(*a):
        assert not ran, "an indicator computed inside the loop"
        return rel_l1(*a)
    monkeypatch.setattr(teacache, "rel_l1", indicator)
    hook = pipe.transformer.blocks[0].register_forward_hook(lambda *_: ran.append(1))
    try:
        assert pipe.generate(PROMPT, **req, **kw).steps_computed == planned.steps_computed
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def model_inputs():
    torch.manual_seed(0)
    model = random_transformer(PRESETS["tiny-5b"])
    xs = [torch.randn(2, 3, 16, 8, 8) for _ in range(4)]  # one latent batch (uncond, cond) per step
    text = torch.randn(2, 226, 32)
    ts = [torch.tensor([t, t]) for t in (999, 700, 400, 100)]
    return model, xs, text, ts


def test_skipped_step_adds_the_cached_residuals_of_both_streams(model_inputs):
    model, xs, text, ts = model_inputs
    state = teacache.TeaCache(0.0, (), 4, fixed=frozenset({0, 3}))
    calls = []
    hook = model.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            model(xs[0], text, ts[0], cache=state)
            n_after_first = len(calls)
            out = model(xs[1], text, ts[1], cache=state)
            n_after_skip = len(calls)
            # by hand: the blocks' residual at step 0, for each stream, added to step 1's embedded tokens
            v0, c0, rope = model.embed(xs[0], text)
            v1, c1 = model.run_blocks(v0, c0, F.silu(model.embed_time(ts[0], None, torch.float32)), rope)
            v, c, rope = model.embed(xs[1], text)
            temb = F.silu(model.embed_time(ts[1], None, torch.float32))
            want = model.head(v + (v1 - v0), temb, xs[1].shape)
    finally:
        hook.remove()
    assert n_after_first == n_after_skip == 1  # the skipped step ran no block
    assert torch.equal(state.residuals.v[-1], v1 - v0) and torch.equal(state.residuals.c[-1], c1 - c0)
    assert torch.equal(out, want)
    assert state.computed == [0] and state.skipped == [1]


def test_state_is_per_request(model_inputs, pipeline):
    model, xs, text, ts = model_inputs

    def requests():  # two requests: their own states and their own latents
        return [(teacache.TeaCache(0.0, (), 4, fixed=frozenset({0, 3})), xs),
                (teacache.TeaCache(1.0, (1.0, 0.0), 4), xs[::-1])]

    with torch.no_grad():
        alone = [[model(x[i], text, ts[i], cache=s) for i in range(4)] for s, x in requests()]
        reqs, mixed = requests(), ([], [])
        for i in range(4):  # stepped in turn on one model
            for (s, x), outs in zip(reqs, mixed):
                outs.append(model(x[i], text, ts[i], cache=s))
        with pytest.raises(RuntimeError, match="one request"):  # a used state cannot serve another request
            model(xs[0], text, ts[0], cache=reqs[0][0])
    assert [s.computed for s, _ in reqs] == [[0, 3], reqs[1][0].computed] and reqs[1][0].skipped
    for got, want in zip(mixed, alone):
        assert all(torch.equal(g, w) for g, w in zip(got, want))

    pipe = pipeline("5b")
    kw = dict(teacache=1.2, teacache_coefficients=[1.0, 0.0], **KW)
    first = pipe.generate(PROMPT, **kw)
    pipe.generate("another prompt", teacache=1e9, teacache_coefficients=[1.0, 0.0], **{**KW, "seed": 3})
    again = pipe.generate(PROMPT, **kw)
    assert 0 < len(first.steps_skipped) < 4
    assert again.steps_computed == first.steps_computed and np.array_equal(again.frames, first.frames)


def test_fixed_schedule():
    s = teacache.fixed_schedule(50, 22)
    assert len(s) == 22 and s[0] == 0 and s[-1] == 49 and set(np.diff(s)) <= {2, 3}
    assert teacache.fixed_schedule(6, 6) == tuple(range(6)) and teacache.fixed_schedule(6, 2) == (0, 5)
    for bad in ((50, 1), (50, 51), (50, 0)):
        with pytest.raises(ValueError):
            teacache.fixed_schedule(*bad)
    for bad in ((1, 5), (0, 3)):  # first and last must be in it
        with pytest.raises(ValueError, match="first"):
            GenerationRequest(PROMPT, teacache_fixed_steps=bad, **KW)
    with pytest.raises(ValueError, match="one step cache"):
        GenerationRequest(PROMPT, teacache=0.1, teacache_fixed_steps=(0, 5), **KW)


def test_fixed_steps_compute_exactly_those(pipeline):
    pipe = pipeline("5b")
    calls = []
    hook = pipe.transformer.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        res = pipe.generate(PROMPT, teacache_fixed_steps=(5, 0, 2), **KW)
    finally:
        hook.remove()
    assert res.steps_computed == [0, 2, 5] and res.steps_skipped == [1, 3, 4] and len(calls) == 3


def test_published_coefficients_only_for_the_released_shapes(pipeline, tmp_path, capsys):
    assert teacache.published_coefficients(PRESETS["cogvideox-5b"])[0] == -1.53880483e+03
    assert teacache.published_coefficients(PRESETS["cogvideox-2b"])[-1] == -3.61568434e-03
    assert teacache.published_coefficients(PRESETS["cogvideox1.5-5b-i2v"])[0] == 1.22842302e+02
    assert len({teacache.published_coefficients(PRESETS[k]) for k in teacache.PUBLISHED}) == 4  # 5B-I2V = 5B
    req = GenerationRequest(PROMPT, teacache=0.2, **KW)
    with pytest.raises(ValueError, match="calibrate-cache"):
        req.check_for(PRESETS["tiny-5b"])
    with pytest.raises(ValueError, match="calibrate-cache"):
        pipeline("5b").generate(PROMPT, teacache=0.2, **KW)
    # the bundled model ships its own fit (models/cogrt-tiny/teacache_coefficients.json), which the CLI picks up
    rc = cli.main(["generate", PROMPT, "--frames", "9", "--height", "64", "--width", "64", "--steps", "6",
                   "--teacache", "0.2", "--device", "cpu", "-o", str(tmp_path / "o.mp4")])
    assert rc == 0 and "step cache: computed" in capsys.readouterr().out


def test_request_checks():
    with pytest.raises(ValueError, match=">= 0"):
        GenerationRequest(PROMPT, teacache=-0.1)
    with pytest.raises(ValueError, match="without a teacache threshold"):
        GenerationRequest(PROMPT, teacache_coefficients=[1.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        GenerationRequest(PROMPT, teacache=0.1, teacache_coefficients=[1.0, float("nan")])
    with pytest.raises(FileNotFoundError):
        GenerationRequest(PROMPT, teacache=0.1, teacache_coefficients="no/such/file.json")


def test_calibrate_cache_on_the_bundled_model(tmp_path, capsys):
    from cogrt.engine.pipeline import load_pipeline
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right on a black background\n\n"
                       "a blue square moving up on a white background\n")
    out = tmp_path / "coef.json"
    size = ["--frames", "9", "--height", "64", "--width", "64"]
    assert cli.main(["calibrate-cache", "--prompts", str(prompts), "--steps", "20", *size, "--device", "cpu",
                     "--out", str(out)]) == 0
    assert "R^2" in capsys.readouterr().out
    fit = json.loads(out.read_text())
    assert len(fit["coefficients"]) == 5 and len(fit["points"]) == 2 * 19
    assert fit["r2"] > 0.5, fit["r2"]  # the indicator does predict how much the output changes

    # the fitted polynomial drives the skipping: more threshold, fewer steps computed
    pipe = load_pipeline(cli.BUNDLED_MODEL, device="cpu", dtype=torch.float32)
    kw = dict(num_frames=9, height=64, width=64, num_inference_steps=20, seed=0)
    prompt = "a green triangle moving left on a black background"
    exact = pipe.generate(prompt, **kw)
    counts = []
    for th in (0.0, 0.1, 0.2, 0.4, 1.0):
        res = pipe.generate(prompt, teacache=th, teacache_coefficients=out, **kw)
        counts.append(len(res.steps_computed))
        if th == 0.1:
            psnr = 10 * np.log10(255**2 / np.mean((res.frames.astype(float) - exact.frames) ** 2))
    assert counts[0] == 20 and counts[-1] < 8 and all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert 8 < counts[1] < 20, counts  # a usual threshold skips some steps, not all
    assert psnr > 25, psnr

    rc = cli.main(["generate", prompt, *size, "--steps", "20", "--seed", "0", "--teacache", "0.1",
                   "--teacache-coefficients", str(out), "--device", "cpu", "-o", str(tmp_path / "o.mp4")])
    assert rc == 0 and f"computed {counts[1]} of 20 steps" in capsys.readouterr().out
