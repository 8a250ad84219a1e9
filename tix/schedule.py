"""The diffusion noise schedule: forward noising, training timesteps and targets, and loss weights.

A :class:`NoiseSchedule` is built from a diffusers ``scheduler_config.json`` and holds only hashable configuration, so
it can be a static argument of ``jax.jit`` or a closed-over constant; its tables (``betas``, ``alphas_cumprod``) are
numpy arrays computed from that configuration. They reproduce diffusers' float32 tables bit for bit for the linear and
scaled-linear schedules: betas as PyTorch's float32 ``linspace`` produces them, and a cumulative product accumulated in
float64 and rounded to float32, which is what ``torch.cumprod`` does on float32 input.

Fields that only a sampler reads (``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ...) are kept raw in
``sampler_fields`` and interpreted by :mod:`tix.samplers`, each sampler with the defaults of the diffusers class it
mirrors, as ``<Class>.from_config(config)`` would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tix.errors import ConfigError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# Fields the samplers in tix.samplers interpret (or reject) with the defaults of their diffusers class.
SAMPLER_FIELDS = frozenset(
    {
        "timestep_spacing",
        "steps_offset",
        "set_alpha_to_one",
        "clip_sample",
        "clip_sample_range",
        "thresholding",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "interpolation_type",
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_lu_lambdas",
        "use_flow_sigmas",
        "flow_shift",
        "sigma_min",
        "sigma_max",
        "timestep_type",
        "final_sigmas_type",
        "solver_order",
        "algorithm_type",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "lambda_min_clipped",
        "variance_type",
        "use_dynamic_shifting",
        "time_shift_type",
    }
)

# Fields that configure the algorithm of a diffusers sampler tix does not run (PNDM, UniPC, DEIS, LCM, EDM, ...).
# Choosing a tix sampler replaces that algorithm, as `TixSampler.from_config(cfg)` would in diffusers, so they change
# nothing tix computes.
IGNORED_FIELDS = frozenset(
    {
        "skip_prk_steps",
        "predict_x0",
        "solver_p",
        "disable_corrector",
        "corrector_order",
        "predictor_order",
        "original_inference_steps",
        "timestep_scaling",
        "rho",
        "sigma_data",
        "sigma_schedule",
        "shift_terminal",
        "tau_func",
    }
)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The discrete-time DDPM schedule of a Stable Diffusion model (hashable; a leafless pytree).

    ``alphas_cumprod[t]`` is the signal fraction ``alpha_bar_t`` at integer training timestep ``t``.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    class_name: str | None = None
    sampler_fields: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES and self.trained_betas is None:
            raise ConfigError(
                f"scheduler beta_schedule={self.beta_schedule!r} is not supported; supported: "
                f"{', '.join(BETA_SCHEDULES)}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"scheduler prediction_type={self.prediction_type!r} is not supported; supported: "
                f"{', '.join(PREDICTION_TYPES)} (Stable Diffusion 1.x/XL predict epsilon, 2.x-v predicts v)"
            )
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ConfigError(f"scheduler num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 2")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ConfigError(
                f"scheduler trained_betas has {len(self.trained_betas)} values but num_train_timesteps="
                f"{self.num_train_timesteps}"
            )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """Builds the schedule from a ``scheduler_config.json`` dict of any DDPM-family diffusers scheduler.

        Raises ConfigError for a field tix does not know or a value it does not support.
        """
        kwargs: dict[str, Any] = {}
        sampler: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue  # diffusers metadata: _class_name, _diffusers_version, _use_default_values
            if key in ("num_train_timesteps",):
                kwargs[key] = _as_int(key, value)
            elif key in ("beta_start", "beta_end"):
                kwargs[key] = _as_float(key, value)
            elif key in ("beta_schedule", "prediction_type"):
                kwargs[key] = value
            elif key == "rescale_betas_zero_snr":
                kwargs[key] = _as_bool(key, value)
            elif key == "trained_betas":
                kwargs[key] = None if value is None else tuple(float(b) for b in value)
            elif key in SAMPLER_FIELDS:
                sampler[key] = _hashable(value)
            elif key in IGNORED_FIELDS:
                continue
            else:
                raise ConfigError(
                    f"scheduler config field {key!r} (value {value!r}) is not known to tix; it may change the noise "
                    "schedule, so tix refuses to guess. Remove it or report it."
                )
        if kwargs.get("prediction_type") == "sample":
            raise ConfigError(
                "scheduler prediction_type='sample' (the model predicts x0) is not supported; supported: "
                f"{', '.join(PREDICTION_TYPES)}"
            )
        return cls(**kwargs, class_name=config.get("_class_name"), sampler_fields=tuple(sorted(sampler.items())))

    def sampler_field(self, name: str, default: Any) -> Any:
        """The config's value of a sampler-only field, or ``default`` (the sampler class's own) when absent."""
        for key, value in self.sampler_fields:
            if key == name:
                return value
        return default

    @property
    def betas(self) -> np.ndarray:
        """float32 [num_train_timesteps]."""
        return _tables(self)[0]

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """float32 [num_train_timesteps], as DDPM/DDIM use it (exactly 0 at the end under zero-terminal-SNR)."""
        return _tables(self)[1]


jax.tree_util.register_dataclass(
    NoiseSchedule, data_fields=[], meta_fields=[f.name for f in dataclasses.fields(NoiseSchedule)]
)


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"scheduler config field {key}={value!r} must be an integer")
    return int(value)


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"scheduler config field {key}={value!r} must be a number")
    return float(value)


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"scheduler config field {key}={value!r} must be true or false")
    return value


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    # torch.linspace(float32) rounds start, end and the step to float32, then forms start + step*i (first half) or
    # end - step*(n-1-i) (second half) with a single rounding; float64 holds those products and sums exactly.
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    values = np.where(i < n // 2, np.float64(start32) + step * i, np.float64(end32) - step * (n - 1 - i))
    return values.astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch.cumprod accumulates float32 input in float64 on CPU; a float32 running product drifts ~1e-6 by t=999.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _squaredcos_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so it ends at exactly 0 and keeps its start.
    root = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _tables(schedule: NoiseSchedule) -> tuple[np.ndarray, np.ndarray]:
    n = schedule.num_train_timesteps
    if schedule.trained_betas is not None:
        betas = np.asarray(schedule.trained_betas, np.float32)
    elif schedule.beta_schedule == "linear":
        betas = _torch_linspace_f32(schedule.beta_start, schedule.beta_end, n)
    elif schedule.beta_schedule == "scaled_linear":
        root = _torch_linspace_f32(schedule.beta_start**0.5, schedule.beta_end**0.5, n)
        betas = root * root
    else:
        betas = _squaredcos_betas(n)
    if schedule.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    alphas_cumprod = _cumprod_f32(np.float32(1) - betas)
    for table in (betas, alphas_cumprod):
        table.setflags(write=False)
    return betas, alphas_cumprod


def _per_example(schedule: NoiseSchedule, t: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) in float32, shaped [B, 1, ..., 1] to broadcast over NHWC."""
    alpha_bar = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]
    shape = alpha_bar.shape + (1,) * (ndim - alpha_bar.ndim)
    return jnp.sqrt(alpha_bar).reshape(shape), jnp.sqrt(1.0 - alpha_bar).reshape(shape)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; x0, noise [B, H, W, C], t int [B]. Keeps x0's dtype."""
    a, s = _per_example(schedule, t, x0.ndim)
    return (a * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022)."""
    a, s = _per_example(schedule, t, x0.ndim)
    return (a * noise.astype(jnp.float32) - s * x0.astype(jnp.float32)).astype(x0.dtype)


def target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """What the model is trained to output at x_t: the noise (epsilon) or the velocity (v_prediction)."""
    if schedule.prediction_type == "epsilon":
        return noise
    return velocity(schedule, x0, noise, t)


def training_timesteps(key: jax.Array, shape: tuple[int, ...], num_train_timesteps: int,
                       bias: float = 0.0) -> jax.Array:
    """Timesteps for training samples, int32 in [0, num_train_timesteps).

    `bias` 0 draws them uniformly (DDPM, and the textual-inversion paper). `bias` > 0 draws t with density
    proportional to (t / T)^bias: the noisy steps, where a sample's colours and layout are decided, come up more
    often. Their epsilon loss is small and nearly flat in the conditioning, so under uniform draws an attribute that
    only those steps settle (a colour, on the toy world) can be left unlearned while the loss looks converged.
    """
    if not bias:
        return jax.random.randint(key, shape, 0, num_train_timesteps)
    # Inverse CDF: P(t/T <= s) = s^(1 + bias).
    u = jax.random.uniform(key, shape, jnp.float32)
    t = jnp.floor(num_train_timesteps * u ** (1.0 / (1.0 + bias)))
    return jnp.minimum(t, num_train_timesteps - 1).astype(jnp.int32)


def stratified_timesteps(key: jax.Array, levels: int, per_level: int, num_train_timesteps: int) -> jax.Array:
    """[levels x per_level] int32 timesteps, level-major: `per_level` uniform draws in each of `levels` equal spans of
    the schedule, so no span is missed by chance."""
    level = jnp.repeat(jnp.arange(levels), per_level)
    return level_timesteps(level, jax.random.uniform(key, level.shape), levels, num_train_timesteps)


def level_timesteps(level: jax.Array, u: jax.Array, levels: int, num_train_timesteps: int) -> jax.Array:
    """The timestep at fraction `u` in [0, 1) of span `level` of `levels` equal spans of the schedule."""
    return jnp.minimum(((level + u) * (num_train_timesteps / levels)).astype(jnp.int32), num_train_timesteps - 1)


def level_of(t: jax.Array, levels: int, num_train_timesteps: int) -> jax.Array:
    """The span (0 .. levels-1) of `stratified_timesteps` that each timestep falls in."""
    return jnp.minimum(jnp.asarray(t) * levels // num_train_timesteps, levels - 1)


def balanced_level_weight(level_loss: jax.Array, t: jax.Array, num_train_timesteps: int) -> jax.Array:
    """Per-sample loss weight [K*b], rows concept-major: 1 / concept k's reference loss [K, levels] at the sample's
    level (`level_of`), scaled so each concept's weights average 1 over the levels, so its loss keeps the plain
    loss's size and the learning rate and gradient clipping mean what they meant (`train.level_balance`)."""
    num_k, levels = level_loss.shape
    inverse = 1.0 / jnp.maximum(level_loss, 1e-12)
    inverse = inverse / jnp.mean(inverse, axis=1, keepdims=True)
    concept = jnp.repeat(jnp.arange(num_k), t.shape[0] // num_k)
    return inverse[concept, level_of(t, levels, num_train_timesteps)]


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), float32 [B]."""
    alpha_bar = jnp.asarray(schedule.alphas_cumprod)[jnp.asarray(t)]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for the schedule's prediction type, float32 [B].

    The paper's weight min(SNR, gamma) is for an x0-space loss; dividing by the target's own SNR factor turns it into
    the weight for an epsilon loss (min(SNR, gamma) / SNR) or a v loss (min(SNR, gamma) / (SNR + 1)). The epsilon
    form is written min(1, gamma / SNR) so a zero terminal SNR gives its limit 1 instead of 0/0.
    """
    ratio = snr(schedule, t)
    if schedule.prediction_type == "epsilon":
        return jnp.minimum(1.0, gamma / ratio)
    return jnp.minimum(ratio, gamma) / (ratio + 1.0)
