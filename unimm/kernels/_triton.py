"""The ``@triton.jit`` helpers and constants several kernel families share.

Imported only where triton is (``_common`` is imported by the models, and triton may be absent).
A jit function may read a module global only when it is a ``tl.constexpr``, hence ``LOG2E`` here
beside the plain float in ``_common``.
"""

import triton
import triton.language as tl

from unimm.kernels import _common

LOG2E = tl.constexpr(_common.LOG2E)  # scores are scaled by it so that softmaxes run on exp2


@triton.jit
def tanh(x):
    # 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no overflow
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
