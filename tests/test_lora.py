"""LoRA: scale from the file's metadata, fused per request and kept until a request asks for another set, as
diffusers' load_lora_weights would give."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cogrt.engine as engine
from cogrt.engine.lora import read_lora

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
REQ = dict(negative_prompt="blurry", num_frames=9, height=64, width=80, num_inference_steps=3, guidance_scale=6.0)
PROMPT = "a paper boat drifting down a rainy street"


def make_lora(path, num_layers=2, dim=32, r=4, alpha=8.0, seed=0, prefix="transformer.", metadata=True,
              bad_dim_block=None):
    """A random diffusers-format LoRA on every block's attention projections."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(num_layers):
        for m in TARGETS:
            d_in = dim + 3 if i == bad_dim_block else dim
            key = f"{prefix}transformer_blocks.{i}.attn1.{m}"
            sd[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * 0.3
            sd[f"{key}.lora_B.weight"] = torch.randn(dim, r, generator=g) * 0.3
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": r, "transformer.lora_alpha": alpha,
                                                 "transformer.target_modules": list(TARGETS)})} if metadata else None
    save_file(sd, str(path), metadata=meta)
    return path


@pytest.fixture
def pipe(checkpoint):
    """A private pipeline: these tests change weights (and check that they come back)."""
    return engine.load_pipeline(checkpoint("5b"), device="cpu", dtype=torch.float32)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def frames_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_read_lora_scale_from_metadata(tmp_path):
    lf = read_lora(make_lora(tmp_path / "a.safetensors", r=4, alpha=8.0))
    assert lf.rank == 4
    assert len(lf.pairs) == 2 * len(TARGETS)
    a, b = lf.pairs["transformer_blocks.0.attn1.to_q"]
    assert a.shape == (4, 32) and b.shape == (32, 4)
    assert set(lf.scales.values()) == {2.0}

    lf = read_lora(make_lora(tmp_path / "b.safetensors", r=8, alpha=4.0))
    assert set(lf.scales.values()) == {0.5}


def test_read_lora_without_metadata_has_scale_one(tmp_path):
    lf = read_lora(make_lora(tmp_path / "a.safetensors", r=4, metadata=False))
    assert set(lf.scales.values()) == {1.0}


def test_lora_changes_output_and_restores_weights(pipe, tmp_path):
    path = make_lora(tmp_path / "l.safetensors")
    before = state(pipe.transformer)
    base = pipe.generate(PROMPT, **REQ, seed=3).frames
    lora = pipe.generate(PROMPT, **REQ, seed=3, loras=[(path, 1.0)]).frames
    assert frames_diff(base, lora) > 5
    # the set stays fused until a request asks for another; one without LoRAs puts the originals back
    again = pipe.generate(PROMPT, **REQ, seed=3, loras=[(path, 1.0)])
    assert again.timings["lora"] == 0.0 and np.array_equal(again.frames, lora)
    assert np.array_equal(pipe.generate(PROMPT, **REQ, seed=3).frames, base)
    assert_same_state(pipe.transformer, before)


def test_switching_loras_rewrites_only_the_layers_they_touch(pipe, tmp_path):
    a = make_lora(tmp_path / "a.safetensors", seed=1)
    b = make_lora(tmp_path / "b.safetensors", seed=2, num_layers=1)  # block 0 only
    before = state(pipe.transformer)
    only_b = pipe.generate(PROMPT, **REQ, seed=5, loras=[(b, 1.0)]).frames
    pipe.generate(PROMPT, **REQ, seed=5, loras=[(a, 1.0)])
    assert pipe.runner.loras.touched == {"blocks.0.qkv", "blocks.0.out", "blocks.1.qkv", "blocks.1.out"}
    after_switch = pipe.generate(PROMPT, **REQ, seed=5, loras=[(b, 1.0)])
    assert pipe.runner.loras.touched == {"blocks.0.qkv", "blocks.0.out"}
    assert np.array_equal(after_switch.frames, only_b)  # nothing of `a` is left behind
    sd = pipe.transformer.state_dict()
    assert torch.equal(sd["blocks.1.qkv.weight"], before["blocks.1.qkv.weight"])
    assert not torch.equal(sd["blocks.0.qkv.weight"], before["blocks.0.qkv.weight"])


def test_a_lora_file_rewritten_in_place_is_read_again(pipe, tmp_path):
    path = make_lora(tmp_path / "l.safetensors", seed=1)
    first = pipe.generate(PROMPT, **REQ, seed=6, loras=[(path, 1.0)]).frames
    make_lora(path, seed=2)
    second = pipe.generate(PROMPT, **REQ, seed=6, loras=[(path, 1.0)])
    assert second.timings["lora"] > 0 and frames_diff(first, second.frames) > 0


def test_lora_weights_scale_the_effect(pipe, tmp_path):
    path = make_lora(tmp_path / "l.safetensors")
    base = pipe.generate(PROMPT, **REQ, seed=4).frames
    full = pipe.generate(PROMPT, **REQ, seed=4, loras=[(path, 1.0)]).frames
    half = pipe.generate(PROMPT, **REQ, seed=4, loras=[(path, 0.5)]).frames
    zero = pipe.generate(PROMPT, **REQ, seed=4, loras=[(path, 0.0)]).frames
    assert frames_diff(full, half) > 2
    assert frames_diff(base, half) > 2
    assert np.array_equal(zero, base)
    two_halves = pipe.generate(PROMPT, **REQ, seed=4, loras=[(path, 0.5), (path, 0.5)]).frames
    assert frames_diff(two_halves, full) <= 1  # stacked LoRAs add


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_lora_matches_diffusers_load_lora_weights(pipe, checkpoint, tmp_path, weight):
    from diffusers import CogVideoXPipeline
    path = make_lora(tmp_path / "l.safetensors", r=4, alpha=6.0, seed=1)
    ours = pipe.generate(PROMPT, **REQ, seed=9, loras=[(path, weight)]).frames

    ref = CogVideoXPipeline.from_pretrained(checkpoint("5b"))
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(path, adapter_name="test")
    ref.set_adapters(["test"], [weight])
    out = ref(PROMPT, **REQ, generator=torch.Generator("cpu").manual_seed(9), output_type="np").frames[0]
    ref_frames = (np.asarray(out) * 255).round().astype(np.uint8)
    assert ours.shape == ref_frames.shape
    assert frames_diff(ours, ref_frames) <= 1


def test_lora_with_wrong_shapes_is_refused_and_changes_nothing(pipe, tmp_path):
    path = make_lora(tmp_path / "bad.safetensors", bad_dim_block=1)  # block 0 fits, block 1 does not
    before = state(pipe.transformer)
    with pytest.raises(engine.CheckpointError, match="do not fit") as e:
        pipe.generate(PROMPT, **REQ, seed=0, loras=[(path, 1.0)])
    assert str(path) in str(e.value)
    assert_same_state(pipe.transformer, before)


def test_lora_for_a_missing_module_is_refused(pipe, tmp_path):
    path = make_lora(tmp_path / "deep.safetensors", num_layers=3)  # the model has 2 blocks
    before = state(pipe.transformer)
    with pytest.raises(engine.CheckpointError, match="transformer_blocks.2"):
        pipe.generate(PROMPT, **REQ, seed=0, loras=[(path, 1.0)])
    assert_same_state(pipe.transformer, before)


def test_lora_without_transformer_prefix_is_refused(pipe, tmp_path):
    path = make_lora(tmp_path / "noprefix.safetensors", prefix="")
    with pytest.raises(engine.CheckpointError, match="transformer") as e:
        read_lora(path)
    assert str(path) in str(e.value)
    before = state(pipe.transformer)
    with pytest.raises(engine.CheckpointError):
        pipe.generate(PROMPT, **REQ, seed=0, loras=[(path, 1.0)])
    assert_same_state(pipe.transformer, before)


def test_corrupt_lora_file_is_refused(tmp_path):
    path = make_lora(tmp_path / "c.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(engine.CheckpointError, match="c.safetensors"):
        read_lora(path)
