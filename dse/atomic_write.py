"""Write a file atomically: under a hidden temporary name in its directory, renamed onto it when complete.

A reader (or a process killed mid-write) never sees a half-written file. Below every layer that writes
files (the dataset cache, the report files), which must not import each other.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
from collections.abc import Callable
from pathlib import Path

TEMPORARY_NAME = ".{name}.{token}.tmp"
"""The hidden name a file is written under before it is renamed onto `name` (`write_atomically`)."""


def temporary_files(path: Path) -> list[Path]:
    """The temporary files `write_atomically` may have left for `path` (a writer killed mid-write)."""
    return list(path.parent.glob(TEMPORARY_NAME.format(name=glob.escape(path.name), token="*")))


def written_in_place(path: Path) -> bool:
    """Whether `write_atomically` writes `path` in place: a symbolic link, a device or a FIFO."""
    return path.is_symlink() or (path.exists() and not path.is_file() and not path.is_dir())


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` and move the result onto `path`; on failure leave `path` untouched.

    The temporary file is named before it is created, so that an exception raised anywhere in here (a
    signal's, dse.sweep.interrupt) removes it: nothing is left half-written. It is created with the
    permissions any new file gets (0666 less the umask), so a file shared in a group folder can be read
    there, as the file written in place would be. An OS refusal (unwritable or non-directory parent, a
    directory in the way, a full disk) raises its OSError, the temporary file removed. A symbolic link
    or an existing file that is not a regular one (a device, a FIFO: `--csv /dev/stdout`, a link to
    /proc/self/fd/1) is written in place, through the link: renaming onto it would put a regular file
    in the link's place (measured: /dev/stdout replaced, as root).
    """
    if written_in_place(path):
        write(path)
        return path
    temporary = path.parent / TEMPORARY_NAME.format(name=path.name, token=secrets.token_hex(8))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        if not isinstance(error, FileExistsError):  # (a file of that name was there: not ours)
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise
    return path
