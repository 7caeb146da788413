"""A module's own Python attributes (a step counter, a running float, a list its forward appends to, a
helper object's fields): taken, compared and given back, by one rule. `state_kept`
(dse/train/memory.py) gives a model's back after a look-ahead forward; a group (dse/train/stacked.py)
finds with them a module it runs once for all its members that keeps state each member alone keeps
apart.

What a forward may change in place is copied at any depth (`_Copies`): a list's, dict's, set's or
deque's items, a tensor's or numpy array's values, the attributes of a user's object (`user_object`), a
random generator's state (torch's, numpy's, Python's: what it draws next); a tensor in a list in a dict
is compared and given back as a tensor attribute is."""

from __future__ import annotations

import collections
import copy
import enum
import math
import random
from collections.abc import Callable, Iterator, MutableMapping, MutableSequence, MutableSet
from typing import Any, cast

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


def plain_data(value: Any, _seen: set[int] | None = None) -> bool:
    """Whether `value` is data compared by its value all through (numbers, strings, None, tensors,
    numpy arrays and scalars, enum members, a random generator's state, and lists, tuples, deques,
    sets, dicts and a user's objects of them, cycles included): two trials' values are one value or
    not, where an object compared by identity (a module, a function) differs in every copy."""
    if value is None or random_generator(value) or isinstance(
            value, int | float | complex | str | bytes | Tensor | np.ndarray | np.generic | enum.Enum):
        return True
    seen = set() if _seen is None else _seen
    if id(value) in seen:  # (met again, in a cycle or held twice: judged where first met)
        return True
    seen.add(id(value))
    if isinstance(value, list | tuple | collections.deque | set | frozenset):
        return all(plain_data(item, seen) for item in value)
    if isinstance(value, dict):
        return all(plain_data(key, seen) and plain_data(item, seen) for key, item in value.items())
    return user_object(value) and all(plain_data(item, seen) for item in vars(value).values())


def held(value: Any) -> Iterator[Any]:
    """`value` and everything it holds at any depth through lists, tuples, deques, sets, dicts (keys and
    values) and a user's objects' attributes, each object once (a cycle ends)."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, list | tuple | collections.deque | set | frozenset):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif user_object(item):
            stack.extend(vars(item).values())


def modules_outside(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that `model`'s modules (a user's or torch's; dse's layers keep their own) hold in
    their Python attributes outside its module tree (a plain attribute, a Python list, dict or user's
    object of them, at any depth: not registered as a submodule, nn.ModuleList or nn.ModuleDict), with
    their submodules, each named by where it is held (`blocks[]` for an item of `blocks`): what
    `model.modules()` leaves out, so `model.train()`, its parameters, the group's stacking and a copy
    of its state do not reach them."""
    tree = {id(m) for m in model.modules()}
    found: dict[int, tuple[str, nn.Module]] = {}
    owners = list(model.named_modules())
    while owners:
        owner_name, owner = owners.pop(0)
        if type(owner).__module__.startswith("dse."):
            continue
        for attribute, value in vars(owner).items():
            if attribute in MODULE_INTERNALS:
                continue
            where = f"{owner_name}.{attribute}" if owner_name else attribute
            for item in held(value):
                if not isinstance(item, nn.Module) or id(item) in tree or id(item) in found:
                    continue
                place = where if item is value else f"{where}[]"
                for sub_name, sub in item.named_modules(prefix=place):
                    if id(sub) not in tree and id(sub) not in found:
                        found[id(sub)] = (sub_name, sub)
                        owners.append((sub_name, sub))
    return list(found.values())


_StateAccess = tuple[Callable[[Any], Any], Callable[[Any, Any], object]]

_GENERATOR_TYPES: dict[type, _StateAccess | None] = {}
"""Each type met: how to read and set its state where it is one of GENERATORS (an isinstance check
against torch.Generator runs Python code: asked once a type)."""


def _generator(value: Any) -> _StateAccess | None:
    kind = type(value)
    if kind not in _GENERATOR_TYPES:
        _GENERATOR_TYPES[kind] = None if issubclass(kind, random.SystemRandom) else next(
            ((get, put) for generator, get, put in GENERATORS if issubclass(kind, generator)), None)
    return _GENERATOR_TYPES[kind]


def user_object(value: Any) -> bool:
    """Whether `value` is an object of the user's own class that keeps its state in its attributes (not
    a module, function or class, nor an object of torch, dse, numpy or Python, whose state dse or its
    owner keeps): taken, compared and given back by its attributes."""
    return (hasattr(value, "__dict__") and not callable(value)
            and not isinstance(value, nn.Module | type)
            and not type(value).__module__.startswith(("torch", "dse.", "builtins", "numpy")))


def same_value(a: Any, b: Any, _comparing: set[tuple[int, int]] | None = None) -> bool:
    """Whether two attribute values are equal: of one type, and for tensors and numpy arrays of one
    shape, dtype and device, with equal elements; lists, tuples, deques and dicts item by item, a
    user's object by its attributes, anything else by ==. A NaN equals a NaN, -0.0 does not equal 0.0
    (each gives another result somewhere). A pair met again inside itself (a cycle: an object holding
    itself, a dict containing itself) is taken as equal there, so two cyclic values compare by what
    the rest of them holds (`_comparing`: the pairs being compared)."""
    if a is b:  # (the same object: no == call, which for some objects compares all their tensors)
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):  # (a parameter and its detached copy alike)
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and _same_tensor(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and _same_array(a, b)
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b) or (a != a and b != b)
    if isinstance(a, int | str | bytes):  # (no generator, nothing nested: the common case at once)
        return a == b
    generator = _generator(a)
    nested = generator is not None or isinstance(a, list | tuple | collections.deque | dict) or user_object(a)
    if not nested:
        try:
            return bool(a == b)
        except Exception:  # (a value without a plain ==)
            return False
    comparing = set() if _comparing is None else _comparing
    pair = (id(a), id(b))
    if pair in comparing:
        return True
    comparing.add(pair)
    if isinstance(a, list | tuple | collections.deque):
        return len(a) == len(b) and all(same_value(x, y, comparing) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k], comparing) for k in a)
    if generator is not None:
        return (_same_state(generator[0](a), generator[0](b))
                and same_value(_fields(a), _fields(b), comparing))
    return same_value(vars(a), vars(b), comparing)


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
    forward may change in place at any depth (`_Copies`: a tensor in a list in a dict, a user's object's
    field's list), compared and given back through it."""

    __slots__ = ("copies", "kept", "module")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.copies = _Copies()
        self.kept = {name: (value, self.copies.of(value)) for name, value in vars(module).items()
                     if name not in MODULE_INTERNALS}

    def changed(self) -> list[str]:
        """The attributes the module now has otherwise than taken: added, rebound to another value,
        changed in place at any depth, or gone (in the module's order, gone ones last)."""
        now = [name for name, value in vars(self.module).items()
               if name not in MODULE_INTERNALS and self._changed(name, value)]
        return now + [name for name in self.kept if name not in vars(self.module)]

    def _changed(self, name: str, value: Any) -> bool:
        kept = self.kept.get(name)
        return kept is None or not same_value(value, kept[1])

    def restore(self) -> None:
        """The module's attributes as taken: rebound, every object they held refilled in place at any
        depth (whoever else holds one sees it as taken too), added ones gone."""
        module = self.module
        for name in [n for n in vars(module) if n not in MODULE_INTERNALS and n not in self.kept]:
            del module.__dict__[name]
        for name, (value, _) in self.kept.items():
            module.__dict__[name] = value
        self.copies.restore()


_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), frozenset, enum.Enum)
"""Values a forward cannot change in place (a frozenset's items are hashable, so kept as they are)."""


class _Copies:
    """Copies of values and of everything they hold, at any depth (a tensor's or numpy array's values, a
    list's, deque's, dict's or set's items, a user's object's attributes, a random generator's state),
    each object copied once (an object held twice, or in a cycle, is one copy), with the object each
    copy is of, so that `restore` refills every one in place. Modules, functions and other objects
    whose state their owner keeps are held as they are."""

    __slots__ = ("made", "pairs")

    def __init__(self) -> None:
        self.made: dict[int, Any] = {}
        """Each copied object's copy, by the object's id (the object stays alive in `pairs`)."""
        self.pairs: list[tuple[Any, Any]] = []
        """(object, its copy), in the order they were copied."""

    def of(self, value: Any) -> Any:
        """A copy of `value` holding copies of what it holds (`value` itself where nothing in it can
        change in place)."""
        if isinstance(value, _IMMUTABLE):
            return value
        made = self.made.get(id(value))
        if made is not None:
            return made
        copied = self._copy(value)
        if copied is not value:
            self.pairs.append((value, copied))
        return copied

    def _copy(self, value: Any) -> Any:
        made = self.made
        copied: Any
        if isinstance(value, Tensor):
            made[id(value)] = copied = value.detach().clone()
            return copied
        if isinstance(value, np.ndarray):
            made[id(value)] = copied = value.copy()
            return copied
        if _generator(value) is not None:
            numpy = isinstance(value, np.random.Generator | np.random.RandomState | np.random.BitGenerator)
            made[id(value)] = copied = copy.deepcopy(value) if numpy else copy.copy(value)  # (numpy's copy
            return copied                                                   # shares its bit generator)
        if isinstance(value, tuple):
            items = [self.of(item) for item in value]
            if all(a is b for a, b in zip(items, value, strict=True)):
                return value
            rebuilt: Any = (cast(Any, type(value))._make(items) if hasattr(value, "_fields")  # (a namedtuple)
                            else tuple(items) if type(value) is tuple else value)
            made[id(value)] = rebuilt
            return rebuilt
        if not isinstance(value, MutableSequence | MutableSet | MutableMapping) and not user_object(value):
            return value
        try:
            copied = copy.copy(value)  # (its type, a deque's maxlen, a defaultdict's factory)
        except Exception:  # (a class copy cannot copy: only the attribute's rebinding is seen)
            return value
        if copied is value:  # (an enum member, a singleton: nothing to refill)
            return value
        made[id(value)] = copied
        if isinstance(value, MutableSequence):
            items = [self.of(item) for item in value]
            copied.clear()
            copied.extend(items)
        elif isinstance(value, MutableMapping):
            entries = [(key, self.of(item)) for key, item in value.items()]
            copied.clear()
            copied.update(entries)
        elif not isinstance(value, MutableSet):  # (a set's items are hashable: kept as they are)
            fields = [(key, self.of(item)) for key, item in vars(value).items()]
            vars(copied).clear()
            vars(copied).update(fields)
        return copied

    def restore(self) -> None:
        """Every copied object given back its copy's contents in place, the objects it held as they
        were (a tensor or array written only where it changed: no version bump otherwise)."""
        back = {id(copied): value for value, copied in self.pairs}

        def original(item: Any) -> Any:
            return back.get(id(item), item)

        for value, copied in self.pairs:
            if isinstance(value, Tensor):
                if value.shape == copied.shape and not same_value(value, copied):
                    with torch.no_grad():
                        value.copy_(copied)
            elif isinstance(value, np.ndarray):
                if value.flags.writeable and value.shape == copied.shape:
                    value[...] = copied
            elif (generator := _generator(value)) is not None:
                generator[1](value, generator[0](copied))
                if hasattr(value, "__dict__"):  # (random.Random's gauss_next)
                    vars(value).clear()
                    vars(value).update(vars(copied))
            elif isinstance(value, tuple):
                pass  # (its items, refilled in place where they can change)
            elif isinstance(value, MutableSequence):
                value.clear()
                value.extend(original(item) for item in copied)
            elif isinstance(value, MutableSet):
                value.clear()
                value |= copied
            elif isinstance(value, MutableMapping):
                value.clear()
                value.update((key, original(item)) for key, item in copied.items())
            else:
                vars(value).clear()
                vars(value).update((key, original(item)) for key, item in vars(copied).items())


def same_attribute(a: nn.Module, b: nn.Module, name: str) -> bool:
    """Whether two modules' own attribute `name` is equal (`same_value`), or neither has it."""
    return same_value(vars(a).get(name, _GONE), vars(b).get(name, _GONE))


def _same_state(a: Any, b: Any) -> bool:
    """Two states of one kind of generator equal (random.Random's, a tuple of ints, by == at once)."""
    return a == b if isinstance(a, tuple) else same_value(a, b)


def _fields(value: Any) -> dict[str, Any]:
    return vars(value) if hasattr(value, "__dict__") else {}
