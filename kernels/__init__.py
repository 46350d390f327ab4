"""Triton kernels (``@triton.jit`` functions and their launch helpers), installed as ``fastkd.kernels``.

One module per op of ``fastkd.ops`` (``token_relation``, ``gather_tokens``, ``feature_align``), each
computing the op whose docstring states the math; its launch helpers are named
``launch_<op>_fwd`` / ``launch_<op>_bwd``. Kernel files know nothing of torch modules or autograd:
launch helpers take plain tensors, so the tests can run them on CPU tensors under
``TRITON_INTERPRET=1`` (which must be set before import). Every launch keeps batch- and head-sized
extents on grid axis 0 and computes pointer offsets that multiply a batch, head or sequence stride in
int64. ``compile_configs`` holds the configurations each module registers for the ahead-of-time
compile check; ``loop_bounds`` the ``loop_bound`` helper that every
runtime bound of a kernel's ``range`` loop goes through.
"""
