"""Modes and their transforms: quantization (torchao), LoRA fused under quantization and switched, compile and
its fallback, and the errors. The int8 modes run on the CPU; fp8 needs a GPU (tests marked gpu)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import cogrt.engine as engine
from helpers import rel_err
from cogrt.engine import modes, quant
from cogrt.engine.loader import CheckpointWeights, load_transformer
from cogrt.engine.lora import read_lora
from cogrt.engine.runner import Runner
from test_lora import PROMPT, REQ, make_lora

CPU = torch.device("cpu")
GPU = torch.cuda.is_available()
QUANTS = ["int8-dynamic", "int8-weight-only"] + [pytest.param("fp8", marks=pytest.mark.gpu)]
FP8_TOL = 3e-2  # the relative error the kernels issue allows an fp8 path


def device_for(kind):
    return torch.device("cuda") if kind == "fp8" else CPU



def inputs(cfg, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, cfg.in_channels, 8, 10, generator=g).to(device, dtype)
    text = torch.randn(2, 7, cfg.text_embed_dim, generator=g).to(device, dtype)
    return x, text, torch.tensor([500.0, 500.0], device=device)


def runner(checkpoint, kind, from_file=False, **over):
    """A quantized runner; `from_file`: its originals are read from the checkpoint, not copied at load."""
    dev = device_for(kind)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    folder = checkpoint("5b") / "transformer"
    model = load_transformer(folder, dev, dtype)
    t = modes.transforms_for("exact", dev, quant=kind, compile=False, **over)
    source = CheckpointWeights(folder, model.cfg, dtype) if from_file else None
    return Runner(model, t, originals_source=source), dev, dtype


# ----------------------------------------------------------------------------------------------------
def test_modes_on_the_cpu():
    assert modes.transforms_for("exact", CPU) == modes.Transforms()
    t = modes.transforms_for("int8-dynamic", CPU)
    assert t.quant == "int8-dynamic" and t.text_encoder == "int8" and t.vae_tiling is None and not t.compile
    assert modes.transforms_for("exact", CPU, compile=True, attention="sdpa-math").compile
    for mode in ("fp8", "fast"):
        with pytest.raises(ValueError, match="fp8 tensor cores"):
            modes.transforms_for(mode, CPU)
    with pytest.raises(ValueError, match="valid modes: exact, fp8, fast"):
        modes.transforms_for("turbo", CPU)
    with pytest.raises(ValueError, match="valid: fp8"):
        modes.Transforms(quant="int4")


@pytest.mark.parametrize("kind", QUANTS)
def test_quantized_layers_and_output(checkpoint, kind):
    r, dev, dtype = runner(checkpoint, kind)
    exact = load_transformer(checkpoint("5b") / "transformer", dev, dtype)
    for name, m in r.model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert quant.is_quantized(m) == (name.split(".")[-1] in quant.QUANTIZED and name.startswith("blocks.")), name
    x, text, t = inputs(r.model.cfg, dev, dtype)
    with torch.no_grad():
        want, got = exact(x, text, t), r.model(x, text, t)
    err = rel_err(got, want)
    assert 0 < err < FP8_TOL, err


@pytest.mark.parametrize("kind", QUANTS)
def test_fused_lora_under_quantization_matches_the_unfused_path(checkpoint, kind, tmp_path):
    """Fused: the LoRA delta added to the original weight, then quantized. Unfused: the quantized base layer
    plus s * B(Ax) in high precision beside it (what an adapter library does)."""
    # alpha/r = 0.5: it moves the output by ~6%, as a real LoRA might. A much stronger one (~30%) dominates the
    # fused weights' row scales, and the fp8-rounded delta then differs from the unfused one by ~4% in bf16
    lf = read_lora(make_lora(tmp_path / "l.safetensors", r=4, alpha=2.0, seed=3))
    # fused_ff off: the reference adds each delta in a forward hook on its layer, and fused_ff's fp8 blocks call
    # torch._scaled_mm on qkv/ff1/ff2's weights without calling the layers (tests/test_kernels_quant.py checks
    # that they see a rewritten weight)
    r, dev, dtype = runner(checkpoint, kind, fused_ff=False)
    x, text, t = inputs(r.model.cfg, dev, dtype, seed=1)
    plan = r.loras.plan([(lf, 1.0)])
    hooks = []
    for name, deltas in plan.items():
        def hook(mod, args, out, deltas=deltas):
            out = out.clone()
            for rows, a, b, s in deltas:
                out[..., rows] += s * (args[0].float() @ a.to(out.device).T @ b.to(out.device).T).to(out.dtype)
            return out
        hooks.append(r.model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        unfused = r.model(x, text, t)
        for h in hooks:
            h.remove()
        base = r.model(x, text, t)
        r.switch_loras([(lf, 1.0)], ("l",))
        fused = r.model(x, text, t)
    effect, disagreement = rel_err(fused, base), rel_err(fused, unfused)
    assert effect > 5 * disagreement and disagreement < FP8_TOL, (effect, disagreement)  # it matters; both agree


@pytest.mark.parametrize("from_file", [False, True])
@pytest.mark.parametrize("kind", QUANTS)
def test_switching_loras_requantizes_in_place_and_restores_exactly(checkpoint, kind, from_file, tmp_path):
    a = read_lora(make_lora(tmp_path / "a.safetensors", seed=1))
    b = read_lora(make_lora(tmp_path / "b.safetensors", seed=2, num_layers=1))
    r, dev, dtype = runner(checkpoint, kind, from_file)
    assert (r.loras.originals == {}) == from_file  # read from the file on demand, or copied at load
    layer = r.model.blocks[1].qkv
    names = layer.weight.__tensor_flatten__()[0]
    storage = {n: getattr(layer.weight, n).data_ptr() for n in names}
    before = {n: getattr(layer.weight, n).clone() for n in names}
    r.switch_loras([(a, 1.0)], ("a",))
    assert any(not torch.equal(getattr(layer.weight, n), before[n]) for n in names)
    r.switch_loras([(b, 1.0)], ("b",))  # b leaves block 1 alone: its original comes back, quantized again
    for n in names:
        assert torch.equal(getattr(layer.weight, n), before[n]), n
        assert getattr(layer.weight, n).data_ptr() == storage[n]  # same storage: compiled code keeps working
    assert r.switch_loras([(b, 1.0)], ("b",)) == 0.0


@pytest.mark.parametrize("kind", QUANTS)
def test_a_lora_that_does_not_fit_leaves_the_quantized_model_unchanged(checkpoint, kind, tmp_path):
    bad = read_lora(make_lora(tmp_path / "bad.safetensors", bad_dim_block=1))
    r, _, _ = runner(checkpoint, kind)
    before = [t.clone() for t in _inner(r.model.blocks[0].qkv.weight)]
    with pytest.raises(engine.CheckpointError, match="do not fit"):
        r.switch_loras([(bad, 1.0)], ("bad",))
    assert all(torch.equal(x, y) for x, y in zip(_inner(r.model.blocks[0].qkv.weight), before))
    assert r.loras.key == () and not r.loras.touched


def _inner(w):
    return [getattr(w, n) for n in w.__tensor_flatten__()[0]]


def test_a_failed_quantization_puts_the_originals_back(checkpoint, monkeypatch):
    model = load_transformer(checkpoint("5b") / "transformer")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def half_way(m, kind, *_):  # quantize the first block's layers, then fail
        from torchao.quantization import quantize_
        for name in quant.QUANTIZED:
            quantize_(getattr(m.blocks[0], name), quant.config(kind))
        raise RuntimeError("out of memory half-way")
    monkeypatch.setattr(quant, "quantize", half_way)
    with pytest.raises(RuntimeError, match="half-way"):
        Runner(model, modes.Transforms(quant="int8-dynamic"))
    assert not any(quant.is_quantized(m) for m in quant.targets(model, "int8-dynamic").values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fp8_keeps_the_blocks_asked_for_when_the_model_is_deep_enough():
    from cogrt.engine.model import PRESETS, CogVideoXTransformer
    with torch.device("meta"):
        deep, shallow = CogVideoXTransformer(PRESETS["cogrt-tiny"]), CogVideoXTransformer(PRESETS["tiny-5b"])
    blocks = lambda m, kind, keep=(): sorted({int(n.split(".")[1]) for n in quant.targets(m, kind, keep)})
    assert blocks(deep, "fp8") == [0, 1, 2, 3, 4, 5]  # the default keeps none
    ends = (0, -1)
    assert blocks(deep, "fp8", ends) == [1, 2, 3, 4] and blocks(deep, "int8-dynamic", ends) == [0, 1, 2, 3, 4, 5]
    assert blocks(shallow, "fp8", ends) == [0, 1]  # 2 blocks: keeping both would quantize nothing
    assert set(quant.targets(deep, "fp8", ends)) == {f"blocks.{i}.{n}" for i in range(1, 5) for n in quant.QUANTIZED}


def test_checkpoint_weights_are_what_was_loaded_and_a_changed_file_is_refused(checkpoint, tmp_path):
    import shutil
    folder = tmp_path / "transformer"
    shutil.copytree(checkpoint("5b") / "transformer", folder)
    model = load_transformer(folder)
    src = CheckpointWeights(folder, model.cfg, torch.float32)
    for name, linear in quant.targets(model, "int8-dynamic").items():
        assert name in src and torch.equal(src[name], linear.weight), name
    assert "blocks.0.norm1" in src and "blocks.0.nothing" not in src
    f = next(folder.glob("*.safetensors"))
    f.write_bytes(f.read_bytes())  # the same bytes, written again: a new modification time
    with pytest.raises(engine.CheckpointError, match="changed since"):
        src["blocks.0.qkv"]


def test_a_failed_quantization_restores_from_the_checkpoint(checkpoint, monkeypatch):
    folder = checkpoint("5b") / "transformer"
    model = load_transformer(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def half_way(m, kind, *_):
        from torchao.quantization import quantize_
        quantize_(m.blocks[1].ff2, quant.config(kind))
        raise RuntimeError("out of memory half-way")
    monkeypatch.setattr(quant, "quantize", half_way)
    with pytest.raises(RuntimeError, match="half-way"):
        Runner(model, modes.Transforms(quant="int8-dynamic"), originals_source=CheckpointWeights(folder, model.cfg, None))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_quantized_without_originals_refuses_loras(checkpoint, tmp_path):
    model = load_transformer(checkpoint("5b") / "transformer")
    r = Runner(model, modes.Transforms(quant="int8-weight-only"), keep_originals=False)
    with pytest.raises(ValueError, match="keep_originals"):
        r.switch_loras([(read_lora(make_lora(tmp_path / "l.safetensors")), 1.0)], ("l",))


# ----------------------------------------------------------------------------------------------------
def test_int8_mode_pipeline_end_to_end(checkpoint, pipeline, tmp_path):
    pipe = engine.load_pipeline(checkpoint("5b"), device="cpu", dtype=torch.float32, mode="int8-dynamic")
    assert pipe.mode == "int8-dynamic" and pipe.transforms.text_encoder == "int8"
    assert quant.is_quantized(pipe.text_encoder.encoder.block[0].layer[0].SelfAttention.q)
    res = pipe.generate(PROMPT, **REQ, seed=2)
    ref = pipeline("5b").generate(PROMPT, **REQ, seed=2)
    assert res.mode == "int8-dynamic" and res.frames.shape == ref.frames.shape
    assert rel_err(res.latents, ref.latents) < 0.1
    # a LoRA rebuilds its layers from the checkpoint file: nothing was copied at load
    assert isinstance(pipe.runner.loras.source, CheckpointWeights) and pipe.runner.loras.originals == {}
    lora = make_lora(tmp_path / "l.safetensors")
    with_lora = pipe.generate(PROMPT, **REQ, seed=2, loras=[(lora, 1.0)])
    ref_lora = pipeline("5b").generate(PROMPT, **REQ, seed=2, loras=[(lora, 1.0)])
    assert rel_err(with_lora.latents, ref_lora.latents) < 0.1 < rel_err(with_lora.latents, res.latents)
    assert rel_err(pipe.generate(PROMPT, **REQ, seed=2).latents, res.latents) < 1e-6  # switched back exactly
    pinned = engine.load_pipeline(checkpoint("5b"), device="cpu", dtype=torch.float32, mode="int8-dynamic",
                                  keep_originals="pinned")
    assert pinned.runner.loras.source is None and set(pinned.runner.loras.originals) == set(
        quant.targets(pinned.transformer, "int8-dynamic"))
    assert np.array_equal(pinned.generate(PROMPT, **REQ, seed=2, loras=[(lora, 1.0)]).frames, with_lora.frames)
    with pytest.raises(ValueError, match="loaded in mode 'int8-dynamic'"):
        pipe.generate(PROMPT, **REQ, seed=2, mode="exact")
    with pytest.raises(ValueError, match="loaded in mode 'exact'"):
        pipeline("5b").generate(PROMPT, **REQ, seed=2, mode="int8-dynamic")


def test_a_model_folder_with_its_own_teacache_fit_uses_it(checkpoint, tmp_path):
    import json
    import shutil
    ckpt = shutil.copytree(checkpoint("5b"), tmp_path / "model")
    (ckpt / "teacache_coefficients.json").write_text(json.dumps({"coefficients": [1.0, 0.0]}))
    pipe = engine.load_pipeline(ckpt, device="cpu", dtype=torch.float32)
    res = pipe.generate(PROMPT, **{**REQ, "num_inference_steps": 12}, seed=1, teacache=0.5)
    assert 2 <= len(res.steps_computed) < 12
    with pytest.raises(ValueError, match="no published TeaCache coefficients"):  # the tiny model is no real 5B
        engine.load_pipeline(checkpoint("5b"), device="cpu").generate(PROMPT, **REQ, seed=1, teacache=0.3)


def test_offload_with_quantization_is_refused(checkpoint):
    with pytest.raises(ValueError, match="offload"):
        engine.load_pipeline(checkpoint("5b"), device="cpu", offload=True, mode="int8-weight-only")


def test_compile_failure_falls_back_to_eager(checkpoint, pipeline, monkeypatch, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    def compile_broken(self):
        for block in self.model.blocks:
            block.compile(backend=broken_backend, fullgraph=True)
        self.compiled = True
    monkeypatch.setattr(Runner, "compile", compile_broken)
    torch._dynamo.reset()
    pipe = engine.load_pipeline(checkpoint("5b"), device="cpu", dtype=torch.float32, compile=True)
    assert pipe.runner.compiled
    with caplog.at_level(logging.WARNING, logger="cogrt"):
        res = pipe.generate(PROMPT, **REQ, seed=1)
    assert "torch.compile failed" in caplog.text
    assert not pipe.runner.compiled
    assert all(b._compiled_call_impl is None for b in pipe.transformer.blocks)
    assert np.array_equal(res.frames, pipeline("5b").generate(PROMPT, **REQ, seed=1).frames)


def test_compile_raises_the_recompile_limit_and_hitting_it_falls_back(checkpoint, pipeline, monkeypatch, caplog):
    """Every block of every pipeline shares one code object, so Dynamo's default limit (8 entries) is near; the
    runner raises it, and a call that still hits it (fullgraph=True makes that an error) reruns eagerly."""
    from cogrt.engine import runner
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):  # restored after
        _recompile_limit_test(checkpoint, pipeline, monkeypatch, caplog, runner.RECOMPILE_LIMIT)


def _recompile_limit_test(checkpoint, pipeline, monkeypatch, caplog, limit):
    r = Runner(load_transformer(checkpoint("5b") / "transformer"), modes.Transforms(compile=True))
    assert r.compiled and torch._dynamo.config.recompile_limit >= limit

    def compile_eager(self):  # Dynamo without Inductor (quick), and a limit of one entry
        torch._dynamo.config.recompile_limit = 1
        for block in self.model.blocks:
            block.compile(backend="eager", fullgraph=True)
        self.compiled = True
    monkeypatch.setattr(Runner, "compile", compile_eager)
    torch._dynamo.reset()
    pipe = engine.load_pipeline(checkpoint("5b"), device="cpu", dtype=torch.float32, compile=True)
    other = {**REQ, "height": REQ["height"] + 16}
    with caplog.at_level(logging.WARNING, logger="cogrt"):
        pipe.generate(PROMPT, **REQ, seed=1)
        res = pipe.generate(PROMPT, **other, seed=1)  # a second shape: a second entry
    assert "torch.compile failed" in caplog.text
    assert not pipe.runner.compiled
    assert np.array_equal(res.frames, pipeline("5b").generate(PROMPT, **other, seed=1).frames)
    torch._dynamo.reset()


def test_regional_compile_matches_eager(checkpoint, tmp_path):
    """Inductor on the CPU: every block through one compiled graph, warm-up included."""
    torch._dynamo.reset()
    model = load_transformer(checkpoint("5b") / "transformer")
    eager = load_transformer(checkpoint("5b") / "transformer")
    r = Runner(model, modes.Transforms(compile=True), cache_dir=tmp_path / "cache")
    assert r.warm_up(3, 8, 10, 2, 7, CPU, torch.float32) > 0
    graphs = dict(torch._dynamo.utils.counters["stats"])
    assert graphs.get("unique_graphs", 0) >= 1
    x, text, t = inputs(model.cfg, CPU, torch.float32)
    with torch.no_grad():
        got, want = model(x, text, t), eager(x, text, t)
    # the warm-up ran one block, and that compiled the graph every block runs: the full call compiled nothing
    assert dict(torch._dynamo.utils.counters["stats"]) == graphs
    assert len(model.blocks) == model.cfg.num_layers
    assert r.compiled and rel_err(got, want) < 1e-5  # compiled still: no fallback to eager
    assert any((tmp_path / "cache" / "inductor").rglob("*")), "nothing was written to the compile cache"


# ----------------------------------------------------------------------------------------------------
# GPU: the modes as shipped (fused norms, our attention kernels, compile), against exact.

@pytest.fixture(scope="module")
def exact_gpu(checkpoint, tmp_path_factory):
    return engine.load_pipeline(checkpoint("5b"), mode="exact", cache_dir=tmp_path_factory.mktemp("cc"), warm_up=True)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp8", "int8-dynamic", "int8-weight-only"])
def test_quantized_modes_on_the_gpu(checkpoint, exact_gpu, mode, tmp_path):
    pipe = engine.load_pipeline(checkpoint("5b"), mode=mode, cache_dir=tmp_path, warm_up=True)
    assert pipe.runner.compiled and exact_gpu.runner.compiled  # the warm-up compiled without falling back
    want, got = exact_gpu.generate(PROMPT, **REQ, seed=1), pipe.generate(PROMPT, **REQ, seed=1)
    assert 0 < rel_err(got.latents, want.latents) < 0.1


@pytest.mark.gpu
def test_fast_mode_skips_steps_with_teacache(checkpoint, tmp_path):
    """With the model's own TeaCache fit (teacache_coefficients.json in its folder), picked up by default."""
    import json
    import shutil
    ckpt = shutil.copytree(checkpoint("5b"), tmp_path / "model")
    (ckpt / "teacache_coefficients.json").write_text(json.dumps({"coefficients": [0.0, 0.05]}))  # 0.05 a step
    pipe = engine.load_pipeline(ckpt, mode="fast", cache_dir=tmp_path)
    res = pipe.generate(PROMPT, **{**REQ, "num_inference_steps": 20}, seed=1)
    assert res.mode == "fast" and len(res.steps_computed) < 20 and res.steps_computed[0] == 0
    full = pipe.generate(PROMPT, **{**REQ, "num_inference_steps": 20}, seed=1, mode="fp8")
    assert full.mode == "fp8" and len(full.steps_computed) == 20


@pytest.mark.gpu
def test_cuda_graphs_match_plain_compile(checkpoint, tmp_path):
    plain = engine.load_pipeline(checkpoint("5b"), mode="exact", cache_dir=tmp_path)
    graphs = engine.load_pipeline(checkpoint("5b"), mode="exact", cuda_graphs=True, cache_dir=tmp_path)
    a, b = plain.generate(PROMPT, **REQ, seed=4), graphs.generate(PROMPT, **REQ, seed=4)
    assert graphs.runner.compiled and rel_err(b.latents, a.latents) < 1e-2


@pytest.mark.parametrize("options", ["ours", "inductor's defaults"])
def test_int8_weight_only_compile_keeps_torchaos_matmul(options):
    """Inductor's pattern matcher would turn torchao's int8 weight-only matmul into aten._weight_int8pack_mm,
    a naive kernel on CUDA (minutes for a compiled 5B step). compile_options turns the rewrite off. The rewrite
    also fires on the CPU in bf16 under no_grad, so it can be counted here; inductor's defaults show it does."""
    from torch._dynamo.utils import counters
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from cogrt.engine.runner import compile_options
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(torch.bfloat16)
    quantize_(m, Int8WeightOnlyConfig(set_inductor_config=False))
    opts = compile_options(modes.Transforms(quant="int8-weight-only", compile=True)) if options == "ours" else {}
    x = torch.randn(2, 37, 64, dtype=torch.bfloat16)
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(force_disable_caches=True), torch.no_grad():
        got = torch.compile(m, fullgraph=True, dynamic=False, options=opts)(x)
        want = m(x)
    rewrites = counters["inductor"]["woq_matcher_count"]
    assert rewrites == 0 if options == "ours" else rewrites > 0
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()
