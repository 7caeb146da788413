"""Write a file atomically: under a hidden temporary name in its directory, renamed onto it when complete.

A reader (or a process killed mid-write) never sees a half-written file. Below every layer that writes
files (the dataset cache, the report files), which must not import each other.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from dse.interrupts import undone_by_unwinding

TEMPORARY_NAME = ".{name}.{token}.tmp"
"""The hidden name a file is written under before it is renamed onto `name` (`write_atomically`)."""


def rename_target(path: Path) -> Path | None:
    """Where `write_atomically` renames its temporary file onto: `path`, or the file a symbolic link at
    `path` leads to (followed to its end, a relative link from its own folder, a dangling link to the
    file it names), so that the link stays a link and its file is replaced whole. None where the file
    is written in place: a device or a FIFO (`--csv /dev/stdout`, a link to /proc/self/fd/1), whose
    reader a rename would never reach. A loop of links is ELOOP."""
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # (realpath stops at a loop)
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path))
    return None if target.exists() and not target.is_file() and not target.is_dir() else target


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into the existing `folder` by `write_atomically` (a temporary file made
    there and renamed: the folder's permission counts, not the files'), or None where they can."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    return "read-only file system" if os.statvfs(folder).f_flag & os.ST_RDONLY else "permission denied"


def file_problem(path: Path, makes_folders: bool = False) -> str | None:
    """Why `write_atomically` cannot write `path`, in words, or None where it can: asked before any work,
    so that bad input writes nothing. `makes_folders`: the writer creates missing folders, so only an
    existing ancestor must be one."""
    # (renamed onto the path's or its link's file, so that file's folder must be writable, and an
    # existing file too, as its owner may have protected it; a device or a FIFO is written in place)
    try:
        target = rename_target(path)
    except OSError as error:
        return error.strerror
    folder = (target or path).parent
    while makes_folders and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.is_dir():
        return "it is a directory"
    if not folder.is_dir():
        return "no such directory"
    if target is not None and (problem := folder_problem(folder)) is not None:
        return problem
    return "permission denied" if path.exists() and not os.access(path, os.W_OK) else None


def temporary_files(path: Path) -> list[Path]:
    """The temporary files `write_atomically` may have left for `path` (a writer killed mid-write)."""
    try:
        target = rename_target(path)
    except OSError:
        return []
    if target is None:
        return []
    return list(target.parent.glob(TEMPORARY_NAME.format(name=glob.escape(target.name), token="*")))


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)` and move the result onto `path`; on failure leave `path` untouched.

    The temporary file is named before it is created, so that an exception raised anywhere in here (a
    signal's, dse.interrupts) removes it: nothing is left half-written. It is created with the
    permissions any new file gets (0666 less the umask), so a file shared in a group folder can be read
    there, as the file written in place would be. An OS refusal (unwritable or non-directory parent, a
    directory in the way, a full disk, a loop of links) raises its OSError, the temporary file removed.
    A symbolic link is followed (`rename_target`): its file is replaced atomically and the link stays
    (renaming onto the link itself would put a regular file in its place: measured, `--csv /dev/stdout`
    as root replaced /dev/stdout). A device or a FIFO, or a link to one, is written in place.
    """
    target = rename_target(path)
    if target is None:
        write(path)
        return path
    temporary = target.parent / TEMPORARY_NAME.format(name=target.name, token=secrets.token_hex(8))
    created = False
    with undone_by_unwinding():  # (a signal in an import inside `write` raises once it has ended)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                created = True
                os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:  # (a file of that name was there: not ours)
                created = False
                raise
            write(temporary)
            os.replace(temporary, target)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    temporary.unlink()
            raise
    return path


@contextlib.contextmanager
def written_together(folder: Path) -> Iterator[Path]:
    """A new hidden folder inside `folder` (made where missing) to write a set of files into, then
    `move_together` them into `folder`: they appear together or not at all. The hidden folder is removed
    on leaving, with whatever is still in it (a failed write's files: `folder` is as it was, a folder
    made for it removed again where it stayed empty)."""
    made = not folder.exists()
    stage = folder / TEMPORARY_NAME.format(name="files", token=secrets.token_hex(8))
    with undone_by_unwinding():
        try:
            stage.mkdir(parents=True)
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            if made:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def move_together(stage: Path, folder: Path, names: list[str]) -> None:
    """Move the files `names` from `written_together`'s `stage` onto their namesakes in `folder`, in
    that order, by renames only once every one can be renamed: a full disk fails before any file in
    `folder` changed. A symbolic link's file is replaced (`rename_target`); one on another file system
    gets a copy beside it first; a device or a FIFO is written in place, last."""
    renames: list[tuple[Path, Path]] = []
    in_place: list[tuple[Path, Path]] = []
    copies: list[Path] = []
    try:
        for name in names:
            source, path = stage / name, folder / name
            target = rename_target(path)
            if target is None:
                in_place.append((source, path))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if os.stat(target.parent).st_dev != os.stat(stage).st_dev:
                copy = target.parent / TEMPORARY_NAME.format(name=target.name, token=secrets.token_hex(8))
                os.close(os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                copies.append(copy)
                shutil.copyfile(source, copy)
                source = copy
            renames.append((source, target))
        for source, target in renames:
            os.replace(source, target)
    except BaseException:
        for copy in copies:
            with contextlib.suppress(OSError):
                copy.unlink()
        raise
    for source, path in in_place:
        shutil.copyfile(source, path)
