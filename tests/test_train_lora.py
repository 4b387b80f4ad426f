"""A LoRA trained here is served identically by our engine and by diffusers, with no scale passed by hand."""
import numpy as np
import pytest
import torch

import cogrt.engine as engine
from cogrt.engine.loader import load_transformer
from cogrt.engine.lora import FusedLoras, read_lora
from cogrt.train.lora import add_lora, base_state_dict, lora_layers, save_lora

REQ = dict(negative_prompt="", num_frames=9, height=64, width=80, num_inference_steps=3, guidance_scale=6.0)


def trained_lora_model(root, r, alpha, targets=("to_q", "to_k", "to_v", "to_out.0"), seed=0):
    model = load_transformer(root / "transformer")
    add_lora(model, r, alpha, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stand-in for training: B is zero at init, which would make every check trivial
        for layer in lora_layers(model):
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("r,alpha", [(4, 4.0), (4, 16.0), (8, 2.0)])
def test_exported_lora_fuses_to_the_training_forward(checkpoint, tmp_path, r, alpha):
    root = checkpoint("5b")
    model = trained_lora_model(root, r, alpha)
    path = save_lora(tmp_path / "pytorch_lora_weights.safetensors", model)
    lf = read_lora(path)
    assert set(lf.scales.values()) == {alpha / r}
    g = torch.Generator().manual_seed(1)
    x, text, t = torch.randn(2, 3, 16, 6, 10, generator=g), torch.randn(2, 226, 32, generator=g), torch.tensor([3, 900])
    with torch.no_grad():
        trained = model(x, text, t)
        served = load_transformer(root / "transformer")
        with FusedLoras(served, [(lf, 1.0)]):
            fused = served(x, text, t)
    assert (trained - fused).abs().max() <= 1e-5 * trained.abs().max()
    assert not torch.equal(trained, load_transformer(root / "transformer")(x, text, t).detach())


def test_base_state_dict_is_the_untouched_base(checkpoint):
    root = checkpoint("5b")
    model = trained_lora_model(root, 4, 4.0)
    plain = load_transformer(root / "transformer").state_dict()
    sd = base_state_dict(model)
    assert sd.keys() == plain.keys()
    assert all(torch.equal(sd[k], plain[k]) for k in sd)


@pytest.mark.parametrize("r,alpha", [(4, 4.0), (4, 12.0)])
def test_trained_lora_matches_diffusers_load_lora_weights(checkpoint, tmp_path, r, alpha):
    root = checkpoint("5b")
    path = save_lora(tmp_path / "pytorch_lora_weights.safetensors", trained_lora_model(root, r, alpha, seed=4))
    pipe = engine.load_pipeline(root, device="cpu", dtype=torch.float32)
    ours = pipe.generate("a red circle moving right", seed=5, loras=[(path, 1.0)], **REQ).frames
    plain = pipe.generate("a red circle moving right", seed=5, **REQ).frames
    ref_frames = diffusers_frames(root, path)
    assert np.abs(ours.astype(int) - ref_frames.astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - plain.astype(int)).max() > 5  # the LoRA does something


def diffusers_frames(root, lora_path):
    from diffusers import CogVideoXPipeline
    ref = CogVideoXPipeline.from_pretrained(root)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(lora_path)  # no scale passed: only the file's header speaks
    out = ref("a red circle moving right", generator=torch.Generator("cpu").manual_seed(5), output_type="np",
              **REQ).frames[0]
    return (np.asarray(out) * 255).round().astype(np.uint8)


def rewrite(src, dst, rename=lambda k: k, metadata=None):
    from safetensors.torch import load_file, save_file
    save_file({rename(k): v for k, v in load_file(str(src)).items()}, str(dst), metadata=metadata or {"format": "pt"})
    return dst


def sat_name(key: str) -> str:
    """transformer.transformer_blocks.3.attn1.to_k.lora_A.weight -> SAT's
    model.diffusion_model.transformer.layers.3.attention.query_key_value.matrix_A.1"""
    _, _, i, _, module, part = key.replace("to_out.0", "to_out").split(".")[:6]
    j = {"to_q": 0, "to_k": 1, "to_v": 2, "to_out": 0}[module]
    where = "dense" if module == "to_out" else "query_key_value"
    return f"model.diffusion_model.transformer.layers.{i}.attention.{where}.matrix_{part[-1]}.{j}"


def test_sat_loras_get_scale_one_over_r(checkpoint, tmp_path):
    """SAT's LoRA has alpha 1. Its own key names are recognised; a file renamed to diffusers keys by CogVideo's
    export script carries no header, and `cogrt convert-lora --from sat` writes the header that diffusers needs."""
    from cogrt.engine import cli
    root = checkpoint("5b")
    r = 4
    ref_path = save_lora(tmp_path / "ref.safetensors", trained_lora_model(root, r, 1.0, seed=4))  # scale 1/r
    ref = diffusers_frames(root, ref_path)
    pipe = engine.load_pipeline(root, device="cpu", dtype=torch.float32)
    plain = pipe.generate("a red circle moving right", seed=5, **REQ).frames

    native = rewrite(ref_path, tmp_path / "sat_native.safetensors", sat_name)
    lf = read_lora(native)
    assert lf.convention == "sat" and set(lf.scales.values()) == {1 / r} and len(lf.pairs) == 4 * 2  # 2 layers
    ours = pipe.generate("a red circle moving right", seed=5, loras=[(native, 1.0)], **REQ).frames
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - plain.astype(int)).max() > 5

    exported = rewrite(ref_path, tmp_path / "sat_exported.safetensors")  # diffusers keys, no header
    assert set(read_lora(exported).scales.values()) == {1.0}  # what diffusers would do: too strong by r
    assert set(read_lora(exported, convention="sat").scales.values()) == {1 / r}
    assert cli.main(["convert-lora", str(exported), str(tmp_path / "fixed.safetensors"), "--from", "sat"]) == 0
    assert np.abs(diffusers_frames(root, tmp_path / "fixed.safetensors").astype(int) - ref.astype(int)).max() <= 1
    ours = pipe.generate("a red circle moving right", seed=5, loras=[(tmp_path / "fixed.safetensors", 1.0)],
                         **REQ).frames
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_finetrainers_lora_config_header_gives_alpha_over_r(checkpoint, tmp_path):
    import json
    root = checkpoint("5b")
    ref_path = save_lora(tmp_path / "ref.safetensors", trained_lora_model(root, 4, 12.0, seed=4))  # scale 3
    ft = rewrite(ref_path, tmp_path / "finetrainers.safetensors", metadata={"format": "pt", "lora_config": json.dumps(
        {"r": 4, "lora_alpha": 12, "init_lora_weights": True, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})})
    lf = read_lora(ft)
    assert lf.convention == "finetrainers" and set(lf.scales.values()) == {3.0}
    pipe = engine.load_pipeline(root, device="cpu", dtype=torch.float32)
    ours = pipe.generate("a red circle moving right", seed=5, loras=[(ft, 1.0)], **REQ).frames
    assert np.abs(ours.astype(int) - diffusers_frames(root, ref_path).astype(int)).max() <= 1
