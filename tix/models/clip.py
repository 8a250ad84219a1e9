"""The CLIP text encoder (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`) in Flax Linen.

Parameter paths mirror transformers' state-dict keys (see `tix.weights.torch_key`), always under ``text_model/`` with
``text_projection`` beside it for the projection variant, so one tree layout serves SD 1.x, SD 2.x and both SDXL
encoders.

Pooled output rule. transformers picks the pooled ("EOS") hidden state in one of two ways, chosen by the config's
``eos_token_id``: configs carrying the legacy value 2 (all SD 1.x/2.x/XL checkpoints) pool at ``argmax(input_ids)``,
which assumes EOS is the largest id in the sequence; other configs pool at the first ``eos_token_id``. Textual
inversion appends placeholder tokens with ids >= the vocabulary size, so under the legacy rule transformers (and
diffusers' SDXL pipelines after ``load_textual_inversion``) pool at the placeholder instead of at EOS. tix deliberately
pools at the true EOS position, the FIRST occurrence of the tokenizer's EOS id (first, because SD 1.x pads with the EOS
id itself). For prompts without placeholder ids both rules agree; with placeholders, SDXL's pooled ``text_embeds``
differ from diffusers' — see `transformers_pool_positions` to reproduce diffusers exactly when comparing.

Not implemented: transformers' optional padding ``attention_mask``. diffusers' SD 1.x/2.x/XL pipelines call the text
encoder without one (causal attention only), and tix matches that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tix.errors import ConfigError
from tix.models.attention import attention
from tix.models.shapes import param_shapes
from tix.weights import from_torch

# Buffers some checkpoints carry that are not parameters: `position_ids` is an arange that older transformers
# versions saved in the state dict (transformers 5 no longer persists it).
TORCH_IGNORE: tuple[str, ...] = (r"(text_model\.)?embeddings\.position_ids",)

# Where the [vocab_size, hidden_size] token table lives in the parameter tree (without the "params" collection).
TOKEN_TABLE_PATH: tuple[str, ...] = ("text_model", "embeddings", "token_embedding", "embedding")

_ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}

# transformers' names for the activations tix implements. "gelu" there is the exact (erf) GELU; gelu_new,
# gelu_pytorch_tanh and gelu_fast are all the tanh approximation, written differently but the same function.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
}

# config.json fields that do not change the text encoder's forward pass: metadata, initialisation, the special token
# ids other than EOS (which only the tokenizer uses), and fields of transformers' generic PretrainedConfig. Fields that
# are neither here nor read by `from_diffusers` are ignored as well: transformers' CLIP text code reads no others.
IGNORED_FIELDS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "_attn_implementation_autoset",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "initializer_factor",
        "initializer_range",
        "bos_token_id",
        "pad_token_id",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "torchscript",
        "tie_word_embeddings",
        "id2label",
        "label2id",
    }
)

# The CLIP BPE's <|endoftext|> is the last vocabulary entry (49407 of 49408); configs with the legacy
# eos_token_id 2 do not say so, but the tokenizer that ships with them does.
_LEGACY_EOS_TOKEN_ID = 2


def check_transformer_config(cfg: Any, what: str, more_sizes: tuple[str, ...] = ()) -> None:
    """The checks every CLIP tower's config shares (text and vision): a supported activation, positive integer sizes
    (the tower's own in `more_sizes` too) and a width the heads divide. `what` names the config in the error."""
    if cfg.hidden_act not in _ACTIVATIONS:
        raise ConfigError(f"{what}: hidden_act={cfg.hidden_act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", *more_sizes):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{what}: {name}={value!r} must be a positive integer")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"{what}: hidden_size={cfg.hidden_size} is not divisible by "
                          f"num_attention_heads={cfg.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The computation-relevant part of a transformers CLIPTextConfig config.json."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    with_projection: bool = False
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        check_transformer_config(self, "text encoder config", ("vocab_size", "max_position_embeddings",
                                                               "projection_dim"))
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"text encoder config: layer_norm_eps={self.layer_norm_eps!r} must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def pool_token_id(self) -> int:
        """The id tix pools at by default: the config's eos_token_id, or, for the legacy value 2 (not the EOS in the
        CLIP BPE), the last vocabulary id, where CLIP's <|endoftext|> lives. Pass the
        tokenizer's `eos_token_id` to the model explicitly when in doubt."""
        if self.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            return self.vocab_size - 1
        return self.eos_token_id

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> CLIPTextConfig:
        """Validate and read a text_encoder/config.json (transformers CLIPTextConfig) dict.

        Raises ConfigError, naming the field and value, for anything that would change the computation in a way tix
        does not implement: an architecture other than CLIPTextModel / CLIPTextModelWithProjection, an unknown
        hidden_act, nonzero dropout (transformers applies it while training the text encoder).
        """
        model_type = cfg.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ConfigError(
                f"text encoder config: model_type={model_type!r} is not supported; expected 'clip_text_model' "
                "(a CLIPTextConfig as written for CLIPTextModel or CLIPTextModelWithProjection)"
            )
        architectures = cfg.get("architectures")
        if not architectures or len(architectures) != 1 or architectures[0] not in _ARCHITECTURES:
            raise ConfigError(
                f"text encoder config: architectures={architectures!r} is not supported; expected one of "
                f"{[[a] for a in _ARCHITECTURES]}"
            )
        for field in ("attention_dropout", "dropout"):
            value = cfg.get(field, 0.0)
            if value not in (0, 0.0, None):
                raise ConfigError(
                    f"text encoder config: {field}={value!r} is not supported; tix runs the text encoder without "
                    "dropout, so only 0.0 gives the same computation"
                )
        defaults = cls()
        kwargs = {
            f.name: cfg.get(f.name, getattr(defaults, f.name))
            for f in dataclasses.fields(cls)
            if f.name != "with_projection"
        }
        if cfg.get("eos_token_id") is None:
            kwargs["eos_token_id"] = defaults.eos_token_id
        return cls(**kwargs, with_projection=_ARCHITECTURES[architectures[0]])


@flax.struct.dataclass
class CLIPTextOutput:
    """What the text encoder returns (a pytree, so it passes through jit).

    last_hidden_state: [B, T, D] after the final layer norm (what SD 1.x/2.x UNets consume).
    pooled: [B, D] the final-layer-normed hidden state at the EOS position.
    text_embeds: [B, projection_dim] `pooled` through text_projection (with_projection models only, else None).
    hidden_states: with output_hidden_states, a tuple of num_hidden_layers + 1 arrays [B, T, D]: the embeddings
        output, then each layer's output (no final layer norm; SDXL conditions on hidden_states[-2]), else None.
    """

    last_hidden_state: jax.Array
    pooled: jax.Array
    text_embeds: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


def embed_tokens(table: jax.Array, ids: jax.Array, extra: jax.Array | None = None) -> jax.Array:
    """Token embeddings [*ids.shape, D]: rows of `table` [V, D] for ids < V, rows of `extra` [n_extra, D] (the learned
    placeholder vectors) for ids >= V, row `ids - V`.

    Selects with two gathers and `jnp.where` instead of indexing `concatenate([table, extra])`: the concatenation would
    materialise a fresh copy of the whole 49408 x D table (150 MB at D=768 in fp32, more for SDXL) on every training
    step just to add a few rows, and its gradient would be a table-sized buffer too. Here only [B, T, D] arrays are
    built, and gradients reach `extra` at the positions that use it. Ids outside [0, V + n_extra) are clamped.
    """
    vocab = table.shape[0]
    base = jnp.take(table, jnp.clip(ids, 0, vocab - 1), axis=0)
    if extra is None or extra.shape[0] == 0:
        return base
    dtype = jnp.result_type(table.dtype, extra.dtype)
    learned = jnp.take(extra, jnp.clip(ids - vocab, 0, extra.shape[0] - 1), axis=0)
    return jnp.where((ids >= vocab)[..., None], learned.astype(dtype), base.astype(dtype))


def eos_positions(ids: jax.Array, eos_id: int) -> jax.Array:
    """Index of the FIRST `eos_id` in each row of `ids` [B, T] (0 for a row without one, as transformers does).

    First, not last: SD 1.x tokenizers pad with the EOS id itself, so every padding position is an EOS too.
    """
    return jnp.argmax(ids == eos_id, axis=-1)


_first_eos = eos_positions  # CLIPTextModel.__call__ has an argument of that name


def transformers_pool_positions(ids: jax.Array, config_eos_token_id: int) -> jax.Array:
    """The positions transformers' CLIPTextModel pools at, for comparing with diffusers: `argmax(ids)` when the
    config has the legacy eos_token_id 2 (lands on a placeholder id >= vocab size if there is one), else the first
    `config_eos_token_id`. tix itself pools with `eos_positions`."""
    if config_eos_token_id == _LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(ids, axis=-1)
    return eos_positions(ids, config_eos_token_id)


def token_table(params: Mapping[str, Any]) -> jax.Array:
    """The [vocab_size, D] token table inside `params` (with or without the outer "params" collection); no copy."""
    node = params.get("params", params)
    for name in TOKEN_TABLE_PATH:
        node = node[name]
    return node


class _Table(nn.Module):
    """A bare embedding table, so the token table can be read by the parent (nn.Embed only offers lookups)."""

    rows: int
    features: int
    stddev: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("embedding", nn.initializers.normal(self.stddev), (self.rows, self.features),
                          self.param_dtype)


class _SelfAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    causal: bool = True  # the text tower is causal; the vision tower (tix.models.clip_vision) attends both ways

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        split = lambda t: t.reshape(*t.shape[:-1], cfg.num_attention_heads, cfg.head_dim)
        q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, causal=self.causal)
        return dense("out_proj")(out.reshape(*out.shape[:-2], cfg.hidden_size))


class _MLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = _ACTIVATIONS[cfg.hidden_act](x)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


def _layer_norm(config: CLIPTextConfig, dtype: Any, param_dtype: Any, name: str | None = None) -> nn.LayerNorm:
    # Two-pass variance: CLIP's residual stream has large-magnitude channels, where E[x^2] - E[x]^2 loses precision.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class _EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + _SelfAttention(self.config, **kw, causal=self.causal, name="self_attn")(
            _layer_norm(self.config, self.dtype, self.param_dtype, "layer_norm1")(x)
        )
        return x + _MLP(self.config, **kw, name="mlp")(
            _layer_norm(self.config, self.dtype, self.param_dtype, "layer_norm2")(x)
        )


class _Encoder(nn.Module):
    """The stack of pre-norm transformer layers both CLIP towers share (their configs name the same fields)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        outputs = [x]
        for i in range(self.config.num_hidden_layers):
            x = _EncoderLayer(self.config, self.dtype, self.param_dtype, self.causal, name=f"layers_{i}")(x)
            outputs.append(x)
        return outputs


class _Embeddings(nn.Module):
    config: CLIPTextConfig
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        # Same initial scales as transformers (only matters for tests that init randomly).
        self.token_embedding = _Table(cfg.vocab_size, cfg.hidden_size, 0.02, self.param_dtype)
        self.position_embedding = _Table(cfg.max_position_embeddings, cfg.hidden_size, 0.01, self.param_dtype)

    def table(self) -> jax.Array:
        return self.token_embedding()

    def __call__(self, token_embeds: jax.Array) -> jax.Array:
        length = token_embeds.shape[-2]
        return token_embeds + self.position_embedding()[:length].astype(token_embeds.dtype)


class _TextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embeddings = _Embeddings(self.config, self.param_dtype)
        self.encoder = _Encoder(self.config, self.dtype, self.param_dtype)
        self.final_layer_norm = _layer_norm(self.config, self.dtype, self.param_dtype)

    def table(self) -> jax.Array:
        return self.embeddings.table()

    def __call__(self, token_embeds: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        states = self.encoder(self.embeddings(token_embeds))
        return self.final_layer_norm(states[-1]), states


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection when `config.with_projection`.

    Attributes:
        config: the model's CLIPTextConfig.
        dtype: computation dtype (float32, bfloat16, float16).
        param_dtype: dtype of freshly initialised parameters (loaded parameters keep the dtype they were loaded in).
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.text_model = _TextTransformer(self.config, self.dtype, self.param_dtype)
        if self.config.with_projection:
            self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                            param_dtype=self.param_dtype)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        extra_embeddings: jax.Array | None = None,
        eos_positions: jax.Array | None = None,
        eos_token_id: int | None = None,
        output_hidden_states: bool = False,
    ) -> CLIPTextOutput:
        """Encode a batch of token sequences (causal self-attention, no padding mask, as diffusers calls it).

        Args:
            input_ids: [B, T] int token ids, T <= max_position_embeddings. Ids >= vocab_size select rows of
                `extra_embeddings`. With `inputs_embeds` they are only used to find the EOS positions.
            inputs_embeds: [B, T, D] token embeddings (without position embeddings) used instead of looking up
                `input_ids`, e.g. `embed_tokens(token_table(params), ids, learned)` built by the caller.
            extra_embeddings: [n_extra, D] vectors for ids >= vocab_size (see `embed_tokens`); needs `input_ids`.
            eos_positions: [B] positions to pool at. Default: first `eos_token_id` in `input_ids`; required when
                only `inputs_embeds` is given.
            eos_token_id: the tokenizer's EOS id; default `config.pool_token_id`.
            output_hidden_states: also return every layer's output (static; costs memory, so off by default).
        """
        cfg = self.config
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("CLIPTextModel needs input_ids or inputs_embeds")
            inputs_embeds = embed_tokens(self.text_model.table(), input_ids, extra_embeddings)
        elif extra_embeddings is not None:
            raise ValueError("extra_embeddings only apply to input_ids; build inputs_embeds with embed_tokens instead")
        length = inputs_embeds.shape[-2]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        if eos_positions is None:
            if input_ids is None:
                raise ValueError("with only inputs_embeds, pass eos_positions (see tix.models.clip.eos_positions)")
            eos_positions = _first_eos(input_ids, cfg.pool_token_id if eos_token_id is None else eos_token_id)
        last, states = self.text_model(inputs_embeds.astype(self.dtype))
        pooled = jnp.take_along_axis(last, eos_positions[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return CLIPTextOutput(
            last_hidden_state=last,
            pooled=pooled,
            text_embeds=self.text_projection(pooled) if cfg.with_projection else None,
            hidden_states=tuple(states) if output_hidden_states else None,
        )

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        """Randomly initialised parameters without the "params" collection (wrap in jax.eval_shape for shapes only)."""
        return self.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def normalize_torch_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """State-dict keys as tix's parameter tree names them: ``text_model.``-prefixed.

    Checkpoints on the Hub (and everything transformers < 5 saved) prefix CLIPTextModel keys with ``text_model.``;
    transformers 5 builds CLIPTextModel without that level and saves its keys unprefixed (``embeddings....``,
    ``encoder.layers.0....``), so diffusers pipelines saved today carry the short form. CLIPTextModelWithProjection
    keeps ``text_model.`` in both.
    """
    if any(k.startswith("text_model.") for k in state_dict):
        return dict(state_dict)
    return {k if k.startswith("text_projection.") else f"text_model.{k}": v for k, v in state_dict.items()}


def abstract_params(config: CLIPTextConfig, param_dtype: Any = jnp.float32) -> dict[str, Any]:
    """ShapeDtypeStructs of the model's parameter tree (without the "params" collection), at no memory cost."""
    return param_shapes(CLIPTextModel(config, param_dtype=param_dtype))


def load_params(
    state_dict: Mapping[str, np.ndarray],
    config: CLIPTextConfig,
    *,
    dtype: Any = np.float32,
    component: str = "text_encoder",
) -> dict[str, Any]:
    """The parameter tree (without the "params" collection) from a transformers state dict, strictly: every tensor
    must be used and every parameter found, except the `TORCH_IGNORE` buffers. Either key layout is accepted (see
    `normalize_torch_keys`). Apply with ``model.apply({"params": tree}, ids)``."""
    return from_torch(normalize_torch_keys(state_dict), abstract_params(config), dtype=dtype, component=component,
                      ignore=TORCH_IGNORE)
