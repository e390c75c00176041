"""Turn SclError into click's one-line 'Error: ...' and exit status 1, for every scl command; library messages
go through logging.getLogger("scl"), which the commands print to stderr."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading

import click

from .errors import SclError


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def reports_input_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _log_to_stderr()
        _exit_cleanly_on_signals()
        try:
            result = command(*args, **kwargs)
        except SclError as err:
            raise click.ClickException(err.with_options(flag)) from None
        raise_if_stopped()
        return result

    return wrapper


_stopped_by: int | None = None  # the signal that asked this process to stop


def _stop(signum, frame):
    global _stopped_by
    _stopped_by = signum
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary files are removed on the way out (atomic.py)


def raise_if_stopped() -> None:
    """Stop now if a signal asked to. Python drops an exception raised inside a finaliser (a weakref callback, a
    __del__), so a signal arriving there would be lost; it is remembered, and every commit of an output checks it
    (seen once in 11 SIGTERM runs: the run went on and finished with exit status 0)."""
    if _stopped_by is not None:
        raise SystemExit(128 + _stopped_by)


def _quiet_dropped_stop(unraisable) -> None:
    if not (isinstance(unraisable.exc_value, SystemExit) and _stopped_by is not None):
        sys.__unraisablehook__(unraisable)


def _exit_cleanly_on_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop)
        sys.unraisablehook = _quiet_dropped_stop


def _log_to_stderr() -> None:
    logger = logging.getLogger("scl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
