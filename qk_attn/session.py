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

import atexit
import contextlib
import functools
import inspect
import os
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qk_attn.arguments import check_flag, check_source, check_vocabulary
from qk_attn.capture import active
from qk_attn.capture.active import reload_env
from qk_attn.capture.recorder import Session
from qk_attn.capture.sinks import Sink
from qk_attn.config import ENV_PREFIX, SniffConfig, command_line_process
from qk_attn.errors import ConfigError, NotACapture, StorageError
from qk_attn.storage.folder import check_is_capture
from qk_attn.storage.layout import Files
from qk_attn.storage.manifest import read_manifest
from qk_attn.storage.settings import setting_differences
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


def _other_settings(path: Path, config: SniffConfig) -> str | None:
    """Why the capture in `path` cannot be resumed by the environment's settings (the first forward would
    refuse it, in every forward): the QK_SNIFF_* variables that differ, named so."""
    try:
        manifest = read_manifest(path)
    except Exception:  # noqa: BLE001 - a damaged folder is the first forward's to refuse, with how to repair it
        return None
    differences = setting_differences(manifest, config, None) if manifest and manifest["examples"] else []
    if not differences:
        return None
    diffs = "; ".join(f"{_variable(d.setting, config)}: {d.there!r} there, {d.now!r} now" for d in differences)
    return (
        f"it holds a capture with other settings ({diffs}): set the same values to resume it, or choose another folder"
    )


def _variable(setting: str, config: SniffConfig) -> str:
    """A setting of the environment's session as its variable; one left unset says so (its default is compared)."""
    if setting not in SniffConfig.field_names():
        return setting
    name = ENV_PREFIX + setting.upper()
    return name if config.setting_name(setting) == name else f"{name} (unset)"


def _check_env_output(config: SniffConfig) -> None:
    """QK_SNIFF_OUTPUT, refused at import as every QK_SNIFF_* value is (not at the first forward): a file, a
    folder that holds something other than a capture or a capture of other settings, or a place this process
    cannot write. Nothing written. Also at `reload_env()`."""
    output = config.output
    if output is None or command_line_process():
        return
    path = Path(output).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    why = None
    if not existing.is_dir():
        why = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"this process cannot write in {existing}"
    if why is None and path.is_dir():
        try:
            check_is_capture(path, Files())
        except NotACapture as error:
            why = str(error).split(": refusing", 1)[0]
        else:
            why = _other_settings(path, config)
    if why is not None:
        raise ConfigError(
            f"QK_SNIFF_OUTPUT={output!r} is invalid: {why}; expected a new or capture folder you can write to",
            setting="output",
            value=output,
            allowed="a new or capture folder you can write to",
        )


active.check_env_output = _check_env_output
_check_env_output(active.env_config())

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


def _refuse_unused(config: SniffConfig, sink, output, **folder_arguments) -> None:
    """Arguments that would have no effect, refused rather than ignored: `output=` with a `sink=` that does not
    write it (the rows go to the sink), and the arguments of the folder the session opens (`overwrite`,
    `source`, `vocabulary`) when it opens none."""
    if sink is not None and output is not None and not _writes(sink, output):
        raise ConfigError(
            f"sink= and output={output!r} are both given: a session's rows go to one place; pass one of them",
            setting="sink",
            value=sink,
            allowed="None when output= is given",
        )
    if sink is None and config.output is not None:
        return
    given = [name for name, value in folder_arguments.items() if value not in (None, False)]
    if given:
        where = "has a sink of its own" if sink is not None else "keeps its rows in memory (no output)"
        raise ConfigError(
            f"{', '.join(name + '=' for name in given)} only {'applies' if len(given) == 1 else 'apply'} to a session "
            "that writes a folder (output=...); "
            f"this one {where}: leave them out, or pass output=",
            setting=given[0],
            value=folder_arguments[given[0]],
            allowed="its default when the session writes no folder",
        )


def _writes(sink, output) -> bool:
    """Whether `sink` writes the folder `output` (a ParquetSink made for it, as `qk-sniff run` makes per rank)."""
    written = getattr(sink, "output", None)
    return written is not None and Path(written).resolve() == Path(output).expanduser().resolve()


SESSION_KEYWORDS = ("example_ids", "overwrite", "source", "sink", "vocabulary")  # session()'s own, not settings


@contextlib.contextmanager
def _session(
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
    overwrite, source, vocabulary = _checked(overwrite, source, sink, vocabulary, settings)
    config = SniffConfig.from_env(**settings)
    _refuse_unused(config, sink, settings.get("output"), overwrite=overwrite, source=source, vocabulary=vocabulary)
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


def _checked(overwrite, source, sink, vocabulary, settings: dict) -> tuple:
    """session()'s arguments, checked: when it is called, and again when it opens (where the environment is read)."""
    SniffConfig.refuse_unknown(settings, also=SESSION_KEYWORDS)  # (a misspelt `example_ids` too)
    overwrite = check_flag("overwrite", overwrite)
    source, vocabulary = check_source(source), check_vocabulary(vocabulary)
    _check_sink(sink)
    return overwrite, source, vocabulary


def _check_call(*, example_ids=None, overwrite=False, source=None, sink=None, vocabulary=None, **settings) -> None:
    _checked(overwrite, source, sink, vocabulary, settings)
    # The keywords' values. The environment is read when it opens, and so is whether flash attention records
    # (a decorated function's wrap_flash_attention() may come later).
    SniffConfig(**settings)


class _EnteredOnce(contextlib.ContextDecorator):
    """A `session()` block, entered once (contextlib's own error on a second entry is an AttributeError
    about 'args', which does not say that a session is single-use); as a decorator, a new session per call."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        self._args, self._kwargs, self._block, self._recorder = args, kwargs, None, None

    def _recreate_cm(self) -> _EnteredOnce:
        return _EnteredOnce(self._args, self._kwargs)

    def __enter__(self) -> Session:
        if self._block is not None:
            raise RuntimeError(
                "qk_attn: this session() block was entered already; a session is used once: call "
                "qk_attn.session(...) again for a new one"
            )
        self._block = _session(*self._args, **self._kwargs)
        self._recorder = self._block.__enter__()
        # A block entered by hand (a notebook's `s = session(...).__enter__()`) stays open while the process
        # runs, and closes at its exit like the default session: its generator, left to the garbage
        # collector, closed it at once when this object was dropped, or failed at interpreter teardown.
        atexit.register(self._exit_at_interpreter_exit)
        return self._recorder

    def __exit__(self, *exc_info) -> bool | None:
        atexit.unregister(self._exit_at_interpreter_exit)
        return self._block.__exit__(*exc_info)

    def _exit_at_interpreter_exit(self) -> None:
        try:
            if not self._recorder.closed and not active.inherited(self._recorder):
                active.settle_at_exit(self._recorder)
        finally:  # (closed by hand too: its generator ends here, not in the interpreter's teardown)
            self._block.__exit__(None, None, None)


@functools.wraps(_session)
def session(*args, **kwargs) -> _EnteredOnce:
    if args:
        raise TypeError(f"qk_attn.session() takes keyword arguments only; got {len(args)} positional")
    _check_call(**kwargs)  # a bad argument fails here, not only where the block is entered
    return _EnteredOnce(args, kwargs)


# What help() and inspect show: _session's parameters, and what session() returns.
session.__signature__ = inspect.signature(_session).replace(return_annotation="_EnteredOnce")


def flush() -> None:
    """Commit what the environment-configured default session holds."""
    default = active.default_session()
    if default is not None:
        default.commit()
        default.flush()
