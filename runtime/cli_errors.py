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


def not_built_yet(name: str, issue: str):
    """A console script whose command is not built: says so and exits non-zero."""

    @click.command(name=name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command():
        raise click.ClickException(f"{name} is not built yet ({issue}); nothing was done.")

    return command
