"""Trainer, optimisers, schedules, checkpoints and the EMA teacher."""
