"""tix.schedule against diffusers' PyTorch schedulers (the oracle) and hand formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from tix.errors import ConfigError
from tix.schedule import NoiseSchedule, add_noise, min_snr_weight, snr, target, training_timesteps, velocity

# scheduler_config.json of stable-diffusion-v1-5 (PNDM), stable-diffusion-2-1 (DDIM, v) and SDXL base (Euler).
SD1 = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
SD2 = dict(SD1, _class_name="DDIMScheduler", prediction_type="v_prediction")
SDXL = dict(
    SD1, _class_name="EulerDiscreteScheduler", interpolation_type="linear", prediction_type="epsilon",
    sample_max_value=1.0, timestep_spacing="leading", use_karras_sigmas=False,
)


@pytest.mark.parametrize(
    "config",
    [
        SD1,
        {"beta_schedule": "linear"},
        {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 777},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 10},
    ],
)
def test_tables_equal_diffusers_bitwise(config):
    ref = DDPMScheduler.from_config(config)
    sched = NoiseSchedule.from_diffusers(config)
    np.testing.assert_array_equal(sched.betas, ref.betas.numpy())
    np.testing.assert_array_equal(sched.alphas_cumprod, ref.alphas_cumprod.numpy())
    assert sched.alphas_cumprod.dtype == np.float32


def test_zero_terminal_snr_tables():
    config = dict(SD2, rescale_betas_zero_snr=True)
    ref = DDIMScheduler.from_config(config)
    sched = NoiseSchedule.from_diffusers(config)
    # torch's float32 sqrt is not correctly rounded on this CPU, so the rescaled table differs in the last bits.
    np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=2e-6)
    assert sched.alphas_cumprod[-1] == 0.0
    np.testing.assert_allclose(sched.alphas_cumprod[0], ref.alphas_cumprod[0].item(), rtol=1e-6)


def _nchw(x):
    return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def _nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("config", [SD1, SD2])
def test_add_noise_velocity_target_match_ddpm(config):
    ref = DDPMScheduler.from_config(config)
    sched = NoiseSchedule.from_diffusers(config)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((5, 6, 6, 4)).astype(np.float32)
    noise = rng.standard_normal((5, 6, 6, 4)).astype(np.float32)
    t = np.array([0, 1, 500, 998, 999], np.int32)

    fns = jax.jit(lambda s, x, n, t: (add_noise(s, x, n, t), velocity(s, x, n, t), target(s, x, n, t)))
    noisy, v, tgt = (np.asarray(a) for a in fns(sched, x0, noise, t))
    want_noisy = _nhwc(ref.add_noise(_nchw(x0), _nchw(noise), torch.from_numpy(t).long()))
    want_v = _nhwc(ref.get_velocity(_nchw(x0), _nchw(noise), torch.from_numpy(t).long()))
    np.testing.assert_allclose(noisy, want_noisy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(v, want_v, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tgt, v if config["_class_name"] == "DDIMScheduler" else noise)


def test_add_noise_keeps_dtype():
    sched = NoiseSchedule.from_diffusers(SD1)
    x = jnp.ones((2, 4, 4, 4), jnp.bfloat16)
    assert add_noise(sched, x, x, jnp.array([3, 900])).dtype == jnp.bfloat16


@pytest.mark.parametrize("config", [SD1, SD2])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weight_hand_formula(config, gamma):
    sched = NoiseSchedule.from_diffusers(config)
    t = np.arange(0, 1000, 37)
    a = sched.alphas_cumprod.astype(np.float64)[t]
    ratio = a / (1 - a)
    np.testing.assert_allclose(np.asarray(snr(sched, jnp.asarray(t))), ratio, rtol=1e-5)
    if config.get("prediction_type", "epsilon") == "epsilon":
        want = np.minimum(ratio, gamma) / ratio
    else:
        want = np.minimum(ratio, gamma) / (ratio + 1)
    got = np.asarray(jax.jit(min_snr_weight, static_argnums=2)(sched, jnp.asarray(t), gamma))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Low-noise steps (SNR >> gamma) are down-weighted to ~gamma/SNR in both forms; at high noise an epsilon loss keeps
    # weight 1 while a v loss (whose target is then ~x0) gets ~SNR.
    assert got[0] < 0.01 and np.all(got <= 1.0)
    assert got[-1] == (1.0 if config is SD1 else pytest.approx(ratio[-1], rel=1e-2))


def test_min_snr_weight_zero_terminal_snr_is_finite():
    for prediction in ("epsilon", "v_prediction"):
        sched = NoiseSchedule.from_diffusers(dict(SD1, rescale_betas_zero_snr=True, prediction_type=prediction))
        w = np.asarray(min_snr_weight(sched, jnp.array([0, 999]), 5.0))
        assert np.all(np.isfinite(w))
        assert w[1] == (1.0 if prediction == "epsilon" else 0.0)


def test_training_timesteps_are_uniform_by_default_and_biased_toward_noise_on_request():
    key = jax.random.key(4)
    # No bias draws exactly what the step drew before the option existed, so earlier runs resume bit for bit.
    np.testing.assert_array_equal(training_timesteps(key, (64,), 1000), jax.random.randint(key, (64,), 0, 1000))
    for bias in (1.0, 2.5):
        t = np.asarray(training_timesteps(key, (200_000,), 1000, bias))
        assert t.dtype == np.int32 and t.min() >= 0 and t.max() == 999
        # Density ~ (t / T)^bias: the CDF at s is s^(1 + bias), so the mean is T (1 + bias) / (2 + bias).
        for s in (0.25, 0.5, 0.9):
            assert abs(np.mean(t < s * 1000) - s ** (1 + bias)) < 0.005, (bias, s)
        assert np.mean(t) == pytest.approx(1000 * (1 + bias) / (2 + bias), rel=0.01)


def test_schedule_is_static_pytree():
    sched = NoiseSchedule.from_diffusers(SDXL)
    assert jax.tree_util.tree_leaves(sched) == []
    assert sched == NoiseSchedule.from_diffusers(dict(SDXL)) and hash(sched) == hash(NoiseSchedule.from_diffusers(SDXL))
    assert sched.sampler_field("timestep_spacing", "linspace") == "leading"
    assert sched.sampler_field("final_sigmas_type", "zero") == "zero"
    assert sched.class_name == "EulerDiscreteScheduler"
    # Real configs load, and fields of a sampler tix does not run (PNDM's skip_prk_steps) are ignored.
    for config in (SD1, SD2, EulerDiscreteScheduler.from_config(SDXL).config):
        NoiseSchedule.from_diffusers(dict(config))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"beta_schedule": "exp"}, "beta_schedule"),
        ({"num_train_timesteps": 1.5}, "num_train_timesteps"),
        ({"rescale_betas_zero_snr": "yes"}, "rescale_betas_zero_snr"),
        ({"some_new_field": 3}, "some_new_field"),
    ],
)
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        NoiseSchedule.from_diffusers(dict(SD1, **change))
