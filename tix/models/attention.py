"""Scaled dot-product attention shared by the text encoder, the UNet and the VAE."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from tix.models import platform

# Blocked attention's rows per block are chosen so a block's float32 logits take about this many bytes: small enough
# to stay in a CPU's cache between the matmul, the softmax and the second matmul, large enough that the loop over
# blocks costs nothing.
BLOCK_BYTES = 2**22
# Below this many keys the whole [length, length] logits fit in cache anyway and one pass is faster.
BLOCKED_MIN_KEYS = 512
# Fewer rows than this per block and the loop's per-iteration cost outweighs the cache (large batches at 4096 keys).
MIN_BLOCK_ROWS = 64


def _implementation(q: jax.Array, k: jax.Array, causal: bool = False) -> str:
    """cuDNN's fused (flash) attention where it applies, blocked attention for long self-attention on a CPU, else
    XLA's.

    `jax.nn.dot_product_attention` with no implementation named uses XLA's, which materialises the full
    [batch, heads, length, length] logits: at SD 1.5's 64 x 64 latents that is 4096 x 4096 per head, the largest
    tensor of the train step and a large share of its time. cuDNN's kernel needs a GPU, half precision, a head
    width that is a multiple of 8 up to 128 (SD's 40, 64 and 80 all are) and, for its backward, even sequence
    lengths: so the UNet's self-attention takes it, while cross-attention to CLIP's 77 tokens (small logits) and
    the text encoder stay on XLA.

    On a CPU the UNet's long self-attention is memory-bound: XLA writes and re-reads the whole logits several times
    per pass, and its autodiff of softmax several more (the backward took 5x the forward at 1024 positions). The
    blocked form (`_blocked_attention`) keeps each block of logits in cache and was 1.5-2x faster forward and
    backward at 1024 and 4096 positions; TPUs and GPUs fuse the plain form well, so they keep it.
    """
    head_dim, length = q.shape[-1], q.shape[1]
    backend = platform.backend()
    if (backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128 and k.shape[1] == length and length % 2 == 0):
        return "cudnn"
    if backend == "cpu" and not causal and k.shape[1] >= BLOCKED_MIN_KEYS and _block_rows(q, k) < length:
        return "blocked"
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


def _block_rows(q: jax.Array, k: jax.Array) -> int:
    """Query rows per block: the largest divisor of the query length whose float32 logits (batch x heads x rows x
    keys) fit in `BLOCK_BYTES`, or up to `MIN_BLOCK_ROWS` rows where even that does not fit."""
    batch, length, heads, _ = q.shape
    budget = max(BLOCK_BYTES // (4 * batch * heads * k.shape[1]), MIN_BLOCK_ROWS)
    return max(d for d in range(1, min(budget, length) + 1) if length % d == 0)


def _split_rows(x: jax.Array, n: int) -> jax.Array:
    """[b, h, L, d] -> [n, b, h, L / n, d]: n blocks of consecutive rows."""
    b, h, length, d = x.shape
    return jnp.moveaxis(x.reshape(b, h, n, length // n, d), 2, 0)


def _join_rows(x: jax.Array) -> jax.Array:
    n, b, h, rows, d = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(b, h, n * rows, d)


def _blocked_forward(q: jax.Array, k: jax.Array, v: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Heads-major attention [b, h, L, d] in n blocks of query rows; also the log-sum-exp of each row's logits
    [n, b, h, L / n], all the backward needs to rebuild the probabilities."""
    scale = q.shape[-1] ** -0.5

    def block(qb):
        logits = jnp.einsum("bhqd,bhkd->bhqk", qb, k, preferred_element_type=jnp.float32) * scale
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)
        total = jnp.sum(e, axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", (e / total).astype(v.dtype), v)
        return out, (top + jnp.log(total))[..., 0]

    out, lse = jax.lax.map(block, _split_rows(q, n))
    return _join_rows(out), lse


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, n: int) -> jax.Array:
    """Softmax attention over heads-major [b, h, L, d] operands, computed n blocks of query rows at a time, forward
    and backward (the flash-attention recurrence without its online softmax: every block sees all keys, so each
    row's softmax is exact in one pass). The backward recomputes a block's probabilities from the saved log-sum-exp
    rather than keeping the [L, L] probabilities, and applies softmax's derivative in closed form."""
    return _blocked_forward(q, k, v, n)[0]


def _blocked_fwd(q, k, v, n):
    out, lse = _blocked_forward(q, k, v, n)
    return out, (q, k, v, out, lse)


def _blocked_bwd(n, residuals, d_out):
    q, k, v, out, lse = residuals
    scale = q.shape[-1] ** -0.5
    # Row i's sum over j of p_ij dp_ij, which softmax's derivative subtracts: equal to d_out_i . out_i.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def block(carry, xs):
        dk, dv = carry
        qb, dob, lse_b, delta_b = xs
        # In the transposed [keys, rows] layout, so the two products summed over the block's rows (dk, dv) contract
        # their operands' last axes: XLA:CPU runs a product contracting a leading axis on a slow generic kernel.
        logits_t = jnp.einsum("bhkd,bhqd->bhkq", k, qb, preferred_element_type=jnp.float32) * scale
        p_t = jnp.exp(logits_t - lse_b[..., None, :])
        dv = dv + jnp.einsum("bhkq,bhqd->bhkd", p_t.astype(v.dtype), dob, preferred_element_type=jnp.float32)
        dp_t = jnp.einsum("bhkd,bhqd->bhkq", v, dob, preferred_element_type=jnp.float32)
        ds_t = (p_t * (dp_t - delta_b[..., None, :]) * scale).astype(q.dtype)
        dq = jnp.einsum("bhkq,bhkd->bhqd", ds_t, k)
        dk = dk + jnp.einsum("bhkq,bhqd->bhkd", ds_t, qb, preferred_element_type=jnp.float32)
        return (dk, dv), dq

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(block, zeros, (_split_rows(q, n), _split_rows(d_out, n), lse,
                                               _split_rows(delta[..., None], n)[..., 0]))
    return _join_rows(dq), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)


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
    implementation = _implementation(q, k, causal)
    if implementation == "blocked":
        n = q.shape[1] // _block_rows(q, k)
        heads_major = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        return jnp.swapaxes(_blocked_attention(*heads_major, n), 1, 2).astype(dtype)
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn").astype(dtype)
        except (RuntimeError, ValueError, NotImplementedError):
            pass  # an older cuDNN or an unsupported shape: XLA's attention computes the same thing
    return _xla_attention(q, k, v, causal).astype(dtype)
