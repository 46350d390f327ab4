"""Fused operators. Each op lives in its own file: torch.library registration, autograd,
fake (meta) implementation, dispatch to a Triton kernel on CUDA and a C++/PyTorch path on CPU."""
