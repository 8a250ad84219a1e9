"""AutoencoderKL (the Stable Diffusion VAE) in Flax Linen, NHWC, parameters named as diffusers' state dict.

`encode` returns the diagonal Gaussian's (mean, logvar); `decode` maps latents to images. Neither applies
`scaling_factor`/`shift_factor`: the pipeline does, so the module stays the plain autoencoder diffusers saves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tix.errors import ConfigError
from tix.models.attention import attention
from tix.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

Dtype = Any

VAE_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code it for every norm (the UNet uses norm_eps)
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

IGNORED_FIELDS = {
    "sample_size": "only the default resolution of pipelines and tiling; the model takes any size",
}

_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",),
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def _reject(field: str, value: Any, supported: str) -> ConfigError:
    return ConfigError(f"vae config.json: {field}={value!r} is not supported by tix (supported: {supported})")


@dataclass(frozen=True)
class VAEConfig:
    """A diffusers AutoencoderKL config.json, validated.

    `scaling_factor`, `shift_factor`, `latents_mean`/`latents_std` are recorded for the pipeline (latent = (mean or
    sample - shift) * scale); `force_upcast` records that the weights overflow in float16 (SDXL), which only matters
    for the dtype the caller picks.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Validate an AutoencoderKL config.json dict; raise ConfigError naming any field tix cannot honour."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise _reject("_class_name", class_name, "'AutoencoderKL'")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS and k not in IGNORED_FIELDS)
        if unknown:
            raise ConfigError(
                f"vae config.json: unknown field(s) {unknown} (values {[config[k] for k in unknown]}); tix does not "
                "know whether they change the computation, so it refuses rather than ignore them"
            )
        cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}
        if cfg["act_fn"] != "silu":
            raise _reject("act_fn", cfg["act_fn"], "'silu'")
        channels = tuple(cfg["block_out_channels"])
        for field, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(cfg[field])
            if any(t != allowed for t in types):
                raise _reject(field, types, f"only {allowed!r} blocks")
            if len(types) != len(channels):
                raise _reject(field, types, f"one block per block_out_channels entry ({len(channels)})")
        layers = cfg["layers_per_block"]
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise _reject("layers_per_block", layers, "a positive int")
        groups = cfg["norm_num_groups"]
        if not isinstance(groups, int) or any(c % groups for c in channels):
            raise _reject("norm_num_groups", groups, f"an int dividing every block_out_channels entry {channels}")
        for field in ("latents_mean", "latents_std"):
            if cfg[field] is not None:
                cfg[field] = tuple(float(v) for v in cfg[field])
        return cls(
            in_channels=int(cfg["in_channels"]),
            out_channels=int(cfg["out_channels"]),
            block_out_channels=channels,
            layers_per_block=layers,
            latent_channels=int(cfg["latent_channels"]),
            norm_num_groups=groups,
            scaling_factor=float(cfg["scaling_factor"]),
            shift_factor=None if cfg["shift_factor"] is None else float(cfg["shift_factor"]),
            latents_mean=cfg["latents_mean"],
            latents_std=cfg["latents_std"],
            force_upcast=bool(cfg["force_upcast"]),
            use_quant_conv=bool(cfg["use_quant_conv"]),
            use_post_quant_conv=bool(cfg["use_post_quant_conv"]),
            mid_block_add_attention=bool(cfg["mid_block_add_attention"]),
        )


class SpatialAttention(nn.Module):
    """diffusers' Attention as the VAE mid block builds it: GroupNorm, one head as wide as the channels, biased
    q/k/v/out projections, residual. Computed in float32 (diffusers sets upcast_softmax for it)."""

    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(self.groups, VAE_EPS, "group_norm", self.dtype)(x).reshape(b, h * w, 1, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(y) for name in ("to_q", "to_k", "to_v"))
        out = attention(q, k, v, upcast=True).reshape(b, h * w, c)
        return nn.Dense(c, dtype=self.dtype, name="to_out_0")(out).reshape(b, h, w, c) + x


class _MidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, (attention), resnet."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        c = x.shape[-1]
        x = ResnetBlock2D(c, cfg.norm_num_groups, VAE_EPS, dtype=self.dtype, name="resnets_0")(x)
        if cfg.mid_block_add_attention:
            x = SpatialAttention(cfg.norm_num_groups, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, cfg.norm_num_groups, VAE_EPS, dtype=self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels
        x = conv(channels[0], 3, "conv_in", self.dtype)(x)
        for i, c in enumerate(channels):
            last = i == len(channels) - 1
            x = _EncoderBlock(cfg, c, add_downsample=not last, dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = _MidBlock(cfg, dtype=self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, VAE_EPS, "conv_norm_out", self.dtype)(x))
        return conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(x)


class _EncoderBlock(nn.Module):
    """DownEncoderBlock2D: resnets, then a stride-2 conv with the asymmetric (0, 1, 0, 1) pad."""

    config: VAEConfig
    out_channels: int
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        for j in range(cfg.layers_per_block):
            x = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, VAE_EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class _DecoderBlock(nn.Module):
    """UpDecoderBlock2D: layers_per_block + 1 resnets, then nearest 2x upsampling and a conv."""

    config: VAEConfig
    out_channels: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        for j in range(cfg.layers_per_block + 1):
            x = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, VAE_EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        channels = cfg.block_out_channels[::-1]
        x = conv(channels[0], 3, "conv_in", self.dtype)(z)
        x = _MidBlock(cfg, dtype=self.dtype, name="mid_block")(x)
        for i, c in enumerate(channels):
            x = _DecoderBlock(cfg, c, add_upsample=i < len(channels) - 1, dtype=self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, VAE_EPS, "conv_norm_out", self.dtype)(x))
        return conv(cfg.out_channels, 3, "conv_out", self.dtype)(x)


class AutoencoderKL(nn.Module):
    """The VAE. Use `model.apply(params, images, method="encode")` -> (mean, logvar) and
    `model.apply(params, latents, method="decode")` -> images; calling the module runs both (for `init`)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B,H,W,C] in [-1, 1] -> (mean, logvar) of the latent Gaussian, [B,H/f,W/f,latent_channels] each,
        unscaled (multiply a sample by scaling_factor for the UNet)."""
        moments = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents [B,h,w,latent_channels] -> images [B,h*f,w*f,out_channels] (about [-1, 1])."""
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)

    def init_params(self, rng: jax.Array, *, size: int = 16) -> dict:
        """Randomly initialised parameters (for tests and shapes; use jax.eval_shape(...) to get shapes only)."""
        return self.init(rng, jnp.zeros((1, size, size, self.config.in_channels), self.dtype))["params"]


def sample_latent(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian: mean + exp(logvar / 2) * N(0, 1), in float32."""
    mean = mean.astype(jnp.float32)
    std = jnp.exp(0.5 * logvar.astype(jnp.float32))
    return mean + std * jax.random.normal(rng, mean.shape, jnp.float32)


_LEGACY_ATTENTION = re.compile(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)")
_LEGACY_TO_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(r".*\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight")


def rename_legacy_vae_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Map an old diffusers VAE state dict (mid-block attention as `query`/`key`/`value`/`proj_attn`) to today's
    `to_q`/`to_k`/`to_v`/`to_out.0`, squeezing attention weights stored as 1x1 convs ([C, C, 1, 1]) to [C, C].
    Other keys pass through unchanged; a current-format state dict comes back equal."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        match = _LEGACY_ATTENTION.fullmatch(key)
        if match:
            key = f"{match.group(1)}{_LEGACY_TO_NEW[match.group(2)]}.{match.group(3)}"
        if _ATTENTION_WEIGHT.fullmatch(key) and np.ndim(value) == 4 and tuple(value.shape[2:]) == (1, 1):
            value = value[:, :, 0, 0]
        if key in out:
            raise ConfigError(f"vae weights: both the legacy and the current name of {key!r} are present")
        out[key] = value
    return out
