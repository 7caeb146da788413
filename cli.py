"""The `dse` command line: parse arguments, call dse, render with Rich, map bad input to exit code 2."""
# ruff: noqa: E402  (a signal's handler is set before the imports: dse.interrupts)

from __future__ import annotations

import os
import sys

from dse.interrupts import COMMAND_SIGNALS, Interrupted, files_line, stop_while_starting

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "dse":
    stop_while_starting()

import atexit
import contextlib
import dataclasses
import functools
import gc
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

# (no emoji codes: a name or path holding ':x:' printed as an emoji, `a:x:b.yaml` as 'a❌b.yaml')
console = Console(emoji=False)
error_console = Console(stderr=True, emoji=False)


def _error_line(message: str) -> None:
    error_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def _warning_line(message: str) -> None:
    error_console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _warnings_as_lines(*categories: type[Warning]) -> Iterator[None]:
    """Inside the block each warning of `categories` is one `warning:` line on stderr, every time it is
    given; other warnings are shown as Python shows them."""
    with warnings.catch_warnings():
        for category in categories:
            warnings.simplefilter("always", category)
        show = warnings.showwarning

        def as_line(message: Warning | str, category: type[Warning], *where: Any, **more: Any) -> None:
            if issubclass(category, categories):
                _warning_line(str(message))
            else:
                show(message, category, *where, **more)

        warnings.showwarning = as_line
        yield


def _flags_without_metavar(params: list[Any]) -> list[Any]:
    """A flag takes no value, so its help shows no `<bool>` after it."""
    for param in params:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    """A dse command: its flags show no metavar in its help."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))


class _Commands(TyperGroup):
    """dse's command groups: usage errors (`--epochs ten`, an unknown option) as one line on stderr and
    exit code 2, like every other bad input (Click draws a boxed panel of several lines); flags without
    a metavar in the help."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_metavar(super().get_params(ctx))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`dse ...` itself (a test's CliRunner calls `main`): this process ends with the command."""
        COMMAND_SIGNALS.ends_process = True
        stop_while_starting()  # (already, where cli.py was run as `dse`)
        return super().__call__(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        """Run the command; a signal stops it with one line and 128 + its number (dse.interrupts)."""
        COMMAND_SIGNALS.start()
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as error:
            raise typer.Exit(COMMAND_SIGNALS.say(Interrupted.of(error))) from None

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        COMMAND_SIGNALS.begin()
        try:
            try:
                code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
                code = code if isinstance(code, int) else 0
            except typer.TyperException as error:  # Click's usage errors (typer >= 0.29 vendors Click)
                context = getattr(error, "ctx", None)
                where = f"{context.command_path}: " if context is not None else ""
                if error.format_message():  # empty: `dse` alone, which printed the help
                    _error_line(f"{where}{error.format_message()} (see --help)")
                code = error.exit_code
            except typer.Abort:
                _error_line("aborted")
                code = 1
            finally:
                COMMAND_SIGNALS.recorded()
        except KeyboardInterrupt as error:  # (between the command's end and the line above)
            code = COMMAND_SIGNALS.say(Interrupted.of(error))
        if code == 130:  # (typer's exit for a KeyboardInterrupt outside `invoke`: Ctrl-C in a CliRunner)
            COMMAND_SIGNALS.say(Interrupted())
        COMMAND_SIGNALS.end(code)


def _exit_without_collections() -> None:
    """At the process's exit (atexit), move every object out of the cycle collector's reach: the
    interpreter's shutdown, which follows, otherwise runs full collections over everything torch,
    pandas, scipy and matplotlib allocated, 0.6-1.1 s after a sweep's last line for memory the OS
    frees anyway. Objects are still freed by reference counting (files, the store)."""
    gc.freeze()


atexit.register(_exit_without_collections)


app = typer.Typer(help="Design-space exploration of number formats for low-precision training.",
                  cls=_Commands, no_args_is_help=True, pretty_exceptions_enable=False)
formats_app = typer.Typer(help="The number-format zoo.", cls=_Commands, invoke_without_command=True)
app.add_typer(formats_app, name="formats")


def _print_version(asked: bool) -> None:
    if asked:
        from dse import __version__

        typer.echo(f"dse {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print dse's version and exit.")] = False
         ) -> None:
    """Design-space exploration of number formats for low-precision training."""

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(command: F) -> F:
    """Bad input (a spec, a file, a table) becomes one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_numbers(kwargs)
            return command(*args, **kwargs)
        except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
            lines = getattr(error, "problems", None) or [str(error).splitlines()[0] if str(error)
                                                         else type(error).__name__]
            for line in lines:  # one line per problem (a sweep file reports all of its errors)
                _error_line(line)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature; mypy sees a new type


def _check_numbers(values: dict[str, Any]) -> None:
    """Every number on the command line is one a setting may hold (no NaN or infinity, an integer in 64
    bits: `dse.errors.number_problem`), else an InputError naming its option. A dataclass of options
    (`_with_options`) is looked into."""
    from dse.errors import InputError, number_problem

    for name, value in values.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_numbers({field.name: getattr(value, field.name) for field in dataclasses.fields(value)})
            continue
        problem = number_problem(value)
        if problem is not None:
            raise InputError(f"{_option_name(name)} {problem}")


def _option_name(parameter: str) -> str:
    """How the running command spells the option of `parameter` (`format_spec` is `--format`)."""
    try:
        from typer._click.globals import get_current_context  # typer >= 0.29 vendors Click
    except ImportError:  # pragma: no cover - an older typer: Click's own
        from click import get_current_context  # type: ignore[no-redef]  # the same function

    context = get_current_context(silent=True)
    for param in context.command.params if context is not None else ():
        if param.name == parameter:
            return max(param.opts, key=len)
    return f"--{parameter.replace('_', '-')}"


def _print_whole(table: Table) -> None:
    """Print a table at its natural width even on a narrow or non-terminal console (no cropped cells)."""
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(width=max(console.width, natural), emoji=False).print(table)


def _number(value: float) -> str:
    return f"{value:.4g}"


@formats_app.callback()
@user_errors
def formats_list(ctx: typer.Context) -> None:
    """List the zoo: bits, range and precision of each named format."""
    if ctx.invoked_subcommand is not None:
        return
    from dse.formats import ZOO, get

    table = Table(title="Number formats (element grid at unit scale)")
    for column in ("spec", "family", "bits", "max", "min positive", "range (decades)",
                   "rel. precision at 1", "scaling"):
        table.add_column(column, justify="left" if column in ("spec", "family", "scaling") else "right")
    for spec in ZOO:
        fmt = get(spec)
        table.add_row(fmt.spec, fmt.family, str(fmt.bits), _number(fmt.max), _number(fmt.min_positive),
                      f"{fmt.dynamic_range_decades:.2f}", _number(fmt.relative_precision),
                      fmt.scaling.kind + (" (pow2)" if fmt.scaling.pow2 else ""))
    _print_whole(table)


def _scaling_text(scaling: Any) -> str:
    """A format's scaling in words: none, per tensor, per channel or per block of N along an axis."""
    pow2 = ", power of two" if scaling.pow2 else ""
    axis = "the last axis" if scaling.axis == -1 else f"axis {scaling.axis}"
    if scaling.kind == "none":
        return "none (unit scale)"
    if scaling.kind == "tensor":
        return f"one scale per tensor{pow2}"
    if scaling.kind == "block":
        return f"one scale per block of {scaling.block_size} along {axis}{pow2}"
    return f"one scale per channel ({axis}){pow2}"


@formats_app.command("show", cls=_Command)
@user_errors
def formats_show(
    spec: Annotated[str, typer.Argument(help='A format spec, e.g. "posit(16,1)" or fp8_e4m3.')],
    plot: Annotated[Path | None, typer.Option(help="Write a value-density plot (PNG) here.")] = None,
) -> None:
    """Show one format's properties and optionally plot its value density."""
    from dse.formats import get

    _check_output_file("--plot", plot, makes_folders=True)
    if plot is not None and plot.suffix:
        from dse.interrupts import undone_by_unwinding

        with undone_by_unwinding():  # (matplotlib's first import writes its font cache: format_plots)
            from matplotlib.backend_bases import FigureCanvasBase

        from dse.errors import InputError

        types = FigureCanvasBase.get_supported_filetypes()
        if plot.suffix[1:].lower() not in types:
            raise InputError(f"--plot {str(plot)!r}: matplotlib writes no {plot.suffix} files (it writes "
                             f"{', '.join('.' + name for name in sorted(types))})")
    fmt = get(spec)
    table = Table(title=fmt.spec, show_header=False)
    table.add_column("property")
    table.add_column("value")
    rows: dict[str, str] = {"family": fmt.family, "bits": str(fmt.bits)}
    rows.update(fmt.spec_options())  # the spec's own options, as a spec writes them
    rows.update({"scaling": _scaling_text(fmt.scaling),
                 "max": _number(fmt.max), "min positive": _number(fmt.min_positive),
                 "dynamic range (decades)": f"{fmt.dynamic_range_decades:.3f}",
                 "relative precision at 1.0": _number(fmt.relative_precision)})
    if fmt.bits <= 16:
        rows["finite values"] = str(fmt.values().numel())
    if fmt.float32_note:
        rows["in float32"] = fmt.float32_note
    for name, value in rows.items():
        table.add_row(name, value)
    console.print(table)
    if plot is not None:
        from dse.report.format_plots import plot_value_density

        console.print(f"wrote {plot_value_density(fmt, plot)}")


# --- energy ---------------------------------------------------------------------------------------

_WorkloadOpt = Annotated[str, typer.Option("--workload", "-w", help="A built-in (resnet18, resnet50, "
                                           "mobilenetv2, vit-b16, bert-base, gpt2-small, llama-7b, "
                                           "llama(blocks=N, width=D), a proxy such as m1d-cnn), an .onnx, "
                                           ".yaml or .csv file, or your model as file.py:function "
                                           "(with --dataset).")]
_WorkloadDataOpt = Annotated[str | None, typer.Option(
    "--dataset", help="The dataset a file.py:function model is built for and traced on (a name or "
    "file.py:function).")]
_NodeOpt = Annotated[str, typer.Option(help="Technology node: 45, 32, 28, 20, 16, 14, 10 or 7nm (calibrated "
                                       "range); 65, 5, 3nm with --node-scaling stillmaker.")]
_NodeScalingOpt = Annotated[str, typer.Option("--node-scaling", help="calibrated (Horowitz 45 nm and Jouppi "
                                              "et al. 7 nm, default) or stillmaker.")]
_ScopeOpt = Annotated[str, typer.Option(help="datapath (MAC units), pe (+ update, registers, SRAM) or system "
                                        "(+ DRAM, default).")]
_BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Batch size (default: the "
                                               "workload's).")]
_OptimizerOpt = Annotated[str | None, typer.Option(help="sgd, adam, adamw, madam, lns-madam or niti "
                                                   "(default: Madam for LNS weights, else the workload's).")]
_AccOpt = Annotated[str | None, typer.Option("--accumulator", help="Accumulator: int24, "
                                             "int(32), fp32, fp16, bf16, quire (default by family: int32, "
                                             "fp32, LNS int24).")]
_VectorOpt = Annotated[int | None, typer.Option("--vector-length", help="K of the "
                                                "dot-product unit (default 16; 1 = scalar fused MAC).")]
_ROUNDINGS = "nearest, stochastic, stochastic(k) (k random bits, 1..23), pseudo_stochastic or toward_zero"
"""dse.formats.ROUNDINGS and stochastic(k) in words (not imported: --help stays free of torch)."""
_RoundingOpt = Annotated[str, typer.Option(help=f"Rounding into the weight, activation and gradient formats: "
                                           f"{_ROUNDINGS}.")]
_UpdateRoundingOpt = Annotated[str, typer.Option(help=f"Rounding of weights updated in their own format (no "
                                                 f"master copy): {_ROUNDINGS}.")]
_LnsOpt = Annotated[str | None, typer.Option("--lns-datapath", help="LNS conversion: madam (per-remainder "
                                             "partial sums, default) or direct (per product).")]
_MitchellOpt = Annotated[int | None, typer.Option("--mitchell-bits", help="LNS remainder bits approximated "
                                                  "by Mitchell (default 0).")]
_LnsConversionOpt = Annotated[int | None, typer.Option("--lns-conversion-length", help="LNS-Madam: products "
                                                      "per conversion of the partial sums, a multiple of K "
                                                      "(default K).")]
_AlignOpt = Annotated[int | None, typer.Option("--alignment-bits", help="FP/MX alignment width (default: "
                                               "exact for MX, accumulator + 3 bits otherwise).")]
_SramOpt = Annotated[str | None, typer.Option(help="SRAM preset (default horowitz_32kb).")]
_DramOpt = Annotated[str | None, typer.Option(help="DRAM preset (default hbm2e).")]
_SramScalingOpt = Annotated[str | None, typer.Option("--sram-scaling", help="SRAM node scaling: calibrated "
                                                     "(default), sqrt, logic or none.")]
_ReuseOpt = Annotated[float | None, typer.Option("--operand-reuse", help="MACs per operand read from SRAM "
                                                 "(default 16).")]
_TableOpt = Annotated[Path | None, typer.Option("--table", help="Your own energy table (YAML, same schema).")]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def _option(option: Any, default: Any = None) -> Any:
    """A dataclass field that carries its command-line option (for `_with_options`)."""
    return dataclasses.field(default=default, metadata={"option": option})


@dataclasses.dataclass(frozen=True)
class _EnergyOptions:
    """The options `dse energy` and `dse compare` share: stated once, added to both by `_with_options`."""

    node: _NodeOpt = _option(None, "45nm")
    node_scaling: _NodeScalingOpt = _option(None, "calibrated")
    scope: _ScopeOpt = _option(None, "system")
    batch_size: _BatchOpt = _option(None)
    optimizer: _OptimizerOpt = _option(None)
    accumulator: _AccOpt = _option(None)
    vector_length: _VectorOpt = _option(None)
    rounding: _RoundingOpt = _option(None, "nearest")
    update_rounding: _UpdateRoundingOpt = _option(None, "nearest")
    lns_datapath: _LnsOpt = _option(None)
    mitchell_bits: _MitchellOpt = _option(None)
    lns_conversion_length: _LnsConversionOpt = _option(None)
    alignment_bits: _AlignOpt = _option(None)
    sram: _SramOpt = _option(None)
    dram: _DramOpt = _option(None)
    sram_scaling: _SramScalingOpt = _option(None)
    operand_reuse: _ReuseOpt = _option(None)
    table: _TableOpt = _option(None)
    dataset: _WorkloadDataOpt = _option(None)

    def workload(self, spec: str) -> Any:
        """The workload `spec` names; --dataset is what a file.py:function model is traced on, and
        means nothing to any other workload. What it leaves unpriced is one `warning:` line each."""
        from dse.energy import get_workload
        from dse.errors import InputError
        from dse.models.workloads import UnpricedWarning
        from dse.usercode import is_ref

        if self.dataset is not None and not is_ref(spec):
            raise InputError(f"--dataset applies to a model given as file.py:function, not to the workload "
                             f"{spec!r}")
        with _warnings_as_lines(UnpricedWarning):
            return get_workload(spec, self.dataset, self.batch_size)

    def model(self) -> Any:
        from dse.energy import DatapathParams, MemoryParams, build_model

        _check_at_least_one(batch_size=self.batch_size)

        def given(**options: Any) -> dict[str, Any]:
            return {name: value for name, value in options.items() if value is not None}

        datapath = DatapathParams(**given(accumulator=self.accumulator, vector_length=self.vector_length,
                                          lns_datapath=self.lns_datapath,
                                          lns_mitchell_bits=self.mitchell_bits,
                                          lns_conversion_length=self.lns_conversion_length,
                                          alignment_bits=self.alignment_bits))
        memory = MemoryParams(**given(sram=self.sram, dram=self.dram, sram_scaling=self.sram_scaling,
                                      operand_reuse=self.operand_reuse))
        return build_model(self.node, datapath, memory, self.table, scope=self.scope,
                           node_scaling=self.node_scaling)


def _with_options(group: type) -> Callable[[F], F]:
    """Add a dataclass's fields to a command as options (after its own), handed to it as one `options`
    argument: commands that share a group of options state them once."""
    import typing

    hints = typing.get_type_hints(group, include_extras=True)

    def decorate(command: F) -> F:
        parameters = inspect.signature(command, eval_str=True).parameters.values()
        own = [p for p in parameters if p.name != "options"]
        shared = [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                    annotation=hints[field.name]) for field in dataclasses.fields(group)]

        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            grouped = {field.name: values.pop(field.name) for field in dataclasses.fields(group)}
            return command(**values, options=group(**grouped))

        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]  # for Typer
        return wrapper  # type: ignore[return-value]  # same call as the command, options grouped

    return decorate


def _mj(pj: float) -> str:
    return f"{pj * 1e-9:.4g}"


def _check_at_least_one(**options: int | None) -> None:
    """Counts given on the command line are >= 1 (checked here, not as Click ranges, whose `[x>=1]`
    would widen every command's help past 80 columns)."""
    from dse.errors import InputError

    for name, value in options.items():
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _check_output_file(option: str, path: Path | None, makes_folders: bool = False) -> None:
    """Refuse an unwritable output file before any work (nothing is written on bad input)."""
    from dse.atomic_write import file_problem
    from dse.errors import InputError

    problem = None if path is None else file_problem(path, makes_folders)
    if problem is not None:
        raise InputError(f"{option} {str(path)!r}: cannot write there ({problem})")


@app.command("energy", cls=_Command)
@_with_options(_EnergyOptions)
@user_errors
def energy(
    workload: _WorkloadOpt,
    format_spec: Annotated[str, typer.Option("--format", "-f", help='Format of weights, activations and '
                                             'gradients, e.g. "lns(8,gamma=8)".')],
    weights: Annotated[str | None, typer.Option(help="Weight format (overrides --format).")] = None,
    activations: Annotated[str | None, typer.Option(help="Activation format (overrides --format).")] = None,
    gradients: Annotated[str | None, typer.Option(help="Gradient format (overrides --format).")] = None,
    weight_grads: Annotated[str | None, typer.Option(help="Weight-gradient format (default: gradients).")]
    = None,
    optimizer_state: Annotated[str | None, typer.Option(help="Optimizer-state format (default fp32).")]
    = None,
    layers: Annotated[int, typer.Option(help="How many of the most expensive layers to list.")] = 10,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the long-form breakdown (one row per "
                                             "layer, pass, unit, tensor, level) to this CSV file.")] = None,
    as_json: _JsonOpt = False,
    gemms: Annotated[bool, typer.Option("--gemms", help="Also list every GEMM of the iteration: shape "
                                        "per sample by layer and pass, and the parameters each update "
                                        "touches.")] = False,
    options: _EnergyOptions = _EnergyOptions(),
) -> None:
    """Energy (and datapath area) of one training iteration of a workload, by pass, unit and layer."""
    import json

    from dse.energy import (
        TrainingFormats,
        iteration_energy,
        pass_unit_table,
        per_mac,
        summarize,
        top_layers,
    )
    from dse.energy.iteration import training_area_um2
    from dse.formats import get

    _check_at_least_one(layers=layers)
    _check_output_file("--csv", csv)
    model = options.model()
    formats = TrainingFormats.of(get(format_spec), weights=weights and get(weights),
                                 activations=activations and get(activations),
                                 gradients=gradients and get(gradients),
                                 weight_grads=weight_grads and get(weight_grads),
                                 optimizer_state=optimizer_state and get(optimizer_state),
                                 optimizer=options.optimizer, rounding=options.rounding,
                                 update_rounding=options.update_rounding)
    network = options.workload(workload)
    frame = iteration_energy(network, formats, model, options.batch_size)
    area = training_area_um2(formats, model, network)
    info = frame.attrs
    mac = per_mac(frame)
    by_pass = pass_unit_table(frame)
    memory = summarize(frame[frame["unit"] == "memory"], ["level", "tensor"])
    top = top_layers(frame, layers)
    if csv is not None:
        from dse.report.files import write_text_atomically

        write_text_atomically(csv, frame.to_csv(index=False))
    if as_json:
        out = {"workload": info["workload"], "batch_size": info["batch_size"], "node_nm": info["node_nm"],
               "scope": info["scope"], "formats": info["formats"], "macs": info["macs"],
               "iteration_mj": float(frame["energy_pj"].sum()) * 1e-9,
               "per_mac_pj": {"multiply": mac.multiply_pj, "conversion": mac.conversion_pj,
                              "accumulation": mac.accumulation_pj},
               "area_um2": area,
               "by_pass_mj": {str(p): {str(u): float(v) * 1e-9 for u, v in row.items()}
                              for p, row in by_pass.iterrows()},
               "memory_mj": [{"level": r["level"], "tensor": r["tensor"], "mj": float(r["energy_pj"]) * 1e-9}
                             for _, r in memory.iterrows()],
               "top_layers": [{"layer": r["layer"], "mj": float(r["energy_pj"]) * 1e-9,
                               "share": float(r["share"])} for _, r in top.iterrows()]}
        typer.echo(json.dumps(_json_safe(out)))
        return
    console.print(f"[bold]{info['workload']}[/], batch {info['batch_size']}, {info['node_nm']:g} nm, scope "
                  f"{info['scope']}: {info['formats']}")
    console.print(f"{info['macs']:.4g} MACs per iteration, {_mj(frame['energy_pj'].sum())} mJ; per MAC "
                  f"(workload average): multiply {mac.multiply_pj:.4g} pJ, conversion "
                  f"{mac.conversion_pj:.4g} pJ, accumulation {mac.accumulation_pj:.4g} pJ")
    console.print(f"area at {info['node_nm']:g} nm: datapath {_number(area['datapath'])} um^2, PE "
                  f"{_number(area['pe'])} um^2 (K = {model.datapath.vector_length} lanes)")
    grid = Table(title="Energy per iteration by pass and unit (mJ)")
    grid.add_column("pass")
    for column in by_pass.columns:
        grid.add_column(str(column), justify="right")
    for name, row in by_pass.iterrows():
        grid.add_row(str(name), *(_mj(v) for v in row))
    _print_whole(grid)
    if len(memory):
        grid = Table(title="Memory by level and tensor (mJ)")
        for column in ("level", "tensor", "mJ"):
            grid.add_column(column, justify="right" if column == "mJ" else "left")
        for _, row in memory.iterrows():
            grid.add_row(row["level"], row["tensor"], _mj(row["energy_pj"]))
        console.print(grid)
    grid = Table(title=f"Top {len(top)} layers")
    for column in ("layer", "mJ", "share"):
        grid.add_column(column, justify="left" if column == "layer" else "right")
    for _, row in top.iterrows():
        grid.add_row(row["layer"], _mj(row["energy_pj"]), f"{row['share']:.1%}")
    console.print(grid)
    if gemms:
        grid = Table(title=f"GEMMs of one iteration (m, k, n per sample; MACs for batch "
                     f"{info['batch_size']})")
        for column in ("layer", "pass", r"groups x \[m, k] x \[k, n]", "MACs", "parameters"):
            grid.add_column(column, justify="left" if column in ("layer", "pass") else "right")
        for row in network.training_gemms(info["batch_size"]):
            shape = (rf"{row['groups']} x \[{row['m']}, {row['k']}] x \[{row['k']}, {row['n']}]"
                     if row["pass"] != "update" else "")
            grid.add_row(row["layer"], row["pass"], shape, f"{row['macs']:,}" if row["macs"] else "",
                         f"{row['params']:,}" if row["params"] else "")
        _print_whole(grid)
    if csv is not None:
        console.print(f"wrote {csv}")


_COMPARE_HEADERS = {
    "format": "format", "multiply_pj_per_mac": "multiply pJ/MAC", "conversion_pj_per_mac":
    "conversion pJ/MAC", "accumulation_pj_per_mac": "accumulation pJ/MAC", "mac_pj": "MAC pJ",
    "compute_mj": "compute mJ", "update_mj": "update mJ", "memory_mj": "memory mJ",
    "iteration_mj": "iteration mJ", "vs_fp32": "vs fp32", "vs_int8": "vs int8",
    "datapath_um2": "datapath um^2", "pe_um2": "PE um^2",
}


@app.command("compare", cls=_Command)
@_with_options(_EnergyOptions)
@user_errors
def compare(
    specs: Annotated[list[str], typer.Argument(help="Formats to compare, e.g. lns8 posit8 int8 fp8_e4m3.")],
    workload: _WorkloadOpt = "resnet50",
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the table to this CSV file.")] = None,
    as_json: _JsonOpt = False,
    options: _EnergyOptions = _EnergyOptions(),
) -> None:
    """Per-MAC energy, energy per training iteration and datapath/PE area of several formats, with
    ratios to fp32 and int8."""
    import json

    from dse.energy import compare_formats
    from dse.formats import get

    _check_output_file("--csv", csv)
    model = options.model()
    formats = [get(spec) for spec in specs]
    network = options.workload(workload)
    frame = compare_formats(formats, network, model, options.batch_size, optimizer=options.optimizer,
                            rounding=options.rounding, update_rounding=options.update_rounding)
    if csv is not None:
        from dse.report.files import write_text_atomically

        write_text_atomically(csv, frame.to_csv(index=False))
    if as_json:
        out = {"workload": workload, "node_nm": model.node_nm, "scope": model.scope,
               "rows": frame.to_dict(orient="records")}
        typer.echo(json.dumps(_json_safe(out)))
        return
    grid = Table(title=f"{workload}, {model.node_nm:g} nm, scope {model.scope}: energy per MAC (workload "
                 "average), per training iteration, and area")
    for column in frame.columns:
        grid.add_column(_COMPARE_HEADERS[column], justify="left" if column == "format" else "right")
    for _, row in frame.iterrows():
        grid.add_row(*(row[c] if c == "format" else _number(row[c]) for c in frame.columns))
    _print_whole(grid)
    if csv is not None:
        console.print(f"wrote {csv}")


# --- sweep -----------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """NaN and inf have no JSON spelling: they become null."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


# --- train: its options are TrainConfig's fields --------------------------------------------------

_TRAIN_DECLS: dict[str, tuple[str, ...]] = {"format": ("--format", "-f")}
"""Option names other than the field's own (--field-name)."""
_TRAIN_CHOICES: dict[str, str] = {
    "dataset": "built in: digits, mnist1d, mnist5k, sort, sort-easy, mnist, cifar10",
    "optimizer": "sgd, adam, adamw, madam, lns-madam or niti",
    "lr_schedule": "constant, cosine or step", "rounding": _ROUNDINGS, "update_rounding": _ROUNDINGS,
    "device": "cpu or cuda[:N]", "full_precision_layers": "comma-separated: first, last",
    "master_weights": "true (fp32), false (the weight format) or a format spec, e.g. 'lns(12,gamma=128)'",
    "layers": "rules as YAML/JSON, e.g. '[{match: head, format: fp32}]', or a .yaml/.json file of them",
}
"""What a field's value may be, in words, where its type does not say it."""
_TRAIN_TEXT_FIELDS = ("master_weights", "full_precision_layers", "layers")
"""Fields given as text on the command line and read into their TrainConfig type."""


def _field_docs(cls: type) -> dict[str, str]:
    """Each dataclass field's docstring: the string literal written under it in the class body."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]  # a ClassDef
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _first_sentence(text: str) -> str:
    import re

    return re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0]


def _train_parameters() -> list[Any]:
    """One option per TrainConfig field (its type, default and docstring), then the command's own."""
    import inspect
    import typing

    from dse.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    docs = _field_docs(TrainConfig)
    parameters = []
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        default = field.default
        kind: Any = hints[name]
        if name in _TRAIN_TEXT_FIELDS:
            kind, default = (str | None, None) if name == "layers" else (str, _config_text(default))
        elif name == "data_dir":
            kind = Path | None
        help_text = _first_sentence(docs[name])  # every field has its docstring (a test says so)
        if name in _TRAIN_CHOICES:
            help_text = f"{help_text} {_TRAIN_CHOICES[name]}.".strip()
        decls = _TRAIN_DECLS.get(name, (f"--{name.replace('_', '-')}",))
        option = typer.Option(*decls, help=help_text)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[kind, option]))
    own = {
        "no_master_weights": (bool, typer.Option("--no-master-weights", help="No copy: the weights are "
                                                 "stored in their GEMM format (--master-weights false).")),
        "as_json": (bool, typer.Option("--json", help="Print one JSON object (no progress lines).")),
        "quiet": (bool, typer.Option("--quiet", "-q", help="No progress lines, only the result.")),
        "verbose": (bool, typer.Option("--verbose", "-v", help="List every GEMM with its formats (after "
                                       "training: those first run then), and the GEMMs left in fp32; a "
                                       "user's network that raises while training shows its traceback.")),
    }
    for name, (kind, option) in own.items():
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False,
                                            annotation=Annotated[kind, option]))
    return parameters


def _config_text(value: Any) -> str:
    """A field's default as the command line spells it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _config_value(name: str, text: str | None, no_master_weights: bool) -> Any:
    """A text option read into its TrainConfig field's type."""
    from dse.precision import read_layer_rules
    from dse.train.loop import check_field

    if name == "master_weights":
        return False if no_master_weights else check_field("master_weights", text)
    if name == "full_precision_layers":
        return tuple(layer.strip() for layer in (text or "").split(",") if layer.strip())
    return read_layer_rules(text) if text else ()


@user_errors
def train(**options: Any) -> None:
    """Train one proxy under a number format and report its validation and test accuracy."""
    import json

    from dse.train import TrainConfig
    from dse.train import train as run_training
    from dse.train.allocator import keep_freed_memory
    from dse.train.layers import UnconvertedGemmWarning

    keep_freed_memory()  # as a sweep's processes run its trials

    as_json, quiet, verbose = options.pop("as_json"), options.pop("quiet"), options.pop("verbose")
    no_master_weights = options.pop("no_master_weights")
    for name in _TRAIN_TEXT_FIELDS:
        options[name] = _config_value(name, options[name], no_master_weights)
    if options["data_dir"] is not None:
        options["data_dir"] = str(options["data_dir"])

    reported: dict[str, Any] = {}

    def report_gemms(gemms: list[Any], unconverted: list[str]) -> None:
        reported.update(gemms=gemms, listed=len(gemms), warned=len(getattr(gemms, "unconverted", ())))
        if verbose:
            error_console.print(f"GEMMs ({sum(g.quantized for g in gemms)} of {len(gemms)} quantized):",
                                markup=False, highlight=False)
            for gemm in gemms:
                error_console.print(f"  {gemm.describe()}", markup=False, highlight=False, soft_wrap=True)
        for message in unconverted:  # always: a GEMM left in fp32 is never silent
            _warning_line(message)

    def report_late_gemms() -> None:
        """The GEMMs the example forward did not reach, as training first ran them (the list is live)."""
        gemms = reported.get("gemms")
        if gemms is None:
            return
        late = gemms[reported["listed"]:]
        if verbose and late:
            error_console.print(f"GEMMs first run during training ({len(late)} more; "
                                f"{sum(g.quantized for g in gemms)} of {len(gemms)} quantized in all):",
                                markup=False, highlight=False)
            for gemm in late:
                error_console.print(f"  {gemm.describe()}", markup=False, highlight=False, soft_wrap=True)
        for message in getattr(gemms, "unconverted", [])[reported["warned"]:]:
            _warning_line(message)

    config = TrainConfig(**options)

    def report_epoch(epoch: int, loss: float, validation: float, test: float) -> None:
        # validation, as `dse sweep` chooses by it: a test accuracy per epoch invites choosing an epoch by it
        error_console.print(f"epoch {epoch + 1}/{config.epochs}: training loss {loss:.4f}, validation "
                            f"accuracy {validation:.4f}", markup=False, highlight=False)

    progress = None if as_json or quiet else report_epoch
    with warnings.catch_warnings(), _users_network_errors(config.model, verbose):
        warnings.simplefilter("ignore", UnconvertedGemmWarning)  # printed from the live list below
        result = run_training(config, progress=progress, on_gemms=report_gemms)
    report_late_gemms()
    if as_json:
        typer.echo(json.dumps(_json_safe(result.to_dict())))
        return
    table = Table(title=f"{config.model} on {config.dataset}", show_header=False)
    table.add_column("", justify="left")
    table.add_column("", justify="right")
    curve = result.loss_curve
    finite = [v for v in curve if v == v]
    rows = [("validation accuracy", f"{result.val_accuracy:.4f}"),
            ("test accuracy", f"{result.test_accuracy:.4f}"), ("diverged", str(result.diverged).lower()),
            ("epochs run", str(result.epochs_run)),
            ("training loss first / last / min",
             " / ".join(f"{v:.4f}" for v in (curve[0], curve[-1], min(finite))) if finite else "nan"),
            ("parameters", f"{result.params:,}"), ("wall time", f"{result.wall_time_s:.2f} s")]
    for name, value in rows:
        table.add_row(name, value)
    _print_whole(table)


@contextlib.contextmanager
def _users_network_errors(model: str, traceback_shown: bool) -> Iterator[None]:
    """An error a user's network (`file.py:function`) raises while it trains, as one line naming the
    network (an InputError); with `traceback_shown`, as it is."""
    from dse.errors import InputError
    from dse.usercode import is_ref

    try:
        yield
    except InputError:
        raise
    except Exception as error:
        if traceback_shown or not is_ref(model):
            raise
        text = str(error).splitlines()[0] if str(error) else ""
        raise InputError(f"model {model!r} raised {type(error).__name__} while training: {text} (--verbose "
                         "shows the traceback)") from None


train.__signature__ = inspect.Signature(_train_parameters())  # type: ignore[attr-defined]  # Typer reads it
app.command("train", cls=_Command)(train)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


@app.command("sweep", cls=_Command)
@user_errors
def sweep(
    config: Annotated[Path, typer.Argument(help="The sweep file (YAML; every key in docs/config.md).")],
    force: Annotated[bool, typer.Option("--force", help="Rerun finished trials; replace a store that holds "
                                        "another sweep's results.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Rerun the trials that failed (stored "
                                               "with an error); finished ones are kept.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory (overrides the "
                                                "file's output:).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Trials run at once (overrides "
                                                "executor.workers).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and list the trials; run nothing, "
                                          "write nothing.")] = False,
    group_size: Annotated[int | None, typer.Option(min=1, help="Trials of one configuration trained at "
                                                   "once (overrides executor.group_size; 1: each "
                                                   "alone).")] = None,
) -> None:
    """Train every trial of a sweep file, estimate its energy, store results, and write Pareto reports.

    Runs again skip finished trials (resume); results go to the output directory's sweep.sqlite.
    """
    from dse.sweep.interrupt import sweep_line
    from dse.sweep.progress import RichReporter
    from dse.sweep.receipt import conclude_finished, finished_sweep, invocation, likely_to_train, read_sweep

    reporter = RichReporter(console, error_console, quiet=quiet)
    on_disk = None if dry_run else read_sweep(config, output)  # the file and its store, read once here
    finished = None if force or dry_run else finished_sweep(config, output, group_size, retry_failed, on_disk)
    from dse.models.workloads import UnpricedWarning
    from dse.report.drawing import FigureFallbackWarning
    from dse.sweep.lock import UnlockedWarning

    as_lines = (FigureFallbackWarning, UnlockedWarning, UnpricedWarning)  # a sweep's warnings, one line each
    if finished is not None:  # nothing to train, the plan as stored: no planning, no torch
        with (COMMAND_SIGNALS.stopped_by(sweep_line(finished.output)),
              _warnings_as_lines(*as_lines)):
            summary = conclude_finished(finished, reporter)
        _print_sweep_summary(summary, finished.memory_objective, quiet)
        return
    if not dry_run and on_disk is not None:  # another sweep writing there: refused before the imports
        from dse.sweep.lock import refuse_if_held

        refuse_if_held(on_disk.directory)
    if not dry_run and likely_to_train(config, output, force, on_disk):
        from dse.sweep.executors import start_worker_server

        start_worker_server()  # its imports overlap this process's own and the planning
    from dse.sweep import load_config, run_sweep
    from dse.sweep.runner import plan_sweep

    settings = load_config(config, None if on_disk is None else on_disk.text)  # the file read once
    if output is not None:
        settings = settings.replace(output=output)
    if workers is not None:
        settings = settings.replace(executor=dataclasses.replace(settings.executor, workers=workers))
    if group_size is not None:
        settings = settings.replace(executor=dataclasses.replace(settings.executor, group_size=group_size))
    if dry_run:
        trials, _, _ = plan_sweep(settings)
        runs = len({trial.trial_id for trial in trials})
        grid = Table(title=Text(f"{settings.name}: {runs} trials -> {settings.output}"))  # (not markup)
        for column in ("task", "configuration", "tuning", "trials"):
            grid.add_column(column, justify="right" if column == "trials" else "left")
        rows: dict[tuple[str, str], tuple[dict[str, list[Any]], int]] = {}
        for trial in trials:
            tuned, count = rows.get((trial.task, trial.label), ({}, 0))
            for name, value in trial.tuning.items():
                if value not in tuned.setdefault(name, []):
                    tuned[name].append(value)
            rows[(trial.task, trial.label)] = (tuned, count + 1)
        for (task, label), (tuned, count) in rows.items():
            tuning = "; ".join(f"{name}: {', '.join(map(str, values))}" for name, values in tuned.items())
            grid.add_row(task, label, tuning or "-", str(count))
        _print_whole(grid)
        from dse.sweep.groups import device_shares, plan_groups
        from dse.sweep.runner import unique_runs

        unique = unique_runs(trials)
        groups, notes = plan_groups(unique, settings.executor.group_size,
                                    shares=device_shares(unique, settings.executor))
        from dse.sweep.groups import GROUP_SIZE

        chosen = settings.executor.group_size
        largest = max((len(group) for group in groups), default=1)  # as planned: after any split below
        if chosen is None:  # the largest group, and where its size came from
            sizes = (f"{largest} (no group_size given: each model's default, {GROUP_SIZE}, or 1 where a line "
                     f"below says why)")
        else:
            sizes = f"{largest}" if largest == chosen else f"{largest} (group_size {chosen})"
        console.print(f"{len(groups)} jobs: trials trained in groups of up to {sizes}", markup=False,
                      highlight=False, soft_wrap=True)
        for note in notes:
            console.print(note, markup=False, highlight=False, soft_wrap=True)
        return
    from dse.train.allocator import keep_freed_memory

    keep_freed_memory()  # as in its workers and in `dse train`
    # SIGINT, SIGTERM, SIGHUP: run_sweep stops its workers, and says how many trials are stored
    with (COMMAND_SIGNALS.stopped_by(sweep_line(settings.output)),
          _warnings_as_lines(*as_lines)):
        summary = run_sweep(settings, force=force, retry_failed=retry_failed, reporter=reporter,
                            invocation=invocation(config, output, group_size))
    _print_sweep_summary(summary, settings.memory_objective, quiet)


def _print_sweep_summary(summary: Any, memory_objective: bool, quiet: bool) -> None:
    """The end of `dse sweep`: counts, the best trial, notes, each task's fronts, where the files are."""
    from dse.sweep.store import STORE_FILE

    if quiet:
        return
    resumed = f" now, {summary.skipped} from an earlier run" if summary.skipped else ""
    console.print(f"[bold]{summary.name}[/]: {summary.total} trials: {summary.ok} ok, {summary.diverged} "
                  f"diverged, {summary.errors} failed ({summary.ran} run{resumed}) in "
                  f"{_duration(summary.wall_time_s)}", highlight=False)
    if summary.best is not None:
        best = summary.best
        console.print(f"best by validation accuracy: val {best.val_accuracy:.4f}, test "
                      f"{best.test_accuracy:.4f}: {best.task}: {best.label} (seed {best.seed})",
                      markup=False, highlight=False)
    for note in summary.notes:
        console.print(note, markup=False, highlight=False, soft_wrap=True)
    if summary.ok:
        from dse.report import SweepTables

        tables = summary.tables or SweepTables.of(summary.trials, memory_objective)  # built once
        _print_fronts(tables, memory_objective)
    console.print(f"results: {summary.output / STORE_FILE}", markup=False, highlight=False)
    if summary.files:
        names = ", ".join(sorted({path.name for path in summary.files}))
        console.print(f"reports ({len(summary.files)} files) in {summary.output}: {names}", markup=False,
                      highlight=False, soft_wrap=True)


# --- reports ---------------------------------------------------------------------------------------


def _rich_table(text_table: Any) -> Table:
    """A report TextTable as a Rich table (cells as plain text, never markup; rules between groups)."""
    from rich.text import Text

    table = Table(title=Text(text_table.title))
    for column, numeric in zip(text_table.columns, text_table.numeric, strict=True):
        table.add_column(Text(column), justify="right" if numeric else "left")
    for index, row in enumerate(text_table.rows):
        table.add_row(*(Text(cell) for cell in row), end_section=index + 1 in text_table.group_starts)
    return table


_DirArg = Annotated[Path, typer.Argument(help="A sweep's output directory (the one holding its store).")]
_MemoryOpt = Annotated[bool, typer.Option("--memory", help="Make memory footprint a third objective of the "
                                          "fronts (also on when the sweep asked for it).")]


_AllPointsOpt = Annotated[bool, typer.Option("--all-points", help="Report every tuning point of each "
                                              "configuration instead of the one chosen by validation "
                                              "accuracy.")]
_FrontEnergyOpt = Annotated[str | None, typer.Option(
    "--front-energy", help="The energy fronts rank by: iteration (one iteration in the trial's formats) or "
    "run-mean (the run's energy per iteration; an error where a configuration has none). Default: "
    "run-mean where every configuration has one, else iteration.")]


def _print_fronts(tables: Any, memory_objective: bool) -> None:
    """Each task's Pareto front on each workload, as a table."""
    from dse.report.tables import pareto_text_table

    fronts = tables.fronts
    objectives = "max accuracy, min energy" + (", min memory" if memory_objective else "")
    for task in dict.fromkeys(tables.summary["task"]):
        for workload in tables.workloads:
            rows = fronts[(fronts["task"] == task) & (fronts["workload"] == workload)]
            title = f"Pareto front: {task} on {workload} ({objectives})"
            _print_whole(_rich_table(pareto_text_table(rows, memory_objective, title, keys=False)))


@app.command("report", cls=_Command)
@user_errors
def report(directory: _DirArg, memory: _MemoryOpt = False, all_points: _AllPointsOpt = False,
           titles: Annotated[bool, typer.Option("--titles", help="Put a title in each figure (none by "
                                                "default: the caption belongs to the paper).")] = False,
           front_energy: _FrontEnergyOpt = None) -> None:
    """Print a sweep's summary and Pareto fronts; rewrite its CSV, LaTeX, Markdown tables and plots.

    The files always report each configuration at its chosen tuning point (all_points.csv has
    every point); --all-points changes what is printed. Files that are already what this would
    write (from these trials and options, unchanged since) are left as they are.
    """
    from dse.report import SweepTables, write_reports
    from dse.report.files import writable_current_reports
    from dse.report.pareto import choose_front_energy
    from dse.sweep.store import load_trials

    trials = load_trials(directory)
    choose_front_energy(trials, front_energy)
    memory_objective = memory or bool((trials.attrs.get("sweep") or {}).get("memory_objective", False))
    # files to write: a folder that refuses them is the whole answer, printed alone
    current = writable_current_reports(trials, directory, memory_objective, titles)
    tables = SweepTables.of(trials, memory_objective, all_points)
    _print_whole(_rich_table(tables.text_table("summary")))
    _print_fronts(tables, memory_objective)
    if current is not None:
        console.print(f"{len(current)} files in {directory} are up to date (written from these trials by "
                      "this report code)", markup=False, highlight=False, soft_wrap=True)
        return
    from dse.report.drawing import FigureFallbackWarning, FigureProcesses

    with (COMMAND_SIGNALS.stopped_by(files_line(directory)), _warnings_as_lines(FigureFallbackWarning),
          FigureProcesses() as figures):
        written = write_reports(trials, directory, memory_objective, None if all_points else tables, titles,
                                figures)
    console.print(f"wrote {len(written)} files to {directory}", markup=False, highlight=False)


@app.command("export", cls=_Command)
@user_errors
def export(
    directory: _DirArg,
    text_format: Annotated[str, typer.Option("--to", "-t", help="The file type: csv, latex (booktabs) or "
                                             "markdown.")],
    table: Annotated[str, typer.Option(help="summary (mean/std over seeds) or pareto (every front).")]
    = "summary",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the table to this file "
                                                "(default: standard output).")] = None,
    memory: _MemoryOpt = False,
    all_points: _AllPointsOpt = False,
    front_energy: _FrontEnergyOpt = None,
) -> None:
    """Write one table of a sweep as CSV, LaTeX or Markdown."""
    from dse.errors import InputError
    from dse.report import render_table
    from dse.report.files import write_text_atomically
    from dse.report.pareto import choose_front_energy
    from dse.report.tables import check_export_choice
    from dse.sweep.store import load_trials

    check_export_choice(table, text_format)
    if output is not None and output.is_dir():
        raise InputError(f"--output {output} is a directory; give a file path")
    _check_output_file("--output", output, makes_folders=True)
    trials = load_trials(directory)
    choose_front_energy(trials, front_energy)
    memory_objective = memory or bool((trials.attrs.get("sweep") or {}).get("memory_objective", False))
    text = render_table(trials, table, text_format, memory_objective, all_points)
    if output is None:
        typer.echo(text, nl=False)
    else:
        with COMMAND_SIGNALS.stopped_by(files_line(output.parent)):
            write_text_atomically(output, text)
        console.print(f"wrote {output}", markup=False, highlight=False)


if __name__ == "__main__":
    app()
