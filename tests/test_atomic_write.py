"""dse.atomic_write, the one atomic write under the dataset cache and the report files: the file is whole
or as it was, with the permissions of any new file, and no temporary file outlives a failure or a signal."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from dse.atomic_write import TEMPORARY_NAME, temporary_files, write_atomically
from dse.data.dataset import load_cached, save_cached


def _interrupted_in_savez(monkeypatch: pytest.MonkeyPatch) -> None:
    """np.savez writes part of its file, then the process gets SIGINT (KeyboardInterrupt)."""
    def half_then_interrupt(file: object, **arrays: object) -> None:
        file.write(b"PK\x03\x04 half an npz")  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(np, "savez", half_then_interrupt)


def test_the_dataset_cache_interrupted_mid_write_leaves_the_old_file_and_no_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the cache caught only OSError: a Ctrl-C in np.savez left its .tmp file in the cache."""
    path = tmp_path / "cache" / "data-v1.npz"
    assert save_cached(path, {"x": np.arange(3)})
    old = path.read_bytes()
    _interrupted_in_savez(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        save_cached(path, {"x": np.arange(5)})
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name] and path.read_bytes() == old
    loaded = load_cached(path, ("x",))
    assert loaded is not None and list(loaded["x"]) == [0, 1, 2]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_dataset_cache_and_a_report_get_the_permissions_of_any_new_file(tmp_path: Path,
                                                                            umask: int) -> None:
    from dse.report.files import write_text_atomically

    previous = os.umask(umask)
    try:
        assert save_cached(tmp_path / "a.npz", {"x": np.zeros(2)})
        write_text_atomically(tmp_path / "summary.md", "| a |\n")
    finally:
        os.umask(previous)
    for name in ("a.npz", "summary.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_temporary_file_is_hidden_beside_its_target_and_found_by_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "odd [name]*.npz"
    seen: list[Path] = []

    def write(temporary: Path) -> None:
        seen.append(temporary)
        assert temporary.parent == tmp_path and temporary.name.startswith(".") and temporary.exists()
        assert temporary_files(target) == [temporary]
        assert temporary_files(tmp_path / "odd [name]x.npz") == []  # glob characters in a name are literal
        temporary.write_bytes(b"whole")

    assert write_atomically(target, write) == target and target.read_bytes() == b"whole"
    assert seen[0].name.startswith(TEMPORARY_NAME.format(name=target.name, token="")[:-4])
    assert temporary_files(target) == [] and sorted(tmp_path.iterdir()) == [target]


def test_an_os_refusal_is_its_oserror_and_a_full_cache_only_costs_regenerating(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        write_atomically(blocker / "x.npz", lambda temporary: temporary.write_bytes(b""))
    assert save_cached(blocker / "x.npz", {"x": np.zeros(1)}) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_symbolic_link_stays_a_link_and_its_file_is_replaced_whole(tmp_path: Path) -> None:
    """Renaming onto a link puts a regular file in its place (`--csv /dev/stdout` as root replaced
    /dev/stdout, a link to /proc/self/fd/1, measured). Writing through the link instead truncated its
    file first: a failure mid-write lost the old content. The link's file is replaced by a rename."""
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "real.csv"
    target.write_text("old")
    old_inode = target.stat().st_ino
    link = tmp_path / "link.csv"
    link.symlink_to(Path("data") / "real.csv")  # relative, from the link's folder
    chain = tmp_path / "chain.csv"
    chain.symlink_to(link)

    def fail_half_way(temporary: Path) -> None:
        assert temporary.parent == target.parent and target.read_text() == "old"
        temporary.write_text("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(chain, fail_half_way)
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["real.csv"]
    assert write_atomically(chain, lambda path: path.write_text("new")) == chain
    assert target.read_text() == "new" and target.stat().st_ino != old_inode  # replaced, not rewritten
    assert os.readlink(link) == str(Path("data") / "real.csv") and os.readlink(chain) == str(link)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.csv", "data", "link.csv"]
    assert temporary_files(chain) == [] and sorted(p.name for p in target.parent.iterdir()) == ["real.csv"]


def test_a_dangling_link_makes_its_file_and_stays_a_link(tmp_path: Path) -> None:
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to("made.csv")
    write_atomically(dangling, lambda path: path.write_text("made"))
    assert dangling.is_symlink() and os.readlink(dangling) == "made.csv"
    assert (tmp_path / "made.csv").read_text() == "made"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.csv", "made.csv"]


def test_a_link_to_a_folder_or_a_loop_of_links_is_an_oserror_and_nothing_changes(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    to_folder = tmp_path / "to-folder"
    to_folder.symlink_to("folder")
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    for path in (to_folder, loop):
        with pytest.raises(OSError):
            write_atomically(path, lambda temporary: temporary.write_text("x"))
        assert path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "loop", "to-folder"]
    assert list((tmp_path / "folder").iterdir()) == []


def test_a_file_there_under_the_temporary_name_is_not_removed(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a temporary file write_atomically made is removed on failure; a FileExistsError raised by
    the writer after it was made removes it too (before, any FileExistsError kept it)."""
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: "0" * (2 * n))
    theirs = tmp_path / TEMPORARY_NAME.format(name="a.csv", token="0" * 16)
    theirs.write_text("theirs")
    with pytest.raises(FileExistsError):
        write_atomically(tmp_path / "a.csv", lambda temporary: temporary.write_text("x"))
    assert theirs.read_text() == "theirs"
    theirs.unlink()

    def exists_error(temporary: Path) -> None:
        raise FileExistsError(17, "File exists", "somewhere else")

    with pytest.raises(FileExistsError):
        write_atomically(tmp_path / "a.csv", exists_error)
    assert list(tmp_path.iterdir()) == []


def test_a_fifo_is_written_in_place_for_its_reader(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_bytes()))
    reader.start()
    write_atomically(fifo, lambda path: path.write_bytes(b"rows\n"))
    reader.join(timeout=10)
    assert read == [b"rows\n"] and fifo.is_fifo() and sorted(tmp_path.iterdir()) == [fifo]


def test_a_link_to_a_fifo_is_written_in_place(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to("pipe")
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_bytes()))
    reader.start()
    write_atomically(link, lambda path: path.write_bytes(b"rows\n"))
    reader.join(timeout=10)
    assert read == [b"rows\n"] and fifo.is_fifo() and link.is_symlink()
    assert sorted(tmp_path.iterdir()) == [link, fifo]


def test_a_table_onto_a_link_to_a_full_device_is_one_line(tmp_path: Path) -> None:
    """`dse compare --csv` wrote with pandas directly: a full disk was an OSError traceback."""
    from typer.testing import CliRunner

    from dse.cli import app

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    link = tmp_path / "full.csv"
    link.symlink_to("/dev/full")
    result = CliRunner().invoke(app, ["compare", "int8", "fp32", "--csv", str(link)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: cannot write {link}: No space left on device"
    assert link.is_symlink() and sorted(tmp_path.iterdir()) == [link]
