"""The ``@triton.jit`` helpers and constants several kernel families share.

Imported only where triton is (``_common`` is imported by the models, and triton may be absent).
A jit function may read a module global only when it is a ``tl.constexpr``, hence ``LOG2E`` here
beside the plain float in ``_common``.
"""

import triton
import triton.language as tl

from unimm.kernels import _common

LOG2E = tl.constexpr(_common.LOG2E)  # scores are scaled by it so that softmaxes run on exp2
# Below this |x| tanh is its odd Taylor series: there ``1 - exp(-2|x|)`` would cancel (an absolute
# error of ~6e-8, large next to a small tanh), and the series' first left-out term, 1382/155925
# x^11, is under 1e-8 relative.
TANH_SERIES_BELOW = tl.constexpr(0.25)


@triton.jit
def tanh(x, EXACT_NEAR_ZERO: tl.constexpr = True):
    # sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) <= 1: no overflow, exact limits at +-inf, and
    # relative error ~2 ulp above TANH_SERIES_BELOW (e <= 0.61 there); NaN stays NaN. Below it
    # ``1 - e`` cancels (absolute error ~6e-8): EXACT_NEAR_ZERO takes the series there, at the cost
    # of a few registers per element; a caller whose result is scaled by a moderate soft-cap and
    # rounded to 16 bits (decode's scores) may skip it.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -big, big)
    if EXACT_NEAR_ZERO:
        x2 = x * x
        series = x + x * x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0))))
        t = tl.where(a < TANH_SERIES_BELOW, series, t)
    return t


@triton.jit
def dim_mask(ok, dims, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The load / store mask ``[R, BLOCK_D]`` (or ``[R, 1]``) of rows ``ok [R]``: a head dim that is
    not a power of two is padded to BLOCK_D columns inside the kernel (loaded as zeros, which add
    nothing to any dot, and never stored); a power of two keeps the row mask alone."""
    mask = ok[:, None]
    if HEAD_DIM != BLOCK_D:
        mask = mask & (dims[None, :] < HEAD_DIM)
    return mask
