"""A bounded ring of host memory (pinned on CUDA machines): what is in flight between the capturing
thread and the saver. Regions are aligned (qk_attn.capture.staging.ALIGN) for every dtype view."""

from __future__ import annotations

import math
import queue
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

    `release` (the saver's side) takes no lock: the capturing thread is the main thread, where an
    interrupt (Ctrl-C) landing between a lock's acquisition and its `with` block leaves that lock held
    for good, and a saver waiting for it would hang the session's close. It marks the region free and
    wakes a waiting producer; producers (the only ones to change the ring) reclaim freed space.
    """

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.nbytes = aligned(nbytes)
        self.pinned = pin
        self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        self._producers = threading.Lock()  # threads handing off forwards at once; never the saver
        self._freed: queue.SimpleQueue = queue.SimpleQueue()  # one token per release: wakes a waiting producer
        self._live: deque[list] = deque()  # [start, end, released], in acquisition order
        self.high_water = 0  # the most bytes of the ring held at once
        self.waits = 0  # times a producer had to wait for space
        self.waited_s = 0.0  # and for how long in all: how far the saver held capture back

    @property
    def in_use(self) -> int:
        """Bytes of the regions not released yet."""
        return sum(end - start for start, end, released in list(self._live) if not released)

    def _span(self) -> int:
        """Bytes of the ring from the oldest live region to the newest (what bounds the next `acquire`)."""
        if not self._live:
            return 0
        first, last = self._live[0][0], self._live[-1][1]
        return last - first if last > first else self.nbytes - first + last

    def _find(self, n: int) -> int | None:
        while not self._freed.empty():  # the wake-up tokens of releases so far (only producers take them,
            self._freed.get_nowait()  # under their lock): space is reclaimed below
        while self._live and self._live[0][2]:
            self._live.popleft()
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
        with self._producers:
            start = self._find(n)
            if start is None and not wait:
                return None
            if start is None:
                self.waits += 1
                since = time.perf_counter()
                while start is None:
                    check()  # a dead saver never frees space: surface its error instead of hanging
                    try:
                        self._freed.get(timeout=WAIT_S)
                    except queue.Empty:
                        pass
                    start = self._find(n)
                self.waited_s += time.perf_counter() - since
            region = [start, start + n, False]
            self._live.append(region)
            self.high_water = max(self.high_water, self._span())
            return region

    def release(self, region: list) -> None:
        """Any thread, any number of times: the region is free (reclaimed by the next `acquire`)."""
        if not region[2]:
            region[2] = True
            self._freed.put(None)

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        return self.buffer[offset : offset + nbytes].view(dtype).view(shape)
