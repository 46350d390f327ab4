"""Trainer, optimisers, schedules and training checkpoints (the EMA teacher is
:class:`fastkd.models.EMATeacher`)."""
