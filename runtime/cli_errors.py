"""Turn InputError into click's one-line 'Error: ...' and exit status 1, for every scl command."""

from __future__ import annotations

import functools

import click

from .errors import InputError


def reports_input_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InputError as err:
            raise click.ClickException(str(err)) from None

    return wrapper

