"""Triton kernels (``@triton.jit`` functions and their launch helpers), installed as ``fastkd.kernels``.

One module per op of ``fastkd.ops`` (whose docstring states the math), launchers ``launch_<op>_fwd`` / ``_bwd``
on plain tensors (no autograd), so tests run them on CPU under ``TRITON_INTERPRET=1`` (set before import).
Batch- and head-sized extents go on grid axis 0, stride offsets in int64. ``compile_configs``: the configurations
for the ahead-of-time compile check; ``loop_bounds``: the helper every runtime ``range`` bound goes through.
"""
