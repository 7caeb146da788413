"""How a `dse` command answers the signals that stop it: SIGINT (Ctrl-C), SIGTERM (`kill`, a batch
scheduler's time limit) and SIGHUP (the terminal or session that started it went away).

Whatever the instant, the command prints one line on stderr and exits with 128 + the signal's number
(130, 143, 129), as a shell reports a process the signal ended, and leaves nothing half-written:
- while `dse` imports its command line, before anything is written: `stop_while_starting`'s handler
  prints the line and exits at once (no KeyboardInterrupt traceback from inside an import);
- while a command runs: each signal raises `Interrupted` in the main thread, as Ctrl-C raises
  KeyboardInterrupt (a subclass), so what is being written unwinds; inside `signals_interrupt` only
  the first does (a sweep stops its workers undisturbed); one that arrives while another library is
  being imported (torch's: seconds) raises once that import has ended (`_DeferredSignal`); where
  nothing is to be undone (outside every `undone_by_unwinding` block: a command's imports before it
  writes), one during any import ends the process at once instead;
- once the command has returned: `CommandSignals` records the signal and says it after the exit
  handlers; a second one ends the process at once.
A handler the caller installed (SIG_IGN under `nohup`, a test's own) is left in place.

Imported by cli.py's first lines, before torch: it imports nothing heavy (`python -X importtime`).
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

TYPE_CHECKING = False  # (not typing's: importing typing here cost cli.py's first lines 1.8 ms: -X importtime)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path
    from types import FrameType
    from typing import Any

INTERRUPTING_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""The signals that stop a command (SIGHUP where the platform has it)."""

GROUP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGHUP") if hasattr(signal, name))
"""What a terminal sends a command's whole process group (Ctrl-C; a hang-up as it closes): a helper
process the command started ignores them, and the command stops it (SIGTERM)."""


class Interrupted(KeyboardInterrupt):
    """A command stopped by one of INTERRUPTING_SIGNALS (a KeyboardInterrupt, so code that handles
    Ctrl-C handles the others)."""

    def __init__(self, signal_number: int = signal.SIGINT) -> None:
        super().__init__(signal_number)
        self.signal_number = int(signal_number)

    @classmethod
    def of(cls, error: KeyboardInterrupt) -> Interrupted:
        """`error` itself, or a plain KeyboardInterrupt as SIGINT's."""
        return error if isinstance(error, Interrupted) else cls(signal.SIGINT)

    @property
    def name(self) -> str:
        """The signal's name: SIGINT, SIGTERM, SIGHUP."""
        return signal.Signals(self.signal_number).name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: what a shell reports for a process the signal ended."""
        return 128 + self.signal_number

    def __str__(self) -> str:
        """What a command stopped by it says, unless it has more to say (`CommandSignals.line`)."""
        return f"interrupted by {self.name}"


def files_line(directory: Path) -> Callable[[Interrupted], str]:
    """What a command that writes files into `directory` (atomically: dse.atomic_write) says when a
    signal stops it."""
    return lambda interrupted: (f"{interrupted}: no file in {directory} is half-written; run the "
                                "same command again to write them")


def _stopped_while_starting(number: int, frame: object) -> None:
    os.write(2, f"{Interrupted(number)}\n".encode())
    os._exit(128 + number)


_IMPORT_MACHINERY = frozenset({"importlib._bootstrap", "importlib._bootstrap_external", "_frozen_importlib",
                               "_frozen_importlib_external"})
"""The modules whose frames run an import (their names before and after `importlib` renames them)."""

DEFER_LIMIT_S = 10.0
"""How long a signal waits for the import it arrived in to end; past that it raises inside it (a
library whose import runs a long job itself still stops)."""


OVERRAN_WATCH_S = 0.05
"""How often the import that outlasted DEFER_LIMIT_S is checked for its end."""


class _DeferredSignal:
    """The signal that arrived while the main thread ran another library's import, re-sent to it once
    that import has ended. An exception raised inside such an import is unsafe: torch's start-up
    imports numpy from C and discards the error, leaving numpy half-initialised (a later import fails:
    RecursionError, 'cannot load module more than once'), and one raised in the import system's
    weakref callback is printed and dropped (the command goes on)."""

    def __init__(self) -> None:
        self.number: int | None = None
        self.overran: FrameType | None = None
        """The import that outlasted DEFER_LIMIT_S (its outermost frame, `_library_import`) while it
        runs: a signal inside it raises at once. The import itself, not a flag: a flag set for one
        signal outlived it where the signal sent again met a handler that never asks (a caller's own),
        and made a later signal raise inside another import. Kept only while that import runs
        (`_send_after_imports`): a frame kept after it keeps its callers' frames and their locals."""

    def forget(self) -> None:
        """Nothing pending: in a forked child, which has no re-sending thread, a signal kept pending
        would keep each later one that arrives in an import waiting for it, for ever."""
        self.number, self.overran = None, None

    def defers(self, number: int, frame: FrameType | None) -> bool:
        """Whether signal `number`, arriving at `frame` of the main thread, waits for its import to end
        (then it is re-sent); False: raise it now."""
        running = _library_import(frame)
        if running is None or running is self.overran:
            return False
        if self.number is None:  # (a second signal during the same import: the first stops the command)
            import _thread

            self.number = number
            _thread.start_new_thread(self._send_after_imports, (_thread.get_ident(), number))
        return True

    def _send_after_imports(self, main: int, number: int) -> None:
        import time

        deadline = time.monotonic() + DEFER_LIMIT_S
        while (running := _library_import(frame := sys._current_frames().get(main))) is not None:
            if time.monotonic() >= deadline:
                self.overran = running
                break
            time.sleep(0.01)
        del frame
        self.number = None
        if main in sys._current_frames():  # (else the main thread has ended)
            signal.pthread_kill(main, number)
        if running is not None:  # the signal sent again may be swallowed: the record ends with the import
            while _library_import(sys._current_frames().get(main)) is running:
                time.sleep(OVERRAN_WATCH_S)
            if self.overran is running:
                self.overran = None
        del running  # (no reference to a frame of the main thread kept past this point)


def _library_import(frame: FrameType | None) -> FrameType | None:
    """The import of another library that `frame` runs inside (the outermost frame of the import system
    running it), None if none: walking out from `frame`, a frame of the import system comes before any
    of dse's own or of the user's code (`users_code`), which unwind cleanly: a signal raises there, in
    their module code between imports, at once."""
    found = None
    while frame is not None:
        module = frame.f_globals
        name = module.get("__name__", "")
        if name in _IMPORT_MACHINERY:
            found = frame
        elif name == "dse" or name.startswith("dse.") or _users(module):
            return found
        frame = frame.f_back
    return found


_USERS_CODE: list[tuple[str, str]] = []
"""(sys.path folder, package: '' for any) of the user's own code (`users_code`)."""


def users_code(folder: str, package: str = "") -> None:
    """The modules imported by name from the sys.path entry `folder` (only `package` and below, if
    given) are the user's own code (dse.usercode loads it: a model file's folder, a model module's):
    a signal in their module code raises at once, as in dse's own. A user's model that trains as it is
    imported stops at Ctrl-C, where it ran on for DEFER_LIMIT_S; a library it imports is still waited for."""
    if (folder, package) not in _USERS_CODE:
        _USERS_CODE.append((folder, package))


def _users(module: dict[str, Any]) -> bool:
    """Whether the module of these globals is the user's own code (`users_code`)."""
    name, file = module.get("__name__"), module.get("__file__")
    if not _USERS_CODE or not isinstance(name, str) or not isinstance(file, str):
        return False
    for folder, package in _USERS_CODE:
        if not package or name == package or name.startswith(f"{package}."):
            stem = os.path.join(folder, *name.split("."))
            if file in (f"{stem}.py", os.path.join(stem, "__init__.py")):
                return True
    return False


_DEFERRED = _DeferredSignal()
os.register_at_fork(after_in_child=_DEFERRED.forget)


_UNDOING: set[object] = set()
"""A token per `undone_by_unwinding` block now running, in any thread."""


@contextmanager
def undone_by_unwinding() -> Iterator[None]:
    """What the block does (a file it writes, a sweep's workers and store, a user's code loaded, an import
    that writes files: matplotlib's first, its font cache under a lock file) is undone by unwinding it:
    inside, a signal in another library's import waits for that import to end, then raises. Outside
    every such block (in any thread) `dse` has nothing to undo, and a signal during any import ends it
    at once (`CommandSignals.end_at_once`): not after another library's import (torch's, seconds under
    load), and not raised in module code, where what runs may turn it into another error (Python
    3.11 wraps one raised in a class attribute's `__set_name__` in a RuntimeError: a traceback, exit 1)."""
    token = object()
    _UNDOING.add(token)
    try:
        yield
    finally:
        _UNDOING.discard(token)


def _importing(frame: FrameType | None) -> bool:
    """Whether `frame` runs inside an import (dse's own module code, the user's, another library's)."""
    while frame is not None:
        if frame.f_globals.get("__name__", "") in _IMPORT_MACHINERY:
            return True
        frame = frame.f_back
    return False


def _raise_interrupted(number: int, frame: FrameType | None) -> None:
    if not _UNDOING and _importing(frame):
        COMMAND_SIGNALS.end_at_once(number)
    if not _DEFERRED.defers(number, frame):
        raise Interrupted(number)


def _replaceable(handler: object) -> bool:
    """Python's defaults and this module's own handlers, never one a caller installed."""
    return handler in (signal.SIG_DFL, signal.default_int_handler, _stopped_while_starting,
                       _raise_interrupted)


def _replace(handler: Callable[[int, Any], None]) -> None:
    for number in INTERRUPTING_SIGNALS:
        if _replaceable(signal.getsignal(number)):
            signal.signal(number, handler)


def _a_worker_importing_its_parents_main() -> bool:
    """Whether this process is a multiprocessing worker (spawned, or forked from the fork server) that
    imports its parent's main module, `dse` itself, before it runs its task (multiprocessing's own
    mark for that: `_inheriting`, spawn.py)."""
    process = sys.modules.get("multiprocessing.process")
    return process is not None and bool(getattr(process.current_process(), "_inheriting", False))


def stop_while_starting() -> None:
    """Until `CommandSignals.start`, a signal prints its line and ends the process at once: it comes
    while `dse` imports (nothing is written yet), where a KeyboardInterrupt would be a traceback from
    inside an import and SIGTERM would kill the process silently. Not in a sweep's worker importing
    `dse` as its parent's main module: the sweep stops it with SIGTERM, which ends it silently."""
    if not _a_worker_importing_its_parents_main():
        _replace(_stopped_while_starting)


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, the first of INTERRUPTING_SIGNALS raises Interrupted and later ones are ignored
    (what unwinds, a sweep stopping its workers, is not interrupted again); the handlers are restored
    after it. Outside the main thread (where Python cannot set handlers) the block runs as it is."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        with undone_by_unwinding():
            yield
        return
    raised = False

    def interrupt(number: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised or _DEFERRED.defers(number, frame):
            return  # already unwinding, or raised once its import ends
        raised = True
        raise Interrupted(number)

    previous = {number: signal.getsignal(number) for number in INTERRUPTING_SIGNALS}
    replaced = [number for number, handler in previous.items() if _replaceable(handler)]
    for number in replaced:
        signal.signal(number, interrupt)
    try:
        with undone_by_unwinding():
            yield
    finally:
        for number in replaced:
            signal.signal(number, previous[number])


class CommandSignals:
    """How the `dse` process answers INTERRUPTING_SIGNALS once its command line is imported: while a
    command runs (`start`), a signal raises Interrupted, which ends it with one line (`say`) and 128 +
    the number; once the command has returned (`recorded`), a signal is recorded and said the same way
    after the exit handlers and the non-daemon threads ended (`end`); a second one (or a first after
    the command was interrupted) ends the process at once, so that a stuck exit handler cannot keep it
    from stopping; after that a signal is ignored, so that interpreter shutdown, where CPython puts
    SIGINT back to its default action, cannot end the process silently with -2."""

    def __init__(self) -> None:
        self.ends_process = False
        """Set where `dse` itself runs (cli.py's `_Commands.__call__`), not where a test's CliRunner calls
        the command in its own process."""
        self.line: Callable[[Interrupted], str] = str
        """What a signal says; a command that has more to say sets it (`stopped_by`)."""
        self.said = False
        self.late: list[int] = []
        self.code = 0
        """The exit code the process ends with: its signal's once said (`say`), else the command's (`end`)."""

    def begin(self) -> None:
        """A command line is read: nothing said or recorded yet (a CliRunner reads several in one process)."""
        self.line, self.said, self.late, self.code = str, False, [], 0

    def start(self) -> None:
        """`dse` runs its command: from now on a signal raises Interrupted in it."""
        if self.ends_process:
            _replace(_raise_interrupted)

    @contextmanager
    def stopped_by(self, line: Callable[[Interrupted], str]) -> Iterator[None]:
        """Inside the block the first signal raises Interrupted, and later ones do not interrupt what
        unwinds (`signals_interrupt`); the command then says `line(the Interrupted)`, as does a
        signal after the block."""
        self.line = line
        with signals_interrupt():
            yield

    def say(self, interrupted: Interrupted) -> int:
        """Print the line of `interrupted` (unless one was said) and return its exit code."""
        if not self.said:
            self.said, self.code = True, interrupted.exit_code  # (what a second signal exits with: `record`)
            print(self.line(interrupted), file=sys.stderr, flush=True)
        return interrupted.exit_code

    def end_at_once(self, number: int) -> None:
        """End the process now, for signal `number` during an import with nothing to undo
        (`undone_by_unwinding`): its line, the exit handlers (a second signal during them ends the
        process at once), 128 + its number."""
        import atexit

        code = self.say(Interrupted(number))
        _replace(self.record)
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def record(self, number: int, frame: Any) -> None:
        if self.late or self.said:  # the user insists, or a handler is stuck: everything is written
            code = self.say(Interrupted(self.late[0])) if self.late and self.code < 128 else self.code
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        self.late.append(number)

    def recorded(self) -> None:
        """The command has returned: from now on a signal is recorded, not raised."""
        if self.ends_process:
            _replace(self.record)

    def end(self, code: int) -> None:
        """End the process with `code`: the exit handlers run, and the non-daemon threads end (what
        interpreter shutdown would wait for, concurrent.futures' included), with signals recorded; a
        signal recorded by then is said and exits 128 + its number; any later one is ignored.
        A CliRunner's command (not `ends_process`) exits with `code` alone."""
        if self.ends_process:
            import atexit
            import threading

            self.code = code
            atexit._run_exitfuncs()
            getattr(threading, "_shutdown", lambda: None)()  # (what Py_Finalize calls first)
            for number in INTERRUPTING_SIGNALS:
                if signal.getsignal(number) == self.record:
                    signal.signal(number, signal.SIG_IGN)
            if self.late and code < 128:
                code = self.say(Interrupted(self.late[0]))
            sys.stdout.flush()
        sys.exit(code)


COMMAND_SIGNALS = CommandSignals()
"""This process's (one command line, one process)."""
