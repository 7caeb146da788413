"""The "published vs dse" table of docs/energy-model.md: every published figure the energy model can be
checked against, the model's value for the same quantity now, and (before) at the commit the model was
last checked at, so anyone can rerun it.

Run: .venv/bin/python benchmarks/published.py [--before e7d66b0] [--markdown]
     .venv/bin/python benchmarks/published.py --model-tables   (the per-MAC and ResNet-50 tables)

`--before` names a git commit of this repository; its `dse/`, `models/` and `energy_tables/` are
unpacked into a temporary folder and evaluated in a subprocess with the same quantity functions
(written against the API both versions share). Quantities the older model cannot express (a scope, a
vector length, an area) show "n/a" there. Without git or the commit the column is left empty.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEFORE = "e7d66b0"
"""The commit whose model issue 12 measured (docs/energy-model.md, "published vs dse")."""

# --- the published figures -------------------------------------------------------------------------
# (key, quantity, published, source, how it was verified). `published` is a number, a tuple of numbers
# (several entries in one row) or a (low, high) range string.
PUBLISHED: list[tuple[str, str, Any, str, str]] = [
    ("int_add_45", "INT add 8 / 16 / 32 b, 45 nm (pJ)", (0.03, 0.05, 0.1),
     "Horowitz, ISSCC 2014 (detailed table)", "page: Gholami et al. 2021 Fig. 15 reproduction"),
    ("int_mul_45", "INT mult 8 / 32 b, 45 nm (pJ)", (0.2, 3.1), "Horowitz 2014", "page: same"),
    ("fp16_45", "FP16 add / mult, 45 nm (pJ)", (0.4, 1.1), "Horowitz 2014", "page: same"),
    ("fp32_45", "FP32 add / mult, 45 nm (pJ)", (0.9, 3.7), "Horowitz 2014", "page: same"),
    ("sram_45", "SRAM 64-b read 8 KB / 32 KB / 1 MB, 45 nm (pJ)", (10, 20, 100), "Horowitz 2014 (figure)",
     "page: slide reproductions"),
    ("fp32_7", "FP32 add / mult, 7 nm (pJ)", (0.38, 1.31), "Jouppi et al., ISCA 2021, Table 2",
     "page (secondary): two independent reproductions; the paper itself not opened"),
    ("sram_7", "SRAM 64-b read 8 KB / 32 KB / 1 MB, 7 nm (pJ)", (7.5, 8.5, 14), "Jouppi et al. 2021, Table 2",
     "memory: recalled, not re-read"),
    ("fp32_mac_45", "FP32 MAC, 45 nm (pJ): below mult + add (unfused)", (4.6,),
     "Horowitz 2014 (3.7 + 0.9, an upper bound)", "derived"),
    ("fp8_int8_fp16", "FP8-E4M3 / INT8 MAC, FP16 accumulator", (1.53,),
     "van Baalen et al. 2023, Sec. 3 (abstract: 50-180 % less efficient)", "page: abstract; 1.53 secondary"),
    ("fp8_int8_fp32", "FP8-E4M3 / INT8 MAC, FP32 accumulator", (2.83,), "van Baalen et al. 2023, Sec. 3",
     "page: abstract range 1.5-2.8x; 2.83 secondary"),
    ("posit_fp_power", "posit / FP MAC energy, 8 / 16 / 32 b", (1.15, 1.38, 1.45),
     "Zhang, He and Ko, ISCAS 2019, 28 nm", "secondary only"),
    ("posit_fp_area", "posit / FP MAC area, 8 / 16 / 32 b", (1.28, 1.61, 1.48), "Zhang, He and Ko 2019",
     "secondary only"),
    ("lns_int8_elma", "LNS8 / INT8 MAC (scalar, 32-b accumulator)", (0.96,),
     "Johnson 2018, 'Rethinking floating point', ELMA, 28 nm", "page: abstract and author's note"),
    ("lns_int8_madam", "LNS-Madam LNS8 / INT8 MAC, K = 16", "0.68-0.94",
     "Zhang et al., GLSVLSI 2024 (LNS MAC 6-32 % below fixed point)", "page: abstract"),
    ("lns_int8_direct", "LNS8 (direct conversion) / INT8 MAC, K = 16", "0.68-0.94",
     "Zhang et al., GLSVLSI 2024 (LNS MAC 6-32 % below fixed point)", "page: abstract"),
    ("mxint_mxfp", "MXINT8 / MXFP8-E4M3 MAC energy", (0.63,), "Chen et al. 2025, arXiv 2510.25602, Table 5",
     "secondary (analytical model)"),
    ("mx_area_mem", "MXFP6 / MXFP4 dot-product area x bits vs FP8", (0.5, 0.25),
     "Rouhani et al., ISCA 2023, p. 7 (their MX6/MX4)", "secondary; OCP MXFP6-E3M2 / MXFP4 stand in"),
    ("madam_resnet_pe", "LNS8 / FP32, FP16, FP8 per ResNet-50 iteration, PE scope", (0.09, 0.22, 0.45),
     "LNS-Madam (Zhao et al., TC 2022; figure)", "page: abstract (>90 % vs FP32, 55 % vs FP8)"),
    ("madam_bert_pe", "LNS8 / FP32, FP16, FP8 per BERT-base iteration, PE scope", (0.09, 0.22, 0.45),
     "LNS-Madam (Zhao et al. 2022)", "page: same"),
    ("madam_resnet_datapath_scalar", "LNS8 / FP32, FP16, FP8 per ResNet-50 iteration, datapath scope, "
     "scalar FP MACs", (0.09, 0.22, 0.45), "LNS-Madam (Zhao et al. 2022)", "page: same"),
    ("madam_bert_datapath_scalar", "LNS8 / FP32, FP16, FP8 per BERT-base iteration, datapath scope, "
     "scalar FP MACs", (0.09, 0.22, 0.45), "LNS-Madam (Zhao et al. 2022)", "page: same"),
    ("madam_resnet_system", "LNS8 / FP32, FP16, FP8 per ResNet-50 iteration, system scope",
     (0.09, 0.22, 0.45), "LNS-Madam (Zhao et al. 2022)", "page: same (the paper's figure has no DRAM)"),
]


# --- the model's value for each quantity (API shared by the old and the new model) ------------------

def _values() -> dict[str, Any]:
    """Every quantity, computed with whatever dse is importable."""
    from dse.energy import DatapathParams, build_model, iteration_energy, mac_energy
    from dse.formats import get

    new = "vector_length" in DatapathParams.__dataclass_fields__
    model45, model7 = build_model("45nm"), build_model("7nm")
    c45, c7 = model45.components, model7.components

    def mac(spec: str, k: int | None = None, model: Any = model45, **params: Any) -> float:
        if k is not None:
            if not new:
                return math.nan
            params["vector_length"] = k
        fmt = get(spec)
        return mac_energy(fmt, fmt, model.components, DatapathParams(**params), 1024).total_pj

    def area(spec: str, k: int = 16, **params: Any) -> float:
        if not new or model45.area is None:
            return math.nan
        from dse.energy import datapath_area_um2

        fmt = get(spec)
        return datapath_area_um2(fmt, fmt, model45.area, DatapathParams(vector_length=k, **params))

    def sram(model: Any, capacity: str) -> float:
        from dse.energy.model import MemoryParams

        chosen = build_model(f"{model.node_nm:g}nm", memory=MemoryParams(sram=f"horowitz_{capacity}"))
        return chosen.sram_pj_per_bit * 64

    def iteration(workload: str, spec: str, scope: str, k: int | None = None) -> float:
        if new:
            params = DatapathParams() if k is None else DatapathParams(vector_length=k)
            model = build_model("45nm", params, scope=scope)
        elif k is not None:
            return math.nan
        else:
            model = build_model("45nm")
        frame = iteration_energy(workload, get(spec), model)
        if not new and scope == "pe":  # the old model had no scopes: drop its DRAM rows
            frame = frame[frame["level"] != "dram"]
        return float(frame["energy_pj"].sum())

    def ratios(workload: str, scope: str, fp_k: int | None = None) -> tuple[float, ...]:
        lns = iteration(workload, "lns8", scope)
        return tuple(lns / iteration(workload, base, scope, fp_k) for base in ("fp32", "fp16", "fp8_e4m3"))

    out: dict[str, Any] = {
        "int_add_45": tuple(c45.adder(b) for b in (8, 16, 32)),
        "int_mul_45": tuple(c45.multiplier(b, b) for b in (8, 32)),
        "fp16_45": (c45.fp_add(5, 10), c45.fp_mul(5, 10)),
        "fp32_45": (c45.fp_add(8, 23), c45.fp_mul(8, 23)),
        "sram_45": tuple(sram(model45, size) for size in ("8kb", "32kb", "1mb")),
        "fp32_7": (c7.fp_add(8, 23), c7.fp_mul(8, 23)),
        "sram_7": tuple(sram(model7, size) for size in ("8kb", "32kb", "1mb")),
        "fp32_mac_45": (mac("fp32", 1) if new else mac("fp32"),),
    }
    scalar = 1 if new else None
    int8 = mac("int8", scalar)
    out["fp8_int8_fp16"] = (mac("fp8_e4m3", scalar, accumulator="fp16") / int8,)
    out["fp8_int8_fp32"] = (mac("fp8_e4m3", scalar) / int8,)
    pairs = (("posit(8,0)", "fp8_e4m3"), ("posit(16,1)", "fp16"), ("posit(32,2)", "fp32"))
    out["posit_fp_power"] = tuple(mac(p, scalar) / mac(f, scalar) for p, f in pairs)
    out["posit_fp_area"] = tuple(area(p, 1) / area(f, 1) for p, f in pairs)
    direct = {"lns_datapath": "direct", "accumulator": "int32"}
    out["lns_int8_elma"] = (mac("lns8", scalar, **direct) / int8,)
    out["lns_int8_madam"] = (mac("lns8", 16) / mac("int8", 16),) if new else (mac("lns8") / mac("int8"),)
    out["lns_int8_direct"] = ((mac("lns8", 16, lns_datapath="direct") / mac("int8", 16),) if new
                              else (mac("lns8", lns_datapath="direct") / mac("int8"),))
    out["mxint_mxfp"] = (mac("mxint8", 16 if new else None) / mac("mxfp8_e4m3", 16 if new else None),)
    fp8_cost = area("fp8_e4m3") * 8
    out["mx_area_mem"] = (area("mxfp6_e3m2") * 6.25 / fp8_cost, area("mxfp4") * 4.25 / fp8_cost)
    out["madam_resnet_pe"] = ratios("resnet50", "pe")
    out["madam_bert_pe"] = ratios("bert-base", "pe")
    if new:
        out["madam_resnet_datapath_scalar"] = ratios("resnet50", "datapath", 1)
        out["madam_bert_datapath_scalar"] = ratios("bert-base", "datapath", 1)
    else:
        out["madam_resnet_datapath_scalar"] = out["madam_bert_datapath_scalar"] = (math.nan,) * 3
    out["madam_resnet_system"] = ratios("resnet50", "system")
    return out


# --- the table ------------------------------------------------------------------------------------

def _before(commit: str) -> dict[str, Any] | None:
    """The quantities at `commit`, computed in a subprocess on an unpacked copy (None if unavailable)."""
    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "old.tar"
        try:
            with archive.open("wb") as out:
                subprocess.run(["git", "-C", str(REPO), "archive", commit, "dse", "models", "energy_tables"],
                               stdout=out, check=True, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError):
            return None
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
        here = str(REPO / "benchmarks")
        script = (f"import json, sys; sys.path.insert(0, {folder!r}); sys.path.insert(1, {here!r})\n"
                  "import published; print(json.dumps(published._values()))")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=folder,
                                check=False)
        if result.returncode != 0:
            return None
        return {key: tuple(value) for key, value in json.loads(result.stdout.splitlines()[-1]).items()}


def _cell(values: Any) -> str:
    if values is None:
        return ""
    if isinstance(values, str):
        return values
    parts = ["n/a" if (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}" for v in values]
    return " / ".join(parts)


def table(before: dict[str, Any] | None, now: dict[str, Any], markdown: bool) -> str:
    header = ["quantity", "published", "source", "verified", "dse before", "dse now"]
    rows = [[quantity, _cell(published), source, verified, _cell(before.get(key)) if before else "",
             _cell(now[key])] for key, quantity, published, source, verified in PUBLISHED]
    if not markdown:
        return "\n".join(" | ".join(row) for row in [header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


PER_MAC = [("int8", {}), ("int8", {"accumulator": "int24"}), ("int4", {"accumulator": "int16"}),
           ("fp8_e4m3", {}), ("fp8_e4m3", {"accumulator": "fp16"}), ("fp8_e5m2", {}), ("bf16", {}),
           ("fp16", {}), ("fp32", {}), ("posit8", {}), ("posit8", {"accumulator": "quire"}), ("posit16", {}),
           ("lns8", {}), ("lns8", {"lns_datapath": "direct"}), ("lns8", {"lns_mitchell_bits": 1}),
           ("mxfp8_e4m3", {}), ("mxfp8_e4m3", {"alignment_bits": 16}), ("mxfp4", {}), ("mxint8", {}),
           ("nvfp4", {})]
ITERATION = ["int8", "int4", "fp8_e4m3", "bf16", "fp16", "fp32", "posit8", "posit16", "lns8",
             "mxfp8_e4m3", "mxfp4", "mxint8"]


def model_tables() -> str:
    """Per-MAC energy (K = 1 and 16, 45 and 7 nm, with area) and ResNet-50 iterations per scope."""
    from dse.energy import DatapathParams, build_model, compare_formats, datapath_area_um2, mac_energy
    from dse.formats import get

    lines = ["| format | options | K = 1, 45 nm (pJ) | K = 16, 45 nm (pJ) | K = 16, 7 nm (fJ) "
             "| x INT8, K = 16 | area K = 16, 45 nm (um^2) |", "|---|---|---|---|---|---|---|"]
    m45, m7 = build_model("45nm"), build_model("7nm")
    base = mac_energy(get("int8"), None, m45.components, DatapathParams()).total_pj
    for spec, options in PER_MAC:
        fmt = get(spec)
        one = mac_energy(fmt, None, m45.components, DatapathParams(vector_length=1, **options)).total_pj
        sixteen = mac_energy(fmt, None, m45.components, DatapathParams(**options))
        seven = mac_energy(fmt, None, m7.components, DatapathParams(**options)).total_pj
        assert m45.area is not None
        area = datapath_area_um2(fmt, fmt, m45.area, DatapathParams(**options))
        text = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"
        lines.append(f"| {spec} | {text} | {one:.3f} | {sixteen.total_pj:.3f} | {1e3 * seven:.1f} | "
                     f"{sixteen.total_pj / base:.2f} | {area:.0f} |")
    scopes = [f"{scope} {node} (mJ, vs fp32)" for node in ("45nm", "7nm")
              for scope in ("datapath", "pe", "system")]
    lines += ["", "| format | " + " | ".join(scopes) + " | memory share 7 nm |", "|---|" + "---|" * 7]
    frames = {(node, scope): compare_formats(ITERATION, "resnet50", build_model(node, scope=scope))
              for node in ("45nm", "7nm") for scope in ("datapath", "pe", "system")}
    for index, spec in enumerate(ITERATION):
        cells = []
        for node in ("45nm", "7nm"):
            for scope in ("datapath", "pe", "system"):
                row = frames[(node, scope)].iloc[index]
                cells.append(f"{row['iteration_mj']:.4g} ({row['vs_fp32']:.3f})")
        row = frames[("7nm", "system")].iloc[index]
        cells.append(f"{row['memory_mj'] / row['iteration_mj']:.0%}")
        lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lns_madam_ablation() -> str:
    """LNS-Madam LNS8 / INT8 MAC at K = 16, L = 1024: the earlier accounting, each correction applied in
    turn, then the conversion period. The last correction's value is checked against the model."""
    from dse.energy import DatapathParams, build_model, mac_energy
    from dse.energy.datapaths import lns_constant_adders
    from dse.formats import get

    c = build_model("45nm").components
    k, length, width, scaled, buckets = 16, 1024, 24, 30, 8  # int24 partial sums, 6-bit constants, gamma 8

    def mac(spec: str, **params: Any) -> float:
        return mac_energy(get(spec), None, c, DatapathParams(vector_length=k, **params), length).total_pj

    int8 = mac("int8")
    multiply_route = c.adder(7) + c.gates(2) + c.gates(buckets) + c.gates(width)
    one_hot = c.incrementer(width) + c.gates(width)
    sum_and_output = (buckets - 1) * c.adder(scaled) + c.adder(scaled) + c.register(scaled)
    state = buckets * c.register(width)
    terms = {"register": c.register(width), "one_hot": one_hot, "state": state,
             "constants": buckets * 2 * c.adder(scaled), "tree": 0.0}
    steps = [("earlier accounting: each product increments a 24-b partial-sum register; per K: 16 constant "
              "adders, 8 registers cleared", {}),
             ("products meet in per-remainder adder trees, no register write per product (as INT8's tree)",
              {"register": 0.0}),
             ("a tree adder per product instead of a one-hot increment (as INT8: one adder per product)",
              {"one_hot": 0.0, "tree": c.adder(width)}),
             ("no partial-sum registers to clear: converting every K, the trees feed the constants",
              {"state": 0.0}),
             ("constant multiplies: non-zero CSD digits of the 7 rounded constants (r = 0 is a wire)",
              {"constants": lns_constant_adders(buckets, 6) * c.adder(scaled)})]
    lines = ["| step | LNS8 MAC (pJ) | / INT8 MAC |", "|---|---|---|"]
    for text, change in steps:
        terms.update(change)
        per_product = multiply_route + terms["register"] + terms["one_hot"] + terms["tree"]
        value = per_product + (terms["state"] + terms["constants"] + sum_and_output) / k
        lines.append(f"| {text} | {value:.4f} | {value / int8:.3f} |")
    assert abs(value - mac("lns8")) < 1e-9, "the ablation's last step must be the model"
    for period in (64, 256, 1024):
        value = mac("lns8", lns_conversion_length=period)
        lines.append(f"| convert every {period} products (8 partial-sum registers written once per K) "
                     f"| {value:.4f} | {value / int8:.3f} |")
    direct = mac("lns8", lns_datapath="direct")
    lines.append(f"| LNS8 direct conversion (LUT, shift, one int24 tree) | {direct:.4f} "
                 f"| {direct / int8:.3f} |")
    return "\n".join(lines)


PAPER_RATIOS = (0.09, 0.22, 0.45)  # LNS-Madam: LNS8 / FP32, FP16, FP8 per training iteration


def lns_madam_baselines(workload: str = "resnet50") -> str:
    """Which FP baselines reproduce the paper's ratios: each scope, FP vector length, FP accumulator and
    operand reuse, with the FP16 / FP32 and FP8 / FP32 ratios the paper's figures imply (0.41, 0.20)."""
    from dse.energy import DatapathParams, build_model, iteration_energy
    from dse.energy.iteration import GEMM_UNITS
    from dse.energy.model import MemoryParams
    from dse.formats import get

    def energy(spec: str, scope: str, reuse: float, free_datapath: bool = False, **params: Any) -> float:
        memory = MemoryParams(operand_reuse=reuse)
        model = build_model("45nm", DatapathParams(**params), scope=scope, memory=memory)
        frame = iteration_energy(workload, get(spec), model)
        if free_datapath:  # only what the operands cost around the MAC units
            frame = frame[~frame["unit"].isin(GEMM_UNITS)]
        return float(frame["energy_pj"].sum())

    implied = (PAPER_RATIOS[0] / PAPER_RATIOS[1], PAPER_RATIOS[0] / PAPER_RATIOS[2])
    lines = [f"| scope | operand reuse | FP MACs | LNS8 / FP32, FP16, FP8 (paper {_cell(PAPER_RATIOS)}) "
             f"| FP16 / FP32, FP8 / FP32 (implied {_cell(implied)}) | largest error |", "|" + "---|" * 6]
    for scope in ("datapath", "pe"):
        for reuse in ((16.0,) if scope == "datapath" else (16.0, 256.0)):
            lns = energy("lns8", scope, reuse)
            for k in (16, 1):
                for own in (False, True):
                    bases = []
                    for spec, acc in (("fp32", "fp32"), ("fp16", "fp16"), ("fp8_e4m3", "fp16")):
                        accumulator = acc if own else None
                        bases.append(energy(spec, scope, reuse, vector_length=k, accumulator=accumulator))
                    ratios = tuple(lns / b for b in bases)
                    error = max(abs(r / p - 1) for r, p in zip(ratios, PAPER_RATIOS, strict=True))
                    fp_text = f"K = {k}, " + ("FP16-accumulating FP16 / FP8" if own else "FP32 accumulator")
                    lines.append(f"| {scope} | {reuse:g} | {fp_text} | {_cell(ratios)} "
                                 f"| {_cell((bases[1] / bases[0], bases[2] / bases[0]))} | {error:.0%} |")
    lns = energy("lns8", "pe", 16.0, free_datapath=True)
    bases = [energy(spec, "pe", 16.0) for spec in ("fp32", "fp16", "fp8_e4m3")]
    ratios = tuple(lns / b for b in bases)
    error = max(abs(r / p - 1) for r, p in zip(ratios, PAPER_RATIOS, strict=True))
    lines.append(f"| pe, LNS8 MACs free (its buffers, registers, update only) | 16 "
                 f"| K = 16, FP32 accumulator "
                 f"| {_cell(ratios)} | {_cell((bases[1] / bases[0], bases[2] / bases[0]))} | {error:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git commit of the 'before' column ('' for none)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--model-tables", action="store_true", help="print the per-MAC and ResNet-50 tables")
    parser.add_argument("--lns-madam", action="store_true",
                        help="print the LNS-Madam MAC ablation and the per-iteration baseline comparison")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.model_tables:
        print(model_tables())
        return
    if args.lns_madam:
        print(lns_madam_ablation(), "", lns_madam_baselines(), sep="\n")
        return
    now = _values()
    before = _before(args.before) if args.before else None
    print(table(before, now, args.markdown))


if __name__ == "__main__":
    main()
