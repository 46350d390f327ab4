"""Distillation and teacher-pretraining methods: ``nn.Module``s mapping a batch to a dict of losses."""
