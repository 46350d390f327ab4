"""``loop_bound(x)``: a runtime scalar (a kernel argument such as ``N``, a loaded value, program-id
arithmetic) used as a bound of a ``for ... in range(...)`` loop inside a kernel, written so that every
supported Triton (3.0 to 3.8) accepts it, compiled and under ``TRITON_INTERPRET=1``.

Compiled, it is the identity (the loop lowers to ``scf.for`` with that bound, as ``range(x)`` would).
Under the interpreter a scalar tensor holds a one-element array of shape ``(1,)``, and Python's
``range`` takes its bounds through ``tensor.__index__``, which is ``int(array)`` in the interpreters of
triton 3.0 to 3.6 (3.7 squeezes the array first). NumPy 2.5 made ``int()`` of an array with
``ndim > 0`` a ``TypeError`` ("only 0-dimensional arrays can be converted to Python scalars"), so
there ``range(N)`` fails; ``loop_bound(N)`` hands ``range`` the element as a Python int instead.
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
