"""fastkd: kernel-backed self-supervised knowledge distillation for vision models."""

__version__ = "0.1.0"
