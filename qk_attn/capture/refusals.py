"""Examples refused after their forward: checks that a device's forward leaves to the sink (positions
that do not count up by one, a static cache's offset the host derived, a call with more rows than
its staging holds) fail only when the sink reads them on the host, after the forward has returned.

The CPU refuses such a forward inside it. Here the sink refuses its examples as late as it learns
of them, and only them: none of their rows is kept, neither those already held nor those of later
forwards, and they are never committed. The capturing thread hears of it once, at its first call
that names them (a later forward of theirs, or `commit`), else at `flush`, `close` or `table`;
every other example, before and after, is recorded as usual.
"""

from __future__ import annotations

import threading

from qk_attn.errors import CaptureError, CaptureOverflow

REFUSALS = (CaptureError, CaptureOverflow)  # what refuses a forward: raised inside it, or by its deferred checks


class LateRefusals:
    """The examples a sink refused after their forward, and the errors not yet reported. Written by
    whoever reads the checks (the saver thread, or `MemorySink` when it reads), read by the caller."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ids: frozenset[int] = frozenset()
        self._unreported: list[tuple[frozenset[int], BaseException]] = []

    def refuse(self, example_ids, error: BaseException) -> None:
        ids = frozenset(int(i) for i in example_ids)
        with self._lock:
            if ids <= self.ids:  # the same forward's other calls, or a later forward of theirs
                return
            self.ids = self.ids | ids
            self._unreported.append((ids, error))

    def raise_for(self, example_ids=None) -> None:
        """Raise, once, the refusals of any of `example_ids` (None: of any example) not reported yet."""
        if not self._unreported:  # the common case, without the lock
            return
        wanted = None if example_ids is None else {int(i) for i in example_ids}
        with self._lock:
            due = [entry for entry in self._unreported if wanted is None or entry[0] & wanted]
            self._unreported = [entry for entry in self._unreported if entry not in due]
        if due:
            ids = sorted(set().union(*(entry[0] for entry in due)))
            error = due[0][1]
            raise type(error)(
                f"{error} (found after the forward of examples {ids} had returned: none of their rows is kept, "
                "they are not committed, and the session goes on)"
            ) from error
