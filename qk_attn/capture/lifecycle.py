"""A session's life seen from its caller (`SessionLifecycle`, a base of `qk_attn.capture.recorder.Session`):
`begin`, `flush`, `close` and `table`, each between forwards. What runs inside an attention call is the
recorder's; the forwards and sequences these settle are `qk_attn.capture.forwards` and
`qk_attn.capture.sequences`."""

from __future__ import annotations

import logging
import sys

from qk_attn.capture import active
from qk_attn.capture.sinks import Sink

logger = logging.getLogger(__name__)


class SessionLifecycle:
    """Uses what `Session` sets: `sink`, `config`, `_closed`, `_models`, `_warned`, `_discarded`, `_forwards`,
    `_ended`, and the forward and sequence trackers' methods."""

    def begin(self, example_ids) -> None:
        if self._closed:  # its ids would name no forward: nothing records into a closed session
            raise RuntimeError(f"qk_attn: begin({list(example_ids)}) on a closed session; open a new session()")
        try:
            super().begin(example_ids)
        except ValueError:  # ids a forward took that stopped part-way: free once it is settled, as for a retry
            if not self._settle_stopped_forwards():
                raise
            super().begin(example_ids)

    def flush(self) -> None:
        """Write what the sink holds for committed examples now, and surface any saver error."""
        if self._closed:  # closing made every commit durable
            return
        self._end_forwards("flush")
        self.sink.flush()
        self.check()

    def check(self) -> None:
        """Re-raise an error from the sink's background work, if any."""
        self.sink.check()

    @property
    def closed(self) -> bool:
        """Whether close() ran: a forward that would record into it is refused (`active.refuse_closed`)."""
        return self._closed

    def close(self) -> None:
        """Commit what was begun since the last commit, then close the sink. Examples a generate() that
        still runs (in any thread, this one included: closed from a callback) was extending are
        discarded with a warning, never committed part-way; its next forward is refused."""
        if self._closed:
            return
        self._closed = True
        handing_off = None
        try:
            try:
                self._end_forwards("close")  # refused while a forward runs, named as what the caller called
            except RuntimeError:
                raise
            except BaseException as error:  # noqa: BLE001 - a hand-off failed: that forward was discarded
                handing_off = error  # and the others are complete: committed, then it is raised
            self._warn_if_nothing_recorded()  # (once every forward is settled: discarded ones are known)
            running = active.running_generations(self)
            if running:
                threads = ", ".join(sorted({repr(thread.name) for thread, _ in running}))
                self.drop_open_sequences(
                    f"the session closed while generate() ran in thread {threads}", generations=running
                )
            self.commit()
        except RuntimeError:  # refused: another thread is inside a forward, which the closing sink ends
            self.discard_running("was running in thread {thread} when the session closed")
            raise
        finally:
            self.sink.close()
        # Every forward is retired: what they hold (their decoder stack, its cache) goes with the session's close,
        # not with the session object (which a caller keeps to read table()).
        self._forwards.clear()
        self._ended.clear()
        if handing_off is not None:
            raise handing_off

    def expect_nothing(self) -> None:
        """Its caller ran no forward on purpose (a rank whose documents are all committed, or that owns
        none): closing it empty is then no sign of a model whose attention bypassed qk_sniff."""
        self._warned.add("nothing expected")

    def _warn_if_nothing_recorded(self) -> None:
        """An empty dataset would look like a capture (a training-only session was told why already)."""
        told = {"training", "nothing expected"} & self._warned
        if self._models or told or sys.exc_info()[0] is not None:
            return
        logger.warning(
            "qk-attn: the session ends having recorded nothing: "
            + (
                f"its {self._discarded} forward(s) that reached qk_sniff were discarded (refused, or stopped "
                "part-way: see the errors and warnings above)"
                if self._discarded
                else "no attention call reached qk_sniff; if a model ran forwards in it that did not raise "
                "before their attention, check its config._attn_implementation (set_attn_implementation keeps "
                "the old one, with transformers' warning, on models that cannot switch, e.g. Bloom), and that it is no "
                "jit-traced or exported copy (which runs no Python, so nothing of it can be recorded)"
            )
        )

    def table(self):
        """All rows captured so far (in-memory sessions, i.e. without `output`; None before any)."""
        if type(self.sink).table is Sink.table:  # a sink that keeps no rows: None would read as "no rows"
            where = f"writes {self.config.output}" if self.config.output else "has a sink that keeps no rows"
            raise ValueError(
                f"qk_attn: table() reads the rows of an in-memory session (no output); this session {where}: "
                "read it with qk_attn.load(output, layer=..., head=..., kind=...) once the session is closed"
            )
        self._end_forwards("table")  # the last forward's rows are handed off at its end
        return self.sink.table()
