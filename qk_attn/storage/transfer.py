"""Device -> host for captured rows: into the bounded host pool (qk_attn.storage.pool), on a side
stream, one event per piece.

A forward's rows (the usual path), at the forward's end, between forwards (`send_forward`):

    take a pool region for the staging's used bytes, waiting for space here
    CUDA: one copy of the staging buffer into it, on the side stream after the producing stream,
          one blocking-sync event; the buffer is reused after that event. CPU: no copy, the staged
          host tensors are the piece and the region only accounts for their bytes
    one ForwardPiece to the saver

A streamed call (a forward too large to stage: qk_attn.capture.staging), per `CaptureBatch`
(qk_attn.storage.sender):

    split the staging capacity into pieces that fit the pool
    for each piece:  take a pool region *without waiting*; when the pool is full, stop: the rest
                     of the batch stays on the device (its tensors are kept alive, and an event on
                     its producing stream orders the later copy) until `end_forward`, which runs
                     between forwards and may wait for space
                     copy the piece into it (as above, or no copy on the CPU) and hand it on (the
                     caller enqueues it before taking the next region, so the saver can always
                     free space: no deadlock)

Saver thread, per piece:  `wait()` on the event -> rows -> copy into buffers -> `release()`.

Nothing here reads a device value on the host: row counts are copied with the rows and read
by the saver after the event. Rows past a count are copied too (the count is not known on the
host when the copy is issued); the sampler's capacity bound limits that waste.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from qk_attn.capture.batch import CaptureBatch, HostRows
from qk_attn.capture.staging import ALIGN, aligned
from qk_attn.storage.pool import HostPool


@dataclass
class Piece:
    """Rows [start, start + len) of one batch's staging buffer, copied into a pool region.

    `host` is a CaptureBatch whose tensors are views of the pool: count (1,), valid (B,),
    row/position/bucket (n,), vectors (H, n, D). They stay valid until `release()`.
    """

    host: CaptureBatch
    start: int
    capacity: int  # the whole batch's staging capacity (for the overflow check)
    first: bool  # the first piece of its batch (the one that accounts valid lengths)
    event: object | None
    region: list
    pool: HostPool

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def rows(self) -> HostRows:
        """This piece's rows up to the batch's count. Small columns are copies; `vectors`
        (H, n, D) is still a view of the pool (copy it before `release()`)."""
        return self.host.host_rows(self.start, self.capacity, with_valid=self.first)

    def release(self) -> None:
        self.pool.release(self.region)

    def __del__(self) -> None:
        if hasattr(self, "pool"):  # (not when its making failed: `send_forward` frees the region then)
            _free(self.region, self.pool, self.event)


def _host_batch(batch: CaptureBatch, views: dict) -> CaptureBatch:
    """`batch` with its tensors replaced by `views` (in the pool, or the host tensors themselves)."""
    return CaptureBatch(
        batch.layer, batch.kind, batch.heads, batch.example_ids, batch.sliding_window, batch.cross_attention, **views
    )


def _free(region: list, pool: HostPool, event) -> None:
    """Free a region whose piece is gone before the saver took it (an interrupt between its making and
    its hand-over): the pool frees its regions in order, so one never freed would stop it for good."""
    if not region[2]:
        if event is not None:
            event.synchronize()  # a copy still landing in the region must not land in its next owner's
        pool.release(region)


def _host_dtype(dtype: torch.dtype) -> torch.dtype:
    # numpy has no bfloat16: anything but float32/float16 is widened to float32 by the copy
    return dtype if dtype in (torch.float32, torch.float16) else torch.float32


class Transfer:
    """Moves device batches into a bounded host pool of `pool_bytes`, piece by piece.

    On CUDA the pool is pinned, copies run on one side stream per device and each piece
    carries an event; elsewhere the same path runs with plain copies and no event.
    """

    def __init__(self, pool_bytes: int) -> None:
        self.pool_bytes = pool_bytes
        self.pool: HostPool | None = None  # allocated at the first batch
        self._streams: dict[int, torch.cuda.Stream] = {}

    def _pool_for(self, device: torch.device) -> HostPool:
        if self.pool is None:
            # Pinned whenever CUDA exists: a model split over cpu and cuda may send its first batch from cpu.
            self.pool = HostPool(self.pool_bytes, pin=device.type == "cuda" or torch.cuda.is_available())
        return self.pool

    def prepare(self, device: torch.device) -> None:
        """Allocate the pool at the first forward's start, not inside an attention call."""
        self._pool_for(device)

    def send_forward(self, staging, check: Callable[[], None]) -> ForwardPiece:
        """A forward's staged rows (qk_attn.capture.staging.Staging) as one piece, waiting for pool space
        (between forwards). Buffer mode on CUDA: one copy of the used bytes into the pinned pool and one
        event; the staging buffer is returned for reuse after that event. Elsewhere, or when no call
        staged anything (a decode step whose calls all kept nothing), no copy: the staged host tensors
        are the piece (the region accounts for their bytes, as in `send`)."""
        pool = self._pool_for(staging.device)
        calls = staging.calls
        region = event = None
        try:
            if staging.bytes is not None and staging.device.type == "cuda" and staging.used:
                region = pool.acquire(staging.used, check)
                host = pool.buffer[region[0] : region[0] + staging.used]
                event = self._copy([(host, staging.bytes[: staging.used])], staging.device, staging.stream)
                staging.returned(event)
                calls, checks = host_views(calls, staging.checks, staging.bytes.data_ptr(), host)
            else:
                if staging.bytes is not None and not staging.used:  # every call kept nothing: no bytes to copy
                    staging.returned(None)
                nbytes = (
                    sum(batch_nbytes(call) for call in calls if isinstance(call, CaptureBatch))
                    if staging.batches
                    else 0
                )
                region = pool.acquire(min(nbytes, pool.nbytes), check)
                checks = staging.checks
                if staging.device.type == "cuda" and checks:
                    # The saver reads the checks' device values: after the producing stream's work, not
                    # on its own stream's terms (a user's stream does not wait for the saver's).
                    event = self._copy([], staging.device, staging.stream)
            return ForwardPiece(staging.example_ids, calls, checks, staging.unseen, event, region, pool)
        except BaseException:  # (an interrupt): a region no piece owns would never be freed
            if region is not None:
                _free(region, pool, event)
            raise

    def pieces(self, batch: CaptureBatch, check: Callable[[], None] = lambda: None) -> Iterator[Piece]:
        """Copy `batch` into the pool in pieces, waiting for space; yields each piece as soon as
        its copy is issued. The consumer must hand each piece on before asking for the next."""
        yield from self.send(batch, 0, check, wait=True)

    def send(
        self,
        batch: CaptureBatch,
        start: int,
        check: Callable[[], None],
        wait: bool,
        stopped: list | None = None,
        producer=None,
    ) -> Iterator[Piece]:
        """Pieces of `batch` from staging row `start` on. With `wait=False` it stops at the first
        piece the pool has no room for and appends that row to `stopped` (the rest is sent later).
        `producer`: the event recorded where the batch was made (a deferred batch), else the current stream."""
        device = batch.vectors.device
        pool = self._pool_for(device)
        heads, cap, dim = batch.vectors.shape
        vec_dtype = _host_dtype(batch.vectors.dtype)
        vec_size = vec_dtype.itemsize
        batch_size = batch.valid.shape[0]
        header = aligned(8) + 2 * aligned(8 * batch_size)
        per_row = 8 + 4 + 4 + 4 + heads * dim * vec_size
        # A quarter of the pool per piece keeps several pieces in flight (copy/write overlap).
        budget = max(pool.nbytes // 4, header + 5 * ALIGN + per_row)
        rows_per_piece = max(1, (budget - header - 5 * ALIGN) // per_row)
        if header + 5 * ALIGN + per_row > pool.nbytes:
            raise ValueError(
                f"QK_SNIFF_PINNED_MB={self.pool_bytes >> 20} is too small for one row of layer {batch.layer} "
                f"({heads} heads x {dim} x {vec_size} bytes); raise QK_SNIFF_PINNED_MB"
            )
        while True:
            n = min(rows_per_piece, cap - start)
            layout = [
                ("count", torch.int64, (1,), batch.count.reshape(1)),
                ("valid", torch.int64, (batch_size,), batch.valid),
                ("row", torch.int64, (n,), batch.row[start : start + n]),
                ("position", batch.position.dtype, (n,), batch.position[start : start + n]),
                ("bucket", batch.bucket.dtype, (n,), batch.bucket[start : start + n]),
                ("vectors", vec_dtype, (heads, n, dim), batch.vectors[:, start : start + n]),
            ]
            if batch.first_position is not None:
                layout.append(("first_position", torch.int64, (batch_size,), batch.first_position))
            if batch.token_id is not None:
                layout.append(("token_id", batch.token_id.dtype, (n,), batch.token_id[start : start + n]))
            if batch.misnumbered is not None:
                layout.append(("misnumbered", torch.bool, (batch_size,), batch.misnumbered))
            sizes = [aligned(math.prod(shape) * dt.itemsize) for _, dt, shape, _ in layout]
            region = pool.acquire(sum(sizes), check, wait=wait)
            if region is None:
                stopped.append(start)
                return
            event = None
            try:
                if device.type == "cuda":
                    offset, views, pairs = region[0], {}, []
                    for (name, dt, shape, src), size in zip(layout, sizes):
                        views[name] = pool.view(offset, dt, shape)
                        pairs.append((views[name], src))
                        offset += size
                    event = self._copy(pairs, device, producer)
                else:
                    # Host tensors are handed over, not copied (a batch is not modified after `put`):
                    # the region only accounts for their bytes, so the pool still bounds what is in
                    # flight and its own memory is never touched.
                    views = {name: src if src.dtype == dt else src.to(dt) for name, dt, _, src in layout}
                piece = Piece(_host_batch(batch, views), start, cap, start == 0, event, region, pool)
            except BaseException:  # (an interrupt): a region no piece owns would never be freed
                _free(region, pool, event)
                raise
            yield piece
            start += n
            if start >= cap:
                return

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, producer=None):
        """Copy on a side stream after everything `producer` (a stream or an event recorded on it; by
        default the current stream) queued so far; returns the copy's event."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        producer = torch.cuda.current_stream(index) if producer is None else producer
        if isinstance(producer, torch.cuda.Event):
            stream.wait_event(producer)
        else:
            stream.wait_stream(producer)
        with torch.cuda.stream(stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            # blocking: the saver thread sleeps in synchronize() instead of spinning a core.
            event = torch.cuda.Event(blocking=True)
            event.record(stream)
        for _, src in pairs:
            # The caching allocator must not hand the staging memory to the compute stream
            # before the side-stream copy has read it.
            src.record_stream(stream)
        return event


def batch_nbytes(batch: CaptureBatch) -> int:
    """The bytes of `batch`'s vectors: what it holds on the device, what the host pool must take."""
    return batch.vectors.numel() * batch.vectors.element_size()


def _rebase(tensor: torch.Tensor, base: int, host: torch.Tensor) -> torch.Tensor:
    """The view of `host` (the pool's copy of a staging buffer at `base`) where `tensor` was in the buffer."""
    offset, nbytes = tensor.data_ptr() - base, tensor.numel() * tensor.element_size()
    if not 0 <= offset <= offset + nbytes <= host.numel():  # a column outside the copied bytes
        raise RuntimeError(f"qk_sniff: internal: a staged tensor lies outside the staging buffer (offset {offset})")
    return host[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)


def host_views(calls: list, checks: list, base: int, host: torch.Tensor) -> tuple[list, list]:
    """The calls (CaptureBatch, or empty calls) and offset checks with their tensors as views of
    `host`, the copy of a staging buffer at `base`. A tensor the calls share (the per-row columns)
    becomes one view they share, so the saver reads it once (HostReader keys on identity)."""
    views: dict[tuple, torch.Tensor] = {}

    def view(tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in views:
            views[key] = _rebase(tensor, base, host)
        return views[key]

    calls = [call.map_tensors(view) if isinstance(call, CaptureBatch) else call for call in calls]
    return calls, [c._replace(value=view(c.value)) for c in checks]


class ForwardPiece:
    """One forward's rows in host memory (`Transfer.send_forward`): its examples, its calls
    (CaptureBatch views of the pool, or an empty call), the offset checks to verify first, the queries
    layers did not get (`Staging.unseen`), and the event of the one copy."""

    def __init__(
        self, example_ids: tuple, calls: list, checks: list, unseen: list, event, region: list, pool: HostPool
    ) -> None:
        self.example_ids, self.calls, self.checks, self.unseen = example_ids, calls, checks, unseen
        self.event, self.region, self.pool = event, region, pool

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def release(self) -> None:
        self.pool.release(self.region)

    def __del__(self) -> None:
        if hasattr(self, "pool"):  # (not when its making failed: `send_forward` frees the region then)
            _free(self.region, self.pool, self.event)
