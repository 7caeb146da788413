"""Run `dse` commands as separate processes without each paying for its imports: this process imports
what the commands import once, then forks one child per command, which runs it as `dse ARGS` would
(its own process, folder, environment, exit code, stdout and stderr).

Requests on stdin, one JSON line each: {"cwd": folder, "env": {name: value}, "args": [...]}; one JSON
line back each: {"returncode": int, "stdout": str, "stderr": str}. An empty line ends it. Used by
tests/test_permissions.py, which runs this as another user: each command started in full as that
user cost 1.5-2 s of imports (torch, pandas, matplotlib), most of that file's time.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback


def _run(request: dict[str, object]) -> dict[str, object]:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the command's own process
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.chdir(str(request["cwd"]))
                os.environ.update(request["env"])  # type: ignore[arg-type]
                from dse.cli import app

                try:
                    app(args=list(request["args"]), prog_name="dse")  # type: ignore[call-overload]
                    code = 0
                except SystemExit as done:
                    code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(status),
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


PRELOADED = ("torch", "pandas", "matplotlib.pyplot", "scipy.stats", "sklearn.datasets", "dse.cli",
             "dse.data", "dse.energy", "dse.formats", "dse.models", "dse.report", "dse.sweep", "dse.train")
"""What the commands import, imported once (a command still imports whatever else it needs)."""


def main() -> None:
    import importlib

    for name in PRELOADED:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(json.dumps(_run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
