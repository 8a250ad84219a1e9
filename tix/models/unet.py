"""UNet2DConditionModel (SD 1.x, SD 2.x, SDXL) in Flax Linen, NHWC, parameters named as diffusers' state dict."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tix.errors import ConfigError, TixError
from tix.models.blocks import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv,
    group_norm,
    timestep_embedding,
)

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# config.json fields that do not change what tix computes, with the reason.
IGNORED_FIELDS = {
    "sample_size": "only the default resolution of pipelines; the model takes any size",
    "addition_embed_type_num_heads": "used only by addition_embed_type 'text'",
    "resnet_skip_time_act": "used only by the Simple*/ResnetDownsample block types, which tix rejects",
    "resnet_out_scale_factor": "used only by the Simple*/ResnetDownsample block types, which tix rejects",
    "cross_attention_norm": "used only by the Simple* block types, which tix rejects",
    "mid_block_only_cross_attention": "used only by UNetMidBlock2DSimpleCrossAttn, which tix rejects",
    "class_embeddings_concat": "used only with a class embedding, which tix rejects",
}

# Fields that tix supports only at one value (or a few): field -> (allowed values, diffusers' default).
_FIXED_FIELDS: dict[str, tuple[tuple[Any, ...], Any]] = {
    "act_fn": (("silu",), "silu"),
    "mid_block_type": (("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn"),
    "dual_cross_attention": ((False,), False),
    "class_embed_type": ((None,), None),
    "num_class_embeds": ((None,), None),
    "resnet_time_scale_shift": (("default",), "default"),
    "time_embedding_type": (("positional",), "positional"),
    "time_embedding_act_fn": ((None,), None),
    "timestep_post_act": ((None,), None),
    "time_cond_proj_dim": ((None,), None),
    "encoder_hid_dim": ((None,), None),
    "encoder_hid_dim_type": ((None,), None),
    "attention_type": (("default",), "default"),
    "reverse_transformer_layers_per_block": ((None,), None),
    "num_attention_heads": ((None,), None),  # diffusers itself refuses it (the legacy attention_head_dim naming)
    "addition_embed_type": ((None, "text_time"), None),
    "dropout": ((0, 0.0), 0.0),
}

# diffusers' defaults for the fields tix reads, used when an (old) config.json omits them.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "addition_time_embed_dim": None,
    "upcast_attention": False,
    "time_embedding_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
}


class ConditioningError(TixError, ValueError):
    """The UNet was called without (or with unexpected) added conditioning."""


def _reject(field: str, value: Any, supported: str) -> ConfigError:
    return ConfigError(f"unet config.json: {field}={value!r} is not supported by tix (supported: {supported})")


def _per_block(cfg: Mapping[str, Any], field: str, n: int) -> tuple[int, ...]:
    value = cfg[field]

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value):
        return (value,) * n
    if (
        isinstance(value, Sequence)
        and len(value) == n
        and all(is_int(v) for v in value)
    ):
        return tuple(value)
    raise _reject(field, value, f"an int or a flat list of {n} ints (one per down block)")


@dataclass(frozen=True)
class UNetConfig:
    """The computation-relevant part of a diffusers UNet2DConditionModel config.json, validated and resolved.

    `num_heads` is per down block; it comes from `attention_head_dim`, which for these models counts heads.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = _DEFAULTS["down_block_types"]
    up_block_types: tuple[str, ...] = _DEFAULTS["up_block_types"]
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    center_input_sample: bool = False
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    time_embedding_dim: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def uses_text_time(self) -> bool:
        """SDXL: needs `text_embeds` and `time_ids` added conditioning."""
        return self.addition_embed_type == "text_time"

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Validate a UNet2DConditionModel config.json dict; raise ConfigError naming any field tix cannot honour."""
        class_name = config.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise _reject("_class_name", class_name, "'UNet2DConditionModel'")
        known = set(_DEFAULTS) | set(_FIXED_FIELDS) | set(IGNORED_FIELDS)
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ConfigError(
                f"unet config.json: unknown field(s) {unknown} (values {[config[k] for k in unknown]}); tix does not "
                "know whether they change the computation, so it refuses rather than ignore them"
            )
        for field, (allowed, default) in _FIXED_FIELDS.items():
            value = config.get(field, default)
            if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
                raise _reject(field, value, " or ".join(repr(a) for a in allowed))
        cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}

        down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
        # diffusers strips a "UNetRes" prefix from block type names.
        down = tuple(t[7:] if t.startswith("UNetRes") else t for t in down)
        up = tuple(t[7:] if t.startswith("UNetRes") else t for t in up)
        for field, types, allowed in (("down_block_types", down, DOWN_BLOCK_TYPES), ("up_block_types", up,
                                                                                      UP_BLOCK_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise _reject(field, list(cfg[field]), f"block types {list(allowed)}")
        channels = tuple(cfg["block_out_channels"])
        n = len(channels)
        if len(down) != n or len(up) != n:
            raise ConfigError(
                f"unet config.json: down_block_types ({len(down)}), up_block_types ({len(up)}) and "
                f"block_out_channels ({n}) must have the same length"
            )
        only_cross = cfg["only_cross_attention"]
        if (only_cross if isinstance(only_cross, bool) else any(only_cross)):
            raise _reject("only_cross_attention", only_cross, "False")
        cross_dim = cfg["cross_attention_dim"]
        if not isinstance(cross_dim, int) or isinstance(cross_dim, bool):
            raise _reject("cross_attention_dim", cross_dim, "a single int")
        groups = cfg["norm_num_groups"]
        if groups is None:
            raise _reject("norm_num_groups", groups, "an int")
        for field in ("conv_in_kernel", "conv_out_kernel"):
            if cfg[field] % 2 != 1:
                raise _reject(field, cfg[field], "an odd kernel size")
        layers = _per_block(cfg, "layers_per_block", n)
        tlayers = _per_block(cfg, "transformer_layers_per_block", n)
        heads = _per_block(cfg, "attention_head_dim", n)
        for i, (c, h) in enumerate(zip(channels, heads, strict=True)):
            attn_used = down[i] == "CrossAttnDownBlock2D" or up[n - 1 - i] == "CrossAttnUpBlock2D" or i == n - 1
            if attn_used and c % h:
                raise _reject("attention_head_dim", cfg["attention_head_dim"],
                              f"head counts dividing block_out_channels (block {i}: {c} channels, {h} heads)")
            if c % groups:
                raise _reject("norm_num_groups", groups, f"a divisor of every block_out_channels entry ({c})")
        if config.get("addition_embed_type") == "text_time":
            for field in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(cfg[field], int):
                    raise _reject(field, cfg[field], "an int (addition_embed_type 'text_time' needs it)")
        return cls(
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=layers,
            transformer_layers_per_block=tlayers,
            num_heads=heads,
            cross_attention_dim=cross_dim,
            use_linear_projection=bool(cfg["use_linear_projection"]),
            upcast_attention=bool(cfg["upcast_attention"]),
            flip_sin_to_cos=bool(cfg["flip_sin_to_cos"]),
            freq_shift=cfg["freq_shift"],
            norm_num_groups=groups,
            norm_eps=float(cfg["norm_eps"]),
            center_input_sample=bool(cfg["center_input_sample"]),
            mid_block_scale_factor=float(cfg["mid_block_scale_factor"]),
            downsample_padding=int(cfg["downsample_padding"]),
            conv_in_kernel=int(cfg["conv_in_kernel"]),
            conv_out_kernel=int(cfg["conv_out_kernel"]),
            time_embedding_dim=cfg["time_embedding_dim"],
            addition_embed_type=config.get("addition_embed_type"),
            addition_time_embed_dim=cfg["addition_time_embed_dim"] if config.get("addition_embed_type") else None,
            projection_class_embeddings_input_dim=(
                cfg["projection_class_embeddings_input_dim"] if config.get("addition_embed_type") else None
            ),
        )

    def replace(self, **changes: Any) -> UNetConfig:
        return dataclasses.replace(self, **changes)


class _Level(nn.Module):
    """One down block (resnets, optional spatial transformers, optional stride-2 downsampler) or one up block
    (resnets fed with popped skips, optional transformers, optional upsampler), as diffusers builds them."""

    config: UNetConfig
    out_channels: int
    num_layers: int
    has_attention: bool
    heads: int
    transformer_layers: int
    resample: bool
    up: bool
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, skips=None, upsample_size=None):
        cfg = self.config
        resnet_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        outputs = []
        skips = list(skips) if skips is not None else None
        for j in range(self.num_layers):
            if self.up:
                x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = resnet_cls(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, dtype=self.dtype,
                           name=f"resnets_{j}")(x, temb)
            if self.has_attention:
                x = Transformer2DModel(
                    self.heads, self.out_channels // self.heads, num_layers=self.transformer_layers,
                    groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
                    upcast=cfg.upcast_attention, remat=self.remat, dtype=self.dtype, name=f"attentions_{j}",
                )(x, context)
            outputs.append(x)
        if self.resample and self.up:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        elif self.resample:
            x = Downsample2D(self.out_channels, padding=cfg.downsample_padding, dtype=self.dtype,
                             name="downsamplers_0")(x)
            outputs.append(x)
        return x, outputs


class _MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, spatial transformer, resnet; resnets divide by mid_block_scale_factor."""

    config: UNetConfig
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.config
        c, heads = cfg.block_out_channels[-1], cfg.num_heads[-1]
        resnet_cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D

        def resnet(name):
            return resnet_cls(c, cfg.norm_num_groups, cfg.norm_eps, output_scale_factor=cfg.mid_block_scale_factor,
                              dtype=self.dtype, name=name)

        x = resnet("resnets_0")(x, temb)
        x = Transformer2DModel(
            heads, c // heads, num_layers=cfg.transformer_layers_per_block[-1], groups=cfg.norm_num_groups,
            use_linear_projection=cfg.use_linear_projection, upcast=cfg.upcast_attention, remat=self.remat,
            dtype=self.dtype, name="attentions_0",
        )(x, context)
        return resnet("resnets_1")(x, temb)


def _added_cond(added_cond: Any) -> tuple[jax.Array, jax.Array]:
    if added_cond is None:
        raise ConditioningError(
            "this UNet has addition_embed_type 'text_time' (SDXL) and needs added_cond={'text_embeds': [B, P] pooled "
            "text embeddings, 'time_ids': [B, 6] (orig_h, orig_w, crop_top, crop_left, target_h, target_w)}"
        )
    if isinstance(added_cond, Mapping):
        missing = [k for k in ("text_embeds", "time_ids") if k not in added_cond]
        if missing:
            raise ConditioningError(f"added_cond is missing {missing}; SDXL needs both 'text_embeds' and 'time_ids'")
        return added_cond["text_embeds"], added_cond["time_ids"]
    if isinstance(added_cond, Sequence) and len(added_cond) == 2:
        return added_cond[0], added_cond[1]
    raise ConditioningError("added_cond must be a dict with 'text_embeds' and 'time_ids' or a (text_embeds, time_ids) "
                            f"pair, not {type(added_cond).__name__}")


class UNet2DConditionModel(nn.Module):
    """The conditional UNet. `remat=True` rematerialises every resnet and transformer block in the backward pass.

    Call: `(sample [B,H,W,C_in], timesteps [B] or scalar (int or float), encoder_hidden_states [B,T,D],
    added_cond=None | {'text_embeds': [B,P], 'time_ids': [B,6]} | (text_embeds, time_ids))` -> [B,H,W,C_out] in `dtype`.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int | float,
        encoder_hidden_states: jax.Array,
        added_cond: Mapping[str, jax.Array] | tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        cfg = self.config
        b, h, w, _ = sample.shape
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)

        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                   freq_shift=cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="time_embedding")(t_emb)
        if cfg.uses_text_time:
            text_embeds, time_ids = _added_cond(added_cond)
            time_ids = jnp.asarray(time_ids, jnp.float32)
            time_emb = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                          flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
            add = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), time_emb.reshape(b, -1)], axis=-1)
            temb = temb + TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="add_embedding")(add)
        elif added_cond is not None:
            raise ConditioningError("added_cond was given but this UNet's config has no addition_embed_type "
                                    "'text_time'; it would be ignored")

        x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, "conv_in", self.dtype)(x)
        skips = [x]
        n = len(cfg.block_out_channels)
        for i, block_type in enumerate(cfg.down_block_types):
            x, outs = _Level(
                cfg, cfg.block_out_channels[i], cfg.layers_per_block[i], block_type == "CrossAttnDownBlock2D",
                cfg.num_heads[i], cfg.transformer_layers_per_block[i], resample=i < n - 1, up=False,
                remat=self.remat, dtype=self.dtype, name=f"down_blocks_{i}",
            )(x, temb, context)
            skips.extend(outs)

        x = _MidBlock(cfg, remat=self.remat, dtype=self.dtype, name="mid_block")(x, temb, context)

        for i, block_type in enumerate(cfg.up_block_types):
            level = n - 1 - i
            num_layers = cfg.layers_per_block[level] + 1
            block_skips, skips = skips[-num_layers:], skips[:-num_layers]
            # Upsample to the size of the next skip so that odd latent sizes line up, as diffusers does.
            upsample_size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            x, _ = _Level(
                cfg, cfg.block_out_channels[level], num_layers, block_type == "CrossAttnUpBlock2D",
                cfg.num_heads[level], cfg.transformer_layers_per_block[level], resample=i < n - 1, up=True,
                remat=self.remat, dtype=self.dtype, name=f"up_blocks_{i}",
            )(x, temb, context, block_skips, upsample_size)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", self.dtype)(x))
        return conv(cfg.out_channels, cfg.conv_out_kernel, "conv_out", self.dtype)(x)

    def init_params(self, rng: jax.Array, *, height: int = 8, width: int = 8, context_len: int = 77) -> dict:
        """Randomly initialised parameters (for tests and shapes; use jax.eval_shape(...) to get shapes only)."""
        return self.init(rng, *self.dummy_inputs(height=height, width=width, context_len=context_len))["params"]

    def dummy_inputs(self, *, batch: int = 1, height: int = 8, width: int = 8, context_len: int = 77) -> tuple:
        cfg = self.config
        sample = jnp.zeros((batch, height, width, cfg.in_channels), self.dtype)
        context = jnp.zeros((batch, context_len, cfg.cross_attention_dim), self.dtype)
        added = None
        if cfg.uses_text_time:
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {"text_embeds": jnp.zeros((batch, pooled), self.dtype), "time_ids": jnp.zeros((batch, 6))}
        return sample, jnp.zeros((batch,), jnp.int32), context, added
