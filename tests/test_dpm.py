"""engine/dpm.py against diffusers' CogVideoXDPMScheduler.step: the same latents, bit for bit, over whole
schedules, and the same draws from the request's generator."""
import pytest
import torch
from diffusers import CogVideoXDPMScheduler

from cogrt.engine.dpm import DPMSteps

CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
              num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
              set_alpha_to_one=True, snr_shift_scale=1.0, steps_offset=0, timestep_spacing="trailing")


@pytest.mark.parametrize("steps", [50, 7, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
def test_dpm_steps_match_diffusers_bit_for_bit(steps, dtype, prediction):
    config = {**CONFIG, "prediction_type": prediction}
    ref_s, ours_s = CogVideoXDPMScheduler(**config), CogVideoXDPMScheduler(**config)
    for s in (ref_s, ours_s):
        s.set_timesteps(steps)
    ts = ref_s.timesteps.tolist()
    dpm = DPMSteps(ours_s, ts)
    shape = (1, 3, 4, 6, 5)
    g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    lat_ref = torch.randn(shape, generator=g_ref).to(dtype)
    lat_ours = torch.randn(shape, generator=g_ours).to(dtype)
    old_ref = old_ours = None
    v_gen = torch.Generator().manual_seed(9)
    for i, t in enumerate(ref_s.timesteps):
        v = torch.randn(shape, generator=v_gen)  # the model's output, float32 as the pipeline's CFG combine makes it
        back = ref_s.timesteps[i - 1] if i > 0 else None
        lat_ref, old_ref = ref_s.step(v, old_ref, t, back, lat_ref, eta=0.0, generator=g_ref, return_dict=False)
        noise = dpm.noise(i, shape, g_ours, lat_ours.dtype)
        lat_ours, old_ours = dpm.step(i, v, old_ours, lat_ours, noise)
        # bit for bit; NaN where diffusers' own step gives NaN (epsilon at the zero-SNR first step divides by 0)
        for ours, ref in ((lat_ours, lat_ref), (old_ours, old_ref)):
            torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True, msg=f"step {i}")
        lat_ref, lat_ours = lat_ref.to(dtype), lat_ours.to(dtype)
    # the generators were drawn from equally: their next draws agree
    assert torch.equal(torch.randn(4, generator=g_ref), torch.randn(4, generator=g_ours))


def test_dpm_steps_refuse_unknown_predictions():
    s = CogVideoXDPMScheduler(**CONFIG)
    s.register_to_config(prediction_type="flow")
    s.set_timesteps(5)
    with pytest.raises(ValueError):
        DPMSteps(s, s.timesteps.tolist())
