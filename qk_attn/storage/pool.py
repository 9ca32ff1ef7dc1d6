"""A bounded ring of host memory (pinned on CUDA machines): what is in flight between the capturing
thread and the saver. Regions are aligned (qk_attn.capture.staging.ALIGN) for every dtype view."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from qk_attn.capture.staging import aligned

WAIT_S = 0.05  # how often a blocked producer re-checks for a saver error


class HostPool:
    """`nbytes` of host memory (pinned when `pin`), handed out as regions of a ring.

    Regions are normally released in the order they were acquired (one saver thread,
    FIFO queue); out-of-order release is tolerated, the space returns when every older
    region is released. `acquire` blocks while there is no room: that is the back-pressure.
    """

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.nbytes = aligned(nbytes)
        self.pinned = pin
        self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        self._cond = threading.Condition()
        self._live: deque[list] = deque()  # [start, end, released], in acquisition order
        self.in_use = 0
        self.high_water = 0
        self.waits = 0  # times a producer had to wait for space
        self.waited_s = 0.0  # and for how long in all: how far the saver held capture back

    def _find(self, n: int) -> int | None:
        if not self._live:
            return 0
        first, last = self._live[0][0], self._live[-1]
        wrapped = last[0] < first  # the newest region sits below the oldest one
        if wrapped:
            return last[1] if last[1] + n <= first else None
        if last[1] + n <= self.nbytes:
            return last[1]
        return 0 if n <= first else None

    def acquire(self, nbytes: int, check: Callable[[], None] = lambda: None, wait: bool = True) -> list | None:
        """A region [start, end) of at least `nbytes`; waits for space, calling `check` while
        waiting (`wait=False`: None instead of waiting)."""
        n = aligned(max(nbytes, 1))
        if n > self.nbytes:
            raise ValueError(f"a {n}-byte piece cannot fit a {self.nbytes}-byte host pool")
        with self._cond:
            start = self._find(n)
            if start is None and not wait:
                return None
            if start is None:
                self.waits += 1
                since = time.perf_counter()
                while start is None:
                    check()  # a dead saver never frees space: surface its error instead of hanging
                    self._cond.wait(WAIT_S)
                    start = self._find(n)
                self.waited_s += time.perf_counter() - since
            region = [start, start + n, False]
            self._live.append(region)
            self.in_use += n
            self.high_water = max(self.high_water, self.in_use)
            return region

    def release(self, region: list) -> None:
        with self._cond:
            if region[2]:
                return
            region[2] = True
            self.in_use -= region[1] - region[0]
            while self._live and self._live[0][2]:
                self._live.popleft()
            self._cond.notify_all()

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        return self.buffer[offset : offset + nbytes].view(dtype).view(shape)
