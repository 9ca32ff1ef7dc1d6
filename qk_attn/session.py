"""`qk_attn.session()`: a capture for the lifetime of a block, and the default session that the
QK_SNIFF_* environment variables configure.

    with qk_attn.session(output="out", sampler="uniform") as s:
        s.begin([17, 18])          # ids of the next forward's batch rows (optional)
        model(**batch)             # rows go to the sink during the forward
        s.commit()                 # examples begun so far are complete

Without a `session()` the environment configures a default session (`QK_SNIFF_OUTPUT`),
which commits at `qk_attn.flush()` and at interpreter exit.
"""

from __future__ import annotations

import contextlib
import reprlib
from collections.abc import Iterator
from typing import Any

from qk_attn.arguments import check_flag, check_source, check_vocabulary
from qk_attn.capture import active
from qk_attn.capture.active import reload_env
from qk_attn.capture.recorder import Session
from qk_attn.capture.sinks import Sink
from qk_attn.config import SniffConfig
from qk_attn.errors import ConfigError, StorageError
from qk_attn.storage.sink import ParquetSink

__all__ = ["Session", "flush", "reload_env", "session"]


def _recorder(
    config: SniffConfig, sink=None, example_ids=None, overwrite: bool = False, source=None, vocabulary=None
) -> Session:
    """A recorder writing to `sink`, else to `config.output` (Parquet), else to memory."""
    if sink is None and config.output is not None:
        try:
            sink = ParquetSink(config.output, config, overwrite=overwrite, source=source, vocabulary=vocabulary)
        except OSError as error:  # a file where the folder goes, no such parent, no permission
            raise StorageError(
                f"{config.setting_name('output')}={config.output!r}: cannot write a capture there "
                f"({error.strerror or error}); choose a folder you can write to"
            ) from error
    return Session(config, sink=sink, example_ids=example_ids)


active.make_default = _recorder

# What a sink that does not subclass Sink must have (qk_attn.capture.sinks.as_sink uses only these).
SINK_METHODS = ("put", "commit", "close")


def _check_sink(sink) -> None:
    """`sink=`: None, a Sink, or an object with the methods as_sink calls; refused here, not at the
    session's first commit (an AttributeError, then another at close)."""
    if sink is None or isinstance(sink, Sink):
        return
    missing = [name for name in SINK_METHODS if not callable(getattr(sink, name, None))]
    if missing:
        allowed = (
            "None, a qk_attn.capture.sinks.Sink, or an object with put(batch), commit(example_ids) and close() methods"
        )
        raise ConfigError(
            f"sink={reprlib.repr(sink)} is invalid: expected {allowed} (it has no {', '.join(missing)})",
            setting="sink",
            value=sink,
            allowed=allowed,
        )


@contextlib.contextmanager
def session(
    *,
    example_ids=None,
    overwrite: bool = False,
    source: dict | None = None,
    sink=None,
    vocabulary=None,
    **settings: Any,
) -> Iterator[Session]:
    """Capture inside this block. `settings` are SniffConfig fields; they override QK_SNIFF_*.

    `source` is recorded in the manifest and card (e.g. {"tokenizer": name, "tokenizer_revision":
    rev}, which `load(..., tokens=True)` uses); `vocabulary` (token strings by id, e.g.
    `tokenizer.convert_ids_to_tokens(range(len(tokenizer)))`) adds a `token_str` column.
    Every argument is checked before anything is done (in memory too): `overwrite` is a bool."""
    overwrite = check_flag("overwrite", overwrite)
    source, vocabulary = check_source(source), check_vocabulary(vocabulary)
    _check_sink(sink)
    config = SniffConfig.from_env(**settings)
    recorder = _recorder(config, sink, example_ids, overwrite, source, vocabulary)
    active.opened(recorder)
    try:
        yield recorder
    except BaseException:
        # Examples in flight when the block fails (Ctrl-C mid-forward) are incomplete:
        # never commit them, so that a re-run redoes them.
        if not active.inherited(recorder):
            recorder.abort()
        raise
    finally:
        active.closed(recorder)
        # A process forked inside the block leaves it with a copy of the session: its saver, lock and
        # files are the parent's, which goes on writing them, so the copy is dropped, never closed.
        if not active.inherited(recorder):
            recorder.close()


def flush() -> None:
    """Commit what the environment-configured default session holds."""
    default = active.default_session()
    if default is not None:
        default.commit()
        default.flush()
