"""tix.samplers against diffusers' PyTorch schedulers (the oracle): timesteps, single steps, whole guided loops."""

import contextlib
import itertools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers import scheduling_dpmsolver_multistep, scheduling_euler_ancestral_discrete

from tests.test_schedule import SD1, SD2, SDXL
from tix import samplers
from tix.errors import ConfigError
from tix.schedule import NoiseSchedule

ORACLE = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler,
          "euler-ancestral": EulerAncestralDiscreteScheduler, "dpm++2m-sde": DPMSolverMultistepScheduler}
STOCHASTIC = [s for s in samplers.SAMPLERS if samplers.is_stochastic(s)]
CONFIGS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


def oracle(config, sampler):
    """The diffusers scheduler tix's `sampler` reproduces, built from `config` (any scheduler's, e.g. a pipeline's)."""
    base = sampler.removesuffix(samplers.KARRAS_SUFFIX)
    # "-karras" is the sampler diffusers users build with from_config(config, use_karras_sigmas=True); "dpm++2m"
    # and "dpm++2m-sde" fix DPM-Solver's algorithm and order whatever the config says.
    algorithm = {"dpm++2m": "dpmsolver++", "dpm++2m-sde": "sde-dpmsolver++"}.get(base)
    fixed = {"algorithm_type": algorithm, "solver_order": 2} if algorithm else {}
    karras = {"use_karras_sigmas": True} if base != sampler else {}
    return ORACLE[base].from_config(config, **fixed, **karras)


@contextlib.contextmanager
def tix_step_noise(draw):
    """diffusers' stochastic schedulers (Euler ancestral, DPM-Solver++ SDE) adding `draw(i, nhwc_shape)` (numpy,
    NHWC) at their i-th step instead of torch's noise, so their steps can be compared with tix's fed the same noise."""
    calls = itertools.count()

    def randn_tensor(shape, **_):
        b, c, h, w = shape
        return torch.from_numpy(np.array(draw(next(calls), (b, h, w, c)), np.float32)).permute(0, 3, 1, 2)

    with (mock.patch.object(scheduling_euler_ancestral_discrete, "randn_tensor", randn_tensor),
          mock.patch.object(scheduling_dpmsolver_multistep, "randn_tensor", randn_tensor)):
        yield


def keyed_noise(keys):
    """`tix_step_noise`'s draw that is tix's own per-step noise for these row keys."""
    return lambda i, shape: samplers.step_noise(keys, i, shape)


def _pair(config, sampler, n):
    ref = oracle(config, sampler)
    ref.set_timesteps(n)
    return ref, samplers.make_table(NoiseSchedule.from_diffusers(config), sampler, n)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
def test_timesteps_and_noise_scales_match_diffusers(sampler, config_name, spacing):
    config = dict(CONFIGS[config_name])
    if spacing is not None:
        config["timestep_spacing"] = spacing  # None: the sampler class's own default (DDIM leading, others linspace)
    for n in (1, 7, 25, 50, 999):
        ref, table = _pair(config, sampler, n)
        if sampler == "euler-karras":
            # Its timesteps are read back from log-sigma; torch's sigma (x ** 0.5) and numpy's (sqrt) differ in the
            # last bit at a fifth of the training timesteps, which moves a fractional timestep by one float32 step.
            np.testing.assert_allclose(table.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-5)
        else:
            np.testing.assert_array_equal(table.timesteps, ref.timesteps.numpy().astype(np.float32))
        assert table.timesteps.dtype == np.float32
        assert table.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
        if sampler.startswith("euler"):
            np.testing.assert_allclose(table.coeffs["sigma"], ref.sigmas[:-1].numpy(), rtol=1e-6)
            np.testing.assert_allclose(table.coeffs["sigma_next"], ref.sigmas[1:].numpy(), rtol=1e-6)


def test_timestep_defaults_differ_per_sampler_as_in_diffusers():
    sched = NoiseSchedule.from_diffusers(SD1)  # no timestep_spacing field
    assert samplers.timesteps(sched, "ddim", 25)[:3].tolist() == [961, 921, 881]  # leading + steps_offset
    assert samplers.timesteps(sched, "euler", 25)[:2].tolist() == pytest.approx([999.0, 957.375])  # linspace
    assert samplers.timesteps(sched, "dpm++2m", 25)[:3].tolist() == [999, 959, 919]  # linspace over n + 1 points
    sdxl = NoiseSchedule.from_diffusers(SDXL)  # timestep_spacing "leading" written in the file
    assert samplers.timesteps(sdxl, "euler", 25)[:2].tolist() == [961.0, 921.0]


# Variants beyond the three stock configs: each exercises a field the samplers interpret.
STEP_CASES = [
    *[(name, sampler, {}, 25) for name in CONFIGS for sampler in samplers.SAMPLERS],
    ("sd1", "ddim", {"clip_sample": True, "clip_sample_range": 1.5}, 25),
    ("sd1", "ddim", {"set_alpha_to_one": True, "timestep_spacing": "trailing"}, 10),
    ("sd2", "ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 25),
    ("sd2", "dpm++2m", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 25),
    ("sd2", "euler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, 25),
    ("sd1", "dpm++2m", {"final_sigmas_type": "sigma_min"}, 20),  # second order on the last step
    ("sd1", "dpm++2m", {"final_sigmas_type": "sigma_min"}, 10),  # lower_order_final below 15 steps
    ("sd1", "dpm++2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}, 20),
    ("sd1", "dpm++2m", {"solver_type": "heun", "timestep_spacing": "leading"}, 25),
    ("sd2", "dpm++2m", {"lambda_min_clipped": -5.1, "timestep_spacing": "trailing"}, 25),
    ("sd2", "dpm++2m-karras", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 25),
    ("sd1", "dpm++2m-karras", {"beta_schedule": "squaredcos_cap_v2"}, 20),  # timesteps truncated, not rounded
    ("sd1", "dpm++2m-karras", {"final_sigmas_type": "sigma_min"}, 10),
    ("sd1", "euler-karras", {"sigma_min": 0.1, "sigma_max": 10.0}, 25),
    ("sd2", "euler-karras", {"timestep_spacing": "leading", "steps_offset": 1}, 25),
    ("sd1", "dpm++2m-sde", {"solver_type": "heun"}, 25),
    ("sd1", "dpm++2m-sde", {"final_sigmas_type": "sigma_min"}, 20),
    ("sd1", "dpm++2m-sde", {"final_sigmas_type": "sigma_min"}, 10),
    ("sd2", "dpm++2m-sde-karras", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 25),
    ("sd2", "euler-ancestral", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 25),
    ("sd1", "euler-ancestral", {"timestep_spacing": "leading", "steps_offset": 1}, 25),
]


@pytest.mark.parametrize("config_name, sampler, change, n", STEP_CASES)
def test_each_step_matches_diffusers(config_name, sampler, change, n):
    """Every step of a run, fed the same latents and model output as diffusers, gives its output within 1e-5.

    Latents are noised clean samples at each step's noise level and the model output is the true target plus error,
    so magnitudes are those of real sampling; DPM-Solver's second-order steps use the previous step's x0.
    """
    config = dict(CONFIGS[config_name], **change)
    ref, table = _pair(config, sampler, n)
    assert table.num_steps == len(ref.timesteps)
    np.testing.assert_allclose(table.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-5)
    if hasattr(ref, "set_begin_index"):
        # Where the first two timesteps coincide (Karras sigmas on a zero-SNR or cosine schedule) diffusers would
        # otherwise start at the second step and run off the end of its sigmas (IndexError); tix runs every step.
        ref.set_begin_index(0)
    step = jax.jit(samplers.step, static_argnums=0)
    alphas_cumprod = ref.alphas_cumprod.numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    prev_x0 = jnp.zeros((2, 8, 8, 4))
    fresh = np.random.default_rng(1).standard_normal((len(ref.timesteps), 2, 8, 8, 4)).astype(np.float32)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        x0 = rng.standard_normal((2, 8, 8, 4))
        eps = rng.standard_normal((2, 8, 8, 4))
        if sampler.startswith("euler"):
            sigma = float(ref.sigmas[i])
            x, a = x0 + sigma * eps, 1 / (1 + sigma**2)
        else:
            a = alphas_cumprod[int(t)]
            x = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
        true = eps if ref.config.prediction_type == "epsilon" else np.sqrt(a) * eps - np.sqrt(1 - a) * x0
        m = (true + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        x = x.astype(np.float32)

        x_t = torch.from_numpy(x).permute(0, 3, 1, 2)
        np.testing.assert_allclose(
            x / table.input_divisor[i], ref.scale_model_input(x_t, t).permute(0, 2, 3, 1).numpy(), rtol=1e-6
        )
        with tix_step_noise(lambda _, shape, z=fresh[i]: z):
            want = ref.step(torch.from_numpy(m).permute(0, 3, 1, 2), t, x_t).prev_sample.permute(0, 2, 3, 1).numpy()
        got, prev_x0 = step(table, i, jnp.asarray(x), jnp.asarray(m), prev_x0, jnp.asarray(fresh[i]))
        err = float(np.abs(np.asarray(got) - want).max())
        # float32 resolution of the latents: zero terminal SNR makes Euler/DPM's first sigma 4096.
        tol = 1e-5 * max(1.0, float(np.abs(x).max()) / 16)
        assert err <= tol, (i, int(t), err, tol)
        worst = max(worst, err)
    print(f"{config_name} {sampler} {change} n={n}: max abs step error {worst:.2e}")


class FakeModel:
    """model(x, t) = 0.1 x + b_row (1 + t/1000), rows [uncond; cond]: the same in torch (NCHW) and jax (NHWC)."""

    bias = np.array([0.3, -0.2, 0.5, 0.1], np.float32)  # 2 uncond rows, then 2 cond rows

    @classmethod
    def torch(cls, x, t, rows):
        return 0.1 * x + torch.from_numpy(cls.bias[rows]).view(-1, 1, 1, 1) * (1 + t / 1000.0)


def _diffusers_loop(ref, noise, guidance_scale):
    batch = noise.shape[0]
    latents = torch.from_numpy(noise).permute(0, 3, 1, 2) * ref.init_noise_sigma
    for t in ref.timesteps:
        if guidance_scale > 1:
            inputs, rows = torch.cat([latents] * 2), np.arange(2 * batch)
        else:
            inputs, rows = latents, np.arange(batch, 2 * batch)
        out = FakeModel.torch(ref.scale_model_input(inputs, t), t.float(), rows)
        if guidance_scale > 1:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        latents = ref.step(out, t, latents).prev_sample
    return latents.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_guided_loop_matches_diffusers(config_name, sampler, guidance_scale):
    config, n = CONFIGS[config_name], 25
    ref, _ = _pair(config, sampler, n)
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), 2)
    with tix_step_noise(keyed_noise(keys)):
        want = _diffusers_loop(ref, noise, guidance_scale)
    schedule = NoiseSchedule.from_diffusers(config)

    @jax.jit
    def generate(bias, noise, keys):  # the bias plays the params: a jit argument the model closes over
        def model_fn(x, t):
            rows = bias if x.shape[0] == 2 * noise.shape[0] else bias[noise.shape[0]:]
            return 0.1 * x + rows[:, None, None, None] * (1 + t[:, None, None, None] / 1000.0)

        return samplers.sample(model_fn, schedule, sampler, n, noise, guidance_scale=guidance_scale, keys=keys)

    got = np.asarray(generate(jnp.asarray(FakeModel.bias), jnp.asarray(noise), keys))
    err = float(np.abs(got - want).max())
    scale = np.abs(want).max()
    print(f"{config_name} {sampler} g={guidance_scale}: max abs error {err:.2e} (max |latent| {scale:.1f})")
    # float32 resolution: the SDE sampler with guidance drives this stand-in model's latents to about 100.
    assert err <= 2e-6 * max(scale, 50.0)


def test_guidance_batches_and_combine():
    schedule = NoiseSchedule.from_diffusers(SD1)
    noise = jnp.asarray(np.random.default_rng(2).standard_normal((3, 4, 4, 4)), jnp.float32)
    seen = []

    def model_fn(x, t):
        seen.append((x.shape, t.shape))
        return x * jnp.arange(1, x.shape[0] + 1, dtype=x.dtype)[:, None, None, None]  # each row tagged by its index

    assert samplers.doubles_batch(7.5) and not samplers.doubles_batch(1.0) and not samplers.doubles_batch(0.0)
    np.testing.assert_allclose(samplers.guide(jnp.float32(1.0), jnp.float32(3.0), 7.5), 1.0 + 7.5 * 2.0)

    samplers.sample(model_fn, schedule, "ddim", 2, noise, guidance_scale=1.0)
    assert seen == [((3, 4, 4, 4), (3,))]  # scan traces the body once
    seen.clear()
    samplers.sample(model_fn, schedule, "ddim", 2, noise, guidance_scale=7.5)
    assert seen == [((6, 4, 4, 4), (6,))]

    # Rows [:B] are the unconditional copy, [B:] the conditional one, of the same latents: with this model the
    # guided output for row j is x*(j+1) + g*(x*(B+j+1) - x*(j+1)) = x*(j+1+g*B); check one DDIM step by hand.
    def one_step(g):
        return samplers.sample(model_fn, schedule, "ddim", 1, noise, guidance_scale=g)

    table = samplers.make_table(schedule, "ddim", 1)
    g = 7.5
    rows = jnp.arange(1, 4, dtype=jnp.float32)[:, None, None, None]
    want, _ = samplers.step(table, 0, noise, noise * (rows + g * 3))
    np.testing.assert_allclose(one_step(g), want, rtol=1e-6)

    # A traced guidance scale cannot pick the batch size, so it always doubles; g = 1 then equals the unguided run.
    def two_halves(x, t):
        seen.append(x.shape)
        if x.shape[0] == 2 * noise.shape[0]:
            return jnp.concatenate([0.5 * x[:3], 0.2 * x[3:]])
        return 0.2 * x

    seen.clear()
    traced = jax.jit(lambda g: samplers.sample(two_halves, schedule, "euler", 3, noise, guidance_scale=g))(1.0)
    assert seen == [(6, 4, 4, 4)]
    unguided = samplers.sample(two_halves, schedule, "euler", 3, noise, guidance_scale=1.0)
    np.testing.assert_allclose(traced, unguided, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_stochastic_samplers_draw_fresh_noise_per_row_and_step_from_their_keys(sampler):
    schedule = NoiseSchedule.from_diffusers(SD1)
    noise = jnp.asarray(np.random.default_rng(4).standard_normal((3, 4, 4, 4)), jnp.float32)
    keys, other = jax.random.split(jax.random.key(0), 3), jax.random.split(jax.random.key(1), 3)
    # A row's noise is its own key's: the same whatever rows stand beside it, new at every step.
    np.testing.assert_array_equal(samplers.step_noise(keys, 2, noise.shape)[1:],
                                  samplers.step_noise(keys[1:], 2, (2, 4, 4, 4)))
    assert not np.allclose(samplers.step_noise(keys, 2, noise.shape), samplers.step_noise(keys, 3, noise.shape))

    def run(sampler, k):
        return np.asarray(samplers.sample(lambda x, t: 0.1 * x, schedule, sampler, 5, noise, keys=k))

    np.testing.assert_array_equal(run(sampler, keys), run(sampler, keys))
    assert np.abs(run(sampler, keys) - run(sampler, other)).max() > 0.01
    np.testing.assert_array_equal(run("euler", keys), run("euler", other))  # a deterministic sampler ignores them
    with pytest.raises(ConfigError, match="keys="):
        run(sampler, None)
    with pytest.raises(ConfigError, match="noise="):
        samplers.step(samplers.make_table(schedule, sampler, 5), 0, noise, noise)


@pytest.mark.parametrize(
    "sampler, change, field",
    [
        ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ("dpm++2m-karras", {"use_beta_sigmas": True}, "use_beta_sigmas"),
        ("euler", {"use_karras_sigmas": "yes"}, "use_karras_sigmas"),
        ("euler-karras", {"sigma_min": "low"}, "sigma_min"),
        ("euler-karras", {"sigma_max": -1.0}, "sigma_max"),
        ("dpm++2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("dpm++2m", {"variance_type": "learned_range"}, "variance_type"),
        ("dpm++2m", {"solver_type": "bh2"}, "solver_type"),
        ("ddim", {"timestep_spacing": "karras"}, "timestep_spacing"),
        ("euler", {"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
    ],
)
def test_unsupported_sampler_fields_raise(sampler, change, field):
    schedule = NoiseSchedule.from_diffusers(dict(SDXL, **change))  # training does not care: the schedule loads
    with pytest.raises(ConfigError, match=field):
        samplers.make_table(schedule, sampler, 25)


@pytest.mark.parametrize("sampler", ["euler", "dpm++2m"])
def test_a_config_asking_for_karras_sigmas_gets_them_under_the_plain_name(sampler):
    """diffusers' from_config honours use_karras_sigmas in the file; so does tix, and the "-karras" name is that."""
    config = dict(SD1, use_karras_sigmas=True)
    ref, table = _pair(config, sampler, 20)
    named = samplers.make_table(NoiseSchedule.from_diffusers(SD1), sampler + samplers.KARRAS_SUFFIX, 20)
    np.testing.assert_allclose(table.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-5)  # see euler-karras above
    np.testing.assert_array_equal(named.timesteps, table.timesteps)
    plain = samplers.make_table(NoiseSchedule.from_diffusers(SD1), sampler, 20)
    # Karras spends more of the steps at low noise than even spacing does.
    assert (table.timesteps < 100).sum() > (plain.timesteps < 100).sum() + 2


def test_fields_of_other_schedulers_are_ignored_like_diffusers():
    # DDIMScheduler has no use_karras_sigmas, so DDIMScheduler.from_config ignores it; tix's DDIM does too.
    schedule = NoiseSchedule.from_diffusers(dict(SDXL, use_karras_sigmas=True))
    ref = DDIMScheduler.from_config(dict(SDXL, use_karras_sigmas=True))
    ref.set_timesteps(25)
    np.testing.assert_array_equal(samplers.timesteps(schedule, "ddim", 25), ref.timesteps.numpy())


def test_bad_sampler_arguments():
    schedule = NoiseSchedule.from_diffusers(SD1)
    with pytest.raises(ConfigError, match="sampler"):
        samplers.make_table(schedule, "pndm", 25)
    with pytest.raises(ConfigError, match="num_steps"):
        samplers.make_table(schedule, "ddim", 1001)
    with pytest.raises(ConfigError, match="num_steps"):
        samplers.make_table(schedule, "euler", 0)
    # "leading" + steps_offset 1 would reach t=1000 (an IndexError in diffusers).
    with pytest.raises(ConfigError, match="steps_offset"):
        samplers.make_table(schedule, "ddim", 1000)
