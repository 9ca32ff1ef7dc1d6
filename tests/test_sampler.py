"""The sampler contract: determinism, prefix stability, nesting, bucket bounds, rates."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qk_attn.config import SniffConfig
from qk_attn.errors import ConfigError
from qk_attn.sampler import MASK32, Sampler, bit_length, fmix32

strategies = st.sampled_from(["log_uniform", "uniform"])
powers = st.sampled_from([1, 2, 8, 64, 1024])
rates = st.floats(min_value=0.01, max_value=64.0)
example_ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _keep(sampler, example_id, layer, kind, length, start=0):
    positions = torch.arange(start, start + length, dtype=torch.int64)[None]
    return sampler.keep(torch.tensor([example_id]), layer, kind, positions)[0]


def test_fmix32_matches_python_int_reference():
    # Python ints never overflow: this checks the int64 tensor path's split multiply.
    def reference(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & MASK32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & MASK32
        return h ^ (h >> 16)

    values = torch.randint(0, 2**32, (4096,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    got = fmix32(values).tolist()
    assert got == [reference(v) for v in values.tolist()]
    assert all(0 <= v <= MASK32 for v in got)


@settings(max_examples=30, deadline=None)
@given(
    strategy=strategies,
    m=powers,
    rate=rates,
    seed=st.integers(0, 2**32 - 1),
    example=example_ids,
    layer=st.integers(0, 200),
    length=st.integers(1, 3000),
    cut=st.integers(1, 3000),
)
def test_deterministic_and_prefix_stable(strategy, m, rate, seed, example, layer, length, cut):
    sampler = Sampler(strategy, m, rate, seed)
    full = _keep(sampler, example, layer, "k", length)
    assert torch.equal(full, _keep(Sampler(strategy, m, rate, seed), example, layer, "k", length))
    cut = min(cut, length)
    assert torch.equal(full[:cut], _keep(sampler, example, layer, "k", cut))


@settings(max_examples=30, deadline=None)
@given(strategy=strategies, m=powers, low=rates, factor=st.floats(1.0, 16.0), example=example_ids)
def test_nested_across_base_rates(strategy, m, low, factor, example):
    sparse = _keep(Sampler(strategy, m, low, 3), example, 2, "q", 2000)
    dense = _keep(Sampler(strategy, m, low * factor, 3), example, 2, "q", 2000)
    assert not (sparse & ~dense).any()


@settings(max_examples=20, deadline=None)
@given(ids=st.lists(example_ids, min_size=2, max_size=5, unique=True), shuffle_seed=st.integers(0, 100))
def test_independent_of_batch_composition_and_order(ids, shuffle_seed):
    sampler = Sampler("log_uniform", 8, 2.0, 9)
    positions = torch.arange(500)[None].expand(len(ids), -1)
    batch = sampler.keep(torch.tensor(ids), 4, "k", positions)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(shuffle_seed))
    shuffled = sampler.keep(torch.tensor(ids)[order], 4, "k", positions)
    assert torch.equal(batch[order], shuffled)
    for row, example in enumerate(ids):
        assert torch.equal(batch[row], _keep(sampler, example, 4, "k", 500))


def test_queries_keys_layers_and_seeds_are_sampled_independently():
    sampler = Sampler("uniform", 1, 0.5, 0)
    base = _keep(sampler, 1, 0, "q", 4000)
    for other in (
        _keep(sampler, 1, 0, "k", 4000),
        _keep(sampler, 1, 1, "q", 4000),
        _keep(Sampler("uniform", 1, 0.5, 1), 1, 0, "q", 4000),
        _keep(sampler, 2, 0, "q", 4000),
        _keep(sampler, 1 + 2**32, 0, "q", 4000),
    ):  # high half of the id matters too
        agreement = (base == other).float().mean().item()
        assert 0.45 < agreement < 0.55  # independent fair coins agree half the time


def test_log_uniform_bucket_bounds():
    sampler = Sampler("log_uniform", 16, 4.0, 0)
    bounds = sampler.bucket_bounds(200)
    assert [(b, s, e) for b, s, e, _ in bounds] == [(0, 0, 16), (1, 16, 32), (2, 32, 64), (3, 64, 128), (4, 128, 256)]
    assert [p for *_, p in bounds] == [0.25, 0.25, 0.125, 0.0625, 0.03125]
    positions = torch.tensor([0, 15, 16, 31, 32, 63, 64, 127, 128, 2**40])
    assert sampler.bucket_of(positions).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 37]


def test_uniform_and_all_buckets_are_position_div_m():
    positions = torch.tensor([0, 8191, 8192, 100000])
    for strategy in ("uniform", "all"):
        assert Sampler(strategy, 8192, 1.0).bucket_of(positions).tolist() == [0, 0, 1, 12]
    assert Sampler("uniform", 8192, 1.0).thresholds() == (math.ceil(2**24 / 8192),)
    assert _keep(Sampler("all", 4, 1.0), 0, 0, "q", 100).all()


def test_bit_length_matches_python():
    values = torch.tensor([0, 1, 2, 3, 4, 255, 256, 2**31 - 1, 2**31, 2**40 + 5])
    assert bit_length(values).tolist() == [int(v).bit_length() for v in values.tolist()]


@pytest.mark.parametrize("strategy,m,rate", [("log_uniform", 64, 4.0), ("uniform", 256, 8.0), ("uniform", 8192, 1.0)])
def test_empirical_keep_rate_matches_probability(strategy, m, rate):
    sampler = Sampler(strategy, m, rate, seed=1234)
    length, examples = 1 << 14, 64
    positions = torch.arange(length)[None].expand(examples, -1)
    keep = sampler.keep(torch.arange(examples), 5, "k", positions)
    buckets = sampler.bucket_of(torch.arange(length))
    for bucket, start, end, p in sampler.bucket_bounds(length):
        n = examples * (min(end, length) - start)
        observed = keep[:, buckets == bucket].sum().item()
        sd = math.sqrt(n * p * (1 - p))
        assert abs(observed - n * p) <= 6 * sd + 1, (bucket, observed, n * p)


def test_capacity_covers_expected_and_never_exceeds_length():
    sampler = Sampler("log_uniform", 128, 1.0)
    assert sampler.expected_keeps(128) == pytest.approx(1.0)
    assert sampler.capacity(1) == 1
    assert sampler.capacity(1 << 17) < 200
    assert Sampler("all", 128, 1.0).capacity(5000) == 5000


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(strategy="gaussian"), "log_uniform | uniform | all"),
        (dict(min_bucket_size=100), "power of two"),
        (dict(min_bucket_size=0), "power of two"),
        (dict(base_rate=0.0), "> 0"),
    ],
)
def test_bad_parameters_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**kwargs)


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("seed", 2**40, "an integer in [0, 2**32)"),  # was the seed 0's selection: only 32 bits are mixed
        ("seed", -5, "an integer in [0, 2**32)"),  # was the selection of 2**32 - 5
        ("seed", 1.0, "an integer in [0, 2**32)"),
        ("seed", True, "an integer in [0, 2**32)"),
        ("min_bucket_size", True, "a power of two from 1 to 2**62 (1, 2, 4, ..., 8192, ...)"),  # was 1
        ("min_bucket_size", 2**63, "a power of two from 1 to 2**62 (1, 2, 4, ..., 8192, ...)"),
        ("min_bucket_size", 8.0, "a power of two from 1 to 2**62 (1, 2, 4, ..., 8192, ...)"),
        ("base_rate", float("inf"), "a finite number > 0"),
        ("base_rate", float("nan"), "a finite number > 0"),
        ("base_rate", 10**400, "a finite number > 0"),
        ("base_rate", True, "a finite number > 0"),
        ("base_rate", "2", "a finite number > 0 (a number, not a string)"),  # was a bare TypeError from `>`
    ],
)
def test_sampler_refuses_what_sniff_config_refuses(name, value, allowed):
    """The public Sampler skipped SniffConfig's checks: seeds outside 32 bits aliased other seeds, a bool
    bucket size and an infinite rate were taken, a string rate failed inside a comparison. Refused now in
    SniffConfig's one line (a ConfigError, a ValueError), naming the argument; SniffConfig refuses the same
    value (a string rate aside, which its environment variables need)."""
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{name}={value!r} is invalid: expected {allowed}')}$"):
        Sampler(**{name: value})
    if not isinstance(value, str):
        with pytest.raises(ConfigError, match=rf"^{name}=.* is invalid"):
            SniffConfig(**{name: value})


def test_sampler_takes_the_values_sniff_config_takes():
    """The ends of each range, and numpy numbers (normalised to Python ones, so equal samplers hash alike)."""
    for kwargs in [dict(seed=2**32 - 1), dict(min_bucket_size=2**62), dict(base_rate=1e-300), dict(base_rate=3)]:
        config = SniffConfig(**kwargs)
        assert Sampler(**kwargs) == Sampler.from_config(config)
    numpy_made = Sampler("uniform", np.int64(8), np.float32(0.5), np.uint32(7))
    assert numpy_made == Sampler("uniform", 8, 0.5, 7) and type(numpy_made.min_bucket_size) is int
    assert hash(numpy_made) == hash(Sampler("uniform", 8, 0.5, 7))


@settings(max_examples=25, deadline=None)
@given(
    strategy=st.sampled_from(["log_uniform", "uniform", "all"]),
    m=powers,
    rate=rates,
    ids=st.lists(example_ids, min_size=1, max_size=3),
    start=st.integers(0, 1 << 20),
)
def test_keep_all_layers_equals_keep_per_layer_and_kind(strategy, m, rate, ids, start):
    sampler = Sampler(strategy, m, rate, seed=5)
    example = torch.tensor(ids, dtype=torch.int64)
    positions = torch.arange(start, start + 300, dtype=torch.int64).expand(len(ids), 300)
    table = sampler.keep_all_layers(example, 4, positions)
    assert table.shape == (4, 2, len(ids), 300)
    for layer in range(4):
        for index, kind in enumerate(("q", "k")):
            assert torch.equal(table[layer, index], sampler.keep(example, layer, kind, positions))


def test_keep_probability_is_the_rate_the_threshold_keeps_also_below_its_step():
    """Below 2**-24 the 24-bit compare keeps 2**-24, not the rate asked for: capacities, estimates and the
    card use what is kept, so a long document at a tiny rate cannot overflow a capacity sized for less."""
    tiny = Sampler("uniform", min_bucket_size=2**30, base_rate=1.0)
    assert tiny.keep_probability(0) == 2**-24  # asked for 2**-30
    positions = torch.arange(2**26, dtype=torch.int64)[None]
    kept = int(tiny.keep(torch.tensor([7]), 0, "q", positions).sum())
    assert tiny.expected_keeps(2**26) == 4.0 and 0 < kept <= tiny.capacity(2**26)
    coarse = Sampler("uniform", min_bucket_size=8192, base_rate=0.001)  # 1.22e-7 is 2.05 steps: 3 are kept
    assert coarse.keep_probability(0) == 3 / 2**24 and coarse.thresholds() == (3,)
    # A rate whose p underflows to 0.0 kept nothing (threshold 0), where the rule keeps 2**-24 of any p > 0.
    for underflow in (Sampler("uniform", base_rate=5e-324), Sampler("log_uniform", 2**62, base_rate=1e-300)):
        assert min(underflow.thresholds()) == 1 and underflow.keep_probability(0) == 2**-24
        assert 0 < int(underflow.keep(torch.tensor([7]), 0, "q", positions).sum()) <= underflow.capacity(2**26)
