"""The im2col convolution a CPU uses computes what XLA's convolution does, values and input gradients, for every
kernel, stride and padding the UNet and VAE use, and is chosen only where it applies. A whole model with it is
checked against diffusers by the full-size SD 1.5 UNet test (tests/test_unet.py), whose kernels are all above
`IM2COL_MIN_KERNEL_BYTES`; the tiny models' kernels are below it, so their parity tests check XLA's convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tix.models import convolution as C
from tix.models import platform

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(autouse=True)
def _small_kernels_too(monkeypatch):
    """These tests' kernels are small, so that the tests are quick; the size rule is checked on its own below."""
    monkeypatch.setattr(C, "IM2COL_MIN_KERNEL_BYTES", 0)


def _operands(n, hw, c_in, c_out, k, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, hw, hw, c_in)), dtype)
    w = jnp.asarray(rng.standard_normal((k, k, c_in, c_out)) / np.sqrt(k * k * c_in), dtype)
    return x, w


@pytest.mark.parametrize("k, stride, pad, hw", [
    (3, 1, 1, 9),  # resnet convs
    (3, 2, 1, 9),  # UNet downsamplers (odd size)
    (3, 2, 0, 8),  # VAE downsamplers: padded (0, 1) by hand, then VALID
    (1, 1, 0, 7),  # shortcuts, SD 1.x proj_in/out
])
def test_im2col_equals_xla_values_and_input_gradients(k, stride, pad, hw):
    x, w = _operands(2, hw, 24, 16, k)
    padding = ((pad, pad), (pad, pad))
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(
        lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC).shape), jnp.float32)

    def run(conv):
        def loss(x):
            return jnp.sum(conv(x, w, (stride, stride), padding, dimension_numbers=NHWC) * weights)

        return jax.jit(lambda x: conv(x, w, (stride, stride), padding, dimension_numbers=NHWC))(x), \
            jax.jit(jax.grad(loss))(x)

    assert C._im2col_applies(x, w, padding, None, None, NHWC, 1, 1)
    (y, dx), (y_ref, dx_ref) = run(C.conv_general_dilated), run(lax.conv_general_dilated)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)


def test_im2col_in_bfloat16_stays_within_bfloat16_rounding():
    x, w = _operands(1, 8, 32, 32, 3, jnp.bfloat16)
    padding = ((1, 1), (1, 1))
    y = C.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)
    ref = lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), padding,
                                   dimension_numbers=NHWC)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0.05, atol=0.05)


def test_chosen_only_on_a_cpu_below_the_size_limit_for_plain_convolutions(monkeypatch):
    x, w = _operands(1, 16, 8, 8, 3)
    padding = ((1, 1), (1, 1))
    assert C._im2col_applies(x, w, padding, None, None, NHWC, 1, 1)
    assert not C._im2col_applies(x, w, padding, None, (2, 2), NHWC, 1, 1)  # dilated
    assert not C._im2col_applies(x, w[:, :, :4], padding, None, None, NHWC, 2, 1)  # grouped
    assert not C._im2col_applies(x, w, "SAME", None, None, NHWC, 1, 1)
    assert not C._im2col_applies(jnp.moveaxis(x, -1, 1), w, padding, None, None, ("NCHW", "HWIO", "NCHW"), 1, 1)
    monkeypatch.setattr(C, "IM2COL_MAX_BYTES", 16 * 16 * 9 * 8 * 4 - 1)  # one byte short of this input's matrix
    assert not C._im2col_applies(x, w, padding, None, None, NHWC, 1, 1)
    monkeypatch.setattr(C, "IM2COL_MAX_BYTES", 2**26)
    monkeypatch.setattr(C, "IM2COL_MIN_KERNEL_BYTES", w.size * 4 + 1)  # one byte more than this kernel
    assert not C._im2col_applies(x, w, padding, None, None, NHWC, 1, 1)
    monkeypatch.setattr(C, "IM2COL_MIN_KERNEL_BYTES", w.size * 4)
    assert C._im2col_applies(x, w, padding, None, None, NHWC, 1, 1)
    with platform.compiling_for("tpu"):  # a TPU slice's step compiled on this CPU host
        assert not C._im2col_applies(x, w, padding, None, None, NHWC, 1, 1)
    assert C._im2col_applies(x, w, padding, None, None, NHWC, 1, 1)
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(C.jax, "default_backend", lambda backend=backend: backend)
        assert not C._im2col_applies(x, w, padding, None, None, NHWC, 1, 1)
