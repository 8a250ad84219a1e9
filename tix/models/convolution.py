"""The convolution the UNet and VAE blocks run: XLA's, except where a CPU is faster with a matmul.

On XLA:CPU the backward of a convolution with respect to its input first writes a reversed, transposed copy of the
kernel, every step; SD 1.5's frozen 3 x 3 kernels are 1.9 GB of float32, so at 256 px those copies alone took 2.3 s
of a 7 s train step, and at the UNet's 8 x 8 and 4 x 4 levels (1280 channels) XLA's convolution itself is 2-3x
slower than a matmul. Written as im2col (the k x k shifted views of the input side by side, times the kernel as a
[k*k*C_in, C_out] matrix), the forward is one matmul and its input gradient another, reading the kernel in place:
forward + backward of a 3 x 3, 1280-channel conv at 8 x 8 went from 129 ms to 25 ms, at 32 x 32 x 320 from 25 to
24 ms. The shifted views cost k*k times the input's memory, so this form is taken only below `IM2COL_MAX_BYTES`
(the VAE's full-resolution convs stay on XLA), and only on a CPU: GPUs and TPUs have convolution units that need
no such help. Nor do small kernels: below `IM2COL_MIN_KERNEL_BYTES` the copy is cheap and XLA's convolution runs as
fast (forward + backward of 64 -> 64 channels at 16 x 16, batch 8: 2.9 ms vs 2.2; 128 -> 128 at 32 x 32: 3.4 vs
3.8 ms) while the im2col form takes 3-6x as long to compile (0.2-0.3 s against 0.05 s per convolution), which is
most of the cold start of the small and toy-world models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from tix.models import platform

# The largest im2col matrix (bytes) built instead of calling XLA's convolution.
IM2COL_MAX_BYTES = 2**26
# The smallest kernel (bytes) whose reversed copy is worth avoiding (SD's smallest 3 x 3 kernel, 320 channels: 3.7 MB).
IM2COL_MIN_KERNEL_BYTES = 2**20


def _im2col_applies(lhs: jax.Array, rhs: jax.Array, padding: Any, lhs_dilation: Any, rhs_dilation: Any,
                    dimension_numbers: Any, feature_group_count: int, batch_group_count: int) -> bool:
    if platform.backend() != "cpu" or feature_group_count != 1 or batch_group_count != 1:
        return False
    if isinstance(padding, str) or lhs.ndim != 4:
        return False
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    if dimension_numbers is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
        return False
    if rhs.size * rhs.dtype.itemsize < IM2COL_MIN_KERNEL_BYTES:
        return False
    kh, kw, c_in, _ = rhs.shape
    n, h, w, _ = lhs.shape
    return n * h * w * kh * kw * c_in * lhs.dtype.itemsize <= IM2COL_MAX_BYTES


def _im2col(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int], padding: Sequence[tuple[int, int]],
            precision: Any, preferred_element_type: Any) -> jax.Array:
    kh, kw, c_in, c_out = rhs.shape
    (top, bottom), (left, right) = padding
    x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    sh, sw = strides
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    views = [x[:, a:a + sh * (out_h - 1) + 1:sh, b:b + sw * (out_w - 1) + 1:sw, :]
             for a in range(kh) for b in range(kw)]
    cols = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    return jnp.matmul(cols, rhs.reshape(kh * kw * c_in, c_out), precision=precision,
                      preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """`lax.conv_general_dilated`, as im2col and one matmul where that is faster (see the module docstring)."""
    if _im2col_applies(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                       batch_group_count):
        return _im2col(lhs, rhs, window_strides, padding, precision, preferred_element_type)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision, preferred_element_type)
