"""The `put` side of a sink (qk_attn.storage.sink): a streamed call's batches into the host pool
without waiting inside an attention call.

What the pool has no room for stays on the device until the sink's `end_forward` (or `commit`,
`flush`), between forwards, where waiting for space is allowed; see qk_attn.storage.transfer for the
pieces and the pool.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import torch

from qk_attn.capture.batch import CaptureBatch
from qk_attn.storage.transfer import Piece, Transfer, batch_nbytes

logger = logging.getLogger(__name__)


class Sender:
    """The `put` side of a sink: pieces into the pool without waiting inside an attention call.

    When the pool is full, the rest of the batch (and every later batch, to keep their order)
    stays on the device, its tensors kept alive, until `drain()` (the sink's `end_forward`,
    `commit`, `flush`), which waits for space. If one forward holds more than the pool on the
    device, `put` waits after all (with a warning naming the setting): device memory must not
    grow without bound because the pool is too small for the plan.
    """

    def __init__(self, transfer: Transfer, emit: Callable[[Piece], None], check: Callable[[], None]) -> None:
        self.transfer = transfer
        self.emit = emit  # hands a piece to the saver thread
        self.check = check  # re-raises the saver's error while waiting
        self.deferred: deque[list] = deque()  # [batch, first staging row not sent yet]
        self.deferred_bytes = 0
        self._warned = False

    def put(self, batch: CaptureBatch) -> None:
        if not self.deferred:
            stopped: list[int] = []
            for piece in self.transfer.send(batch, 0, self.check, wait=False, stopped=stopped):
                self.emit(piece)
            if not stopped:
                return
            self.deferred.append([batch, stopped[0], _produced(batch)])
        else:
            self.deferred.append([batch, 0, _produced(batch)])
        self.deferred_bytes += batch_nbytes(batch)
        pool = self.transfer.pool
        if self.deferred_bytes > pool.nbytes:
            if not self._warned:
                logger.warning(
                    "qk-sniff: one forward captures more than the %d MiB host pool; capture now waits inside "
                    "attention calls. Raise pinned_mb (QK_SNIFF_PINNED_MB) above the bytes of one forward's rows.",
                    pool.nbytes >> 20,
                )
                self._warned = True
            self.drain()

    def drain(self) -> None:
        """Send every deferred batch, waiting for pool space (never call inside an attention call)."""
        while self.deferred:
            batch, start, produced = self.deferred[0]
            for piece in self.transfer.send(batch, start, self.check, wait=True, producer=produced):
                self.emit(piece)
            self.deferred.popleft()
            self.deferred_bytes -= batch_nbytes(batch)

    def clear(self) -> None:
        self.deferred.clear()
        self.deferred_bytes = 0


def _produced(batch: CaptureBatch):
    """An event on the stream that made `batch` (CUDA): a deferred copy waits for it, not for whatever
    stream is current when it is finally sent."""
    if batch.vectors.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(batch.vectors.device))
    return event
