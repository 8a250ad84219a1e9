"""Building blocks shared by the UNet and the VAE, NHWC, named after diffusers' PyTorch attributes.

Submodule names are the PyTorch attribute names (list members as ``name_<i>``) so `tix.weights` maps every parameter to
its diffusers state-dict key without a rename table.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tix.models.attention import attention
from tix.models.convolution import conv_general_dilated

Dtype = Any


def group_norm(groups: int, eps: float, name: str, dtype: Dtype = jnp.float32) -> nn.GroupNorm:
    """GroupNorm over the channel (last) axis, as torch.nn.GroupNorm on NCHW.

    The two-pass variance is used because VAE decoder activations reach magnitudes where E[x^2] - E[x]^2 loses
    digits in float32.
    """
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def layer_norm(eps: float, name: str, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, padding: int | None = None) -> nn.Conv:
    """A square conv with symmetric explicit padding (default: 'same' for odd kernels, as diffusers' (k - 1) // 2)."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)), dtype=dtype, name=name,
        conv_general_dilated=conv_general_dilated,
    )


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding [N, dim] (float32) of N (possibly fractional) timesteps, as diffusers' Timesteps.

    Frequencies are exp(-log(max_period) * i / (dim/2 - freq_shift)); the halves are ordered [cos, sin] when
    `flip_sin_to_cos`, else [sin, cos]; an odd `dim` gets a trailing zero.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding with act_fn silu and no post activation)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x.astype(self.dtype))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with the time embedding added between, plus a 1x1 shortcut when channels change.

    `temb=None` builds no `time_emb_proj` (the VAE's resnets).
    """

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", self.dtype)(x))
        h = conv(self.out_channels, 3, "conv1", self.dtype)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", self.dtype)(h))
        h = conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=0` means diffusers' asymmetric (0, 1, 0, 1) pad (the VAE encoder)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, "conv", self.dtype, stride=2, padding=self.padding)(x)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour upsampling of NHWC `x`: 2x, or to `size` with torch's index rule floor(dst * in / out)."""
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    out_h, out_w = size
    # torch computes the scale in float32 and floors dst * scale; np.float32 reproduces its rounding.
    rows = np.minimum(np.floor(np.arange(out_h, dtype=np.float32) * np.float32(h / out_h)).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(out_w, dtype=np.float32) * np.float32(w / out_w)).astype(np.int64), w - 1)
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """Nearest 2x (or to `output_size`) upsampling followed by a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        return conv(self.out_channels, 3, "conv", self.dtype)(upsample_nearest(x, output_size))


class Attention(nn.Module):
    """diffusers' Attention as BasicTransformerBlock uses it: bias-free q/k/v, biased to_out.0, `heads` x `dim_head`."""

    heads: int
    dim_head: int
    upcast: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head

        def project(name: str, inp: jax.Array) -> jax.Array:
            y = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(inp)
            return y.reshape(*y.shape[:-1], self.heads, self.dim_head)

        out = attention(project("to_q", x), project("to_k", context), project("to_v", context), upcast=self.upcast)
        out = out.reshape(*out.shape[:-2], inner)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """proj to 2 * inner, then value * gelu(gate) with the exact (erf) GELU as torch's F.gelu."""

    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """net.0 = GEGLU(dim -> 4 dim), net.1 = dropout (0, no params), net.2 = Linear back to dim."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text context, GEGLU feed-forward, each residual."""

    heads: int
    dim_head: int
    upcast: bool = False
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def attn(name: str) -> Attention:
            return Attention(self.heads, self.dim_head, upcast=self.upcast, dtype=self.dtype, name=name)

        x = attn("attn1")(layer_norm(self.eps, "norm1", self.dtype)(x)) + x
        x = attn("attn2")(layer_norm(self.eps, "norm2", self.dtype)(x), context) + x
        return FeedForward(dtype=self.dtype, name="ff")(layer_norm(self.eps, "norm3", self.dtype)(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm (eps 1e-6), proj_in (1x1 conv, or Linear for SD 2.x/XL), `num_layers`
    BasicTransformerBlocks over the H*W tokens, proj_out, residual."""

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = group_norm(self.groups, 1e-6, "norm", self.dtype)(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = conv(inner, 1, "proj_in", self.dtype)(x).reshape(b, h * w, inner)
        block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            x = block_cls(self.heads, self.dim_head, upcast=self.upcast, dtype=self.dtype,
                          name=f"transformer_blocks_{i}")(x, context)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, "proj_out", self.dtype)(x.reshape(b, h, w, inner))
        return x + residual
