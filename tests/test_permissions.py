"""Checks that depend on file permissions, run as a user they apply to: each command line a process of
its own (tests/support/forked_cli.py), as this user where it is not root, else as `nobody` (setpriv);
skipped where neither can run dse (root without setpriv or a nobody, or a nobody who cannot read the
checkout). Root reads and writes every file, so these
paths are untested where the tests run as root otherwise. Each refusal is one line, exit code 2, and
the files are left as they were."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dse.sweep import parse_config, run_sweep
from dse.sweep.executors import InlineExecutor
from dse.sweep.store import STORE_FILE

ROOT = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT_S = 300


def _prefix() -> tuple[str, ...]:
    """setpriv to nobody and nobody's own group, by number (the group is `nogroup` on Debian, `nobody`
    on Fedora: a name that is missing would make every test here skip)."""
    if os.geteuid() != 0:
        return ()
    import pwd

    nobody = pwd.getpwnam("nobody")
    return ("setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups")


def _has_nobody() -> bool:
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return True


class _Commands:
    """tests/support/forked_cli.py run as the other user: each `dse` command a process of its own,
    forked from one that imported what the commands import once (started in full, each command cost
    1.5-2 s of imports: most of this file's time)."""

    def __init__(self, home: Path) -> None:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(home),
               "MPLCONFIGDIR": str(home / ".mpl")}
        server = str(ROOT / "tests" / "support" / "forked_cli.py")
        self.errors = tempfile.TemporaryFile()  # (a pipe nobody reads could fill and stop the process)
        self.process = subprocess.Popen([*_prefix(), sys.executable, server], cwd=home, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.errors, text=True)
        assert self.process.stdout is not None and self.process.stdin is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        self.ready = self.stdout.readline().strip() == '{"ready": true}'

    def run(self, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"HOME": str(folder), "DSE_CACHE_DIR": str(folder / ".cache")}
        self.stdin.write(json.dumps({"cwd": str(folder), "env": env, "args": list(args)}) + "\n")
        self.stdin.flush()
        if not select.select([self.stdout], [], [], COMMAND_TIMEOUT_S)[0]:
            self.process.kill()
            raise TimeoutError(f"dse {' '.join(args)} ran past {COMMAND_TIMEOUT_S} s")
        reply = json.loads(self.stdout.readline())
        return subprocess.CompletedProcess(["dse", *args], reply["returncode"], reply["stdout"],
                                           reply["stderr"])

    def close(self) -> str:
        """Stop the process; its stderr (why it did not start, where it did not)."""
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.errors.seek(0)
        errors = self.errors.read().decode(errors="replace")
        self.errors.close()
        return errors


_COMMANDS: list[_Commands] = []


@pytest.fixture(scope="module")
def commands() -> Iterator[_Commands]:
    if os.geteuid() == 0 and (shutil.which("setpriv") is None or not _has_nobody()):
        pytest.skip("running as root without setpriv or a nobody: no user to whom permissions apply")
    home = Path(tempfile.mkdtemp(prefix="dse-permissions-home-"))
    home.chmod(0o755)
    _give(home)
    started = _Commands(home)
    try:
        if not started.ready:
            pytest.skip(f"the other user cannot run dse here: {started.close().strip()[-200:]}")
        _COMMANDS.append(started)
        yield started
    finally:
        _COMMANDS.clear()
        started.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def workdir(commands: _Commands) -> Iterator[Path]:
    """A folder the other user owns (this user's tmp_path is root's private folder when run as root)."""
    folder = Path(tempfile.mkdtemp(prefix="dse-permissions-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(folder)


def _give(path: Path) -> None:
    """Hand path (and what is below it) to the user the commands run as."""
    if os.geteuid() == 0:
        import pwd

        nobody = pwd.getpwnam("nobody")
        for item in [path, *path.rglob("*")]:
            os.chown(item, nobody.pw_uid, nobody.pw_gid)


def _run(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(folder),
           "MPLCONFIGDIR": str(folder / ".mpl"), "DSE_CACHE_DIR": str(folder / ".cache")}
    return subprocess.run([*_prefix(), sys.executable, *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT_S)


def _dse(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _COMMANDS[0].run(folder, *args)


def _one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and ".mpl" not in path.parts}


def _stored_sweep(fake_train: Callable[..., Any], folder: Path) -> Path:
    out = folder / "out"
    text = (f"name: n\ntask: {{model: mlp, dataset: digits}}\ntrials: [{{format: fp32}}, {{format: int8}}]\n"
            f"output: {out}\n")
    run_sweep(parse_config(text, "s.yaml"), train_fn=fake_train, executor=InlineExecutor(), reports=False)
    (folder / "s.yaml").write_text(text)
    _give(folder)
    return out


def test_a_sweep_into_a_folder_it_cannot_write_or_from_a_file_it_cannot_read_is_refused(
        workdir: Path) -> None:
    (workdir / "locked").mkdir()
    config = workdir / "s.yaml"
    config.write_text("name: n\ntask: {model: mlp, dataset: digits}\ntrials: [{format: fp32}]\n"
                      "output: locked/out\n")
    _give(workdir)
    (workdir / "locked").chmod(0o555)
    _one_error_line(_dse(workdir, "sweep", "s.yaml"), "cannot write to output directory 'locked/out'",
                    "permission denied")
    config.chmod(0o000)
    _one_error_line(_dse(workdir, "sweep", "s.yaml", "--dry-run"), "s.yaml", "not readable")
    assert not (workdir / "locked" / "out").exists()


def test_a_store_this_user_cannot_read_is_named_not_called_foreign(fake_train: Callable[..., Any],
                                                                    workdir: Path) -> None:
    """Before: `<store> is not a dse sweep store; remove it or choose another output path`."""
    out = _stored_sweep(fake_train, workdir)
    (out / STORE_FILE).chmod(0o000)
    for args in (["report", "out"], ["export", "out", "--to", "csv"], ["sweep", "s.yaml"]):
        line = _one_error_line(_dse(workdir, *args), "cannot read ", f"out/{STORE_FILE}: permission denied")
        assert "remove" not in line and "not a dse" not in line
    assert sorted(path.name for path in out.iterdir()) == [STORE_FILE]


def test_a_read_only_store_is_reported_and_a_sweep_into_it_is_refused(fake_train: Callable[..., Any],
                                                                      workdir: Path) -> None:
    """Before, `dse sweep` on a store the user may not write was a traceback (sqlite3.OperationalError:
    attempt to write a readonly database) after planning."""
    out = _stored_sweep(fake_train, workdir)
    (out / STORE_FILE).chmod(0o444)
    before = _files(out)
    exported = _dse(workdir, "export", "out", "--to", "csv")
    assert exported.returncode == 0 and "int8" in exported.stdout, exported.stderr
    assert _files(out) == before
    for args in (["sweep", "s.yaml"], ["sweep", "s.yaml", "--force"]):
        _one_error_line(_dse(workdir, *args), f"cannot write {out / STORE_FILE}", "permission denied")
        assert _files(out) == before


def test_reports_and_tables_into_a_folder_this_user_cannot_write_are_refused(fake_train: Callable[..., Any],
                                                                             workdir: Path) -> None:
    out = _stored_sweep(fake_train, workdir)
    (workdir / "shared").mkdir()
    (workdir / "shared" / "mine.csv").write_text("old\n")
    (workdir / "link.csv").symlink_to(Path("shared") / "mine.csv")
    _give(workdir)
    (workdir / "shared").chmod(0o555)
    out.chmod(0o555)
    before = _files(workdir)
    # refused before anything is printed (it printed the summary and the fronts, then the error)
    reported = _dse(workdir, "report", "out")
    _one_error_line(reported, "cannot write the report files into out: permission denied")
    assert reported.stdout == ""
    exported = _dse(workdir, "export", "out", "--to", "latex", "--output", "shared/t.tex")
    _one_error_line(exported, "--output 'shared/t.tex': cannot write there (permission denied)")
    assert exported.stdout == ""
    # a file this user may write, in a folder it may not: the atomic write's temporary file cannot be
    # made there, so the check before any work looks at the folder (it looked at the file)
    _one_error_line(_dse(workdir, "compare", "int8", "fp32", "--csv", "shared/mine.csv"),
                    "--csv 'shared/mine.csv': cannot write there (permission denied)")
    _one_error_line(_dse(workdir, "formats", "show", "int8", "--plot", "shared/p.png"),
                    "--plot 'shared/p.png': cannot write there (permission denied)")
    # a link to that file: the file is replaced by a rename in its own folder (dse.atomic_write)
    _one_error_line(_dse(workdir, "compare", "int8", "fp32", "--csv", "link.csv"),
                    "--csv 'link.csv': cannot write there (permission denied)")
    assert _files(workdir) == before


def test_input_files_this_user_cannot_read_are_one_line_naming_them(workdir: Path) -> None:
    (workdir / "layers.yaml").write_text("- {match: head, format: fp32}\n")
    (workdir / "net.yaml").write_text("layers:\n  - {name: fc, kind: linear, in: 64, out: 10}\n")
    (workdir / "model.py").write_text("import torch\ndef net(n):\n    return torch.nn.Linear(64, n)\n")
    mnist = workdir / "mnist"
    mnist.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (mnist / name).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    _give(workdir)
    for path in (workdir / "layers.yaml", workdir / "net.yaml", workdir / "model.py",
                 mnist / "train-images-idx3-ubyte"):
        path.chmod(0o000)
    before = sorted(p.name for p in workdir.rglob("*") if ".mpl" not in p.parts)
    _one_error_line(_dse(workdir, "train", "--layers", "layers.yaml"), "layers.yaml")
    _one_error_line(_dse(workdir, "energy", "-w", "net.yaml", "-f", "int8"), "net.yaml")
    _one_error_line(_dse(workdir, "train", "--model", "model.py:net", "--dataset", "digits"), "model.py")
    _one_error_line(_dse(workdir, "train", "--dataset", "mnist", "--data-dir", "mnist"),
                    "train-images-idx3-ubyte")
    assert sorted(p.name for p in workdir.rglob("*") if ".mpl" not in p.parts) == before


def test_a_dataset_cache_this_user_cannot_write_only_costs_generating_the_data(workdir: Path) -> None:
    (workdir / "cache").mkdir()
    _give(workdir)
    (workdir / "cache").chmod(0o555)
    code = ("from dse.data import load_dataset\n"
            "print(load_dataset('mnist5k', cache_dir='cache').x_train.shape[0])\n")
    result = _run(workdir, "-c", code)
    assert (result.returncode, result.stdout.strip()) == (0, "3600"), result.stderr
    assert list((workdir / "cache").iterdir()) == []


def test_a_sweep_with_nothing_to_train_and_stale_reports_in_a_folder_it_cannot_write_prints_only_why(
        workdir: Path, fake_train: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The same command again with every trial stored answers from the store (its receipt) and writes
    the report files that are stale: in a folder this user may not write, that is one line and nothing
    printed before it (it drew the progress bar, then failed)."""
    from typer.testing import CliRunner

    import dse.sweep.executors
    import dse.sweep.runner
    import dse.train.loop
    from dse.cli import app

    (workdir / "s.yaml").write_text("name: n\ntask: {model: mlp, dataset: digits, epochs: 1}\n"
                                    "trials: [{format: fp32}]\noutput: out\n")
    # the first run: `dse sweep` in this process (its receipt written as the command writes it), each
    # trial trained by fake_train inline
    monkeypatch.setattr(dse.sweep.runner, "make_executor", lambda sweep: InlineExecutor())
    monkeypatch.setattr(dse.sweep.runner, "start_worker_server", lambda: None)
    monkeypatch.setattr(dse.sweep.executors, "start_worker_server", lambda: None)
    monkeypatch.setattr(dse.train.loop, "train", lambda config, dataset=None: fake_train(config))
    monkeypatch.chdir(workdir)
    first = CliRunner().invoke(app, ["sweep", "s.yaml", "-q"])
    assert first.exit_code == 0, first.output
    (workdir / "out" / "summary.md").unlink()  # a report file gone: the reports are stale
    _give(workdir)
    (workdir / "out").chmod(0o555)
    before = _files(workdir)
    again = _dse(workdir, "sweep", "s.yaml")
    _one_error_line(again, "cannot write the report files into out: permission denied")
    assert again.stdout == "" and _files(workdir) == before
