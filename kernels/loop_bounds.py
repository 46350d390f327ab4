"""``loop_bound(x)``: a runtime scalar as a kernel's ``range`` bound, accepted by Triton 3.0 to 3.8 compiled and
under ``TRITON_INTERPRET=1``. Compiled it is the identity. The interpreters of 3.0 to 3.6 take ``range`` bounds
through ``int()`` of a shape-``(1,)`` array, a ``TypeError`` since NumPy 2.5; here the element is a Python int.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def loop_bound(x):
    """``x`` itself: the bound of a ``range`` loop (see the module docstring)."""
    return x


if isinstance(loop_bound, InterpretedFunction):  # TRITON_INTERPRET=1 when the kernels were defined

    def loop_bound(x):  # noqa: F811 - the interpreter's version of the helper above
        """``x`` as a Python int when it is a scalar tensor of the interpreter (else ``x`` unchanged)."""
        return x.handle.data.item() if isinstance(x, tl.tensor) else x
