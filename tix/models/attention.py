"""Scaled dot-product attention shared by the text encoder, the UNet and the VAE."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _implementation(q: jax.Array, k: jax.Array) -> str:
    """cuDNN's fused (flash) attention where it applies, else XLA's.

    `jax.nn.dot_product_attention` with no implementation named uses XLA's, which materialises the full
    [batch, heads, length, length] logits: at SD 1.5's 64 x 64 latents that is 4096 x 4096 per head, the largest
    tensor of the train step and a large share of its time. cuDNN's kernel needs a GPU, half precision, a head
    width that is a multiple of 8 up to 128 (SD's 40, 64 and 80 all are) and, for its backward, even sequence
    lengths: so the UNet's self-attention takes it, while cross-attention to CLIP's 77 tokens (small logits) and
    the text encoder stay on XLA.
    """
    head_dim, length = q.shape[-1], q.shape[1]
    if (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128 and k.shape[1] == length and length % 2 == 0):
        return "cudnn"
    return "xla"


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """Attention as two batched matmuls over heads-major operands.

    The same arithmetic as `jax.nn.dot_product_attention(implementation="xla")` (float32 logits and softmax,
    probabilities cast back to the value dtype), but with q, k and v moved to [batch, heads, length, head_dim]
    first: XLA:CPU runs the [batch, length, heads, head_dim] contractions that function emits as strided dots about
    twice as slowly (a UNet forward at 32 x 32 latents: 38 ms against 16 ms), and the transposes are cheap.
    """
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    if causal:
        t, s = logits.shape[-2:]
        logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, v), 1, 2)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    upcast: bool = False,
) -> jax.Array:
    """Multi-head attention on [batch, length, heads, head_dim] arrays.

    `upcast` computes in float32, which SD 2.x's `upcast_attention` asks for because its logits overflow in half
    precision (and so never takes the cuDNN path).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if _implementation(q, k) == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn").astype(dtype)
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # an older cuDNN or an unsupported shape: XLA's attention computes the same thing
    return _xla_attention(q, k, v, causal).astype(dtype)
