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
