"""A module's own Python attributes (dse/train/attributes.py), by the one rule that `state_kept` and a
group's checks share: `same_value` says two values are equal exactly where they are (checked against
a plain description of each value written here: type, dtype, shape, each element's repr), and
`Attributes` gives back what it took, and names what changed, after any change of the supported kinds
(numbers, strings, tensors, numpy arrays, lists, tuples, deques, dicts, sets, a user's helper
object), at any depth."""

from __future__ import annotations

import collections
import copy
import enum
import random
from typing import Any

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dse.train.attributes import Attributes, held, plain_data, same_value
from dse.train.memory import state_kept


class Helper:
    """A user's object keeping its state in its attributes."""

    def __init__(self, **fields: Any) -> None:
        vars(self).update(fields)


FLOATS = [0.0, -0.0, 1.0, 2.5, float("nan"), float("inf")]

numbers = st.one_of(st.integers(-2, 2), st.sampled_from(FLOATS), st.sampled_from(["a", "b"]))
tensors = st.one_of(
    st.lists(st.sampled_from(FLOATS), max_size=3).map(lambda xs: torch.tensor(xs, dtype=torch.float32)),
    st.lists(st.integers(-2, 2), max_size=3).map(lambda xs: torch.tensor(xs, dtype=torch.int64)),
    st.lists(st.sampled_from(FLOATS), max_size=3).map(lambda xs: torch.tensor(xs, dtype=torch.float64)),
)
arrays = st.one_of(
    st.lists(st.sampled_from(FLOATS), max_size=3).map(lambda xs: np.array(xs, dtype=np.float32)),
    st.lists(st.integers(-2, 2), max_size=3).map(lambda xs: np.array(xs, dtype=np.int64)),
)
leaves = st.one_of(numbers, tensors, arrays)


def _containers(items: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    small = st.lists(items, max_size=3)
    return st.one_of(
        small, small.map(tuple), small.map(collections.deque),
        st.dictionaries(st.sampled_from(["x", "y", "z"]), items, max_size=3),
        st.dictionaries(st.sampled_from(["x", "y", "z"]), items, max_size=3).map(lambda d: Helper(**d)),
        st.sets(st.integers(-2, 2), max_size=3),
    )


values = st.one_of(tensors, arrays, st.recursive(leaves, _containers, max_leaves=6))


def described(value: Any) -> Any:
    """What a value is, written out: its type, and dtype, shape and elements (by repr: -0.0 and NaN
    show) or items; a helper by its attributes."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return (type(value).__name__, str(value.dtype), tuple(value.shape), repr(value.tolist()))
    if isinstance(value, list | tuple | collections.deque):
        return (type(value).__name__, tuple(described(x) for x in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, described(v)) for k, v in value.items())))
    if isinstance(value, Helper):
        return ("Helper", described(vars(value)))
    if isinstance(value, set):
        return ("set", tuple(sorted(value)))
    return (type(value).__name__, repr(value))


@settings(max_examples=400, deadline=None)
@given(values, values)
def test_same_value_says_equal_exactly_where_two_values_are_equal(a: Any, b: Any) -> None:
    assert same_value(a, b) == (described(a) == described(b))


@settings(max_examples=200, deadline=None)
@given(values)
def test_a_value_equals_its_copy(value: Any) -> None:
    assert same_value(value, copy.deepcopy(value))


def test_signed_zeros_and_types_tell_values_apart() -> None:
    """-0.0 and 0.0 (a Python float, a tensor's or array's element) and 1 and 1.0 give other results
    somewhere (1 / x, range(x)): not equal; a parameter equals its detached copy."""
    assert not same_value(-0.0, 0.0)
    assert not same_value(torch.tensor([-0.0]), torch.tensor([0.0]))
    assert not same_value(np.array([-0.0]), np.array([0.0]))
    assert not same_value(1, 1.0)
    assert not same_value([1], (1,))
    weight = nn.Parameter(torch.ones(2))
    assert same_value(weight, weight.detach().clone())


def _in_place(value: Any, data: st.DataObject) -> None:
    """One change of the value's own contents, as a forward may make."""
    if isinstance(value, torch.Tensor):
        if value.numel():
            value[data.draw(st.integers(0, value.numel() - 1))] = data.draw(
                st.sampled_from(FLOATS) if value.is_floating_point() else st.integers(-2, 2))
    elif isinstance(value, np.ndarray):
        if value.size:
            value[data.draw(st.integers(0, value.size - 1))] = data.draw(
                st.sampled_from(FLOATS) if value.dtype.kind == "f" else st.integers(-2, 2))
    elif isinstance(value, list | collections.deque):
        change = data.draw(st.sampled_from(["append", "clear", "pop", "set"]))
        if change == "append" or not value:
            value.append(data.draw(values))
        elif change == "clear":
            value.clear()
        elif change == "pop":
            value.pop()
        else:
            value[0] = data.draw(values)
    elif isinstance(value, dict):
        key = data.draw(st.sampled_from(["x", "y", "w"]))
        if key in value and data.draw(st.booleans()):
            del value[key]
        else:
            value[key] = data.draw(values)
    elif isinstance(value, set):
        item = data.draw(st.integers(-3, 3))
        value.symmetric_difference_update({item})
    elif isinstance(value, Helper):
        key = data.draw(st.sampled_from(["x", "y", "w"]))
        if key in vars(value) and data.draw(st.booleans()):
            delattr(value, key)
        else:
            setattr(value, key, data.draw(values))


def _changed(module: nn.Module, names: list[str], data: st.DataObject) -> None:
    """Arbitrary changes of the module's attributes: changed in place, rebound, deleted, added."""
    for _ in range(data.draw(st.integers(0, 4))):
        present = [n for n in names if n in vars(module)]
        change = data.draw(st.sampled_from(["in place", "rebind", "delete", "add"]))
        if change == "add" or not present:
            setattr(module, data.draw(st.sampled_from(["new", *names])), data.draw(values))
            continue
        name = data.draw(st.sampled_from(present))
        if change == "in place":  # (the value or anything it holds, at any depth)
            mutable = torch.Tensor | np.ndarray | list | collections.deque | dict | set | Helper
            inside = [v for v in held(getattr(module, name)) if isinstance(v, mutable)]
            if inside:
                _in_place(data.draw(st.sampled_from(inside)), data)
        elif change == "rebind":
            setattr(module, name, data.draw(values))
        else:
            delattr(module, name)


def _taken_and_changed(attributes: dict[str, Any], data: st.DataObject) -> tuple[nn.Module, Attributes]:
    """A module with the attributes, taken, then changed."""
    module = nn.Module()
    vars(module).update(attributes)
    taken = Attributes(module)
    _changed(module, list(attributes), data)
    return module, taken


def _described_attributes(module: nn.Module) -> dict[str, Any]:
    return {name: described(value) for name, value in vars(module).items() if name in {"a", "b", "c", "new"}}


module_attributes = st.dictionaries(st.sampled_from(["a", "b", "c"]), values, max_size=3)


@settings(max_examples=300, deadline=None)
@given(module_attributes, st.data())
def test_restoring_taken_attributes_after_any_change_gives_back_equal_attributes_in_the_same_objects(
        attributes: dict[str, Any], data: st.DataObject) -> None:
    expected = {name: described(value) for name, value in attributes.items()}
    module, taken = _taken_and_changed(attributes, data)
    taken.restore()
    assert _described_attributes(module) == expected
    assert all(vars(module)[name] is value for name, value in attributes.items())


@settings(max_examples=300, deadline=None)
@given(module_attributes, st.data())
def test_taken_attributes_name_exactly_those_that_any_change_left_unequal(
        attributes: dict[str, Any], data: st.DataObject) -> None:
    before = {name: described(value) for name, value in attributes.items()}
    module, taken = _taken_and_changed(attributes, data)
    now = _described_attributes(module)
    unequal = {name for name in before.keys() | now.keys() if before.get(name) != now.get(name)}
    assert set(taken.changed()) == unequal


def _generators() -> dict[str, Any]:
    return {"torch": torch.Generator().manual_seed(1), "python": random.Random(1),
            "numpy": np.random.default_rng(1), "numpy legacy": np.random.RandomState(1)}


def _draw(generator: Any) -> float:
    if isinstance(generator, torch.Generator):
        return float(torch.rand((), generator=generator))
    if isinstance(generator, random.Random):
        generator.gauss(0.0, 1.0)  # (keeps a second number in an attribute)
        return generator.random()
    return float(generator.random())


def test_a_random_generators_draws_are_a_change_and_restoring_gives_back_its_next_numbers() -> None:
    """A generator's state lives outside its attributes: before, a draw was no change (torch's and
    numpy's compared as the same object, Python's by its attributes) and restoring left it advanced,
    so a look-ahead forward advanced a layer's own generator."""
    module, fresh = nn.Module(), nn.Module()
    vars(module).update(_generators())
    vars(fresh).update(_generators())
    kept = Attributes(module)
    for name in _generators():
        _draw(vars(module)[name])
    assert kept.changed() == list(_generators())
    kept.restore()
    assert kept.changed() == []
    assert [_draw(vars(module)[name]) for name in _generators()] == [
        _draw(vars(fresh)[name]) for name in _generators()]


def test_a_look_ahead_leaves_an_enum_member_held_by_a_layer_whole() -> None:
    """copy.copy of an enum member is the member itself; before, restoring cleared its attributes (its
    value and name, for every user of the enum) after every look-ahead forward."""
    module = nn.Module()
    module.mode = Mode.ON
    with state_kept(module):
        pass
    assert Mode.ON.value == 1 and Mode.ON.name == "ON"


class Mode(enum.Enum):
    ON = 1


def test_a_look_ahead_gives_back_a_parameters_signed_zeros() -> None:
    """A forward that writes its weight in place (here: negates it) may change only the sign of its
    zeros; torch.equal calls -0.0 and 0.0 equal, and before, state_kept left such a weight written."""
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.bias.zero_()
    with state_kept(layer), torch.no_grad():
        layer.bias.neg_()
    assert not layer.bias.signbit().any()


def test_plain_data_is_data_compared_by_value_all_through_cycles_included() -> None:
    """What a group compares between its members' shared modules (`plain_data`): an object compared by
    identity differs in every trial's copy; a cycle is data, and `same_value` compares two cyclic
    values to an end (before, it recursed without end, so `plain_data` left cycles out, uncompared)."""
    def ring(x: float) -> tuple[Helper, list[Any]]:
        first, second = Helper(x=x), Helper()
        first.next, second.next = second, first
        looped: list[Any] = [x]
        looped.append(looped)
        return first, looped

    assert plain_data({"a": [1.0, (2, "x")], "b": Helper(t=torch.zeros(2)), "m": Mode.ON})
    assert all(plain_data(value) for value in ring(1.0))
    assert all(same_value(a, b) for a, b in zip(ring(1.0), ring(1.0), strict=True))
    assert not any(same_value(a, b) for a, b in zip(ring(1.0), ring(2.0), strict=True))
    assert not plain_data([nn.Linear(1, 1)]) and not plain_data({"f": lambda: 0})
