"""The blocked attention a CPU uses for long self-attention computes what the one-pass form does, values and
gradients, and is chosen only where it applies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tix.models import attention as A
from tix.models import platform


def _qkv(shape, keys, dtype, seed=0):
    rng = np.random.default_rng(seed)
    b, _, h, d = shape
    q = rng.standard_normal(shape) * 2  # logits spread wide enough that the softmax is far from uniform
    k, v = (rng.standard_normal((b, keys, h, d)) for _ in range(2))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _both(q, k, v, weights):
    """(blocked, one-pass) of: the output, and the gradients of sum(output * weights) in q, k and v."""

    def run(impl):
        def loss(q, k, v):
            return jnp.sum(impl(q, k, v).astype(jnp.float32) * weights)

        out = jax.jit(impl)(q, k, v)
        return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    n = q.shape[1] // A._block_rows(q, k)
    assert n > 1, "the shape must make more than one block"

    def blocked(q, k, v):
        hm = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
        return jnp.swapaxes(A._blocked_attention(*hm, n), 1, 2)

    return run(blocked), run(lambda q, k, v: A._xla_attention(q, k, v, False))


@pytest.mark.parametrize("shape,keys", [((1, 1024, 4, 8), 1024), ((2, 576, 3, 16), 576), ((1, 640, 2, 40), 1280)])
def test_blocked_matches_one_pass_in_float32(shape, keys, monkeypatch):
    monkeypatch.setattr(A, "BLOCK_BYTES", 2**18)  # several blocks even at these small shapes
    q, k, v = _qkv(shape, keys, jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    (out_b, grads_b), (out_x, grads_x) = _both(q, k, v, weights)
    np.testing.assert_allclose(out_b, out_x, atol=2e-6, rtol=2e-6)
    for gb, gx, name in zip(grads_b, grads_x, "qkv", strict=True):
        scale = float(jnp.max(jnp.abs(gx)))
        assert float(jnp.max(jnp.abs(gb - gx))) <= 1e-5 * scale, f"d{name}"


def test_blocked_matches_one_pass_in_bfloat16(monkeypatch):
    monkeypatch.setattr(A, "BLOCK_BYTES", 2**18)
    shape = (1, 1024, 4, 16)
    q, k, v = _qkv(shape, 1024, jnp.bfloat16)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    (out_b, grads_b), (out_x, grads_x) = _both(q, k, v, weights)
    assert out_b.dtype == jnp.bfloat16 and grads_b[0].dtype == jnp.bfloat16
    ref = np.asarray(out_x, np.float32)
    assert np.abs(np.asarray(out_b, np.float32) - ref).max() <= 2e-2 * np.abs(ref).max()
    for gb, gx in zip(grads_b, grads_x, strict=True):
        gx = np.asarray(gx, np.float32)
        assert np.abs(np.asarray(gb, np.float32) - gx).max() <= 3e-2 * np.abs(gx).max()


def test_blocked_chosen_for_long_self_attention_on_cpu_only(monkeypatch):
    def impl(t, s, d=8, heads=4, causal=False):
        return A._implementation(jnp.zeros((1, t, heads, d)), jnp.zeros((1, s, heads, d)), causal)

    monkeypatch.setattr(A.jax, "default_backend", lambda: "cpu")
    assert impl(1024, 1024) == "blocked"  # 16 MB of logits: the UNet's self-attention at 32 x 32 latents
    assert impl(4096, 4096, d=40) == "blocked"
    assert impl(1024, 77) == "xla"  # cross-attention to CLIP's tokens: small logits
    assert impl(77, 77, causal=True) == "xla"  # the text encoder
    assert impl(256, 256) == "xla"
    monkeypatch.setattr(A.jax, "default_backend", lambda: "tpu")
    assert impl(4096, 4096, d=40) == "xla"
    monkeypatch.setattr(A.jax, "default_backend", lambda: "cpu")
    with platform.compiling_for("tpu"):  # a TPU slice's step compiled on this CPU host gets the TPU's form
        assert impl(4096, 4096, d=40) == "xla"
    assert impl(4096, 4096, d=40) == "blocked"


def test_attention_entry_point_takes_the_blocked_path(monkeypatch):
    # Through `attention` itself (the function the UNet calls), with its layout swaps and dtype handling.
    monkeypatch.setattr(A.jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(A, "BLOCK_BYTES", 2**18)
    q, k, v = _qkv((1, 1024, 2, 8), 1024, jnp.float32, seed=3)
    assert A._implementation(q, k) == "blocked"
    np.testing.assert_allclose(A.attention(q, k, v), A._xla_attention(q, k, v, False), atol=2e-6, rtol=2e-6)


def test_plain_flops_count_what_the_cpus_blocked_loop_hides():
    # XLA counts a loop's body once, so the CPU's blocked attention under-reports its work; cost.plain_flops lowers
    # the plain form instead, which counts both products over every key, forward and backward, even after the
    # function was traced in the CPU's form (JAX's trace cache does not know the platform).
    from train import cost

    q, k, v = _qkv((1, 1024, 8, 8), 1024, jnp.float32)
    assert A._implementation(q, k) == "blocked"
    grads = jax.grad(lambda q, k, v: jnp.sum(A.attention(q, k, v)), argnums=(0, 1, 2))
    two_products = 2 * 2 * 1024 * 1024 * 8 * 8
    assert cost.flops(jax.jit(grads).lower(q, k, v)) < two_products
    assert cost.plain_flops(grads, q, k, v) >= 2.5 * two_products  # forward 2 products, backward 4
