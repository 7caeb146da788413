"""Spec parsing (every spec the users name, bad ones rejected with the valid range) and the formats CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dse.cli import app
from dse.errors import InputError
from dse.formats import ZOO, get

ISSUE_SPECS = [
    "fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "fp(e=5,m=2)",
    "int8", "int(4)", "fixed(16,8)", "posit(8,0)", "posit(16,1)", "posit8", "posit16", "lns8",
    "lns(8,gamma=8)", "lns(6,gamma=2)", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4",
    "mxint8",
]

runner = CliRunner()


@pytest.mark.parametrize("spec", ISSUE_SPECS)
def test_issue_specs_parse_and_canonicalise(spec: str) -> None:
    fmt = get(spec)
    assert get(fmt.spec) == fmt
    assert get(fmt.spec.upper().replace(",", " , ")) == fmt  # case and spaces do not matter


@pytest.mark.parametrize(("spec", "bits", "family"), [
    ("fp8_e4m3", 8, "fp"), ("bf16", 16, "fp"), ("int(4)", 4, "int"), ("fixed(16,8)", 16, "fixed"),
    ("posit8", 8, "posit"), ("lns(6,gamma=2)", 6, "lns"), ("mxfp4", 4, "block"), ("mxint8", 8, "block"),
])
def test_specs_mean_what_they_say(spec: str, bits: int, family: str) -> None:
    fmt = get(spec)
    assert (fmt.bits, fmt.family) == (bits, family)


def test_named_formats_have_their_published_ranges() -> None:
    assert get("fp8_e4m3").max == 448.0
    assert get("fp8_e5m2").max == 57344.0
    assert get("fp4_e2m1").max == 6.0
    assert get("fp6_e2m3").max == 7.5
    assert get("fp6_e3m2").max == 28.0
    assert get("bf16").max == pytest.approx(3.3895313892515355e38)
    assert get("fp16").min_positive == 2.0**-24
    assert get("posit8").es == 2 and get("posit16").es == 2  # the 2022 posit standard
    assert get("posit8").max == 2.0**24 and get("posit(8,0)").max == 64.0
    assert get("lns8").gamma == 8 and get("lns(6,gamma=2)").gamma == 2
    assert get("mxfp8_e4m3").block_size == 32 and get("mxfp8_e4m3").element == get("fp8_e4m3")


def test_aliases_and_call_forms_agree() -> None:
    assert get("fp(e=5,m=2)") == get("fp8_e5m2")
    assert get("lns(8,gamma=8)") == get("lns8")
    assert get("int(8)") == get("int8")
    assert get("posit(8,2)") == get("posit8")
    assert get("fp8_e4m3(overflow=nan)") != get("fp8_e4m3")


@pytest.mark.parametrize(("spec", "needle"), [
    ("posit(8,9)", "es"), ("fp(e=0,m=3)", "e"), ("lns(8,gamma=3)", "gamma"), ("int(0)", ".."),
    ("foo8", "unknown format"), ("posit(8", "expected"), ("int(8,scale=sideways)", "scale"),
    ("fp(e=4,m=3,colour=red)", "colour"),
])
def test_bad_specs_raise_value_error_naming_spec_and_range(spec: str, needle: str) -> None:
    with pytest.raises(ValueError) as raised:
        get(spec)
    assert isinstance(raised.value, InputError)
    message = str(raised.value)
    assert spec in message and needle in message
    assert "\n" not in message


def test_cli_lists_the_zoo() -> None:
    result = runner.invoke(app, ["formats"])
    assert result.exit_code == 0, result.output
    for spec in ("fp8_e4m3", "posit(16,1)", "lns8", "mxfp4", "int8"):
        assert spec in result.output


def test_cli_show_prints_properties_and_writes_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "density.png"
    result = runner.invoke(app, ["formats", "show", "posit(16,1)", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert "posit(16,1)" in result.output and "dynamic range" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("spec", ["posit(8,9)", "foo8", "lns(8,gamma=3)"])
def test_cli_bad_spec_is_one_line_exit_2_and_writes_nothing(spec: str, tmp_path: Path) -> None:
    out = tmp_path / "never.png"
    result = subprocess.run([sys.executable, "cli.py", "formats", "show", spec, "--plot", str(out)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and spec in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


SHOWN_OPTION_SPECS = [
    *ZOO, "fp(e=5,m=2,special=fnuz,subnormals=0)", "fp8_e4m3(overflow=nan)",
    "fp(e=3,m=2,special=none,scale=tensor,pow2=1)", "int(4,symmetric=0,scale=channel,axis=0)",
    "fixed(16,8,scale=tensor,pow2=1)", "fixed(8,-2,symmetric=1)", "posit(16,1,scale=block,block=8)",
    "lns(8,gamma=4,underflow=saturate)", "p3109(8,3,signed=0,domain=finite,saturation=satfinite)",
    "block(int8,size=16,scale=ue5m3)", "block(fp(e=2,m=1),size=8,scale=fp32)",
    "mx(fp4_e2m1,block=16,axis=0)", "block(fp4_e2m1,scale=none)", "mxfp4(scale=none)",
]


@pytest.mark.parametrize("spec", SHOWN_OPTION_SPECS)
def test_formats_show_lists_the_options_as_the_spec_writes_them(spec: str) -> None:
    """Every row of `dse formats show` named after an option of the format's family holds that
    option's value in the spec's own words, and those rows written back as one call are the same
    format (nvfp4 showed `tensor_scale True` where its spec says tensor_scale=fp32, p3109 its
    fp parent's fields special/overflow, which p3109(...) does not take)."""
    from inspect import signature

    from dse.formats.spec import _FAMILIES, _ensure_families_loaded

    _ensure_families_loaded()
    fmt = get(spec)
    result = runner.invoke(app, ["formats", "show", spec], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = dict(tuple(cell.strip() for cell in line.split("│")[1:3])
                for line in result.stdout.splitlines() if line.count("│") == 3)
    properties = {"family", "bits", "scaling", "max", "min positive", "dynamic range (decades)",
                  "relative precision at 1.0", "finite values", "in float32"}
    options = set(signature(_FAMILIES[fmt.family]).parameters)
    assert set(rows) - properties <= options, set(rows) - properties - options
    shown = [f"{name}={value}" for name, value in rows.items() if name in options]
    assert get(f"{fmt.family}({','.join(shown)})") == fmt
