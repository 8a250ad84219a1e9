"""CLIP's image tower and the joint model (transformers' `CLIPVisionTransformer` and `CLIPModel`) in Flax Linen.

The vision tower is a ViT: a stride-`patch_size` convolution cuts the image into patch tokens, a learned class token
goes first, then position embeddings, a layer norm (transformers spells it ``pre_layrnorm``), the same pre-norm
transformer layers as the text tower but without the causal mask, and the class token's final state through
``post_layernorm`` is the pooled output. `CLIPModel` pairs it with the text tower of `tix.models.clip`; both project
into the shared embedding space, where CLIP scores are cosine similarities.

Parameter paths mirror transformers' `CLIPModel` state-dict keys (``vision_model.*``, ``text_model.*``,
``visual_projection``, ``text_projection``, ``logit_scale``), so `tix.weights.from_torch` converts them unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tix.errors import ConfigError
from tix.models import clip
from tix.models.shapes import param_shapes
from tix.weights import from_torch

# Buffers CLIPModel checkpoints carry that are not parameters (older transformers saved them).
TORCH_IGNORE: tuple[str, ...] = (r"(text|vision)_model\.embeddings\.position_ids",)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The computation-relevant part of a transformers CLIPVisionConfig (`vision_config` of a CLIPModel config).
    Defaults are ViT-B/32's."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        clip.check_transformer_config(self, "vision config", ("num_channels", "image_size", "patch_size"))
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision config: image_size={self.image_size} is not a multiple of "
                              f"patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any]) -> CLIPVisionConfig:
        for field in ("attention_dropout", "dropout"):
            if cfg.get(field, 0.0) not in (0, 0.0, None):
                raise ConfigError(f"vision config: {field}={cfg[field]!r} is not supported; tix runs CLIP without "
                                  "dropout")
        defaults = cls()
        return cls(**{f.name: cfg.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A transformers CLIPModel config.json: both towers and the shared embedding width."""

    text: clip.CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any]) -> CLIPConfig:
        """Validate and read a CLIPModel config.json dict (the openai/clip-vit-* layout)."""
        architectures = cfg.get("architectures") or ["CLIPModel"]
        if cfg.get("model_type", "clip") != "clip" or architectures != ["CLIPModel"]:
            raise ConfigError(
                f"CLIP config: model_type={cfg.get('model_type')!r}, architectures={architectures!r}; tix.load_clip "
                "reads transformers CLIPModel folders (model_type 'clip', e.g. openai/clip-vit-base-patch32)"
            )
        projection_dim = cfg.get("projection_dim", 512)
        # The towers' sub-configs predate the architectures field; the joint model's projection width is the one
        # the text tower projects to.
        text_raw = {**(cfg.get("text_config") or {}), "model_type": "clip_text_model",
                    "architectures": ["CLIPTextModelWithProjection"], "projection_dim": projection_dim}
        return cls(clip.CLIPTextConfig.from_diffusers(text_raw),
                   CLIPVisionConfig.from_transformers(cfg.get("vision_config") or {}), projection_dim)


class _VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        patches = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
                          padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="patch_embedding")(pixels.astype(self.dtype))
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)
        cls_token = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), self.param_dtype)
        cls_token = jnp.broadcast_to(cls_token.astype(self.dtype), (patches.shape[0], 1, cfg.hidden_size))
        tokens = jnp.concatenate([cls_token, patches], axis=1)
        positions = clip._Table(cfg.num_positions, cfg.hidden_size, 0.02, self.param_dtype,
                                name="position_embedding")()
        return tokens + positions.astype(self.dtype)


class CLIPVisionTransformer(nn.Module):
    """transformers' CLIPVisionTransformer: normalised NHWC pixels -> pooled [B, hidden_size] (post_layernorm of the
    class token)."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        size = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixels.shape[1:]) != size:
            raise ValueError(f"the vision tower takes [B, {size[0]}, {size[1]}, {size[2]}] pixels, got "
                             f"{tuple(pixels.shape)}; preprocess the images first")
        x = _VisionEmbeddings(cfg, **kw, name="embeddings")(pixels)
        x = clip._layer_norm(cfg, self.dtype, self.param_dtype, "pre_layrnorm")(x)
        x = clip._Encoder(cfg, self.dtype, self.param_dtype, causal=False, name="encoder")(x)[-1]
        return clip._layer_norm(cfg, self.dtype, self.param_dtype, "post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
    """transformers' CLIPModel: `image_features` and `text_features` are its get_image_features and
    get_text_features (projected, not normalised)."""

    config: CLIPConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = clip._TextTransformer(cfg.text, **kw)
        self.vision_model = CLIPVisionTransformer(cfg.vision, **kw)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, **kw)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, **kw)
        # exp(logit_scale) is CLIP's softmax temperature; kept so every tensor of a checkpoint has its parameter.
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.param_dtype)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """Normalised pixels [B, S, S, 3] (see `tix.clip_model.preprocess`) -> [B, projection_dim]."""
        return self.visual_projection(self.vision_model(pixels))

    def text_features(self, ids: jax.Array, eos_token_id: int | None = None) -> jax.Array:
        """Token ids [B, T] -> [B, projection_dim], pooled at each row's first EOS (the tokenizer's EOS id; default
        the config's, see `tix.models.clip.CLIPTextConfig.pool_token_id`)."""
        eos = self.config.text.pool_token_id if eos_token_id is None else eos_token_id
        last, _ = self.text_model(clip.embed_tokens(self.text_model.table(), ids).astype(self.dtype))
        pooled = jnp.take_along_axis(last, clip.eos_positions(ids, eos)[:, None, None], axis=1)[:, 0]
        return self.text_projection(pooled)

    def __call__(self, pixels: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.image_features(pixels), self.text_features(ids)

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        """Randomly initialised parameters without the "params" collection (wrap in jax.eval_shape for shapes)."""
        size = self.config.vision.image_size
        pixels = jnp.zeros((1, size, size, self.config.vision.num_channels), jnp.float32)
        return self.init(rng, pixels, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(config: CLIPConfig, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """ShapeDtypeStructs of the parameter tree, at no memory cost."""
    return param_shapes(CLIPModel(config, param_dtype=param_dtype))


def load_params(state_dict: Mapping[str, np.ndarray], config: CLIPConfig, *, dtype: Any = np.float32,
                component: str = "clip") -> dict[str, Any]:
    """The parameter tree from a transformers CLIPModel state dict, strictly (every tensor used, every parameter
    found, except the `TORCH_IGNORE` buffers)."""
    return from_torch(state_dict, abstract_params(config), dtype=dtype, component=component, ignore=TORCH_IGNORE)
