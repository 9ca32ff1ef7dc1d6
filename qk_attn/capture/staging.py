"""A forward's rows, staged on their device until the forward ends, then handed to the sink at once.

    attention call  -> `Staging.add(batch)`, `Staging.calls.append(empty_call)`: rows stay where they were made;
                       on a GPU the kernel writes them straight into views of one byte buffer
    forward's end   -> `Sink.put_forward(staging)`: one piece; ParquetSink copies the used bytes of the
                       buffer to pinned memory in one copy with one event (qk_attn.storage.transfer)

Buffer mode (CUDA, or the kernel under Triton's interpreter): every tensor of a staged batch is a
view of the device's `StagingBuffer`, so one copy moves the whole forward. Elsewhere (the torch
path on the CPU) batches keep their own host tensors and nothing is copied at all.

A forward whose rows could exceed the staging limit (dense capture of a long document) streams
instead: its calls go to `Sink.put` one by one, and only its empty calls and checks are staged.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from qk_attn.capture.batch import CaptureBatch
from qk_attn.errors import CaptureError

ALIGN = 64  # bytes; every view of the buffer starts aligned for any dtype (and for the kernel)


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def call_bytes(capacity: int, heads: int, head_dim: int, itemsize: int, token_ids: bool) -> int:
    """Bytes one staged call takes in the buffer: count, row, position, bucket, vectors, token ids."""
    columns = aligned(8) + aligned(8 * capacity) + 2 * aligned(4 * capacity)
    return columns + aligned(heads * capacity * head_dim * itemsize) + (aligned(4 * capacity) if token_ids else 0)


def forward_bytes(plan, capacity: int, batch_size: int, head_dim: int, itemsize: int, token_ids: bool) -> int:
    """The most bytes one forward stages: every planned (layer, kind) call at `capacity` rows (the
    sampler's bound for the forward's tokens), and its per-row columns."""
    calls = (
        call_bytes(capacity, len(plan.heads(layer, kind)), head_dim, itemsize, token_ids)
        for layer in range(plan.shape.num_layers)
        for kind in ("q", "k")
        if plan.heads(layer, kind)
    )
    return 3 * shared_bytes(batch_size) + sum(calls)


def shared_bytes(batch_size: int) -> int:
    """Bytes of one forward's per-row columns (valid counts, first positions, misnumbered flags)."""
    return 2 * aligned(8 * batch_size) + aligned(batch_size)


class EmptyCall(NamedTuple):
    """An attention call of which the sampler keeps nothing (known on the host): it ran, with 0 rows."""

    layer: int
    kind: str
    heads: tuple[int, ...]
    example_ids: tuple[int, ...]
    sliding_window: int | None
    cross_attention: bool
    tokens: object  # the forward's TextTokens (host tensors)


# EmptyCall((...)) without the Python frame of a NamedTuple's __new__: a decode step makes two per layer.
empty_call = functools.partial(tuple.__new__, EmptyCall)


class OffsetCheck(NamedTuple):
    """A cache offset the host derived instead of reading it (a static cache's `q_offset`), checked by
    the sink once the device value has arrived: rows keyed by a wrong position are refused, not kept."""

    value: torch.Tensor  # the device scalar transformers passed
    expected: int
    example_ids: tuple[int, ...]

    def verify(self) -> None:
        """Raise CaptureError when the device value (read here: on the host after the copy) differs."""
        actual = int(self.value)
        if actual != self.expected:
            raise CaptureError(
                f"qk_sniff: examples {list(self.example_ids)}: the cache was at position {actual}, not "
                f"{self.expected} where their sequence ended (the cache was rolled back or reused outside "
                "the session); their rows are refused; call session.begin(ids) before reusing a cache"
            )


class StagingBuffer:
    """One device byte buffer that the forwards of one device stage into, reused from forward to
    forward once the sink's copy of the previous one has been made (ordered by an event, no host wait)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: torch.Tensor | None = None
        self.ready = None  # CUDA event after which the previous forward's bytes are copied out

    def take(self, nbytes: int) -> torch.Tensor:
        """At a forward's start: a buffer of at least `nbytes`, safe to overwrite on the current stream."""
        if self.bytes is None or self.bytes.numel() < nbytes:
            self.bytes, self.ready = torch.empty(aligned(max(nbytes, 1)), dtype=torch.uint8, device=self.device), None
        elif self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        return self.bytes

    def returned(self, ready) -> None:
        """The sink copied the staged bytes out (`ready`: its event): the next forward reuses the buffer."""
        self.ready = ready

    def forget(self) -> None:
        """The sink keeps the staged tensors themselves: the next forward stages into a new buffer."""
        self.bytes, self.ready = None, None


class Staging:
    """The rows of one forward of one model, in call order, until the forward ends.

    `streams`: the forward's rows could exceed the staging limit, so its calls go to the sink one by
    one; the staging then holds only empty calls and checks."""

    def __init__(
        self, example_ids: tuple[int, ...], device: torch.device, nbytes: int, buffer: StagingBuffer | None, streams
    ) -> None:
        self.example_ids = example_ids
        self.device = device
        self.nbytes = nbytes  # the most its calls can stage
        self.streams = streams
        self.calls: list[CaptureBatch | EmptyCall] = []
        self.batches = 0  # how many of the calls are CaptureBatches (the others kept nothing)
        self.checks: list[OffsetCheck] = []
        # (example_id, layer, start, stop): queries a layer given only their suffix did not get (TextTokens.unseen)
        self.unseen: list[tuple[int, int, int, int]] = []
        self.buffer = buffer if buffer is not None and not streams else None
        self.bytes = self.buffer.take(nbytes) if self.buffer is not None else None
        self.used = 0
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None  # the producing stream
        self._held: dict[int, tuple] = {}  # id(tensor) -> (tensor, its copy in the buffer)
        self._returned = False

    # ---- the attention calls -------------------------------------------------------------
    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit the buffer (buffer mode)."""
        return self.used + nbytes <= self.bytes.numel()

    def empty(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A new tensor for a staged column: a view of the buffer in buffer mode (check `fits` first)."""
        if self.bytes is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        nbytes = math.prod(shape) * dtype.itemsize
        if self.used + nbytes > self.bytes.numel():  # the bound is wrong: never write past the buffer
            raise CaptureError(
                f"qk_sniff: internal: a forward staged more than its bound of {self.bytes.numel()} bytes; "
                "please report this (set pinned_mb lower to stream such forwards meanwhile)"
            )
        view = self.bytes[self.used : self.used + nbytes].view(dtype).view(shape)
        self.used += aligned(nbytes)
        return view

    def hold(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """`tensor` as part of the staged bytes: copied into the buffer once per tensor (buffer mode)."""
        if tensor is None or self.bytes is None:
            return tensor
        held = self._held.get(id(tensor))
        if held is None or held[0] is not tensor:
            copy = self.empty(tensor.dtype, tuple(tensor.shape))
            copy.copy_(tensor, non_blocking=True)
            held = self._held[id(tensor)] = (tensor, copy)
        return held[1]

    def copy_in(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """One call's column as part of the staged bytes: itself when it already is (the kernel wrote
        it there) or when nothing is buffered, else copied in (the torch path on a GPU)."""
        if tensor is None or self.bytes is None or self._inside(tensor):
            return tensor
        copy = self.empty(tensor.dtype, tuple(tensor.shape))
        copy.copy_(tensor, non_blocking=True)
        return copy

    def _inside(self, tensor: torch.Tensor) -> bool:
        start = self.bytes.data_ptr()
        return start <= tensor.data_ptr() < start + self.bytes.numel()

    def add(self, batch: CaptureBatch) -> None:
        self.calls.append(batch)
        self.batches += 1

    def check(self, check: OffsetCheck) -> None:
        """Stage an offset check (at the hand-off, which may run outside the forward's stream context:
        its copy goes on the producing stream, which the copy out waits for)."""
        if self.stream is None:
            self.checks.append(check._replace(value=self.hold(check.value.reshape(1))))
            return
        with torch.cuda.stream(self.stream):
            self.checks.append(check._replace(value=self.hold(check.value.reshape(1))))

    # ---- the sink ---------------------------------------------------------------------------
    def returned(self, ready) -> None:
        """Called by a sink that copied the staged bytes out: the buffer is reused after `ready`."""
        self._returned = True
        if self.buffer is not None:
            self.buffer.returned(ready)

    def handed_off(self) -> None:
        """After `Sink.put_forward`: a sink that kept the tensors keeps the buffer too."""
        if self.buffer is not None and self.bytes is not None and not self._returned:
            self.buffer.forget()
        self._held.clear()
