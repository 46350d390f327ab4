"""Triton kernels (``@triton.jit`` functions and their launch helpers), installed as ``fastkd.kernels``.

Kernel files know nothing of torch modules or autograd: launch helpers take plain tensors, so the
tests can run them on CPU tensors under ``TRITON_INTERPRET=1`` (which must be set before import).
"""
