"""Samplers (DDIM, Euler, DPM-Solver++(2M), Euler ancestral and DPM-Solver++(2M) SDE, the Euler and DPM ones also on
Karras sigmas) as pure step functions over precomputed tables.

Each sampler reproduces a diffusers scheduler built with ``<Class>.from_config(scheduler_config)``: the same
``set_timesteps(n)`` timesteps, the same sigmas and the same update, for epsilon and v-prediction models:

=========== ====================================================================================================
``ddim``    ``DDIMScheduler``, eta 0. Defaults: timestep_spacing "leading", set_alpha_to_one true, clip_sample true.
``euler``   ``EulerDiscreteScheduler`` (s_churn 0). Defaults: timestep_spacing "linspace", final_sigmas_type "zero".
``dpm++2m`` ``DPMSolverMultistepScheduler`` with algorithm_type "dpmsolver++" and solver_order 2 (fixed by the name,
            whatever the config says). Defaults: timestep_spacing "linspace", solver_type "midpoint",
            lower_order_final true, final_sigmas_type "zero".
=========== ====================================================================================================

Two samplers add fresh noise at every step (:func:`is_stochastic`), so the picture keeps changing with the step
count: ``euler-ancestral`` is ``EulerAncestralDiscreteScheduler`` (AUTOMATIC1111's "Euler a"; default
timestep_spacing "linspace"), each step going to a lower noise level than Euler's and adding noise back up to the next;
``dpm++2m-sde`` is ``DPMSolverMultistepScheduler`` with algorithm_type "sde-dpmsolver++" (AUTOMATIC1111's "DPM++ 2M
SDE", with ``-karras`` "DPM++ 2M SDE Karras"), the same fields and defaults as ``dpm++2m``. Their noise comes from
per-row PRNG keys (:func:`step_noise`), not torch's generator: fed the same noise they match diffusers step for step,
but one seed draws other pictures in the two.

``euler-karras``, ``dpm++2m-karras`` and ``dpm++2m-sde-karras`` are the same samplers with ``use_karras_sigmas=True``
(AUTOMATIC1111's "Euler Karras", "DPM++ 2M Karras" and "DPM++ 2M SDE Karras"): the noise levels of Karras et al. 2022
(rho 7) between the schedule's highest and lowest, and the timesteps the model is given read back from them. A config
that sets ``use_karras_sigmas`` gets them under the plain name too, as diffusers' ``from_config`` does. Where Karras
sigmas give the first two steps one whole timestep (zero-SNR or cosine schedules), diffusers' text-to-image loop starts
at the second step and fails past the last (IndexError); tix runs every step, as diffusers does after
``set_begin_index(0)``.

A field missing from the config takes the default of the sampler's diffusers class (so one SD 1.5 config gives DDIM
"leading" but Euler "linspace" timesteps, exactly as in diffusers); a field set to something tix does not implement
(exponential or beta sigmas, thresholding, ...) raises :class:`tix.errors.ConfigError` naming it.

Everything per step that depends only on the schedule and the step count lives in a :class:`SamplerTable` of numpy
arrays built at trace time; :func:`step` indexes it with a (possibly traced) step index, and :func:`sample` runs the
whole loop in one ``jax.lax.scan``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tix.errors import ConfigError
from tix.sampler_names import KARRAS_SUFFIX, SAMPLERS
from tix.schedule import NoiseSchedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerTable:
    """Per-step constants of one sampler for one step count (numpy, length ``num_steps`` along axis 0).

    ``timesteps`` are what the model receives (float32; equal to diffusers' ``scheduler.timesteps``), ``input_divisor``
    what the latents are divided by before the model call (diffusers' ``scale_model_input``), ``init_noise_sigma``
    what unit Gaussian noise is multiplied by to start. ``coeffs`` holds the sampler's own per-step scalars.
    ``signal_scale`` and ``noise_scale`` give the noise level step ``i`` takes its latents to be at, in the sampler's
    own parameterisation: ``x_i = signal_scale[i] * x0 + noise_scale[i] * noise`` (diffusers' ``add_noise`` at that
    step).
    """

    sampler: str
    prediction_type: str
    timesteps: np.ndarray
    input_divisor: np.ndarray
    init_noise_sigma: float
    coeffs: Mapping[str, np.ndarray]
    signal_scale: np.ndarray
    noise_scale: np.ndarray
    clip_sample_range: float | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def make_table(schedule: NoiseSchedule, sampler: str, num_steps: int) -> SamplerTable:
    """The per-step constants of ``sampler`` over ``num_steps`` steps (diffusers' ``set_timesteps(num_steps)``)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler {sampler!r} is not supported; supported: {', '.join(SAMPLERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ConfigError(f"num_steps={num_steps!r} must be a positive integer")
    if num_steps > schedule.num_train_timesteps:
        raise ConfigError(
            f"num_steps={num_steps} exceeds the schedule's num_train_timesteps={schedule.num_train_timesteps}"
        )
    base = sampler.removesuffix(KARRAS_SUFFIX)
    if base == "ddim":
        return _ddim_table(schedule, int(num_steps))
    if base == "euler-ancestral":
        return _euler_ancestral_table(schedule, int(num_steps))
    asked = _field(schedule, base, "use_karras_sigmas", False, (True, False, None))
    karras = sampler.endswith(KARRAS_SUFFIX) or bool(asked)
    if base == "euler":
        return _euler_table(schedule, int(num_steps), karras)
    return _dpm_table(schedule, int(num_steps), karras, sde=base == "dpm++2m-sde")


def start_step(num_steps: int, strength: float) -> int:
    """The step image-to-image starts from: diffusers' ``get_timesteps``, which keeps the last
    ``int(num_steps * strength)`` steps of the ``num_steps`` schedule (every sampler runs its first step at order 1)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength={strength!r} must be a number between 0 and 1")
    kept = min(int(num_steps * strength), num_steps)
    if kept == 0:
        raise ConfigError(
            f"strength={strength} of {num_steps} steps runs no step (it keeps int(steps * strength) of them); "
            "raise --strength or --steps"
        )
    return num_steps - kept


def start_at(table: SamplerTable, first: int) -> SamplerTable:
    """The table of the steps from ``first`` on: the same timesteps and updates, as diffusers' ``set_begin_index``."""
    if not 0 <= first < table.num_steps:
        raise ConfigError(f"cannot start at step {first} of {table.num_steps}")
    coeffs = {k: v[first:] for k, v in table.coeffs.items()}
    if table.sampler in ("dpm++2m", "dpm++2m-sde"):
        # diffusers counts solver orders from the first step it runs, so that step is first order: no prev_x0 yet.
        coeffs["c_d1"] = coeffs["c_d1"].copy()
        coeffs["c_d1"][0] = 0.0
    return dataclasses.replace(
        table, timesteps=table.timesteps[first:], input_divisor=table.input_divisor[first:], coeffs=coeffs,
        signal_scale=table.signal_scale[first:], noise_scale=table.noise_scale[first:],
    )


def add_noise(table: SamplerTable, i: jax.Array | int, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Clean latents ``x0`` taken to step ``i``'s noise level with unit Gaussian ``noise`` (diffusers' ``add_noise``
    at that step); ``i == table.num_steps`` is past the last step, where the latents are clean."""
    signal = jnp.append(jnp.asarray(table.signal_scale), 1.0)[i]
    sigma = jnp.append(jnp.asarray(table.noise_scale), 0.0)[i]
    return signal * x0.astype(jnp.float32) + sigma * noise.astype(jnp.float32)


def blend(x: jax.Array, known: jax.Array, mask: jax.Array) -> jax.Array:
    """Blended Latent Diffusion's step: the sampler's latents where ``mask`` is 1, the ``known`` latents where 0."""
    return mask * x + (1.0 - mask) * known


def timesteps(schedule: NoiseSchedule, sampler: str, num_steps: int) -> np.ndarray:
    """The model timesteps of each step, as diffusers' ``scheduler.timesteps`` after ``set_timesteps(num_steps)``."""
    return make_table(schedule, sampler, num_steps).timesteps


# ----------------------------------------------------------------------------------------------------------------------
# Config fields, resolved with the defaults of the diffusers class each sampler mirrors.


def _field(schedule: NoiseSchedule, sampler: str, name: str, default: Any, supported: tuple = ()) -> Any:
    value = schedule.sampler_field(name, default)
    if supported and value not in supported:
        raise ConfigError(
            f"scheduler config field {name}={value!r} is not supported by the {sampler!r} sampler; supported: "
            f"{', '.join(repr(s) for s in supported)}"
        )
    return value


def _reject_sigma_variants(schedule: NoiseSchedule, sampler: str) -> None:
    for name in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                 "use_flow_sigmas", "use_dynamic_shifting"):
        _field(schedule, sampler, name, False, (False, None))


def _spacing(schedule: NoiseSchedule, sampler: str, default: str) -> str:
    return _field(schedule, sampler, "timestep_spacing", default, ("leading", "trailing", "linspace"))


def _steps_offset(schedule: NoiseSchedule, sampler: str) -> int:
    offset = _field(schedule, sampler, "steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise ConfigError(f"scheduler config field steps_offset={offset!r} must be an integer")
    return offset


def _sampling_alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
    alphas_cumprod = schedule.alphas_cumprod
    if schedule.rescale_betas_zero_snr:
        # Euler and DPM-Solver work in sigma = sqrt((1 - a) / a), infinite at a zero terminal SNR; diffusers nudges
        # the last alpha_bar to 2**-24 (float32 epsilon scale) for them, and so must tix to match their timesteps.
        alphas_cumprod = alphas_cumprod.copy()
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod


def _train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    return np.sqrt((np.float32(1) - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def _final_sigma(schedule: NoiseSchedule, sampler: str, alphas_cumprod: np.ndarray) -> float:
    kind = _field(schedule, sampler, "final_sigmas_type", "zero", ("zero", "sigma_min"))
    return 0.0 if kind == "zero" else float(_train_sigmas(alphas_cumprod[:1])[0])


def _sigma_bound(schedule: NoiseSchedule, sampler: str, name: str, default: float) -> float:
    """A config's ``sigma_min``/``sigma_max`` (null: ``default``, the spaced schedule's own end)."""
    value = _field(schedule, sampler, name, None)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ConfigError(f"scheduler config field {name}={value!r} must be a positive number or null")
    return float(value)


def _karras_sigmas(sigma_max: float, sigma_min: float, n: int) -> np.ndarray:
    """``n`` noise levels from ``sigma_max`` down to ``sigma_min``, evenly spaced in sigma^(1/7) (Karras et al. 2022,
    eq. 5), in float64 as diffusers computes them."""
    rho = 7.0
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each noise level: linear in log-sigma between the two training timesteps
    around it, clamped to the schedule's ends (diffusers' ``_sigma_to_t``)."""
    log_train = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # The last training timestep at or below each level (0 if none), kept one short of the end to have a neighbour.
    low = np.clip(np.searchsorted(log_train, log_sigma, side="right") - 1, 0, len(log_train) - 2)
    w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _f32(x: Any) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# DDIM


def _ddim_table(schedule: NoiseSchedule, n: int) -> SamplerTable:
    name = "ddim"
    num_train = schedule.num_train_timesteps
    spacing = _spacing(schedule, name, "leading")
    offset = _steps_offset(schedule, name)
    _field(schedule, name, "thresholding", False, (False,))
    set_alpha_to_one = _field(schedule, name, "set_alpha_to_one", True, (True, False))
    clip_sample = _field(schedule, name, "clip_sample", True, (True, False))
    clip_range = float(_field(schedule, name, "clip_sample_range", 1.0))

    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(n) * (num_train // n)).round()[::-1].astype(np.int64) + offset
    else:
        ts = np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1
    if ts.max() >= num_train:
        raise ConfigError(
            f"DDIM with steps_offset={offset} and {n} steps reaches timestep {ts.max()}, past the schedule's last "
            f"({num_train - 1}); use fewer steps"
        )
    # DDIM steps back by num_train // n whatever the spacing (so "trailing" and "linspace" do not land on the next
    # table entry); below 0 it uses the "final" alpha_bar.
    prev = ts - num_train // n
    alphas_cumprod = schedule.alphas_cumprod.astype(np.float64)
    final = 1.0 if set_alpha_to_one else alphas_cumprod[0]
    a_t = alphas_cumprod[ts]
    a_prev = np.where(prev >= 0, alphas_cumprod[np.maximum(prev, 0)], final)
    coeffs = {
        "sqrt_a": _f32(np.sqrt(a_t)),
        "sqrt_1ma": _f32(np.sqrt(1 - a_t)),
        "sqrt_a_prev": _f32(np.sqrt(a_prev)),
        "sqrt_1ma_prev": _f32(np.sqrt(1 - a_prev)),
    }
    return SamplerTable(name, schedule.prediction_type, ts.astype(np.float32), np.ones(n, np.float32), 1.0, coeffs,
                        coeffs["sqrt_a"], coeffs["sqrt_1ma"], clip_range if clip_sample else None)


def _ddim_step(table: SamplerTable, c: Mapping[str, jax.Array], x: jax.Array, m: jax.Array) -> tuple[jax.Array, ...]:
    if table.prediction_type == "epsilon":
        x0 = (x - c["sqrt_1ma"] * m) / c["sqrt_a"]
        eps = m
    else:
        x0 = c["sqrt_a"] * x - c["sqrt_1ma"] * m
        eps = c["sqrt_a"] * m + c["sqrt_1ma"] * x
    if table.clip_sample_range is not None:
        # diffusers clips x0 but keeps the model's epsilon (use_clipped_model_output=False).
        x0 = jnp.clip(x0, -table.clip_sample_range, table.clip_sample_range)
    return c["sqrt_a_prev"] * x0 + c["sqrt_1ma_prev"] * eps, x0


# ----------------------------------------------------------------------------------------------------------------------
# Euler


def _euler_spaced(schedule: NoiseSchedule, name: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Euler family's ``n`` timesteps, their sigmas (interpolated linearly in sigma between table entries) and
    the alphas_cumprod they come from, as diffusers' Euler schedulers' ``set_timesteps``."""
    num_train = schedule.num_train_timesteps
    spacing = _spacing(schedule, name, "linspace")
    offset = _steps_offset(schedule, name)
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, n, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(n) * (num_train // n)).round()[::-1].astype(np.float32) + np.float32(offset)
    else:
        ts = np.arange(num_train, 0, -num_train / n).round().astype(np.float32) - np.float32(1)
    alphas_cumprod = _sampling_alphas_cumprod(schedule)
    return ts, np.interp(ts, np.arange(num_train), _train_sigmas(alphas_cumprod)), alphas_cumprod


def _euler_init_sigma(schedule: NoiseSchedule, name: str, sigmas: np.ndarray) -> float:
    max_sigma = sigmas.max()
    spacing = _spacing(schedule, name, "linspace")
    return float(max_sigma if spacing in ("linspace", "trailing") else np.sqrt(max_sigma**2 + np.float32(1)))


def _euler_table(schedule: NoiseSchedule, n: int, karras: bool = False) -> SamplerTable:
    name = "euler"
    _reject_sigma_variants(schedule, name)
    _field(schedule, name, "interpolation_type", "linear", ("linear",))
    if schedule.prediction_type == "v_prediction":
        # Continuous timesteps feed the model 0.25*log(sigma) instead of t: a different model convention.
        _field(schedule, name, "timestep_type", "discrete", ("discrete",))
    ts, sigmas, alphas_cumprod = _euler_spaced(schedule, name, n)
    if karras:
        # Between the spaced schedule's own ends, unless the config pins them (EulerDiscreteScheduler's sigma_min/max).
        high = _sigma_bound(schedule, name, "sigma_max", sigmas[0])
        low = _sigma_bound(schedule, name, "sigma_min", sigmas[-1])
        sigmas = _karras_sigmas(high, low, n)
        ts = _sigma_to_t(sigmas, _train_sigmas(alphas_cumprod))
    sigmas = _f32(np.concatenate([sigmas, [_final_sigma(schedule, name, alphas_cumprod)]]))
    coeffs = {"sigma": sigmas[:-1], "sigma_next": sigmas[1:]}
    divisor = np.sqrt(sigmas[:-1] ** 2 + np.float32(1)).astype(np.float32)
    # Euler's latents are variance-exploding: x0 + sigma * noise.
    return SamplerTable(name, schedule.prediction_type, ts.astype(np.float32), divisor,
                        _euler_init_sigma(schedule, name, sigmas), coeffs, np.ones(n, np.float32), sigmas[:-1])


def _euler_ancestral_table(schedule: NoiseSchedule, n: int) -> SamplerTable:
    # EulerAncestralDiscreteScheduler has no sigma variants, interpolation or final-sigma fields: a config's are
    # ignored there, and so here. It always ends at sigma 0.
    name = "euler-ancestral"
    ts, sigmas, _ = _euler_spaced(schedule, name, n)
    sigmas = _f32(np.concatenate([sigmas, [0.0]]))
    sigma, nxt = sigmas[:-1], sigmas[1:]
    # Each step lands at sigma_down deterministically, then adds fresh noise of sigma_up, so that
    # sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's get_ancestral_step, eta 1).
    up = np.sqrt(nxt**2 * (sigma**2 - nxt**2) / sigma**2).astype(np.float32)
    down = np.sqrt(nxt**2 - up**2).astype(np.float32)
    coeffs = {"sigma": sigma, "sigma_next": nxt, "sigma_up": up, "sigma_down": down}
    divisor = np.sqrt(sigma**2 + np.float32(1)).astype(np.float32)
    return SamplerTable(name, schedule.prediction_type, ts.astype(np.float32), divisor,
                        _euler_init_sigma(schedule, name, sigmas), coeffs, np.ones(n, np.float32), sigma)


def _euler_x0(table: SamplerTable, sigma: jax.Array, x: jax.Array, m: jax.Array) -> jax.Array:
    if table.prediction_type == "epsilon":
        return x - sigma * m
    return m * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)


def _euler_step(table: SamplerTable, c: Mapping[str, jax.Array], x: jax.Array, m: jax.Array) -> tuple[jax.Array, ...]:
    sigma = c["sigma"]
    x0 = _euler_x0(table, sigma, x, m)
    derivative = (x - x0) / sigma
    return x + derivative * (c["sigma_next"] - sigma), x0


def _euler_ancestral_step(
    table: SamplerTable, c: Mapping[str, jax.Array], x: jax.Array, m: jax.Array, noise: jax.Array
) -> tuple[jax.Array, ...]:
    sigma = c["sigma"]
    x0 = _euler_x0(table, sigma, x, m)
    derivative = (x - x0) / sigma
    return x + derivative * (c["sigma_down"] - sigma) + noise * c["sigma_up"], x0


# ----------------------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)


def _dpm_table(schedule: NoiseSchedule, n: int, karras: bool = False, sde: bool = False) -> SamplerTable:
    name = "dpm++2m-sde" if sde else "dpm++2m"
    _reject_sigma_variants(schedule, name)
    _field(schedule, name, "thresholding", False, (False,))
    variance_type = _field(schedule, name, "variance_type", None)
    if variance_type in ("learned", "learned_range"):
        raise ConfigError(
            f"scheduler config field variance_type={variance_type!r} (a model that also outputs its variance) is not "
            f"supported by the {name!r} sampler"
        )
    ts, sigmas = _dpm_sigmas(schedule, name, n, karras)
    coeffs = _dpm_coeffs(schedule, name, sigmas, sde)
    return SamplerTable(name, schedule.prediction_type, ts.astype(np.float32), np.ones(len(ts), np.float32), 1.0,
                        coeffs, coeffs["alpha"], coeffs["noise"])


def _dpm_sigmas(schedule: NoiseSchedule, name: str, n: int, karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver's ``n`` timesteps and their ``n + 1`` VE sigmas (the last the final one), as its ``set_timesteps``."""
    num_train = schedule.num_train_timesteps
    spacing = _spacing(schedule, name, "linspace")
    offset = _steps_offset(schedule, name)
    lambda_min = _field(schedule, name, "lambda_min_clipped", float("-inf"))
    alphas_cumprod = _sampling_alphas_cumprod(schedule)
    # Timesteps whose log-SNR lies below lambda_min_clipped are cut from the top of the range.
    lambdas = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(np.float32(1) - alphas_cumprod))
    last = num_train - int(np.searchsorted(lambdas[::-1], np.float32(lambda_min), side="left"))
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64) + offset
    else:
        ts = np.arange(last, 0, -num_train / n).round().astype(np.int64) - 1
    train_sigmas = _train_sigmas(alphas_cumprod)
    if karras:
        # Over the whole training range (lambda_min_clipped and the spacing no longer pick the timesteps); the model
        # gets the nearest whole timestep but the update uses the Karras sigma itself, as in diffusers, which
        # truncates the timesteps instead of rounding them for a cosine schedule.
        sigmas = _karras_sigmas(float(train_sigmas[-1]), float(train_sigmas[0]), n)
        t = _sigma_to_t(sigmas, train_sigmas)
        ts = (t if schedule.beta_schedule == "squaredcos_cap_v2" else t.round()).astype(np.int64)
    else:
        sigmas = np.interp(ts, np.arange(num_train), train_sigmas)
    final = _final_sigma(schedule, name, alphas_cumprod)
    return ts, _f32(np.concatenate([sigmas, [final]])).astype(np.float64)


def _dpm_coeffs(schedule: NoiseSchedule, name: str, sigmas: np.ndarray, sde: bool) -> dict[str, np.ndarray]:
    """DPM-Solver++(2M)'s per-step update as ``x_next = c_x x + c_d0 x0 + c_d1 (x0 - prev_x0) + c_n noise``; the
    SDE variant (``sde``) damps the latents by exp(-h) more and puts fresh noise in their place (c_n)."""
    solver_type = _field(schedule, name, "solver_type", "midpoint", ("midpoint", "heun"))
    lower_order_final = _field(schedule, name, "lower_order_final", True, (True, False))
    euler_at_final = _field(schedule, name, "euler_at_final", False, (True, False))
    final_type = _field(schedule, name, "final_sigmas_type", "zero", ("zero", "sigma_min"))
    steps = len(sigmas) - 1
    alpha = 1 / np.sqrt(sigmas**2 + 1)  # sigma is the VE noise level; alpha, sigma*alpha the VP signal/noise scales
    noise = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(noise)  # +inf at a final sigma of 0
    i = np.arange(steps)
    h = lam[i + 1] - lam[i]
    inf = np.isinf(h)
    # The ODE's step takes exp(-h) - 1, the SDE's exp(-2h) - 1; both are -1 into sigma 0 (h infinite).
    k = 2.0 if sde else 1.0
    expm = np.where(inf, -1.0, np.expm1(-k * np.where(inf, 0.0, h)))
    c_x = noise[i + 1] / noise[i] * (np.exp(-np.where(inf, 0.0, h)) if sde else 1.0)
    c_d0 = -alpha[i + 1] * expm
    # Second order from the second step on, except a last step into sigma 0 (where h is infinite), or when asked to
    # finish with first order (short schedules, euler_at_final).
    final_first_order = euler_at_final or (lower_order_final and steps < 15) or final_type == "zero"
    second = (i >= 1) & ~((i == steps - 1) & final_first_order)
    h_prev = np.where(i >= 1, lam[i] - lam[np.maximum(i - 1, 0)], 1.0)
    with np.errstate(divide="ignore"):  # h_prev is 0 only where two timesteps share a sigma; diffusers gives inf too
        inv_r = np.where(second, h / np.where(second, h_prev, 1.0), 0.0)  # 1/r0 in D1 = (m0 - m1)/r0
    if solver_type == "midpoint":
        c_d1 = np.where(second, 0.5 * c_d0 * inv_r, 0.0)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            heun = alpha[i + 1] * (expm / (k * h) + 1.0)
        c_d1 = np.where(second, heun * inv_r, 0.0)
    coeffs = {"alpha": alpha[:-1], "noise": noise[:-1], "c_x": c_x, "c_d0": c_d0, "c_d1": c_d1}
    if sde:
        coeffs["c_n"] = noise[i + 1] * np.sqrt(-expm)
    return {key: _f32(value) for key, value in coeffs.items()}


def _dpm_step(
    table: SamplerTable, c: Mapping[str, jax.Array], x: jax.Array, m: jax.Array, prev_x0: jax.Array
) -> tuple[jax.Array, ...]:
    eps_prediction = table.prediction_type == "epsilon"
    x0 = (x - c["noise"] * m) / c["alpha"] if eps_prediction else c["alpha"] * x - c["noise"] * m
    # c_d1 is 0 on first-order steps, so prev_x0 (zeros before the first step) then drops out.
    return c["c_x"] * x + c["c_d0"] * x0 + c["c_d1"] * (x0 - prev_x0), x0


# ----------------------------------------------------------------------------------------------------------------------
# Public step / loop


def step(
    table: SamplerTable,
    i: jax.Array | int,
    x: jax.Array,
    model_output: jax.Array,
    prev_x0: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One sampler step from step ``i``'s latents ``x`` (not input-scaled) and the model's output there.

    Returns ``(x_next, x0)``: the latents of step ``i + 1`` and the step's prediction of the clean latents, which
    DPM-Solver++(2M) needs back as ``prev_x0`` on the next step (ignored by the others). ``noise``: the fresh unit
    Gaussian noise of the shape of ``x`` that a stochastic sampler (:func:`is_stochastic`) adds; the others ignore it.
    Works in float32; ``i`` may be traced.
    """
    c = {k: jnp.asarray(v)[i] for k, v in table.coeffs.items()}
    x = x.astype(jnp.float32)
    m = model_output.astype(jnp.float32)
    if table.sampler == "ddim":
        return _ddim_step(table, c, x, m)
    if table.sampler == "euler":
        return _euler_step(table, c, x, m)
    if is_stochastic(table.sampler) and noise is None:
        raise ConfigError(f"the {table.sampler} sampler adds fresh noise at every step: pass noise=")
    if table.sampler == "euler-ancestral":
        return _euler_ancestral_step(table, c, x, m, noise.astype(jnp.float32))
    x_next, x0 = _dpm_step(table, c, x, m, jnp.zeros_like(x) if prev_x0 is None else prev_x0.astype(jnp.float32))
    if table.sampler == "dpm++2m-sde":
        x_next = x_next + c["c_n"] * noise.astype(jnp.float32)
    return x_next, x0


def is_stochastic(sampler: str) -> bool:
    """Whether ``sampler`` adds fresh noise at every step (then :func:`sample` needs ``keys``)."""
    return sampler.removesuffix(KARRAS_SUFFIX) in ("euler-ancestral", "dpm++2m-sde")


def step_noise(keys: jax.Array, i: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
    """The noise a stochastic sampler adds at step ``i``: for row ``b``, unit Gaussian of ``shape[1:]`` drawn from
    ``fold_in(keys[b], i)``. Each row has its own stream, so a row's noise does not depend on the batch around it."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape[1:], jnp.float32))(keys)


def doubles_batch(guidance_scale: float | jax.Array) -> bool:
    """Whether :func:`sample` calls the model on ``[uncond; cond]`` (2B rows) rather than on the B conditional rows.

    A Python (or concrete) scale doubles only above 1, where guidance changes anything; a traced scale always doubles.
    """
    if isinstance(guidance_scale, jax.core.Tracer):
        return True
    return float(guidance_scale) > 1.0


def guide(uncond: jax.Array, cond: jax.Array, guidance_scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance: uncond + g * (cond - uncond)."""
    return uncond + guidance_scale * (cond - uncond)


def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    sampler: str,
    num_steps: int,
    noise: jax.Array,
    *,
    guidance_scale: float | jax.Array = 1.0,
    init: jax.Array | None = None,
    strength: float = 1.0,
    mask: jax.Array | None = None,
    keys: jax.Array | None = None,
) -> jax.Array:
    """Runs the whole sampling loop (one ``lax.scan``) from unit Gaussian ``noise`` [B, H, W, C]; returns the final
    latents (float32, not yet divided by the VAE scaling factor).

    Image-to-image: with ``init`` (clean latents [B, H, W, C]), only the last ``int(num_steps * strength)`` steps run,
    from ``init`` noised with ``noise`` to the first kept step's level (diffusers' img2img pipeline). Localized edit:
    with ``mask`` ([B, H, W, 1] in [0, 1], 1 where to edit) too, after every step the latents outside the mask are
    replaced by ``init`` noised with the same ``noise`` to the next step's level, and by ``init`` itself after the last
    step (Blended Latent Diffusion, as diffusers' inpainting pipeline does for a 4-channel UNet).

    ``keys``: one PRNG key per row ([B], typed), for a stochastic sampler's fresh noise at every step
    (:func:`step_noise`); required by those, ignored by the others.

    Contract for ``model_fn(latents_in, t) -> model_output``:

    - ``latents_in`` is float32 [N, H, W, C], already input-scaled (Euler divides by sqrt(sigma^2 + 1)); ``t`` is
      float32 [N] (the same step timestep on every row; integer-valued except Euler's "linspace" spacing). The output
      has the shape of ``latents_in`` and is what the model predicts (epsilon or v, per ``schedule.prediction_type``).
    - When :func:`doubles_batch` (``guidance_scale`` > 1, or traced), N = 2B and rows ``[:B]`` are the unconditional
      and ``[B:]`` the conditional copy of the same latents, so ``model_fn`` must pair its text conditioning the same
      way (diffusers' ``cat([negative, positive])`` order); the two halves are combined by :func:`guide`. Otherwise
      N = B and ``model_fn`` should condition on the prompt only.
    - Call ``sample`` inside the caller's ``jax.jit`` with ``model_fn`` a closure over the jit's *arguments* (params,
      text embeddings), so weights are not baked into the program as constants::

          @jax.jit
          def generate(params, context, noise):
              def model_fn(x, t):
                  return unet.apply(params, x, t, context)
              return sample(model_fn, schedule, "dpm++2m", 25, noise, guidance_scale=7.5)

      ``schedule``, ``sampler`` and ``num_steps`` are trace-time constants (a new value recompiles); a Python
      ``guidance_scale`` is too, while passing it as a jit argument makes it traced (then the batch always doubles).
    """
    table = make_table(schedule, sampler, num_steps)
    if mask is not None and init is None:
        raise ConfigError("a mask needs the image it edits: pass its latents as init")
    stochastic = is_stochastic(sampler)
    if stochastic and keys is None:
        raise ConfigError(f"the {sampler!r} sampler adds fresh noise at every step: pass keys= (one PRNG key per row)")
    if init is None:
        x = noise.astype(jnp.float32) * jnp.float32(table.init_noise_sigma)
    else:
        table = start_at(table, start_step(num_steps, strength))
        x = add_noise(table, 0, init, noise)
    cfg = doubles_batch(guidance_scale)
    batch = x.shape[0]
    ts = jnp.asarray(table.timesteps)
    divisors = jnp.asarray(table.input_divisor)

    def body(carry: tuple[jax.Array, jax.Array], i: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
        x, prev_x0 = carry
        x_in = x / divisors[i]
        if cfg:
            x_in = jnp.concatenate([x_in, x_in], axis=0)
        t = jnp.full((x_in.shape[0],), ts[i], jnp.float32)
        out = model_fn(x_in, t).astype(jnp.float32)
        if cfg:
            out = guide(out[:batch], out[batch:], guidance_scale)
        fresh = step_noise(keys, i, x.shape) if stochastic else None
        x_next, x0 = step(table, i, x, out, prev_x0, fresh)
        if mask is not None:
            x_next = blend(x_next, add_noise(table, i + 1, init, noise), mask)
        return (x_next, x0), None

    (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.arange(table.num_steps))
    return x
