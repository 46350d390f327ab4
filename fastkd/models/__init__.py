"""timm-based backbones with pluggable attention, the masked encoder, heads and teacher loaders."""
