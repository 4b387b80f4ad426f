"""`cogrt export onnx` on a tiny random checkpoint (two blocks: the export's time grows with the blocks it traces)
with a random LoRA: ONNX Runtime against the engine, a whole generation through the exported transformer, the
LoRA fused in, the VAE decoder, and the refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from cogrt.engine import cli  # noqa: E402
from cogrt.engine.export import ExportError, OnnxTransformer, check_native  # noqa: E402
from cogrt.engine.pipeline import load_pipeline  # noqa: E402

SIZE = dict(num_frames=9, height=64, width=64)
PROMPT = "a purple star moving up on a white background"


@pytest.fixture(scope="module")
def model(checkpoint, tmp_path_factory):
    """(tiny-5b checkpoint, a random rank-4 LoRA on every attention projection of its blocks)."""
    from cogrt.bench.lora_switch import random_lora
    from cogrt.engine.random_model import tiny_config
    lora = random_lora(tmp_path_factory.mktemp("lora") / "lora.safetensors", tiny_config("5b"), 4, 0, scale=0.1)
    return checkpoint("5b"), lora


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """Both graphs, the LoRA fused, exported once through the CLI."""
    out = tmp_path_factory.mktemp("onnx")
    assert cli.main(["export", "onnx", "--model", str(model[0]), "--out", str(out), "--size", "9x64x64",
                     "--lora", f"{model[1]}:1.0"]) == 0
    return out


@pytest.fixture(scope="module")
def engine(model):
    return load_pipeline(model[0], device="cpu", dtype=torch.float32)


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_graphs_pass_the_checker_and_name_everything(exported):
    import onnx
    for name in ("transformer.onnx", "vae_decoder.onnx"):
        onnx.checker.check_model(str(exported / name), full_check=True)
    proto = onnx.load(str(exported / "transformer.onnx"))
    assert proto.opset_import[0].version >= 18
    shapes = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(proto.graph.input) + list(proto.graph.output)}
    assert shapes["latents"][0] == "batch" and shapes["latents"][1] == "latent_frames"
    assert shapes["latents"][3:] == ["latent_height", "latent_width"]
    assert shapes["rope_cos"][0] == shapes["rope_sin"][0] == "video_tokens"
    assert set(shapes) == {"latents", "text_embeds", "timestep", "rope_cos", "rope_sin", "noise_pred"}
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["cogrt.component"] == "transformer" and "noise_pred" in props["cogrt.shapes"]
    assert json.loads(props["cogrt.loras"])[0][0].endswith(".safetensors")


@pytest.mark.parametrize("batch,frames,h,w", [(2, 3, 8, 8), (1, 5, 12, 16)])
def test_transformer_matches_the_engine_at_any_size(exported, engine, model, batch, frames, h, w):
    """The traced size and another one: batch, latent frames, height and width are dynamic."""
    from cogrt.engine.lora import lora_key, read_lora
    lora = ((str(model[1]), 1.0),)
    engine.runner.switch_loras([(read_lora(p), wt) for p, wt in lora], lora_key(lora))
    ort = OnnxTransformer(exported / "transformer.onnx", engine.transformer)
    g = torch.Generator().manual_seed(batch * 10 + frames)
    cfg = engine.cfg
    x = torch.randn(batch, frames, cfg.in_channels, h, w, generator=g)
    text = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
    t = torch.full((batch,), 321)
    with torch.no_grad():
        ref = engine.transformer(x, text, t).numpy()
    assert _rel(ort(x, text, t).numpy(), ref) <= 1e-4
    engine.runner.switch_loras([], lora_key(()))
    with torch.no_grad():  # the LoRA is in the graph: without it the engine disagrees with it
        assert _rel(ort(x, text, t).numpy(), engine.transformer(x, text, t).numpy()) > 1e-3


def test_fifty_steps_through_the_graph(exported, engine, model):
    lora = ((str(model[1]), 1.0),)
    ref = engine.generate(PROMPT, num_inference_steps=50, seed=0, loras=lora, **SIZE)
    own = engine.transformer
    try:
        engine.transformer = OnnxTransformer(exported / "transformer.onnx", own)
        got = engine.generate(PROMPT, num_inference_steps=50, seed=0, loras=lora, **SIZE)
    finally:
        engine.transformer = own
    assert np.abs(got.frames.astype(int) - ref.frames.astype(int)).max() <= 2


def test_vae_decoder_matches(exported, engine):
    import onnxruntime as ort
    session = ort.InferenceSession(str(exported / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape  # static: one graph per size
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = engine.vae.decode(z).sample.numpy()
    assert _rel(session.run(["video"], {"latents": z.numpy()})[0], ref) <= 1e-3


def test_refusals(capsys, engine, tmp_path):
    assert cli.main(["export", "onnx", "--out", str(tmp_path), "--mode", "fp8"]) == 2
    assert "no ONNX form" in capsys.readouterr().err
    assert cli.main(["export", "onnx", "--out", str(tmp_path), "--size", "10x64x64"]) == 2
    assert "8N+1" in capsys.readouterr().err

    class Quantized:
        transforms = engine.transforms.__class__(quant="int8-weight-only")
    with pytest.raises(ExportError, match="native path"):
        check_native(Quantized())

    class Kernels:
        transforms = engine.transforms.__class__(attention="triton", fused_norms=True)
    with pytest.raises(ExportError, match="attention=triton"):
        check_native(Kernels())
