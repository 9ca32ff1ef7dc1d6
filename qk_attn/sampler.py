"""Which token positions to keep: one integer-only definition (docs/architecture.md, "The sampler").

The keep decision for a token is a pure function of (seed, example_id, layer, kind,
position), shared by all heads of a layer. It uses only 32-bit integer mixing and a
24-bit threshold compare, so the torch reference here, the Triton interpreter and the GPU
kernel agree bit for bit:

    h = fmix32(seed ^ SALT); h = fmix32(h ^ layer); h = fmix32(h ^ KIND_CODE[kind])
    h = fmix32(h ^ lo32(example_id)); h = fmix32(h ^ hi32(example_id))
    r = fmix32(h ^ position) >> 8                  # uniform in [0, 2**24)
    keep  <=>  r < threshold[bucket(position)]     # threshold = ceil(p * 2**24), float64 on the host

Buckets with m = min_bucket_size (a power of two):
    log_uniform: bucket 0 = [0, m), bucket k >= 1 = [m*2**(k-1), m*2**k); p = min(1, base_rate / size)
    uniform:     bucket = position // m;  p = min(1, base_rate / m)
    all:         bucket = position // m;  p = 1
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qk_attn.errors import ConfigError
from qk_attn.setting_values import BUCKET_SIZES

MASK32 = 0xFFFFFFFF
SALT = 0x5F3759DF
KIND_CODE = {"q": 1, "k": 2}
R_BITS = 24
ONE = 1 << R_BITS  # threshold meaning "always keep"
MAX_BUCKETS = 64  # log-uniform buckets cover positions up to min_bucket_size * 2**62
# The largest min_bucket_size: its last log-uniform bucket, min_bucket_size << 62, must stay a finite
# float for its keep probability (qk_attn.config.MAX_MIN_BUCKET_SIZE, the same bound for SniffConfig).
MAX_MIN_BUCKET_SIZE = 1 << (MAX_BUCKETS - 2)
SEED_LIMIT = 1 << 32  # the seed is mixed in as 32 bits: a larger or negative one would alias another


def _mul32(h, c: int):
    """(h * c) mod 2**32 without overflowing int64: split h into 16-bit halves."""
    lo = (h & 0xFFFF) * c
    hi = ((h >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def fmix32(h):
    """murmur3's 32-bit finaliser; works on Python ints and int64 tensors alike."""
    h = h & MASK32
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def layer_kind_hash(seed: int, layer: int, kind: str) -> int:
    """The host-side part of the chain: everything before the example id."""
    h = fmix32(seed ^ SALT)
    h = fmix32(h ^ layer)
    return fmix32(h ^ KIND_CODE[kind])


def row_hash(layer_kind: int, example_ids):
    """Mix the int64 example ids (tensor or int) into the layer/kind hash: both 32-bit halves."""
    h = fmix32(layer_kind ^ (example_ids & MASK32))
    return fmix32(h ^ ((example_ids >> 32) & MASK32))


def uniform24(row_hashes, positions):
    """24-bit uniform draw per (row, position); `row_hashes` broadcasts against `positions`."""
    return fmix32(row_hashes ^ positions) >> (32 - R_BITS)


def threshold(p: float) -> int:
    """Keep iff r < threshold: computed once on the host in float64. At least 1: a rate > 0 whose p
    underflows to 0.0 (base_rate=5e-324) still keeps 2**-24 of each bucket, as for any tiny p."""
    return min(ONE, max(1, math.ceil(p * ONE)))


@dataclass(frozen=True)
class Sampler:
    """A sampler strategy with its parameters; see the module docstring for the definition."""

    strategy: str = "log_uniform"
    min_bucket_size: int = 128
    base_rate: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        # The ranges SniffConfig allows, with its messages (ConfigError, a ValueError). qk_attn.config
        # sits beside this module in the same layer, so its checks cannot be imported here.
        if self.strategy not in ("log_uniform", "uniform", "all"):
            raise ConfigError(f"sampler strategy {self.strategy!r} is invalid: expected log_uniform | uniform | all")
        m = _integer("min_bucket_size", self.min_bucket_size, BUCKET_SIZES)
        if m < 1 or m & (m - 1) or m > MAX_MIN_BUCKET_SIZE:
            raise _invalid("min_bucket_size", self.min_bucket_size, BUCKET_SIZES)
        rate = self.base_rate
        try:
            if isinstance(rate, bool) or not isinstance(rate, numbers.Real):  # True would pass as 1.0
                raise TypeError
            rate = float(rate)  # OverflowError: an int beyond a float (10**400)
        except (TypeError, OverflowError):
            raise _invalid("base_rate", self.base_rate, "a finite number > 0") from None
        if not (math.isfinite(rate) and rate > 0):
            raise _invalid("base_rate", self.base_rate, "a finite number > 0")
        seed = _integer("seed", self.seed, "an integer in [0, 2**32)")
        if not 0 <= seed < SEED_LIMIT:
            raise _invalid("seed", self.seed, "an integer in [0, 2**32)")
        object.__setattr__(self, "min_bucket_size", m)  # numpy integers become ints (frozen dataclass)
        object.__setattr__(self, "base_rate", rate)
        object.__setattr__(self, "seed", seed)

    @classmethod
    def from_config(cls, config) -> Sampler:
        return cls(config.sampler, config.min_bucket_size, config.base_rate, config.seed)

    @property
    def shift(self) -> int:
        return self.min_bucket_size.bit_length() - 1

    # ---- bucket geometry -------------------------------------------------------------
    def bucket_start(self, bucket: int) -> int:
        m = self.min_bucket_size
        if self.strategy != "log_uniform":
            return bucket * m
        return 0 if bucket == 0 else m << (bucket - 1)

    def bucket_size(self, bucket: int) -> int:
        m = self.min_bucket_size
        if self.strategy != "log_uniform" or bucket == 0:
            return m
        return m << (bucket - 1)

    def keep_probability(self, bucket: int) -> float:
        """What the keep rule keeps of `bucket`: min(1, base_rate / size), rounded up to the threshold's
        step of 2**-24; 2**-24 where that is less (buckets of more than 2**24 * base_rate positions:
        size / (2**24 * base_rate) times the rate asked for). Capacities, estimates and the card use it."""
        if self.strategy == "all":
            return 1.0
        return threshold(min(1.0, self.base_rate / self.bucket_size(bucket))) / ONE

    def thresholds(self) -> tuple[int, ...]:
        """Per-bucket thresholds for log_uniform (MAX_BUCKETS entries), one entry otherwise."""
        return _thresholds(self)

    def bucket_bounds(self, length: int) -> list[tuple[int, int, int, float]]:
        """(bucket, start, end, keep probability) for every bucket that meets [0, length)."""
        rows, bucket = [], 0
        while self.bucket_start(bucket) < length:
            start = self.bucket_start(bucket)
            rows.append((bucket, start, start + self.bucket_size(bucket), self.keep_probability(bucket)))
            bucket += 1
        return rows

    def expected_keeps(self, length: int) -> float:
        """Expected kept tokens among positions [0, length): the densest window of that length."""
        return sum(p * (min(end, length) - start) for _, start, end, p in self.bucket_bounds(length))

    def capacity(self, length: int) -> int:
        """Rows to reserve for one sequence of `length` new tokens; overflow beyond it is flagged.

        Keep probability never increases with position, so a window starting at 0 is the
        densest; mean + 8 standard deviations + 16 makes overflow practically impossible.
        """
        if self.strategy == "all":
            return length
        mean = self.expected_keeps(length)
        return min(length, math.ceil(mean + 8 * math.sqrt(mean) + 16))

    # ---- torch reference -------------------------------------------------------------
    def bucket_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Bucket id per position (int64 tensor or numpy array in, the same out), integer ops only."""
        q = positions >> self.shift
        if self.strategy != "log_uniform":
            return q
        return bit_length(q)

    def keep(self, example_ids: torch.Tensor, layer: int, kind: str, positions: torch.Tensor) -> torch.Tensor:
        """Bool keep mask of `positions`' shape (B, T); `example_ids` is (B,) int64."""
        positions = positions.to(torch.int64)
        if self.strategy == "all":
            return torch.ones_like(positions, dtype=torch.bool)
        rows = row_hash(layer_kind_hash(self.seed, layer, kind), example_ids.to(torch.int64))
        r = uniform24(rows.reshape(-1, *([1] * (positions.dim() - 1))), positions)
        if self.strategy == "uniform":
            return r < self.thresholds()[0]
        table = _threshold_table(self.thresholds(), positions.device)
        return r < table[self.bucket_of(positions).clamp_(max=MAX_BUCKETS - 1)]

    def keep_all_layers(self, example_ids: torch.Tensor, num_layers: int, positions: torch.Tensor) -> torch.Tensor:
        """`keep` for every (layer, kind) at once: (num_layers, 2, B, T) bool, kinds ordered q, k, for
        host tensors.

        The same integer chain as `keep`, vectorised over layers and kinds, so one forward pays
        for it once instead of once per attention call (what dominates a CPU decode step); run in
        numpy, whose per-op cost is a fraction of torch's on a decode step's few tokens."""
        positions = positions.numpy(force=True).astype(np.int64)
        shape = (num_layers, 2, *positions.shape)
        if self.strategy == "all":
            return torch.ones(shape, dtype=torch.bool)
        rows = _row_hashes(self.seed, num_layers, tuple(example_ids.tolist()))  # (L*2, B)
        r = uniform24(rows[:, :, None], positions[None])  # (L*2, B, T)
        if self.strategy == "uniform":
            keep = r < self.thresholds()[0]
        else:
            table = np.array(self.thresholds(), dtype=np.int64)
            keep = r < table[np.minimum(self.bucket_of(positions), MAX_BUCKETS - 1)][None]
        return torch.from_numpy(keep.reshape(shape))

    def selected_positions(self, example_id: int, layer: int, kind: str, length: int) -> np.ndarray:
        """Positions in [0, length) that this sampler keeps for one example (for `verify`)."""
        positions = torch.arange(length, dtype=torch.int64)
        mask = self.keep(torch.tensor([example_id], dtype=torch.int64), layer, kind, positions[None])[0]
        return positions[mask].numpy()


def _invalid(name: str, value: Any, allowed: str) -> ConfigError:
    """SniffConfig's one-line message for a bad value of the keyword `name` (which also takes text, from
    QK_SNIFF_* variables; a Sampler takes numbers only)."""
    if isinstance(value, str):
        allowed += " (a number, not a string)"
    return ConfigError(f"{name}={value!r} is invalid: expected {allowed}", setting=name, value=value, allowed=allowed)


def _integer(name: str, value: Any, allowed: str) -> int:
    """`value` as an int: an int or numpy integer, never a bool, a float or a string (not truncated or parsed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _invalid(name, value, allowed)
    return int(value)


# Once per sampler / model shape, not once per forward (a CPU decode step is short).
@functools.lru_cache(maxsize=64)
def _thresholds(sampler: Sampler) -> tuple[int, ...]:
    n = MAX_BUCKETS if sampler.strategy == "log_uniform" else 1
    return tuple(threshold(sampler.keep_probability(b)) for b in range(n))


@functools.lru_cache(maxsize=256)
def _row_hashes(seed: int, num_layers: int, example_ids: tuple[int, ...]) -> np.ndarray:
    """(num_layers * 2, B) int64 `row_hash` of every (layer, kind) (kinds ordered q, k) and example:
    the same for every forward of a sequence, so a decode step only mixes in its positions."""
    layer_kinds = [layer_kind_hash(seed, layer, kind) for layer in range(num_layers) for kind in ("q", "k")]
    return row_hash(np.array(layer_kinds, dtype=np.int64)[:, None], np.array(example_ids, dtype=np.int64)[None, :])


_THRESHOLD_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _threshold_table(thresholds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The per-bucket thresholds on `device`, copied once (not once per attention call). To a GPU
    from pinned memory without a host sync (it happens inside an attention call); the pinned source
    stays referenced, so the copy never reads freed memory."""
    key = (thresholds, str(device))
    if key not in _THRESHOLD_TABLES:
        host = torch.tensor(thresholds, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        _THRESHOLD_TABLES[key] = (host, host.to(device, non_blocking=True))
    return _THRESHOLD_TABLES[key][1]


def bit_length(q):
    """Number of significant bits of non-negative int64 values (0 -> 0), by binary search; an int64
    torch tensor or numpy array in, the same out."""
    where = torch.where if isinstance(q, torch.Tensor) else np.where
    bits = q * 0
    for shift in (32, 16, 8, 4, 2, 1):
        big = (q >> shift) > 0
        q = where(big, q >> shift, q)
        bits = bits + big * shift
    return bits + (q > 0)
