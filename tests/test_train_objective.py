"""The training objective against a direct calculation with diffusers' own scheduler arithmetic."""
import torch

from cogrt.engine.loader import load_transformer
from cogrt.train.objective import Batch, LatentScale, model_inputs, v_loss
from cogrt.train.loop import _alphas_cumprod


def test_v_loss_equals_weighted_x0_and_v_mse(checkpoint):
    import diffusers, json
    root = checkpoint("5b")
    model = load_transformer(root / "transformer")
    conf = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    sched = getattr(diffusers, conf["_class_name"]).from_config(conf)
    alphas = _alphas_cumprod(root)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 16, 6, 10, generator=g)
    text = torch.randn(2, 226, 32, generator=g)
    t = torch.tensor([7, 801])

    loss = v_loss(model, x0, text, alphas, torch.Generator().manual_seed(11), t=t)

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    xt = sched.add_noise(x0, noise, t)
    with torch.no_grad():
        v_hat = model(xt, text, t)
    v = sched.get_velocity(x0, noise, t)
    direct_v = ((v_hat - v) ** 2).mean()
    ab = sched.alphas_cumprod[t].view(2, 1, 1, 1, 1)
    x0_hat = ab.sqrt() * xt - (1 - ab).sqrt() * v_hat
    direct_x0 = ((x0_hat - x0) ** 2 / (1 - ab)).mean()
    assert torch.allclose(loss, direct_x0.float(), rtol=1e-5)
    assert torch.allclose(loss, direct_v.float(), rtol=1e-4)


def test_model_inputs_i2v_padding_and_dropout():
    from cogrt.engine.model import PRESETS
    cfg = PRESETS["tiny-1.5-5b-i2v"]
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 16, 3, 4, 4, generator=g), torch.full((3, 16, 3, 4, 4), -20.0)
    img = torch.randn(3, 16, 1, 4, 4, generator=g)
    batch = Batch(mean, logvar, torch.randn(3, 226, 32), img, torch.full_like(img, -20.0))
    x0, image = model_inputs(batch, cfg, LatentScale(0.7, invert_image=True), torch.Generator().manual_seed(1),
                             image_dropout=0.0)
    assert x0.shape == (3, 4, 16, 4, 4)  # 3 latent frames padded to 4 by repeating the first in front
    assert torch.equal(x0[:, 0], x0[:, 1])
    assert image.shape == x0.shape
    assert torch.equal(image[:, 2:], torch.zeros_like(image[:, 2:]))  # the first frame, then zeros
    assert (image[:, 1] - img.permute(0, 2, 1, 3, 4)[:, 0] / 0.7).abs().max() < 1e-3  # scaled 1/factor (1.5 VAE)
    _, dropped = model_inputs(batch, cfg, LatentScale(0.7, True), torch.Generator().manual_seed(1), image_dropout=1.0)
    assert torch.equal(dropped, torch.zeros_like(dropped))
