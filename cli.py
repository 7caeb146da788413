"""The `dse` command line: parse arguments, call dse, render with Rich, map bad input to exit code 2."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

app = typer.Typer(help="Design-space exploration of number formats for low-precision training.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
formats_app = typer.Typer(help="The number-format zoo.", invoke_without_command=True)
app.add_typer(formats_app, name="formats")

console = Console()
error_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(command: F) -> F:
    """Bad input (a spec, a file, a table) becomes one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            error_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _print_whole(table: Table) -> None:
    """Print a table at its natural width even on a narrow or non-terminal console (no cropped cells)."""
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(width=max(console.width, natural)).print(table)


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


@formats_app.command("show")
@user_errors
def formats_show(
    spec: Annotated[str, typer.Argument(help='A format spec, e.g. "posit(16,1)" or fp8_e4m3.')],
    plot: Annotated[Path | None, typer.Option(help="Write a value-density plot (PNG) here.")] = None,
) -> None:
    """Show one format's properties and optionally plot its value density."""
    from dse.formats import get

    fmt = get(spec)
    table = Table(title=fmt.spec, show_header=False)
    table.add_column("property")
    table.add_column("value")
    rows: list[tuple[str, str]] = [("family", fmt.family), ("bits", str(fmt.bits))]
    for field in dataclasses.fields(fmt):  # type: ignore[arg-type]
        value = getattr(fmt, field.name)
        rows.append((field.name, getattr(value, "spec", None) or str(value)))
    rows += [("max", _number(fmt.max)), ("min positive", _number(fmt.min_positive)),
             ("dynamic range (decades)", f"{fmt.dynamic_range_decades:.3f}"),
             ("relative precision at 1.0", _number(fmt.relative_precision))]
    if fmt.bits <= 16:
        rows.append(("finite values", str(fmt.values().numel())))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if plot is not None:
        from dse.report.format_plots import plot_value_density

        console.print(f"wrote {plot_value_density(fmt, plot)}")


# --- energy ----------------------------------------------------------------------------------------

_WorkloadOpt = Annotated[str, typer.Option("--workload", "-w", help="resnet18, resnet50, bert-base, "
                                           "gpt2-small or a proxy (digits-mlp, m1d-cnn, ...).")]
_NodeOpt = Annotated[str, typer.Option(help="Technology node: 65, 45, 32, 28, 20, 16, 14, 10, 7, 5 or 3nm.")]
_BatchOpt = Annotated[int | None, typer.Option("--batch", help="Batch size (default: the workload's).")]
_OptimizerOpt = Annotated[str | None, typer.Option(help="sgd, adam or madam (default: Madam for LNS weights, "
                                                   "else the workload's).")]
_AccOpt = Annotated[str | None, typer.Option(help="Accumulator: int24, int(32), fp32, fp16, bf16, quire "
                                             "(default by family: int32, fp32, LNS int24).")]
_LnsOpt = Annotated[str | None, typer.Option("--lns-datapath", help="LNS conversion: madam (per-remainder "
                                             "partial sums, default) or direct (per product).")]
_MitchellOpt = Annotated[int | None, typer.Option("--mitchell-bits", help="LNS remainder bits approximated "
                                                  "by Mitchell (default 0).")]
_AlignOpt = Annotated[int | None, typer.Option("--alignment-bits", help="MX FP alignment width "
                                               "(default 2p+8).")]
_SramOpt = Annotated[str | None, typer.Option(help="SRAM preset (default horowitz_32kb).")]
_DramOpt = Annotated[str | None, typer.Option(help="DRAM preset (default hbm2e).")]
_SramScalingOpt = Annotated[str | None, typer.Option("--sram-scaling", help="SRAM node scaling: sqrt "
                                                     "(default), logic or none.")]
_ReuseOpt = Annotated[float | None, typer.Option("--operand-reuse", help="MACs per operand read from SRAM "
                                                 "(default 16).")]
_TableOpt = Annotated[Path | None, typer.Option("--table", help="Your own energy table (YAML, same schema).")]


def _energy_model(node: str, accumulator: str | None, lns_datapath: str | None, mitchell_bits: int | None,
                  alignment_bits: int | None, sram: str | None, dram: str | None, sram_scaling: str | None,
                  operand_reuse: float | None, table: Path | None) -> Any:
    from dse.energy import DatapathParams, MemoryParams, build_model

    def given(**options: Any) -> dict[str, Any]:
        return {name: value for name, value in options.items() if value is not None}

    datapath = DatapathParams(**given(accumulator=accumulator, lns_datapath=lns_datapath,
                                      lns_mitchell_bits=mitchell_bits, alignment_bits=alignment_bits))
    memory = MemoryParams(**given(sram=sram, dram=dram, sram_scaling=sram_scaling,
                                  operand_reuse=operand_reuse))
    return build_model(node, datapath, memory, table)


def _mj(pj: float) -> str:
    return f"{pj * 1e-9:.4g}"


@app.command("energy")
@user_errors
def energy(
    workload: _WorkloadOpt,
    format_spec: Annotated[str, typer.Option("--format", "-f", help='Format of weights, activations and '
                                             'gradients, e.g. "lns(8,gamma=8)".')],
    weights: Annotated[str | None, typer.Option(help="Weight format (overrides --format).")] = None,
    activations: Annotated[str | None, typer.Option(help="Activation format (overrides --format).")] = None,
    gradients: Annotated[str | None, typer.Option(help="Gradient format (overrides --format).")] = None,
    node: _NodeOpt = "45nm",
    batch: _BatchOpt = None,
    optimizer: _OptimizerOpt = None,
    accumulator: _AccOpt = None,
    lns_datapath: _LnsOpt = None,
    mitchell_bits: _MitchellOpt = None,
    alignment_bits: _AlignOpt = None,
    sram: _SramOpt = None,
    dram: _DramOpt = None,
    sram_scaling: _SramScalingOpt = None,
    operand_reuse: _ReuseOpt = None,
    table: _TableOpt = None,
    layers: Annotated[int, typer.Option(help="How many of the most expensive layers to list.")] = 10,
) -> None:
    """Energy of one training iteration of a workload, by pass, unit and layer."""
    from dse.energy import TrainingFormats, iteration_energy, pass_unit_table, per_mac, summarize, top_layers
    from dse.formats import get

    model = _energy_model(node, accumulator, lns_datapath, mitchell_bits, alignment_bits, sram, dram,
                          sram_scaling, operand_reuse, table)
    base = get(format_spec)
    formats = TrainingFormats(weight=get(weights) if weights else base,
                              activation=get(activations) if activations else base,
                              gradient=get(gradients) if gradients else base, optimizer=optimizer)
    frame = iteration_energy(workload, formats, model, batch)
    info = frame.attrs
    mac = per_mac(frame)
    console.print(f"[bold]{info['workload']}[/], batch {info['batch_size']}, {info['node_nm']:g} nm: "
                  f"{info['formats']}")
    console.print(f"{info['macs']:.4g} MACs per iteration, {_mj(frame['energy_pj'].sum())} mJ; per MAC "
                  f"(workload average): multiply {mac.multiply_pj:.4g} pJ, conversion "
                  f"{mac.conversion_pj:.4g} pJ, accumulation {mac.accumulation_pj:.4g} pJ")
    by_pass = pass_unit_table(frame)
    grid = Table(title="Energy per iteration by pass and unit (mJ)")
    grid.add_column("pass")
    for column in by_pass.columns:
        grid.add_column(str(column), justify="right")
    for name, row in by_pass.iterrows():
        grid.add_row(str(name), *(_mj(v) for v in row))
    _print_whole(grid)
    memory = summarize(frame[frame["unit"] == "memory"], ["level", "tensor"])
    grid = Table(title="Memory by level and tensor (mJ)")
    for column in ("level", "tensor", "mJ"):
        grid.add_column(column, justify="right" if column == "mJ" else "left")
    for _, row in memory.iterrows():
        grid.add_row(row["level"], row["tensor"], _mj(row["energy_pj"]))
    console.print(grid)
    top = top_layers(frame, layers)
    grid = Table(title=f"Top {len(top)} layers")
    for column in ("layer", "mJ", "share"):
        grid.add_column(column, justify="left" if column == "layer" else "right")
    for _, row in top.iterrows():
        grid.add_row(row["layer"], _mj(row["energy_pj"]), f"{row['share']:.1%}")
    console.print(grid)


_COMPARE_HEADERS = {
    "format": "format", "multiply_pj_per_mac": "multiply pJ/MAC", "conversion_pj_per_mac":
    "conversion pJ/MAC", "accumulation_pj_per_mac": "accumulation pJ/MAC", "mac_pj": "MAC pJ",
    "compute_mj": "compute mJ", "update_mj": "update mJ", "memory_mj": "memory mJ",
    "iteration_mj": "iteration mJ", "vs_fp32": "vs fp32", "vs_int8": "vs int8",
}


@app.command("compare")
@user_errors
def compare(
    specs: Annotated[list[str], typer.Argument(help="Formats to compare, e.g. lns8 posit8 int8 fp8_e4m3.")],
    workload: _WorkloadOpt = "resnet50",
    node: _NodeOpt = "45nm",
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write the table to this CSV file.")] = None,
    batch: _BatchOpt = None,
    optimizer: _OptimizerOpt = None,
    accumulator: _AccOpt = None,
    lns_datapath: _LnsOpt = None,
    mitchell_bits: _MitchellOpt = None,
    alignment_bits: _AlignOpt = None,
    sram: _SramOpt = None,
    dram: _DramOpt = None,
    sram_scaling: _SramScalingOpt = None,
    operand_reuse: _ReuseOpt = None,
    table: _TableOpt = None,
) -> None:
    """Per-MAC energy and energy per training iteration of several formats, with ratios to fp32 and int8."""
    from dse.energy import compare_formats
    from dse.formats import get

    model = _energy_model(node, accumulator, lns_datapath, mitchell_bits, alignment_bits, sram, dram,
                          sram_scaling, operand_reuse, table)
    formats = [get(spec) for spec in specs]
    frame = compare_formats(formats, workload, model, batch, optimizer=optimizer)
    grid = Table(title=f"{workload}, {model.node_nm:g} nm: energy per MAC (workload average) and per "
                 "training iteration")
    for column in frame.columns:
        grid.add_column(_COMPARE_HEADERS[column], justify="left" if column == "format" else "right")
    for _, row in frame.iterrows():
        grid.add_row(*(row[c] if c == "format" else _number(row[c]) for c in frame.columns))
    _print_whole(grid)
    if csv is not None:
        frame.to_csv(csv, index=False)
        console.print(f"wrote {csv}")


if __name__ == "__main__":
    app()
