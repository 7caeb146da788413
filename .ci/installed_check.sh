#!/usr/bin/env bash
# A real install prices energy: build a wheel, install it (without dependencies) into a fresh venv that
# borrows the CI venv's packages, and run `dse compare` and a one-trial sweep from outside the checkout.
# Offline and fast: no index is contacted (--no-build-isolation, --no-deps, --no-index).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
ci_python="${CI_VENV:-$repo/.venv}/bin/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"  # build from a copy: the checkout stays free of build/ and *.egg-info
tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude=./build --exclude=./results -cf - . | tar -C "$work/src" -xf -
"$ci_python" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$work/wheel" "$work/src"
"$ci_python" -m venv "$work/venv"
deps="$("$ci_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site="$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$deps" > "$site/ci_dependencies.pth"   # torch, numpy, ... from the CI venv; not its editable dse
"$work/venv/bin/python" -m pip install -q --no-deps --no-index "$work"/wheel/dse-*.whl
cd "$work"
"$work/venv/bin/python" -c 'import dse, pathlib, sys; p = pathlib.Path(dse.__file__); sys.exit(0 if "site-packages" in str(p) else f"dse imported from {p}")'
# one top-level name: models/ and cli.py install inside dse, never as `models` or `cli`
"$work/venv/bin/python" - "$site" <<'PY'
import importlib.util, pathlib, sys
site = pathlib.Path(sys.argv[1])
names = sorted(p.name for p in site.iterdir() if not p.name.startswith(("_", "ci_")) and not p.name.endswith(
    (".dist-info", ".pth")) and p.name not in ("pip", "setuptools", "pkg_resources"))
assert names == ["dse"], f"installed top-level names: {names}"
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("cli") is None
import dse.cli, dse.models.workloads
assert pathlib.Path(dse.cli.__file__).parent == pathlib.Path(dse.__file__).parent, dse.cli.__file__
PY
"$work/venv/bin/dse" --version > /dev/null
"$work/venv/bin/dse" compare int8 fp32 lns8 --workload resnet50 --node 7nm --csv "$work/compare.csv" > /dev/null
test -s "$work/compare.csv"
cat > "$work/one.yaml" <<'YAML'
name: installed-check
task: {model: mlp, dataset: digits, epochs: 1, batch_size: 64}
energy: {node: 7nm, workloads: [proxy, resnet50]}
trials:
  - {format: int8}
output: out
YAML
"$work/venv/bin/dse" sweep "$work/one.yaml" > /dev/null
"$work/venv/bin/python" - "$work/out" <<'PY'
import sys
from dse.sweep.store import load_trials
frame = load_trials(sys.argv[1])
energy = frame["energy_mj:resnet50"].iloc[0]
assert energy == energy and energy > 0, frame
print(f"installed wheel: dse compare and a one-trial sweep priced energy (resnet50 {energy:.4g} mJ)")
PY
