"""``python -m fastkd.launch``: torchrun whose agent lets a SIGTERM / SIGINT end the run cleanly.

    python -m fastkd.launch --nproc_per_node 8 -m fastkd.cli distill CONFIG [key=value ...] [--resume]

The command line is exactly torchrun's (``torch.distributed.run`` parses and runs it). Only the
agent's reaction to SIGTERM / SIGINT differs:

* torchrun: the first signal raises ``SignalException`` in the agent, which tears the workers down
  and exits 1 although the fastkd workers wrote their stop checkpoint and exited 0; a scheduler
  (Slurm, Kubernetes, ``docker stop``) sees a failed job.
* fastkd.launch: the first SIGTERM or SIGINT sends SIGTERM to every live worker and keeps
  monitoring them; each trainer writes its stop checkpoint at the same step on every rank and exits
  0, and so does the launcher. ``--resume`` continues the run. A second signal, a signal while no
  worker is alive, and the other signals torchrun handles (SIGHUP, SIGQUIT) keep torchrun's default
  tear-down. After the first signal no new worker starts (a restart would undo the stop).

Why workers always get SIGTERM, at once: torch starts each worker in its own session, so a terminal's
Ctrl-C or Kubernetes' signal to PID 1 reach the agent only, while ``scancel --signal`` or ``kill`` of
every pid reach the workers too, and the agent cannot tell which happened. The trainer treats a
repeated SIGTERM as a no-op but a SIGINT after a stop request as "quit now", so forwarding SIGINT
could abort a checkpoint, and a SIGTERM forwarded at once arrives while that worker is still
stopping. A worker without its stop handler yet (still importing) or any more (exiting) dies of the
SIGTERM, as a single-process run would. An entrypoint that is a shell wrapper must pass SIGTERM on.

How: two hooks in ``torch.distributed.elastic.multiprocessing.api``, alike from torch 2.11 to 2.14
(:func:`install` checks them and fails clearly otherwise): ``PContext.start`` installs the module
attribute ``_terminate_process_handler`` as the agent's handler, looked up when it runs, so replacing
that attribute replaces the handler; and ``PContext.start`` is wrapped to record each process
context (its ``subprocess_handlers`` say which workers are alive) and to start nothing after a stop
request. The patches apply to the launcher process only.
"""

from __future__ import annotations

import os
import signal
import sys
import weakref

__all__ = ["install", "main"]

_GRACEFUL = (signal.SIGTERM, signal.SIGINT)
FORWARDED_SIGNAL = signal.SIGTERM  # what the workers get, whichever of _GRACEFUL the agent got

_state = {"installed": False, "stop": None}  # stop: the first graceful signal received, or None
_contexts: "weakref.WeakSet" = weakref.WeakSet()  # every PContext started in this process


def _say(message: str) -> None:
    """One line on stderr, written with ``os.write``: a signal handler may interrupt the main
    thread inside a ``sys.stderr`` write, where ``print`` would fail (reentrant call)."""
    try:
        os.write(2, f"[fastkd.launch] {message}\n".encode())
    except OSError:
        pass


def _workers() -> list:
    """``(pid, alive, send_signal)`` of every worker of the recorded contexts.

    ``Popen.send_signal`` signals only a process it has not reaped, so a pid reused after a worker
    exited is never hit. Contexts without ``Popen`` handlers (``MultiprocessContext``, used by
    torch's Python launch API, not by the command line) are signalled through ``pids()``."""
    workers = []
    for context in list(_contexts):
        handlers = getattr(context, "subprocess_handlers", None)
        if handlers is not None:
            workers += [(h.proc.pid, h.proc.poll() is None, h.proc.send_signal) for h in list(handlers.values())]
            continue
        try:
            pids = list(context.pids().values())
        except Exception:  # not started yet
            continue
        workers += [(pid, True, lambda signum, pid=pid: os.kill(pid, signum)) for pid in pids]
    return workers


def _signal_live_workers(signum: int) -> list[int]:
    """Sends ``signum`` to every live worker; returns their pids."""
    sent = []
    for pid, alive, send_signal in _workers():
        if alive:
            try:
                send_signal(signum)
                sent.append(pid)
            except ProcessLookupError:  # exited meanwhile
                pass
    return sent


def _make_handler(default):
    def _graceful_stop_handler(signum, frame):
        """The agent's handler for the signals torchrun handles (see the module docstring)."""
        if signum not in _GRACEFUL or _state["stop"] is not None:
            if _state["stop"] is not None:
                _say(f"{signal.Signals(signum).name} again: stopping the workers now (torchrun's default)")
            return default(signum, frame)  # raises SignalException: tear-down, non-zero exit
        _state["stop"] = signal.Signals(signum)  # first, so that a signal arriving meanwhile escalates
        try:
            pids = _signal_live_workers(FORWARDED_SIGNAL)
        except Exception as error:  # e.g. no permission: never fail here, do what torchrun does
            _say(f"could not signal the workers ({error!r}): stopping them the torchrun way")
            pids = []
        if not pids:  # no worker alive (not started, or all exited) or none reachable
            _state["stop"] = None
            return default(signum, frame)
        _say(f"{signal.Signals(signum).name} received: sent {FORWARDED_SIGNAL.name} to the worker(s) "
             f"{', '.join(map(str, pids))}; waiting for them to write their stop checkpoint and exit "
             f"(send the signal again to stop them at once)")

    return _graceful_stop_handler


def install() -> None:
    """Replaces the torchelastic agent's signal handler and records started worker contexts (see
    the module docstring); idempotent. Affects only this process: call it in a launcher, before
    ``torch.distributed.run.main``."""
    if _state["installed"]:
        return
    import torch
    from torch.distributed.elastic.multiprocessing import api

    default = getattr(api, "_terminate_process_handler", None)
    context_class = getattr(api, "PContext", None)
    original_start = getattr(context_class, "start", None)
    names = getattr(getattr(original_start, "__code__", None), "co_names", ())  # globals start() looks up
    if default is None or not hasattr(api, "SignalException") or "_terminate_process_handler" not in names:
        raise RuntimeError(
            f"fastkd.launch does not support torch {torch.__version__}: its torchelastic agent no longer "
            "installs torch.distributed.elastic.multiprocessing.api._terminate_process_handler in "
            "PContext.start (fastkd.launch supports torch 2.11 to 2.14); use torchrun, which exits "
            "non-zero after a SIGTERM although the workers write their stop checkpoint")

    def recording_start(self, *args, **kwargs):
        """``PContext.start``, recording the context, and starting nothing after a stop request."""
        if _state["stop"] is not None:
            raise api.SignalException(
                f"not starting new workers after {_state['stop'].name} (fastkd.launch)", sigval=_state["stop"])
        _contexts.add(self)
        return original_start(self, *args, **kwargs)

    api._terminate_process_handler = _make_handler(default)
    context_class.start = recording_start
    _state["installed"] = True


def main(argv: list[str] | None = None) -> int:
    """Runs torchrun's command line ``argv`` (default ``sys.argv[1:]``) with :func:`install`'s agent;
    returns 0 when every worker exited 0 (after a stop request too). Failures are torchrun's:
    ``ChildFailedError`` / ``SignalException`` propagate, and ``python -m`` exits 1 with torch's report."""
    try:
        install()
    except RuntimeError as error:
        print(f"fastkd.launch: error: {error}", file=sys.stderr)
        return 2
    from torch.distributed import run

    run.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
