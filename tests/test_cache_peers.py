"""bench/cache_peers.py: other projects' step caches on diffusers' CogVideoXPipeline of the bundled tiny model, and
the Meter that measures what they really computed. One pipeline for the module; 8 steps of 9 x 64 x 64."""
from __future__ import annotations

import sys

import pytest
import torch

from cogrt.bench.cache_peers import PEERS, Meter, PeerUnavailable, calibrate_magcache, compute_fraction
from cogrt.bench.quality import MODEL

STEPS = 8
CALL = dict(prompt="a red circle moving right on a black background", negative_prompt="", num_frames=9, height=64,
            width=64, num_inference_steps=STEPS, guidance_scale=6.0, output_type="latent")
DIFFUSERS = [n for n in PEERS if n.startswith("diffusers-")]
CACHE_DIT = [n for n in PEERS if n.startswith("cache-dit-")]
# the knob that computes every step (threshold 0; interval or skip range 1), and one that skips some at 8 steps
COMPUTE_ALL = {n: (1.0 if PEERS[n].lo >= 1 else 0.0) for n in PEERS}
SKIPPING = {"diffusers-fbcache": 1.0, "diffusers-magcache": 1.0, "diffusers-taylorseer": 3, "diffusers-pab": 3,
            "diffusers-fastercache": 3, "cache-dit-dbcache": 0.5, "cache-dit-dbcache-taylorseer": 0.5}


@pytest.fixture(scope="module")
def pipe():
    from diffusers import CogVideoXPipeline
    p = CogVideoXPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    # MagCache's ratios at this geometry, or its apply() would calibrate at the bench's (49 x 128 x 128)
    calibrate_magcache(p, STEPS, num_frames=9, height=64, width=64)
    return p


def generate(pipe, peer=None, knob=0.0):
    if peer is not None:
        PEERS[peer].apply(pipe, knob, STEPS)
    try:
        with Meter(pipe) as m:
            latents = pipe(**CALL, generator=torch.Generator("cpu").manual_seed(0)).frames
    finally:
        if peer is not None:
            PEERS[peer].remove(pipe)
    return latents, m


@pytest.fixture(scope="module")
def reference(pipe):
    return generate(pipe)


def pattern(m: Meter) -> str:
    return "".join("1" if c else "0" for c in m.computed_steps)


def test_uncached_is_all_work(reference):
    _, m = reference
    assert len(m.calls) == STEPS and all(c["batch"] == 2 for c in m.calls)  # CFG: one batch of 2 per step
    assert m.steps_fraction == 1.0 and m.block_fraction == 1.0


def test_magcache_calibration(pipe):
    ratios = calibrate_magcache(pipe, STEPS, num_frames=9, height=64, width=64)
    assert len(ratios) == STEPS and ratios[0] == 1.0  # MagCache logs 1.0 for the first step (nothing before it)
    assert all(0 < r < 10 for r in ratios)
    assert not pipe.transformer.is_cache_enabled


@pytest.mark.parametrize("name", DIFFUSERS)
def test_compute_all_knob_is_the_uncached_run(pipe, reference, name):
    latents, m = generate(pipe, name, COMPUTE_ALL[name])
    # every peer returns the real module's output on the steps it computes, so computing all is bit-identical
    assert torch.equal(latents, reference[0])
    assert m.steps_fraction == 1.0 and m.block_fraction == 1.0


@pytest.mark.parametrize("name", DIFFUSERS)
def test_skipping_knob_is_measured(pipe, reference, name):
    latents, m = generate(pipe, name, SKIPPING[name])
    assert not torch.equal(latents, reference[0])
    assert 0 < m.steps_fraction < 1 and 0 < m.block_fraction < 1
    assert m.block_fraction >= m.steps_fraction
    # the schedule-driven peers, their rules worked out by hand (8 trailing DDIM steps: t = 999, 874, ..., 124)
    if name == "diffusers-taylorseer":  # steps 0-2 warm up, then step s computes iff (s - 4) % 3 == 0
        assert pattern(m) == "11101001" and m.block_fraction == m.steps_fraction
    tokens = m.calls[0]["tokens"]
    ff_share = m.ff_cost(2, tokens) / (m.attn_cost(2, tokens) + m.ff_cost(2, tokens))
    if name == "diffusers-pab":  # attention reused inside t in (100, 800) unless its call count % 3 == 0
        assert pattern(m) == "11010010"
        assert m.block_fraction == pytest.approx((4 + 4 * ff_share) / 8, rel=1e-12)  # the FFN always runs
    if name == "diffusers-fastercache":
        # CFG branch skipped for t < 641 unless step % 3 == 0: steps 4, 5, 7. On those, attention is reused on odd
        # steps (5, 7) and runs on the conditional half on step 4; the FFN runs on the conditional half
        assert pattern(m) == "11110010"
        assert m.block_fraction == pytest.approx((5 + 0.5 + 2 * 0.5 * ff_share) / 8, rel=1e-12)
    if name in ("diffusers-fbcache", "diffusers-magcache"):
        block = m.calls[0]["work"] // 6  # step 0 always runs all 6 blocks
        skipped = block if name == "diffusers-fbcache" else 0  # FirstBlockCache runs the first block to decide
        assert [c["work"] for c in m.calls] == [6 * block if ran else skipped for ran in m.computed_steps]


def test_apply_replaces_and_remove_clears(pipe, reference):
    PEERS["diffusers-pab"].apply(pipe, 3, STEPS)
    latents, m = generate(pipe, "diffusers-fbcache", 0.0)  # apply() takes PAB off first
    assert torch.equal(latents, reference[0]) and m.steps_fraction == 1.0
    assert not pipe.transformer.is_cache_enabled
    latents, m = generate(pipe)
    assert torch.equal(latents, reference[0]) and m.block_fraction == 1.0
    seeded = dict(CALL, generator=torch.Generator("cpu").manual_seed(0))
    assert compute_fraction(pipe, PEERS["diffusers-taylorseer"], 3, **seeded) == (5 / 8, 5 / 8)
    assert not pipe.transformer.is_cache_enabled


def test_missing_cache_dit_is_an_import_error(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # `import cache_dit` now raises ImportError
    with pytest.raises(ImportError, match="cache-dit"):
        PEERS["cache-dit-dbcache"].apply(pipe, 0.1, STEPS)
    assert issubclass(PeerUnavailable, ImportError)
    PEERS["cache-dit-dbcache"].remove(pipe)
    assert not pipe.transformer.is_cache_enabled


@pytest.mark.parametrize("name", CACHE_DIT)
def test_cache_dit(pipe, reference, name):
    pytest.importorskip("cache_dit")
    from cogrt.bench.cache_peers import cache_dit_cached_steps
    latents, m = generate(pipe, name, 0.0)  # threshold 0: cache-dit never caches
    assert torch.equal(latents, reference[0]) and m.steps_fraction == 1.0 and m.block_fraction == 1.0

    peer = PEERS[name]
    peer.apply(pipe, SKIPPING[name], STEPS)
    try:
        with Meter(pipe) as m:
            latents = pipe(**CALL, generator=torch.Generator("cpu").manual_seed(0)).frames
        cached = cache_dit_cached_steps(pipe)
    finally:
        peer.remove(pipe)
    assert 0 < m.steps_fraction < 1 and not torch.equal(latents, reference[0])
    # what we measured is what cache-dit says it did; F1B0 runs the first of the 6 blocks on cached steps
    assert [i for i, ran in enumerate(m.computed_steps) if not ran] == cached
    assert m.block_fraction == pytest.approx(m.steps_fraction + (1 - m.steps_fraction) / 6, rel=1e-12)
    # and it is gone: the plain pipeline again
    assert "_original_forward" not in vars(pipe.transformer)
    assert torch.equal(generate(pipe)[0], reference[0])
