"""End to end on the CPU: synthetic videos → precompute → training makes the loss fall; a killed run resumes."""
import pytest
import torch
from safetensors.torch import load_file

from cogrt.engine.random_model import write_random_checkpoint
from cogrt.train.loop import TrainConfig, _alphas_cumprod, train
from cogrt.train.objective import Batch, LatentScale, model_inputs, v_loss
from cogrt.train.precompute import LatentDataset, precompute
from cogrt.train.synthetic import write_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_dataset(root / "data", n=8, seed=0, frames=9, height=64, width=64, split="train")
    ckpt = write_random_checkpoint(root / "ckpt", "tiny-5b")
    precompute(data, ckpt, root / "latents", "9x64x64", device="cpu")
    return root, ckpt, root / "latents"


def fixed_loss(model, latents, ckpt) -> float:
    """The loss on every sample at fixed timesteps and noise, so that before/after compare like with like."""
    ds, alphas = LatentDataset(latents), _alphas_cumprod(ckpt)
    scale = LatentScale(ds.summary["vae_scaling_factor"])
    total = 0.0
    with torch.no_grad():
        for i in range(len(ds)):
            it = ds[i]
            b = Batch(it["latent_mean"][None].float(), it["latent_logvar"][None].float(), it["prompt_embeds"][None])
            for t in (50, 300, 600, 900):
                g = torch.Generator().manual_seed(i * 1000 + t)
                x0, _ = model_inputs(b, model.cfg, scale, g)
                total += v_loss(model, x0, b.prompt_embeds.float(), alphas, g, t=torch.tensor([t])).item()
    return total / (4 * len(ds))


def config(root, ckpt, latents, out, **kw):
    base = dict(model=str(ckpt), data=str(latents), out=str(root / out), device="cpu", mixed_precision="no",
                batch_size=2, log_every=5, checkpoint_every=0, seed=0)
    return TrainConfig(**{**base, **kw})


def test_full_training_makes_the_loss_fall(world):
    from cogrt.engine.loader import load_transformer
    root, ckpt, latents = world
    before = fixed_loss(load_transformer(ckpt / "transformer"), latents, ckpt)
    res = train(config(root, ckpt, latents, "full", method="full", steps=60, lr=2e-3, caption_dropout=0.1))
    after = fixed_loss(load_transformer(root / "full" / "transformer"), latents, ckpt)
    assert res["steps"] == 60 and len(res["history"]) == 12
    assert after < 0.7 * before, (before, after)


def test_lora_training_makes_the_loss_fall_and_exports_for_serving(world):
    from cogrt.engine.loader import load_transformer
    from cogrt.engine.lora import FusedLoras, read_lora
    root, ckpt, latents = world
    base = load_transformer(ckpt / "transformer")
    before = fixed_loss(base, latents, ckpt)
    res = train(config(root, ckpt, latents, "lora", method="lora", rank=8, alpha=16.0, steps=60, lr=5e-3,
                       validate_every=60, validation_prompts=("a red circle moving right on a black background",),
                       validation_args=dict(num_frames=9, height=64, width=64, num_inference_steps=2, seed=0)))
    lf = read_lora(res["export"])
    assert set(lf.scales.values()) == {2.0}
    with FusedLoras(base, [(lf, 1.0)]):
        after = fixed_loss(base, latents, ckpt)
    assert after < 0.9 * before, (before, after)
    assert (root / "lora" / "validation" / "step_000060" / "00.mp4").is_file()


def test_killed_run_resumes_exactly(world):
    root, ckpt, latents = world
    common = dict(method="lora", rank=4, alpha=4.0, lr=3e-3, checkpoint_every=10)
    train(config(root, ckpt, latents, "straight", steps=30, **common))
    # "killed" after step 25: the last complete checkpoint is step 20, and the resumed run redoes 21-30
    train(config(root, ckpt, latents, "killed", steps=25, **common))
    res = train(config(root, ckpt, latents, "killed", steps=30, **common))
    assert res["steps"] == 30
    a = load_file(str(root / "straight" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(root / "killed" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed training diverged from the uninterrupted run"
