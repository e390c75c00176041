"""Turn SclError into click's one-line 'Error: ...' and exit status 1, for every scl command; library messages
go through logging.getLogger("scl"), which the commands print to stderr."""

from __future__ import annotations

import functools
import logging
import signal
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
            return command(*args, **kwargs)
        except SclError as err:
            raise click.ClickException(err.with_options(flag)) from None

    return wrapper


def _stop(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary files are removed on the way out (atomic.py)


def _exit_cleanly_on_signals() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop)


def _log_to_stderr() -> None:
    logger = logging.getLogger("scl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
