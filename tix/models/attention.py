"""Scaled dot-product attention shared by the text encoder, the UNet and the VAE."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    upcast: bool = False,
) -> jax.Array:
    """Multi-head attention on [batch, length, heads, head_dim] arrays.

    Goes through `jax.nn.dot_product_attention` so XLA picks a fused kernel on GPU/TPU (cuDNN flash attention on
    Hopper for bf16/fp16). `upcast` computes in float32, which SD 2.x's `upcast_attention` asks for because its
    logits overflow in half precision.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
    return out.astype(dtype)
