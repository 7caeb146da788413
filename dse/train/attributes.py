"""A module's own Python attributes (a step counter, a running float, a list its forward appends to, a
helper object's fields): taken, compared and given back, by one rule. `state_kept`
(dse/train/memory.py) gives a model's back after a look-ahead forward; a group (dse/train/stacked.py)
finds with them a module it runs once for all its members that keeps state each member alone keeps
apart.

What a forward may change in place is copied one level deep: a list's, dict's, set's or deque's items
(as they are: a recurrent layer's list of its parameters keeps them), a tensor's or numpy array's
values, the attributes of a user's object (`user_object`), a random generator's state (torch's, numpy's,
Python's: what it draws next)."""

from __future__ import annotations

import collections
import copy
import enum
import math
import random
from collections.abc import Callable, MutableMapping, MutableSequence, MutableSet
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

MODULE_INTERNALS = frozenset(vars(nn.Module()))
"""The attributes every nn.Module has (its tensors, submodules, hooks, `training`): not a layer's own."""

_GONE = object()
"""An attribute a module no longer has."""


GENERATORS: tuple[tuple[type, Callable[[Any], Any], Callable[[Any, Any], object]], ...] = (
    (torch.Generator, torch.Generator.get_state, torch.Generator.set_state),
    (random.Random, random.Random.getstate, random.Random.setstate),
    (np.random.Generator, lambda g: g.bit_generator.state, lambda g, s: setattr(g.bit_generator, "state", s)),
    (np.random.RandomState, lambda g: g.get_state(legacy=False), np.random.RandomState.set_state),
    (np.random.BitGenerator, lambda g: g.state, lambda g, s: setattr(g, "state", s)),
)
"""The random generators a layer may hold and draw from in its forward, with how to read and set their
state, which lives outside their attributes (SystemRandom, drawing from the OS, has none)."""


def random_generator(value: Any) -> bool:
    """Whether `value` is a random generator of `GENERATORS` (a state a forward may advance)."""
    return _generator(value) is not None


def plain_data(value: Any, _within: frozenset[int] = frozenset()) -> bool:
    """Whether `value` is data compared by its value all through (numbers, strings, None, tensors,
    numpy arrays and scalars, enum members, a random generator's state, and lists, tuples, deques,
    sets, dicts and a user's objects of them, without a cycle): two trials' values are one value or
    not, where an object compared by identity (a module, a function) differs in every copy."""
    if value is None or random_generator(value) or isinstance(
            value, int | float | complex | str | bytes | Tensor | np.ndarray | np.generic | enum.Enum):
        return True
    if id(value) in _within:
        return False
    within = _within | {id(value)}
    if isinstance(value, list | tuple | collections.deque | set | frozenset):
        return all(plain_data(item, within) for item in value)
    if isinstance(value, dict):
        return all(plain_data(key, within) and plain_data(item, within) for key, item in value.items())
    return user_object(value) and all(plain_data(item, within) for item in vars(value).values())


def _generator(value: Any) -> tuple[Callable[[Any], Any], Callable[[Any, Any], object]] | None:
    if isinstance(value, random.SystemRandom):
        return None
    return next(((get, put) for kind, get, put in GENERATORS if isinstance(value, kind)), None)


def user_object(value: Any) -> bool:
    """Whether `value` is an object of the user's own class that keeps its state in its attributes (not
    a module, function or class, nor an object of torch, dse, numpy or Python, whose state dse or its
    owner keeps): taken, compared and given back by its attributes."""
    return (hasattr(value, "__dict__") and not callable(value)
            and not isinstance(value, nn.Module | type)
            and not type(value).__module__.startswith(("torch", "dse.", "builtins", "numpy")))


def same_value(a: Any, b: Any) -> bool:
    """Whether two attribute values are equal: of one type, and for tensors and numpy arrays of one
    shape, dtype and device, with equal elements; lists, tuples, deques and dicts item by item, a
    user's object by its attributes, anything else by ==. A NaN equals a NaN, -0.0 does not equal 0.0
    (each gives another result somewhere)."""
    if a is b:  # (the same object: no == call, which for some objects compares all their tensors)
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):  # (a parameter and its detached copy alike)
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and _same_tensor(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and _same_array(a, b)
    if isinstance(a, list | tuple | collections.deque):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    generator = _generator(a)
    if generator is not None:
        return _same_state(generator[0](a), generator[0](b)) and same_value(_fields(a), _fields(b))
    if user_object(a):
        return same_value(vars(a), vars(b))
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b) or (a != a and b != b)
    try:
        return bool(a == b)
    except Exception:  # (a value without a plain ==)
        return False


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Equal elements, a NaN equal to a NaN and -0.0 not equal to 0.0 (torch.equal says otherwise)."""
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    bits = _BITS[a.element_size()]
    if torch.equal(a.view(bits), b.view(bits)):  # (one pass, nothing allocated: a copy's bits)
        return True
    if not torch.equal(a.signbit(), b.signbit()):
        return False
    return bool(torch.equal(a, b)) or bool(((a == b) | (a.isnan() & b.isnan())).all())


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""An integer dtype of each floating-point element size, to compare two tensors' bits."""


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """`_same_tensor` for numpy arrays (of any dtype: strings and objects by ==)."""
    if a.dtype.kind == "c":
        a, b = np.stack([a.real, a.imag]), np.stack([b.real, b.imag])
    if a.dtype.kind != "f":
        return bool(np.array_equal(a, b))
    return bool(np.array_equal(np.signbit(a), np.signbit(b)) and np.array_equal(a, b, equal_nan=True))


class Attributes:
    """A module's own Python attributes as they were when taken: each value, with a copy of what a
    forward may change in place (None: nothing the copies keep; only rebinding the attribute shows)."""

    __slots__ = ("kept", "module")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.kept = {name: (value, _contents(value)) for name, value in vars(module).items()
                     if name not in MODULE_INTERNALS}

    def changed(self) -> list[str]:
        """The attributes the module now has otherwise than taken: added, rebound to another value,
        changed in place, or gone (in the module's order, gone ones last)."""
        now = [name for name, value in vars(self.module).items()
               if name not in MODULE_INTERNALS and self._changed(name, value)]
        return now + [name for name in self.kept if name not in vars(self.module)]

    def _changed(self, name: str, value: Any) -> bool:
        kept = self.kept.get(name)
        return kept is None or not same_value(value, kept[0] if kept[1] is None else kept[1])

    def restore(self) -> None:
        """The module's attributes as taken: rebound, refilled in place (whoever else holds a value
        sees it as taken too), added ones gone."""
        module = self.module
        for name in [n for n in vars(module) if n not in MODULE_INTERNALS and n not in self.kept]:
            del module.__dict__[name]
        for name, (value, contents) in self.kept.items():
            module.__dict__[name] = value
            if isinstance(value, Tensor):
                if value.shape == contents.shape and not same_value(value, contents):  # (no version bump
                    # where nothing was written)
                    with torch.no_grad():
                        value.copy_(contents)
            elif contents is not None:
                _refill(module, name, value, contents)


def same_attribute(a: nn.Module, b: nn.Module, name: str) -> bool:
    """Whether two modules' own attribute `name` is equal (`same_value`), or neither has it."""
    return same_value(vars(a).get(name, _GONE), vars(b).get(name, _GONE))


def _same_state(a: Any, b: Any) -> bool:
    """Two states of one kind of generator equal (random.Random's, a tuple of ints, by == at once)."""
    return a == b if isinstance(a, tuple) else same_value(a, b)


def _fields(value: Any) -> dict[str, Any]:
    return vars(value) if hasattr(value, "__dict__") else {}


def _contents(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    generator = _generator(value)
    if generator is not None:
        numpy = isinstance(value, np.random.Generator | np.random.RandomState | np.random.BitGenerator)
        return copy.deepcopy(value) if numpy else copy.copy(value)  # (numpy's copy shares its bit generator)
    if isinstance(value, MutableSequence | MutableSet | MutableMapping) or user_object(value):
        try:
            copied = copy.copy(value)  # (a user's object: its attributes, as they are)
        except Exception:  # (a class copy cannot copy: only the attribute's rebinding is seen)
            return None
        return None if copied is value else copied  # (an enum member, a singleton: nothing to refill)
    return None


def _refill(module: nn.Module, name: str, value: Any, contents: Any) -> None:
    """`value` (a list, dict, set, deque, numpy array, random generator or user's object) given back
    `contents` (its copy) in place, so that whoever else holds it sees them too."""
    if isinstance(value, MutableSequence):
        value.clear()
        value.extend(contents)
    elif isinstance(value, MutableSet):
        value.clear()
        value |= contents
    elif isinstance(value, MutableMapping):
        value.clear()
        value.update(contents)
    elif isinstance(value, np.ndarray):
        if value.flags.writeable:
            value[...] = contents
        else:
            module.__dict__[name] = contents
    elif (generator := _generator(value)) is not None:
        generator[1](value, generator[0](contents))
        if hasattr(value, "__dict__"):  # (random.Random's gauss_next)
            vars(value).clear()
            vars(value).update(vars(contents))
    else:
        vars(value).clear()
        vars(value).update(vars(contents))
