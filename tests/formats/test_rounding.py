"""stochastic(k): stochastic rounding with k random bits, in every family and wherever a rounding is accepted.

The rule (dse.formats.base.stochastic_up_): the discarded fraction f is rounded to k bits, ties to
even, d = round(f * 2^k), and the value rounds away from zero when d + r >= 2^k, r the top k bits of
one 32-bit generator draw per element. It is gfloat's RoundMode.Stochastic with srnumbits = k and
srbits = r (tests/formats/test_p3109.py checks P3109 formats against gfloat the same way).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from gfloat import RoundMode, round_ndarray
from gfloat.formats import format_info_ocp_e4m3, format_info_ocp_e5m2
from hypothesis import given, settings
from hypothesis import strategies as st

from dse.errors import InputError
from dse.formats import ZOO, Scaling, get, shift_round
from dse.formats.base import check_rounding, random_bits, round_to_integer


def top_bits(shape: tuple[int, ...], k: int, seed: int) -> torch.Tensor:
    return random_bits(shape, torch.device("cpu"), torch.Generator().manual_seed(seed)).long() >> (31 - k)


@pytest.mark.parametrize("k", [1, 2, 7, 16, 23])
@pytest.mark.parametrize(
    ("spec", "info"), [("fp8_e4m3", format_info_ocp_e4m3), ("fp8_e5m2", format_info_ocp_e5m2)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp_stochastic_k_matches_gfloat_srnumbits(
    k: int, spec: str, info: object, dtype: torch.dtype
) -> None:
    fmt = get(f"{spec}(overflow=saturate)")
    values = fmt.values()
    ties = (values[1:] + values[:-1]) / 2
    generator = torch.Generator().manual_seed(k)
    x = torch.cat(
        [
            values,
            ties,
            torch.randn(20000, generator=generator, dtype=torch.float64)
            * 2.0 ** torch.randint(-12, 9, (20000,), generator=generator),
        ]
    ).to(dtype)
    wanted = round_ndarray(
        info,
        x.double().numpy(),
        RoundMode.Stochastic,
        sat=True,
        srbits=top_bits(tuple(x.shape), k, 3).numpy(),
        srnumbits=k,
    )
    actual = fmt.quantize(x, f"stochastic({k})", torch.Generator().manual_seed(3)).double().numpy()
    same = (actual == wanted) | (np.isnan(actual) & np.isnan(wanted))
    assert same.all(), f"{int((~same).sum())} differ at {x.double().numpy()[~same][:4]}"


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 23), t=st.floats(-1e6, 1e6, allow_nan=False), seed=st.integers(0, 2**31 - 1))
def test_round_to_integer_follows_the_k_bit_rule(k: int, t: float, seed: int) -> None:
    """Exact rational model: d = round-half-even(f * 2^k), up when d + r >= 2^k."""
    from fractions import Fraction

    value = torch.tensor([t], dtype=torch.float64)
    r = int(top_bits((1,), k, seed)[0])
    magnitude = Fraction(abs(t))
    floor = math.floor(magnitude)
    d = round((magnitude - floor) * 2**k)  # Python's round is half to even on a Fraction
    wanted = math.copysign(floor + (d + r >= 2**k), t)
    got = round_to_integer(value, f"stochastic({k})", torch.Generator().manual_seed(seed))
    assert float(got) == wanted


@pytest.mark.parametrize("spec", [*ZOO, "p3109(8,4,signed=0)", "block(posit8,size=16,scale=e4m3)"])
def test_stochastic_k_is_reproducible_per_generator_on_every_family(spec: str) -> None:
    fmt = get(spec)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (x * min(fmt.max / 8, 4.0)).abs() if "signed=0" in spec else x * min(fmt.max / 8, 4.0)

    def draw(rounding: str, seed: int) -> torch.Tensor:
        return fmt.quantize(x, rounding, torch.Generator().manual_seed(seed))

    assert torch.equal(draw("stochastic(8)", 1), draw("stochastic(8)", 1))
    assert not torch.equal(draw("stochastic(8)", 1), draw("stochastic(8)", 2))
    down, q = fmt.quantize(x, "toward_zero"), draw("stochastic(4)", 1)
    assert torch.all(q.abs() >= down.abs()) and torch.all((q == down) | (torch.sign(q) == torch.sign(x)))


@pytest.mark.parametrize("spec", ["fp8_e4m3", "posit(8,0)", "lns8", "int8(scale=none)", "p3109(8,3)"])
@pytest.mark.parametrize("k", [2, 8])
def test_stochastic_k_is_unbiased_to_its_k_bit_probability(spec: str, k: int) -> None:
    """Between neighbours a < b the mean is a + (b - a) * round(f * 2^k) / 2^k (log domain for LNS)."""
    fmt = dataclasses.replace(get(spec), scaling=Scaling())
    values = fmt.values()
    positive = values[values > 0]
    a, b = float(positive[positive.numel() // 2]), float(positive[positive.numel() // 2 + 1])
    lns = fmt.family == "lns"
    f = 0.3 + 2.0**-10  # not a multiple of 2^-k: the k-bit rounding of the probability shows
    x = 2.0 ** (math.log2(a) + f * (math.log2(b) - math.log2(a))) if lns else a + f * (b - a)
    n = 60000
    q = fmt.quantize(
        torch.full((n,), x, dtype=torch.float64), f"stochastic({k})", torch.Generator().manual_seed(k)
    )
    assert torch.all((q == a) | (q == b))
    probability = (
        round(f * 2**k) / 2**k if not fmt.family == "posit" else round(((x - a) / (b - a)) * 2**k) / 2**k
    )
    up = float((q == b).double().mean())
    assert abs(up - probability) <= 5 * math.sqrt(max(probability * (1 - probability), 1e-4) / n)


def test_shift_round_stochastic_k_follows_the_same_rule() -> None:
    generator = torch.Generator().manual_seed(4)
    magnitude = torch.randint(0, 2**40, (5000,), generator=generator)
    shift = torch.randint(0, 30, (5000,), generator=generator)
    for k in (1, 5, 23):
        got = shift_round(magnitude, shift, f"stochastic({k})", torch.Generator().manual_seed(8))
        r = top_bits((5000,), k, 8)
        kept, field = magnitude >> shift, magnitude & ((1 << shift) - 1)
        exact = field.double() * 2.0 ** (k - shift).double()  # exact: field < 2^30
        d = torch.round(exact).long()
        assert torch.equal(got, kept + (d + r >= 2**k).long())


@pytest.mark.parametrize(
    "text", ["stochastic(0)", "stochastic(24)", "stochastic(-1)", "stochastic()", "stochastic(8"]
)
def test_k_outside_1_to_23_is_a_one_line_error(text: str) -> None:
    with pytest.raises(InputError) as error:
        check_rounding(text)
    assert text in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputError):
        get("fp8_e4m3").quantize(torch.ones(3), text)


def test_plain_stochastic_is_unchanged_and_k_forms_are_canonical() -> None:
    assert check_rounding(" Stochastic( 8 ) ") == "stochastic(8)"
    # f = 0.3: plain stochastic rounds up 30 % of the time, stochastic(1) rounds f to 1 bit (0.5).
    fmt, n = get("int8(scale=none)"), 20000
    x = torch.full((n,), 2.3, dtype=torch.float64)
    plain = fmt.quantize(x, "stochastic", torch.Generator().manual_seed(2))
    one_bit = fmt.quantize(x, "stochastic(1)", torch.Generator().manual_seed(2))
    assert abs(float((plain == 3).double().mean()) - 0.3) < 5 * math.sqrt(0.21 / n)
    assert abs(float((one_bit == 3).double().mean()) - 0.5) < 5 * math.sqrt(0.25 / n)


def test_training_accepts_stochastic_k_everywhere_a_rounding_goes() -> None:
    from dse.train.config import TrainConfig
    from dse.train.loop import check_field
    from dse.train.optim import LNSMadam
    from dse.train.policy import QuantPolicy, TensorQuant

    assert check_field("rounding", "stochastic(8)") == "stochastic(8)"
    assert check_field("update_rounding", "STOCHASTIC(4)") == "stochastic(4)"
    with pytest.raises(InputError, match="must be in 1..23, got 30"):
        check_field("rounding", "stochastic(30)")
    policy = QuantPolicy.from_config(
        TrainConfig(format="nvfp4", rounding="stochastic(8)", update_rounding="stochastic(8)")
    )
    assert policy.weights.rounding == "stochastic(8)"
    q = TensorQuant(get("nvfp4"), "stochastic(8)")(torch.randn(4, 32), torch.Generator().manual_seed(0))
    assert torch.isfinite(q).all()

    def lns_madam_step(seed: int) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 64))
        optimizer = LNSMadam(
            [weight],
            lr=2.0**-5,
            lns_storage={weight: get("lns(8,gamma=8)")},
            update_rounding="stochastic(6)",
            generator=torch.Generator().manual_seed(seed),
        )
        weight.grad = torch.linspace(-1, 1, 64)
        optimizer.step()
        return weight.detach().clone()

    assert torch.equal(lns_madam_step(0), lns_madam_step(0))
    assert not torch.equal(lns_madam_step(0), torch.linspace(0.5, 1.5, 64))
