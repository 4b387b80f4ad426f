"""The step-cache interface, the probe cache, residual forecasting and the calibrated quality levels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cogrt.engine import caches
from cogrt.engine.caches.x0 import X0Cache
from cogrt.engine.caches import Residuals
from cogrt.engine.caches.probe import ProbeCache
from cogrt.engine.request import GenerationRequest

KW = dict(num_frames=9, height=64, width=64, num_inference_steps=8, seed=0)
PROMPT = "a lighthouse in a storm"


def _series(fn, steps):
    return [torch.full((1, 2, 3), float(fn(s))) for s in steps]


@pytest.mark.parametrize("order,fn", [(0, lambda s: 5.0), (1, lambda s: 2 * s - 1), (2, lambda s: s * s - 3 * s + 2)])
def test_forecast_is_exact_on_polynomials_of_its_order(order, fn):
    r = Residuals(order)
    steps = [0, 3, 4][-(order + 1):]
    for s, v, c in zip(steps, _series(fn, steps), _series(fn, steps)):
        r.record(s, v, c)
    zero = torch.zeros(1, 2, 3)
    for s in (5, 6, 9):
        v, c = r.add_to(s, zero, zero)
        assert torch.allclose(v, torch.full_like(v, fn(s))) and torch.allclose(c, v)


def test_forecast_keeps_only_what_its_order_needs():
    r = Residuals(1)
    for s in range(5):
        r.record(s, torch.full((1,), float(s)), torch.zeros(1))
    assert r.steps == [3, 4] and len(r.v) == 2
    # with a single computed step so far, any order holds the residual still
    one = Residuals(2)
    one.record(0, torch.ones(1), torch.ones(1))
    assert torch.equal(one.add_to(3, torch.zeros(1), torch.zeros(1))[0], torch.ones(1))
    with pytest.raises(ValueError):
        Residuals(3)
    with pytest.raises(RuntimeError, match="before any"):
        Residuals(1).add_to(1, torch.zeros(1), torch.zeros(1))


# the caches that probe with the first block, each run at a threshold: the probe cache as a request asks for it
# (cache_threshold), the x0 cache as the levels file of its kind makes it
PROBING = {"probe": lambda pipe, th: pipe.generate(PROMPT, cache_threshold=th, **KW),
           "x0": lambda pipe, th: pipe.run(GenerationRequest(PROMPT, **KW), cache=caches.level_cache("x0", th, 8)),
           "x0-short": lambda pipe, th: pipe.run(GenerationRequest(PROMPT, **KW), cache=X0Cache(th, 8, short=2))}


@pytest.mark.parametrize("kind", PROBING)
def test_threshold_zero_is_bit_identical_to_no_cache(pipeline, kind):
    pipe = pipeline("5b")
    off = pipe.generate(PROMPT, **KW)
    on = PROBING[kind](pipe, 0.0)
    assert on.steps_computed == list(range(8)) and on.steps_skipped == []
    assert np.array_equal(on.frames, off.frames) and torch.equal(on.latents, off.latents)


def test_x0_short_takes_the_residual_forecast_at_the_start_of_a_run(pipeline):
    """short=2: the first two skipped steps of a run add the forecast residual (the head's output stands), the
    rest come from x0; the residual kind gives another video than the x0 kind alone."""
    pipe = pipeline("5b")
    cache = X0Cache(1e9, 8, short=2)
    mixed = pipe.run(GenerationRequest(PROMPT, **KW), cache=cache)
    assert cache.by_residual == {1, 2} and mixed.steps_skipped == list(range(1, 7))
    plain = PROBING["x0"](pipe, 1e9)
    assert np.isfinite(mixed.frames).all() and not np.array_equal(mixed.frames, plain.frames)


@pytest.mark.parametrize("kind", PROBING)
def test_skips_run_only_the_first_block(pipeline, kind):
    pipe = pipeline("5b")
    first, last = [], []
    hooks = [pipe.transformer.blocks[0].register_forward_hook(lambda *_: first.append(1)),
             pipe.transformer.blocks[-1].register_forward_hook(lambda *_: last.append(1))]
    try:
        res = PROBING[kind](pipe, 1e9)
    finally:
        for h in hooks:
            h.remove()
    assert res.steps_computed == [0, 7] and res.steps_skipped == list(range(1, 7))
    assert len(first) == 8 and len(last) == 2  # the probe on every step, the rest only where computed
    assert np.isfinite(res.frames).all()


def test_probe_decides_by_the_first_blocks_change(model_inputs_probe):
    """The distance it reads is the first block's residual against the one at the last computed step; a
    threshold between the distances it saw splits the steps at that point."""
    model, xs, text, ts = model_inputs_probe
    seen = ProbeCache(0.0, 4)
    with torch.no_grad():
        for i in range(4):
            model(xs[i], text, ts[i], cache=seen)
    d = seen.distances  # steps 1 and 2 (0 and the last always compute)
    assert len(d) == 2 and d[0] != d[1]
    th = (d[0] + d[1]) / 2
    cache = ProbeCache(th, 4)
    with torch.no_grad():
        for i in range(4):
            model(xs[i], text, ts[i], cache=cache)
    # compute at 1 when its distance is over the threshold; else skip, and step 2 compares against step 0
    assert cache.computed[0] == 0 and cache.computed[-1] == 3
    assert (1 in cache.computed) == (d[0] >= th)


@pytest.fixture(scope="module")
def model_inputs_probe():
    from cogrt.engine.model import PRESETS
    from cogrt.engine.random_model import random_transformer
    torch.manual_seed(0)
    model = random_transformer(PRESETS["tiny-5b"])
    xs = [torch.randn(2, 3, 16, 8, 8) for _ in range(4)]
    text = torch.randn(2, 226, 32)
    ts = [torch.tensor([t, t]) for t in (999, 700, 400, 100)]
    return model, xs, text, ts


def test_request_cache_fields():
    with pytest.raises(ValueError, match="unknown cache level"):
        GenerationRequest(PROMPT, cache="turbo")
    with pytest.raises(ValueError, match=">= 0"):
        GenerationRequest(PROMPT, cache_threshold=-1.0)
    with pytest.raises(ValueError, match="one step cache"):
        GenerationRequest(PROMPT, cache="fast", teacache=0.1)
    GenerationRequest(PROMPT, cache="fast", cache_threshold=0.1)  # a level with its threshold given: fine


def test_levels_need_a_calibration(pipeline):
    with pytest.raises(ValueError, match="calibrate-cache"):
        pipeline("5b").generate(PROMPT, cache="balanced", **KW)


def test_levels_file_is_checked(tmp_path):
    bad = tmp_path / "step_cache.json"
    bad.write_text(json.dumps({"levels": {"turbo": {"threshold": 0.1}}}))
    with pytest.raises(ValueError, match="unknown levels"):
        caches.read_levels(bad)
    bad.write_text("{")
    with pytest.raises(ValueError, match="levels file"):
        caches.read_levels(bad)


def test_calibrated_levels_keep_their_quality(tmp_path, capsys):
    """`cogrt calibrate-cache --levels` on the bundled model, small: each level's threshold keeps its PSNR target
    on the calibration prompts, stricter levels skip no more, and a pipeline reading the file serves them."""
    from cogrt.engine import cli
    from cogrt.engine.pipeline import load_pipeline
    from cogrt.engine.video import psnr
    model = tmp_path / "model"
    import shutil
    shutil.copytree(cli.BUNDLED_MODEL, model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving right on a black background\n")
    out = model / caches.LEVELS_FILE
    assert cli.main(["calibrate-cache", "--model", str(model), "--prompts", str(prompts), "--steps", "12",
                     "--frames", "9", "--height", "64", "--width", "64", "--device", "cpu", "--levels", "--iters", "4",
                     "--levels-out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    levels = json.loads(out.read_text())["levels"]
    th = [levels[k]["threshold"] for k in ("safe", "balanced", "fast")]
    assert th == sorted(th), th
    for name, lv in levels.items():
        assert lv["psnr_db"] >= caches.LEVELS[name] or lv["threshold"] == pytest.approx(1e-3), (name, lv)

    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    kw = dict(num_frames=9, height=64, width=64, num_inference_steps=12, seed=0)
    exact = pipe.generate("a red circle moving right on a black background", **kw)
    fast = pipe.generate("a red circle moving right on a black background", cache="fast", **kw)
    assert psnr(exact.frames, fast.frames) == pytest.approx(levels["fast"]["psnr_db"], abs=1e-6)
    assert len(fast.steps_computed) / 12 == pytest.approx(levels["fast"]["steps_frac"])

    # the x0 cache for `fast` alone, merged into the same file: the other levels keep the probe cache
    assert cli.main(["calibrate-cache", "--model", str(model), "--prompts", str(prompts), "--steps", "12",
                     "--frames", "9", "--height", "64", "--width", "64", "--device", "cpu", "--levels", "--iters", "3",
                     "--kind", "x0", "--only", "fast", "--merge", "--levels-out", str(out)]) == 0
    merged = json.loads(out.read_text())["levels"]
    assert {k: v["kind"] for k, v in merged.items()} == {"safe": "probe", "balanced": "probe", "fast": "x0"}
    assert merged["safe"] == {**levels["safe"], "kind": "probe", "order": 2, "margin_db": 0.0}
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    fast = pipe.generate("a red circle moving right on a black background", cache="fast", **kw)
    assert psnr(exact.frames, fast.frames) == pytest.approx(merged["fast"]["psnr_db"], abs=1e-6)
    assert len(fast.steps_computed) / 12 == pytest.approx(merged["fast"]["steps_frac"])
