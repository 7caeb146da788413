"""Errors that mean "the user's input is wrong", so the CLI can print one line and exit 2."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class InputError(ValueError):
    """Bad user input: a spec, a config, a table or a path. The message names the problem and where."""


class SettingError(InputError):
    """Bad value of one named setting. `setting` is its dotted name among the settings of whatever
    raised it (`vector_length` for DatapathParams, `memory.sram` for build_model), so that a reader of
    a settings file places the error at the key that holds the value, whoever checked it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@contextmanager
def about(setting: str) -> Iterator[None]:
    """InputErrors raised inside are about `setting` (a SettingError's own name goes under it)."""
    try:
        yield
    except SettingError as error:
        raise SettingError(f"{setting}.{error.setting}", str(error)) from None
    except InputError as error:
        raise SettingError(setting, str(error)) from None


def closest(word: Any, choices: Iterable[str]) -> str | None:
    """The choice a misspelt `word` most likely meant, if any is close enough."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return close[0] if close else None


INT64_MAX = 2**63 - 1
"""The largest integer a setting may hold: what torch, numpy and SQLite store (a larger one is a typo)."""


def number_problem(value: Any) -> str | None:
    """What is wrong with a number given as a setting, if anything: NaN and infinity are no setting's
    value, and an integer must fit in 64 bits. One rule for every number a user writes (a YAML file,
    a command-line option, a TrainConfig field)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        return f"must fit in 64 bits (at most {INT64_MAX}), got {value}"
    return None


def choice(kind: str, value: Any, valid: Sequence[str]) -> str:
    """`value` as one of `valid` (trimmed, lower case), or an InputError naming all of them."""
    key = value.strip().lower() if isinstance(value, str) else value
    if key not in valid:
        close = closest(key, valid)
        hint = f"; did you mean {close!r}?" if close else ""
        raise InputError(f"unknown {kind} {value!r} (valid: {', '.join(valid)}){hint}")
    return key


class InputErrors(InputError):
    """Several problems found in one input (a sweep file reports all of its errors): one line each in
    `problems`, the message their lines joined."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class Problems:
    """Collects the InputErrors of independent checks, so that an input's every problem is reported at
    once rather than only its first."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def attempt(self, check: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """check(*args, **kwargs), or None with its problem(s) kept."""
        try:
            return check(*args, **kwargs)
        except InputErrors as errors:
            self.add(*errors.problems)
        except InputError as error:
            self.add(str(error).splitlines()[0])
        return None

    def add(self, *lines: str) -> None:
        self.lines.extend(line for line in lines if line not in self.lines)

    def raise_any(self) -> None:
        """Raise what was kept: one InputError, or InputErrors for several."""
        if len(self.lines) == 1:
            raise InputError(self.lines[0])
        if self.lines:
            raise InputErrors(self.lines)


class Unsupported(InputError):
    """What was asked cannot run here (this torch, this device), whatever the trial: the CLI prints one
    line and exits 2; a sweep runs its other trials and then stops naming it, rather than record it as
    the trial's result."""
