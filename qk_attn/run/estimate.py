"""How many rows and bytes a capture will write, before it runs.

    rows(document)  = sum over recorded (layer, kind) of  heads(layer, kind) * E[kept positions in [0, length)]
    bytes(document) = rows(document) * (head_dim * vector bytes + INDEX_BYTES)

`E[kept positions]` is `Sampler.expected_keeps` (exact: every bucket's keep probability times
its overlap with the document), so for `all` it is the length itself. Bytes are the
uncompressed size of the columns (what Arrow holds in memory); on disk, compression and
per-shard overhead roughly cancel (the demo: 23.0 MB estimated, 23.2 MB of shards).
Cross-attention keys (vision tokens, recorded once per sequence) are not counted.

Staging: a forward's rows wait on their device until the forward ends and go to the sink at once
(qk_attn.capture.staging). A forward whose bound (`forward_bytes`: every planned call at the
sampler's capacity for its tokens) exceeds the sink's staging limit, half of the pinned pool
(`inference.pinned_mb`), streams call by call instead; `staging_fit` says before the run which
document lengths do, and `format_staging` prints it with the estimate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qk_attn.capture.plan import HeadPlan
from qk_attn.capture.staging import forward_bytes
from qk_attn.sampler import Sampler

# example_id int64 + position int32 + bucket int32 + layer int16 + head int16 + sliding_window int32
# + kind (one character, dictionary encoded on disk) + token_id int32
INDEX_BYTES = 8 + 4 + 4 + 2 + 2 + 4 + 1 + 4
VECTOR_BYTES = {"float32": 4, "float16": 2}
MIB = 2**20


def row_bytes(head_dim: int, vector_dtype: str = "float32") -> int:
    """Uncompressed bytes of one row: the vector plus the index columns."""
    return head_dim * VECTOR_BYTES[vector_dtype] + INDEX_BYTES


def heads_per_layer(plan: HeadPlan) -> int:
    """Recorded (layer, head, kind) triples: query heads plus key heads over every planned layer."""
    return sum(len(plan.heads(layer, kind)) for layer in plan.query_heads for kind in ("q", "k"))


def document_rows(plan: HeadPlan, sampler: Sampler, length: int) -> float:
    """Expected rows one document of `length` valid tokens adds (all recorded heads, q and k)."""
    if length <= 0:
        return 0.0
    return heads_per_layer(plan) * sampler.expected_keeps(length)


@dataclass(frozen=True)
class Estimate:
    """Expected output of a run: per document and in total (rows are expectations, bytes uncompressed)."""

    documents: int
    rows: float  # total
    bytes: float  # total, uncompressed
    min_rows: float
    max_rows: float
    row_bytes: int

    @property
    def rows_per_document(self) -> float:
        return self.rows / self.documents if self.documents else 0.0

    @property
    def bytes_per_document(self) -> float:
        return self.bytes / self.documents if self.documents else 0.0

    @property
    def gb(self) -> float:
        return self.bytes / 1e9


def estimate(plan: HeadPlan, sampler: Sampler, lengths: Iterable[int], vector_dtype: str = "float32") -> Estimate:
    """The expected rows and bytes of capturing documents of these valid lengths (tokens)."""
    per_row = row_bytes(plan.shape.head_dim, vector_dtype)
    rows = [document_rows(plan, sampler, int(n)) for n in lengths]
    total = sum(rows)
    return Estimate(
        documents=len(rows),
        rows=total,
        bytes=total * per_row,
        min_rows=min(rows, default=0.0),
        max_rows=max(rows, default=0.0),
        row_bytes=per_row,
    )


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold and `capture.max_gb` is read)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_estimate(est) -> list[str]:
    """The estimate as printed before a run."""
    if not est.documents:
        return ["qk-sniff: estimate: nothing to capture (every document is committed already, or this shard owns none)"]
    spread = (
        f"{est.rows_per_document:,.0f}"
        if round(est.min_rows) == round(est.max_rows)
        else f"{est.min_rows:,.0f} to {est.max_rows:,.0f} (mean {est.rows_per_document:,.0f})"
    )
    return [
        f"qk-sniff: estimate: {est.documents:,} document(s) x {spread} rows = {est.rows:,.0f} rows, "
        f"{format_bytes(est.bytes)} uncompressed ({est.row_bytes} bytes per row; "
        f"{format_bytes(est.bytes_per_document)} per document)"
    ]


def refusal(est, limit: float, how: str) -> str:
    return (
        f"capture.max_gb: this run would write about {format_bytes(est.bytes)} ({est.rows:,.0f} rows of "
        f"{est.row_bytes} bytes, uncompressed, {est.documents:,} document(s)), more than the limit of "
        f"{format_bytes(limit)} ({how}); record less with capture.layers, capture.heads or "
        "capture.head_sampling, a sparser capture.sampler (uniform with a larger min_bucket_size, or a smaller "
        "base_rate), capture.vector_dtype: float16, tokenizer.max_length or dataset.max_samples, or raise "
        "capture.max_gb"
    )


# ---- staging: does one forward's rows fit the pinned pool? ----------------------------------------
def staging_bound(
    plan: HeadPlan, sampler: Sampler, length: int, batch_size: int, head_dim: int, vector_dtype: str = "float32"
) -> int:
    """The most bytes one forward of `batch_size` documents padded to `length` tokens stages: what the
    recorder sizes its staging by (`qk_attn.capture.staging.forward_bytes`, token ids included)."""
    capacity = batch_size * sampler.capacity(length)
    return forward_bytes(plan, capacity, batch_size, head_dim, VECTOR_BYTES[vector_dtype], True)


@dataclass(frozen=True)
class StagingFit:
    """The longest forward's staging bound against the staging limit (half of pinned_mb), and the
    longest document length whose forward is still staged whole."""

    longest: int  # tokens of the longest document
    batch_size: int
    bound: int  # bytes the longest forward stages at most
    limit: int  # bytes: half of the pinned pool
    pinned_mb: int
    threshold: int  # forwards of documents up to this many tokens are staged whole (== longest when all are)

    @property
    def fits(self) -> bool:
        return self.bound <= self.limit

    @property
    def needed_mb(self) -> int:
        """The smallest pinned_mb whose half holds the longest forward's bound."""
        return -(-self.bound // (MIB // 2))


def staging_limit(pinned_mb: int) -> int:
    """Bytes of one forward staged whole: half of the pinned pool (ParquetSink.staging_limit)."""
    return (pinned_mb << 20) // 2


def staging_fit(
    plan: HeadPlan,
    sampler: Sampler,
    longest: int,
    batch_size: int,
    head_dim: int,
    vector_dtype: str,
    pinned_mb: int,
) -> StagingFit:
    """Whether a forward of `batch_size` documents of up to `longest` tokens is staged whole under
    `pinned_mb`, and if not, the longest document length that is (the bound grows with the length)."""
    limit = staging_limit(pinned_mb)
    bound = staging_bound(plan, sampler, longest, batch_size, head_dim, vector_dtype)
    threshold = longest
    if bound > limit:  # the largest length whose bound is within the limit (0: none is)
        lo, hi = 0, longest
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if staging_bound(plan, sampler, mid, batch_size, head_dim, vector_dtype) <= limit:
                lo = mid
            else:
                hi = mid
        threshold = lo
    return StagingFit(longest, batch_size, bound, limit, pinned_mb, threshold)


def _mib(n: float) -> str:
    return f"{n / MIB:,.{1 if n >= 10 * MIB else 2}f} MiB"


def format_staging(fit: StagingFit) -> str:
    """The line printed with the estimate: whether every forward is staged whole."""
    limit = f"the staging limit of {_mib(fit.limit)} (half of inference.pinned_mb={fit.pinned_mb:,})"
    batch = f"{fit.batch_size} document(s)" if fit.batch_size > 1 else "one document"
    if fit.fits:
        return (
            f"qk-sniff: estimate: every forward is staged whole: at most {_mib(fit.bound)} of rows per forward "
            f"({batch} of up to {fit.longest:,} tokens), within {limit}"
        )
    which = f"forwards with a document longer than {fit.threshold:,} tokens" if fit.threshold else "every forward"
    return (
        f"qk-sniff: estimate: {which} exceed{'s' if not fit.threshold else ''} {limit}: up to "
        f"{_mib(fit.bound)} of rows ({batch} of {fit.longest:,} tokens); they stream call by call and may "
        f"wait for the saver inside the forward; raise inference.pinned_mb to at least {fit.needed_mb:,} (MiB) to "
        "stage them whole"
    )
