"""The `dse` command line: parse arguments, call dse, render with Rich, map bad input to exit code 2."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
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
    console.print(table)


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


if __name__ == "__main__":
    app()
