"""Errors that mean "the user's input is wrong", so the CLI can print one line and exit 2."""


class InputError(ValueError):
    """Bad user input: a spec, a config, a table or a path. The message names the problem and where."""
