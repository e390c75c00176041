"""The one exception type the command line turns into a one-line message and a non-zero exit."""


class InputError(Exception):
    """Bad input from the user. The message names the problem and the fix, on one line."""
