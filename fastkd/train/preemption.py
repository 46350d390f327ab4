"""SIGTERM / SIGINT handling for clean preemption: the signal only sets a flag; the trainer checks it
after every step, saves a checkpoint and returns. A second SIGINT interrupts at once (the default
``KeyboardInterrupt``), so a user can still force quit."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager that turns SIGTERM and SIGINT into ``self.requested = True`` (and records
    ``self.signal_name``) while active; restores the previous handlers on exit. Outside the main
    thread signal handlers cannot be installed and the flag only changes through :meth:`request`."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}

    def request(self, name: str = "request") -> None:
        self.requested = True
        self.signal_name = name

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:  # a repeated signal (a launcher passing on the group's) keeps the first name
            self.request(signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
