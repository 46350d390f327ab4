"""Drop-in ``nn.Module`` losses built on fastkd's fused ops."""
