"""Turn SclError into click's one-line 'Error: ...' and exit status 1, for every scl command; library messages
go through logging.getLogger("scl"), which the commands print to stderr."""

from __future__ import annotations

import functools
import logging

import click

from .errors import SclError


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def reports_input_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        _log_to_stderr()
        try:
            return command(*args, **kwargs)
        except SclError as err:
            raise click.ClickException(err.with_options(flag)) from None

    return wrapper


def _log_to_stderr() -> None:
    logger = logging.getLogger("scl")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
