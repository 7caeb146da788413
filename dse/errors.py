"""Errors that mean "the user's input is wrong", so the CLI can print one line and exit 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any


class InputError(ValueError):
    """Bad user input: a spec, a config, a table or a path. The message names the problem and where."""


def closest(word: Any, choices: Iterable[str]) -> str | None:
    """The choice a misspelt `word` most likely meant, if any is close enough."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return close[0] if close else None


def choice(kind: str, value: Any, valid: Sequence[str]) -> str:
    """`value` as one of `valid` (trimmed, lower case), or an InputError naming all of them."""
    key = value.strip().lower() if isinstance(value, str) else value
    if key not in valid:
        close = closest(key, valid)
        hint = f"; did you mean {close!r}?" if close else ""
        raise InputError(f"unknown {kind} {value!r} (valid: {', '.join(valid)}){hint}")
    return key
