"""Sweep files: the issue's example expands as described; bad files fail with `file:line: path` and exit 2,
creating nothing; grid sizes and trial ids follow the documented rules (hypothesis)."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dse.cli import app
from dse.errors import InputError
from dse.sweep import expand, parse_config, trial_hash
from dse.sweep.config import TRIAL_FIELDS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

ISSUE_EXAMPLE = """\
name: lns-vs-posit-vs-int8
seeds: [0, 1, 2]
task: {model: mlp, dataset: digits, epochs: 10, batch_size: 64, lr: 0.05}
energy: {node: 7nm, workloads: [proxy, resnet50]}
trials:
  - {format: fp32, optimizer: sgd}
  - {format: ["lns(6,gamma=4)", "lns(8,gamma=8)"], optimizer: [lns-madam, sgd], master_weights: false}
  - {format: ["posit(8,1)", "posit(16,1)"], optimizer: sgd, warmup_epochs: 1}
  - {format: int8, optimizer: niti}
  - {weights: fp8_e4m3, activations: fp8_e4m3, gradients: fp8_e5m2, optimizer: adam}
executor: {backend: local, workers: 2}
output: results/lns-vs-posit-vs-int8
"""


def test_issue_example_expands_to_its_grid() -> None:
    sweep = parse_config(ISSUE_EXAMPLE, "issue.yaml")
    trials = expand(sweep)
    # 1 + 2x2 + 2 + 1 + 1 configurations, each with three seeds
    assert len(trials) == 9 * 3
    assert len({t.trial_id for t in trials}) == 27
    assert Counter(t.config.seed for t in trials) == {0: 9, 1: 9, 2: 9}
    assert sweep.energy.node == "7nm" and sweep.energy.workloads == ("proxy", "resnet50")
    assert sweep.executor.backend == "local" and sweep.executor.workers == 2
    assert str(sweep.output) == "results/lns-vs-posit-vs-int8"
    for trial in trials:  # the task's settings reach every trial
        assert (trial.config.model, trial.config.dataset, trial.config.epochs) == ("mlp", "digits", 10)
        assert (trial.config.batch_size, trial.config.lr) == (64, 0.05)
    lns = [t for t in trials if t.config.format in ("lns(6,gamma=4)", "lns8")]
    assert len(lns) == 12
    assert {(t.config.format, t.config.optimizer) for t in lns} == {
        ("lns(6,gamma=4)", "lns-madam"), ("lns(6,gamma=4)", "sgd"), ("lns8", "lns-madam"), ("lns8", "sgd")}
    assert all(not t.config.master_weights for t in lns)
    posit = [t for t in trials if t.config.format and t.config.format.startswith("posit")]
    assert len(posit) == 6 and all(t.config.warmup_epochs == 1 for t in posit)
    fp8 = [t for t in trials if t.config.optimizer == "adam"]
    assert {(t.config.weights, t.config.activations, t.config.gradients) for t in fp8} == {
        ("fp8_e4m3", "fp8_e4m3", "fp8_e5m2")}
    niti = [t for t in trials if t.config.optimizer == "niti"]
    assert {t.config.format for t in niti} == {"int8"}


def test_labels_name_the_configuration_and_are_unique_per_task() -> None:
    trials = expand(parse_config(ISSUE_EXAMPLE, "issue.yaml"))
    by_label: dict[str, set[int]] = {}
    for trial in trials:
        by_label.setdefault(trial.label, set()).add(trial.config.seed)
    assert len(by_label) == 9 and all(seeds == {0, 1, 2} for seeds in by_label.values())
    labels = set(by_label)
    assert "lns8 lns-madam no-master" in labels
    assert "fp32 sgd" in labels
    assert "posit(8,1) sgd warmup=1" in labels
    assert "W=fp8_e4m3,A=fp8_e4m3,G=fp8_e5m2 adam" in labels


def test_several_tasks_are_separate_fronts() -> None:
    text = """\
tasks:
  - {model: mlp, dataset: digits, epochs: 1}
  - {name: long, model: mlp, dataset: digits, epochs: 2}
trials: [{format: [int8, fp32]}]
"""
    trials = expand(parse_config(text, "t.yaml"))
    assert Counter(t.task for t in trials) == {"mlp/digits": 2, "long": 2}
    assert {t.config.epochs for t in trials if t.task == "long"} == {2}
    assert len({t.trial_id for t in trials}) == 4


def test_a_trial_entry_may_grid_over_full_precision_layers_and_seeds() -> None:
    text = """\
seeds: [0, 1]
task: {model: mlp, dataset: digits}
trials:
  - {format: int8, full_precision_layers: [first, last]}
  - {format: int8, full_precision_layers: [[], [first]], seeds: [5]}
"""
    trials = expand(parse_config(text, "t.yaml"))
    layers = Counter((t.config.full_precision_layers, t.config.seed) for t in trials)
    assert layers == {(("first", "last"), 0): 1, (("first", "last"), 1): 1, ((), 5): 1, (("first",), 5): 1}


# --- hashes ----------------------------------------------------------------------------------------

def test_equivalent_spellings_give_the_same_trial() -> None:
    base = "task: {model: mlp, dataset: digits}\ntrials:\n"
    a = expand(parse_config(base + '  - {format: "lns(8,gamma=8)", optimizer: sgd}\n', "a.yaml"))
    b = expand(parse_config(base + "  - {optimizer: sgd, format: LNS8}\n", "b.yaml"))
    c = expand(parse_config(base + "  - {weights: lns8, activations: lns8, gradients: lns8}\n", "c.yaml"))
    assert a[0].trial_id == b[0].trial_id == c[0].trial_id
    d = expand(parse_config(base + "  - {format: lns8, optimizer: adam}\n", "d.yaml"))
    assert d[0].trial_id != a[0].trial_id
    config = a[0].config  # threads change speed, not the experiment; the seed and the task do change it
    assert trial_hash("mlp/digits", config.replace(threads=4)) == a[0].trial_id
    assert trial_hash("mlp/digits", config.replace(seed=1)) != a[0].trial_id
    assert trial_hash("other", config) != a[0].trial_id


def test_a_stated_scale_is_part_of_the_trial_because_it_trains_differently() -> None:
    """`fp8_e4m3` gives fp/fixed gradients a per-tensor power-of-two scale in training; `fp8_e4m3(scale=none)`
    states the format's own (no scale) and gets none: two experiments, two trials, each trained as
    written (in a sweep, on the direct path and in a per-layer rule)."""
    from dse.train.config import TrainConfig
    from dse.train.policy import QuantPolicy

    text = ("task: {model: mlp, dataset: digits}\n"
            "trials:\n  - {format: [fp8_e4m3, \"FP8_E4M3( scale = none )\"]}\n")
    trials = expand(parse_config(text, "t.yaml"))
    assert len({t.trial_id for t in trials}) == len({t.label for t in trials}) == 2
    scalings = {QuantPolicy.from_config(t.config).gradients.format.scaling.kind for t in trials}
    assert scalings == {"tensor", "none"}
    default, stated = TrainConfig(format="fp8_e4m3"), TrainConfig(format="fp8_e4m3(scale=none)")
    assert trial_hash("t", default) != trial_hash("t", stated)
    assert trial_hash("t", stated) == trial_hash("t", TrainConfig(format="fp8_e4m3( SCALE=none)"))
    scaled = [TrainConfig(format=spec) for spec in ("int8", "int8(scale=tensor)")]  # the same training
    assert trial_hash("t", scaled[0]) == trial_hash("t", scaled[1])
    ruled = [TrainConfig(layers=({"match": "*", "gradients": spec},))
             for spec in ("fixed(8,4)", "fixed(8,4,scale=none)")]
    assert trial_hash("t", ruled[0]) != trial_hash("t", ruled[1])


def test_equivalent_points_in_one_grid_run_once() -> None:
    text = "task: {model: mlp, dataset: digits}\ntrials:\n  - {format: [lns8, \"lns(8,gamma=8)\", int8]}\n"
    assert len(expand(parse_config(text, "t.yaml"))) == 2


_VALUES: dict[str, list[object]] = {
    "format": ["fp32", "int8", "lns8", "posit(8,1)", "fp8_e4m3", "int4", "posit(16,1)"],
    "optimizer": ["sgd", "adam", "adamw", "madam", "lns-madam"],
    "master_weights": [True, False],
    "warmup_epochs": [0, 1, 2, 3],
    "lr": [0.01, 0.05, 0.1, 0.5],
    "epochs": [1, 2, 3],
    "rounding": ["nearest", "stochastic"],
}


@st.composite
def sweep_documents(draw: st.DrawFn) -> dict[str, object]:
    entries = []
    for _ in range(draw(st.integers(1, 3))):
        fields = draw(st.lists(st.sampled_from(sorted(_VALUES)), min_size=1, max_size=4, unique=True))
        entry: dict[str, object] = {}
        for name in fields:
            values = draw(st.lists(st.sampled_from(_VALUES[name]), min_size=1, max_size=3, unique=True))
            entry[name] = values if len(values) > 1 or draw(st.booleans()) else values[0]
        entries.append(entry)
    seeds = draw(st.lists(st.integers(0, 1000), min_size=1, max_size=4, unique=True))
    return {"seeds": seeds, "task": {"model": "mlp", "dataset": "digits"}, "trials": entries}


def _grid_size(entry: dict[str, object]) -> int:
    return math.prod(len(v) if isinstance(v, list) else 1 for v in entry.values())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sweep_documents(), st.randoms(use_true_random=False))
def test_grid_size_and_ids_are_stable_under_key_order(document: dict[str, object],
                                                      rng: random.Random) -> None:
    trials = expand(parse_config(yaml.safe_dump(document, sort_keys=False), "h.yaml"))
    entries = document["trials"]
    assert isinstance(entries, list) and isinstance(document["seeds"], list)
    # entries may overlap each other (then a configuration runs once), but never exceed the sum
    sizes = [_grid_size(entry) * len(document["seeds"]) for entry in entries]
    assert max(sizes) <= len(trials) <= sum(sizes)
    if len(entries) == 1:
        assert len(trials) == sizes[0]
    assert len({t.trial_id for t in trials}) == len(trials)

    shuffled_entries = []
    for entry in entries:
        keys = list(entry)
        rng.shuffle(keys)
        shuffled_entries.append({key: entry[key] for key in keys})
    top = ["trials", "seeds", "task"]
    rng.shuffle(top)
    reordered = {key: {"trials": shuffled_entries, "seeds": document["seeds"], "task": {"dataset": "digits",
                 "model": "mlp"}}[key] for key in top}
    again = expand(parse_config(yaml.safe_dump(reordered, sort_keys=False), "h2.yaml"))
    assert {t.trial_id: t.label for t in again} == {t.trial_id: t.label for t in trials}


# --- errors ----------------------------------------------------------------------------------------

runner = CliRunner()

_GOOD = ["name: bad", "task: {model: mlp, dataset: digits}", "trials:", "  - {format: int8}"]


@pytest.mark.parametrize(("lines", "line", "needles"), [
    (_GOOD[:3] + ["  - {format: int8}", "  - {fromat: int8}"], 5,
     ["trials[1].fromat", "did you mean 'format'"]),
    (_GOOD[:1] + ["task: {model: mlp, dataset: digits, epochs: ten}"] + _GOOD[2:], 2,
     ["task.epochs", "valid integer", "'ten'"]),
    (_GOOD[:3] + ["  - format: [int8, \"lns(8,gama=8)\"]"], 4,
     ["trials[0].format[1]", "lns(8,gama=8)", "gama"]),
    (_GOOD[:3] + ["  - {format: int8, optimizer: [sgd, lns-madma]}"], 4,
     ["trials[0].optimizer[1]", "lns-madma", "did you mean 'lns-madam'"]),
    (_GOOD[:3] + ["  - {format: [], optimizer: sgd}"], 4, ["trials[0].format", "empty"]),
    (_GOOD[:3], 3, ["trials", "empty"]),
    (_GOOD[:1] + ["task: {model: mlpp, dataset: digits}"] + _GOOD[2:], 2,
     ["task.model", "did you mean 'mlp'"]),
    (_GOOD[:1] + ["task: {model: mlp, dataset: digitz}"] + _GOOD[2:], 2, ["task.dataset", "'digits'"]),
    (_GOOD + ["executor: {backend: local, wrokers: 2}"], 5, ["executor.wrokers", "did you mean 'workers'"]),
    (_GOOD + ["energy:", "  workloads: [proxy, resnet5]"], 6, ["energy.workloads[1]", "resnet50"]),
    (_GOOD + ["energy:", "  node: [45nm, 3.5nm]"], 6,
     ["energy.node[1]", "unknown technology node '3.5nm' (known:"]),
    (_GOOD + ["energy: {node: 3nm}"], 5, ["energy.node", "outside the calibrated range 7-45 nm"]),
    (_GOOD + ["energy:", "  scope: [pe, chip]"], 6, ["energy.scope[1]", "unknown scope 'chip'"]),
    (_GOOD + ["energy:", "  vector_length: [16, 0]"], 6, ["energy.vector_length[1]", ">= 1"]),
    (_GOOD + ["energy:", "  accumulator: [fp16, fp77]"], 6, ["energy.accumulator[1]", "fp77"]),
    (_GOOD + ["seeds: []"], 5, ["seeds", "empty"]),
    (_GOOD + ["tirals: []"], 5, ["tirals", "did you mean 'trials'"]),
    (_GOOD[:3] + ["  - {format: int8, master_weights: maybe}"], 4,
     ["trials[0].master_weights", "true, false or a format spec", "unknown format 'maybe'"]),
    (_GOOD[:3] + ["  - {format: lns8, optimizer: lns-madam, master_weights: bf16}"], 4,
     ["master_weights 'bf16'", "LNS format"]),
    (_GOOD[:3] + ["  - {format: int8, p_scale: [3, 0]}"], 4,
     ["trials[0].p_scale[1]", "p_scale must be a positive"]),
    (_GOOD[:3] + ["  - {format: int8, g_bound: -1}"], 4, ["trials[0].g_bound", "g_bound must be a positive"]),
    (_GOOD[:3] + ["  - {format: int8, lr_schedule: cosin}"], 4, ["trials[0].lr_schedule", "cosine"]),
    (["name: bad", "tasks:", "  - {model: mlp, dataset: digits}", "  - {model: transformer, dataset: digits}",
      "trials: [{format: int8}]"], 4, ["tasks[1]", "transformer", "digits"]),
    (_GOOD[:3] + ["  - {format: int8", "  - x"], 6, ["invalid YAML", "flow mapping that starts on line 4"]),
    (_GOOD[:3] + ["  - {format: int8, accumulation: [bf16, \"fp(e=0,m=3)\"]}"], 4,
     ["trials[0].accumulation[1]", "fp(e=0,m=3)"]),
    (_GOOD[:3] + ["  - {format: int8, accumulation_chunk: 0}"], 4, ["accumulation_chunk must be >= 1"]),
    (_GOOD[:1] + ["task: {model: mlp, dataset: digits, device: tpu}"] + _GOOD[2:], 2,
     ["task.device", "'cpu' or 'cuda[:N]'"]),
    (_GOOD[:3] + ["  - format: int8", "    full_precision_layers:", "      - first", "      - frist"], 7,
     ["trials[0].full_precision_layers[1]", "unknown layer 'frist'", "did you mean 'first'"]),
    # tune: and report.baseline
    ([*_GOOD[:3], "  - format: int8", "    tune: {lr: [0.1], momentun: [0.9]}"], 5,
     ["trials[0].tune.momentun", "unknown key", "did you mean 'momentum'"]),
    ([*_GOOD[:3], "  - format: int8", "    tune:", "      lr: []"], 6,
     ["trials[0].tune.lr", "empty list"]),
    ([*_GOOD[:3], "  - format: int8", "    tune: {format: [int8, int4]}"], 5,
     ["trials[0].tune.format", "'format' is not numeric"]),
    ([*_GOOD[:3], "  - format: int8", "    tune: {master_weights: [true, false]}"], 5,
     ["trials[0].tune.master_weights", "not numeric"]),
    ([*_GOOD[:3], "  - format: int8", "    tune:", "      lr: [0.1, fast]"], 6,
     ["trials[0].tune.lr[1]", "'fast'"]),
    ([*_GOOD[:3], "  - format: int8", "    tune:", "      lr: [0.1, -1.0]"], 6,
     ["trials[0].tune.lr[1]", "lr must be a positive number"]),
    ([*_GOOD[:3], "  - format: int8", "    tune: {lr: 0.1}"], 5, ["trials[0].tune.lr", "list"]),
    ([*_GOOD[:3], "  - format: int8", "    tune: [lr]"], 5, ["trials[0].tune", "mapping"]),
    ([*_GOOD[:3], "  - format: int8", "    tune: {lr: [0.1, 0.1]}"], 5, ["listed twice"]),
    ([*_GOOD[:3], "  - format: int8", "    lr: 0.1", "    tune: {lr: [0.1, 0.3]}"], 6,
     ["trials[0].tune.lr", "both set and tuned"]),
    ([*_GOOD[:3], "  - format: int8", "    tune: {seed: [1, 2]}"], 5,
     ["trials[0].tune.seed", "unknown key"]),
    ([*_GOOD[:3], "  - {format: lns8, optimizer: lns-madam, tune: {p_scale: [3, 0]}}"], 4,
     ["trials[0].tune.p_scale[1]", "p_scale"]),
    (["name: bad", "task: {model: mlp, dataset: digits, tune: {epochs: [0, 2]}}", "trials: [{format: int8}]"],
     2,
     ["task.tune.epochs[0]", "epochs must be >= 1"]),
    ([*_GOOD[:2], "trials: [{format: int8}]", "report:", "  baseline: {fromat: fp32}"], 5,
     ["report.baseline.fromat", "did you mean 'format'"]),
    ([*_GOOD[:2], "trials: [{format: int8}]", "report:", "  baseline: \"fp32 adam\""], 5,
     ["report.baseline", "unknown baseline 'fp32 adam'", "'int8 sgd'"]),
    ([*_GOOD[:2], "trials: [{format: int8}]", "report: {baseline: bf16}"], 4,
     ["report.baseline", "unknown baseline", "bf16"]),
])
def test_bad_files_fail_with_file_line_and_path(tmp_path: Path, lines: list[str], line: int,
                                                needles: list[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out"
    result = runner.invoke(app, ["sweep", str(config), "--output", str(output)])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"error: {config}:{line}: "), message
    for needle in needles:
        assert needle in message, message
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_missing_file_is_one_line() -> None:
    result = runner.invoke(app, ["sweep", "no/such/sweep.yaml"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: sweep file 'no/such/sweep.yaml' not found"


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)  # opening it fails with ELOOP, an OSError of no more specific kind
    result = runner.invoke(app, ["sweep", str(loop)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: sweep file {str(loop)!r} cannot be read "
                                     f"(Too many levels of symbolic links)")


def test_parse_errors_are_input_errors_naming_the_line() -> None:
    with pytest.raises(InputError, match=r"^s.yaml:3: trials\[0\]\.model: 'model' belongs to the task"):
        parse_config("task: {model: mlp, dataset: digits}\ntrials:\n  - {model: cnn}\n", "s.yaml")
    with pytest.raises(InputError, match=r"^s.yaml:1: task.seed: .*top-level 'seeds'"):
        parse_config("task: {model: mlp, dataset: digits, seed: 1}\ntrials: [{format: int8}]\n", "s.yaml")
    with pytest.raises(InputError, match=r"^s.yaml:3: trials\[0\]\.format: duplicate key \(first on line 2"):
        parse_config("trials:\n  - format: int8\n    format: int4\ntask: {model: mlp, dataset: digits}\n",
                     "s.yaml")


def test_yaml_floats_in_exponent_form_are_numbers() -> None:
    text = "task: {model: mlp, dataset: digits, lr: 1e-3}\ntrials: [{format: int8}]\n"
    sweep = parse_config(text, "s.yaml")
    assert expand(sweep)[0].config.lr == pytest.approx(1e-3)


def test_every_trial_field_is_a_train_config_field() -> None:
    from dse.train.config import TrainConfig

    for name in TRIAL_FIELDS:
        assert hasattr(TrainConfig(), name)
    assert "seed" not in TRIAL_FIELDS and "model" not in TRIAL_FIELDS


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_parses_and_expands(path: Path) -> None:
    from dse.sweep.runner import plan_sweep

    sweep = parse_config(path.read_text(), str(path))
    trials, keys, energies = plan_sweep(sweep)
    assert trials and len(keys) == len(trials)
    for trial in trials:
        for workload in sweep.energy.workloads:
            assert energies[(keys[trial.trial_id], workload)]["total_mj"] > 0


@pytest.mark.parametrize("name", ["lns_madam", "niti", "posit"])
def test_the_paper_presets_list_their_trials_in_a_dry_run(name: str, tmp_path: Path) -> None:
    path = EXAMPLES / f"{name}.yaml"
    result = runner.invoke(app, ["sweep", str(path), "--dry-run", "--output", str(tmp_path / "out")],
                           env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()
    sweep = parse_config(path.read_text(), str(path))
    configurations = {trial.label for trial in expand(sweep)}
    for label in configurations:
        assert label in result.stdout
    text = path.read_text()
    assert "tune:" in text and text.count("#") > 10  # unknown settings tuned; settings commented


def test_the_examples_exist() -> None:
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"quickstart.yaml", "lns_madam.yaml", "niti.yaml", "posit.yaml", "formats.yaml"} <= names


def test_ray_asked_for_but_not_installed_names_the_extra(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "ray" else real_find_spec(name, *args))
    config = tmp_path / "ray.yaml"
    config.write_text("\n".join(_GOOD + ["executor:", "  backend: ray"]) + "\n")
    result = runner.invoke(app, ["sweep", str(config), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {config}:6: executor.backend: Ray is not installed: "
                                     "pip install 'dse[ray]'")
    assert not (tmp_path / "out").exists()


def test_an_unreachable_ray_cluster_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    config = tmp_path / "ray.yaml"
    config.write_text("\n".join(_GOOD + ["executor: {backend: ray, address: '127.0.0.1:1'}"]) + "\n")
    result = runner.invoke(app, ["sweep", str(config), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: executor.address: cannot reach Ray at '127.0.0.1:1'")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
