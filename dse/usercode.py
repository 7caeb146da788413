"""A user's own code named in a config: `path/to/file.py:function` or `package.module:function`.

Models, datasets and workloads can each come from a function the user wrote. This module is the one
place that parses such a reference, loads its function, and says what identifies it: the function's
name and the sha256 of its source file (so editing the file changes every trial built on it, and moving
the folder changes none).

How the code reaches sweep workers: a `file.py` reference travels as text. `sources_of` reads the file
once, the job carries the text, and `provide_sources` registers it in the worker before the trial runs,
so a process-pool or Ray worker executes the code that was hashed, with no shared filesystem
needed. Only that one file travels: modules it imports must be importable on the worker (installed, or
shipped with Ray's `runtime_env`). A `package.module` reference is imported on the worker by name, so
the package must be installed there; its identity hashes the module's own source file.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import keyword
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dse.digests import sha256_hex
from dse.errors import InputError
from dse.interrupts import undone_by_unwinding, users_code

_PROVIDED: dict[str, str] = {}
"""Absolute path -> source text shipped by a sweep job: used instead of the disk in a worker."""
_READ: dict[str, tuple[tuple[int, int], str]] = {}
"""Absolute path -> ((mtime_ns, size), text): read again only when the file changes."""
_MODULES: dict[tuple[str, str], types.ModuleType] = {}
"""(path, sha256) -> the module executed from that text."""


@dataclass(frozen=True)
class CodeRef:
    """A parsed reference: a file path or a dotted module name, and a function name inside it."""

    module: str
    function: str
    is_file: bool

    @property
    def text(self) -> str:
        return f"{self.module}:{self.function}"


def _is_identifier_path(text: str) -> bool:
    return bool(text) and all(part.isidentifier() and not keyword.iskeyword(part) for part in text.split("."))


def parse_ref(value: Any) -> CodeRef | None:
    """The reference `value` spells, or None if it is a plain name (a built-in model, dataset, ...)."""
    if not isinstance(value, str) or ":" not in value:
        return None
    module, _, function = value.strip().rpartition(":")
    if not _is_identifier_path(function) or "." in function:
        return None
    if module.endswith(".py"):
        return CodeRef(module, function, is_file=True)
    if _is_identifier_path(module):
        return CodeRef(module, function, is_file=False)
    return None


def is_ref(value: Any) -> bool:
    return parse_ref(value) is not None


def absolute(value: str, base_dir: str | Path) -> str:
    """A file reference with its path made absolute against `base_dir`; anything else as it is."""
    ref = parse_ref(value)
    if ref is None or not ref.is_file:
        return value
    path = Path(ref.module).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    return f"{path.resolve()}:{ref.function}"


def _file_path(ref: CodeRef) -> str:
    return str(Path(ref.module).expanduser().resolve())


def _read(path: str, what: str) -> str:
    if path in _PROVIDED:
        return _PROVIDED[path]
    try:
        stat = Path(path).stat()
        cached = _READ.get(path)
        if cached is not None and cached[0] == (stat.st_mtime_ns, stat.st_size):
            return cached[1]
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what}: file {path!r} not found") from None
    except IsADirectoryError:
        raise InputError(f"{what}: {path!r} is a directory, not a Python file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{what}: cannot read {path!r} ({type(error).__name__})") from None
    _READ[path] = ((stat.st_mtime_ns, stat.st_size), text)
    return text


def _module_file(ref: CodeRef, what: str) -> str:
    """The source file of a dotted module (imported to find it)."""
    module = _import(ref, what)
    path = getattr(module, "__file__", None)
    if path is None:
        raise InputError(f"{what}: module {ref.module!r} has no source file to hash")
    return str(Path(path).resolve())


def _exec_file(path: str, what: str) -> types.ModuleType:
    text = _read(path, what)
    digest = sha256_hex(text)
    key = (path, digest)
    if key not in _MODULES:
        name = f"dse_user_{Path(path).stem}_{digest[:12]}"
        module = types.ModuleType(name)
        module.__file__ = path
        folder = str(Path(path).parent)
        users_code(folder)  # (it and the modules it imports from its folder: Ctrl-C stops them at once)
        added = folder not in sys.path
        if added:  # its sibling modules import as they would when run as a script
            sys.path.insert(0, folder)
        sys.modules[name] = module  # dataclasses and pickling look their module up by name
        try:
            with undone_by_unwinding():  # (the user's code, unwound: their `finally` runs)
                exec(compile(text, path, "exec"), module.__dict__)
        except Exception as error:
            sys.modules.pop(name, None)
            if (interrupt := _signal_behind(error)) is not None:
                raise interrupt from None
            raise InputError(f"{what}: {path} failed to load: {type(error).__name__}: "
                             f"{_first_line(error)}") from None
        finally:
            if added:
                sys.path.remove(folder)
        _MODULES[key] = module
    return _MODULES[key]


def _import(ref: CodeRef, what: str) -> types.ModuleType:
    try:
        _users_package(ref.module)
        with undone_by_unwinding():  # (the user's module code, unwound: their `finally` runs)
            return importlib.import_module(ref.module)
    except ModuleNotFoundError as error:
        if error.name and ref.module.startswith(error.name):
            raise InputError(f"{what}: module {ref.module!r} not found (a file needs the .py suffix)"
                             ) from None
        raise InputError(f"{what}: {ref.module} failed to import: {_first_line(error)}") from None
    except Exception as error:
        if (interrupt := _signal_behind(error)) is not None:
            raise interrupt from None
        raise InputError(f"{what}: {ref.module} failed to import: {type(error).__name__}: "
                         f"{_first_line(error)}") from None


def _users_package(module: str) -> None:
    """The package of a module the user named is the user's own code (`dse.interrupts.users_code`)
    where it lies in the working folder (the user's project, where `dse` runs; an editable install of
    it too) and is not installed. Any other is a library, whose import a signal waits for: an installed
    one (torchvision.models), and one elsewhere on PYTHONPATH, whose own module code may swallow a
    signal raised in it (a bare `except:` around an optional import) where the user's would stop."""
    package = module.partition(".")[0]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # (import_module says what is wrong)
        return
    origin = getattr(spec, "origin", None)
    if spec is None or not origin or not Path(origin).is_file():
        return  # (built in, frozen, a namespace package, or not there: import_module says so)
    folder = Path(origin).parent if spec.submodule_search_locations is None else Path(origin).parent.parent
    if str(folder) not in _installed_folders() and folder.resolve().is_relative_to(Path.cwd().resolve()):
        users_code(str(folder), package)


@functools.cache
def _installed_folders() -> set[str]:
    """Where this Python's standard library and installed packages are."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    folders = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    folders += [*site.getsitepackages(), site.getusersitepackages()]
    return {str(Path(folder)) for folder in folders}


def _signal_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The signal (dse.interrupts.Interrupted) that an error of the user's code was raised from: Python
    3.11 wraps one raised in a class attribute's `__set_name__` in a RuntimeError. Said as the signal,
    not as a module that failed to load."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__
    return None


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def load_function(value: str, what: str) -> Callable[..., Any]:
    """The function `value` names; `what` ('model', 'dataset', 'workload') starts every error line."""
    ref = parse_ref(value)
    if ref is None:
        raise InputError(f"{what}: {value!r} is not a reference of the form file.py:function or "
                         "package.module:function")
    what = f"{what} {value!r}"
    module = _exec_file(_file_path(ref), what) if ref.is_file else _import(ref, what)
    function = getattr(module, ref.function, None)
    if function is None:
        raise InputError(f"{what}: no function {ref.function!r} in {ref.module}")
    if not callable(function):
        raise InputError(f"{what}: {ref.function!r} in {ref.module} is {type(function).__name__!r} "
                         "object, not a function")
    return function


def call(value: str, what: str, *args: Any) -> Any:
    """The named function called with `args`; whatever it raises becomes one line naming it."""
    function = load_function(value, what)
    try:
        return function(*args)
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{what} {value!r} raised {type(error).__name__}: {_first_line(error)}") from None


def identity(value: Any, what: str = "code") -> Any:
    """What identifies a field's value in a trial: a plain value itself, a reference its function name
    and the sha256 of its source file (not the path: moving the folder reruns nothing)."""
    ref = parse_ref(value)
    if ref is None:
        return value
    path = _file_path(ref) if ref.is_file else _module_file(ref, f"{what} {value!r}")
    return {"function": ref.function, "source_sha256": sha256_hex(_read(path, f"{what} {value!r}"))}


def sources_of(values: list[Any]) -> dict[str, str]:
    """Path -> text of the files the references among `values` name (what a job ships to a worker)."""
    sources: dict[str, str] = {}
    for value in values:
        ref = parse_ref(value)
        if ref is not None and ref.is_file:
            path = _file_path(ref)
            sources[path] = _read(path, f"{value!r}")
    return sources


def provide_sources(sources: dict[str, str]) -> None:
    """Use these texts for these paths in this process (a worker runs the code its job shipped)."""
    _PROVIDED.update(sources)


def describe(function: Callable[..., Any]) -> str:
    """A reference-like name for a function passed in Python (`module:qualname`)."""
    return f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}"
