"""A capture session: configuration, example ids, the head plan and the sink, for a lifetime.

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
import threading
from typing import Any, Iterator

import torch

from .capture import TokenContext, cross_key_context, is_cross_attention
from .config import SniffConfig
from .gather import select_rows
from .rope import RopeInverter
from .rows import CaptureBatch, MemorySink
from .sampler import Sampler
from .selection import HeadPlan, ModelShape

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class Session:
    """Holds what must persist across attention calls; `capture` runs inside each call."""

    def __init__(self, config: SniffConfig, sink=None, example_ids=None, overwrite: bool = False, source=None):
        self.config = config
        self.sampler = Sampler.from_config(config)
        if sink is None:
            sink = MemorySink() if config.output is None else _parquet_sink(config, overwrite, source)
        self.sink = sink
        self.plan: HeadPlan | None = None
        self._pending_ids = None if example_ids is None else [int(i) for i in example_ids]
        self._ids: list[int] = []
        self._ids_on_device: dict[torch.device, torch.Tensor] = {}
        self._device_heads: dict[tuple, torch.Tensor] = {}
        self._next_auto_id = 0
        self._begun: list[int] = []
        self._last_layer: int | None = None
        self._text_context: TokenContext | None = None
        self._cross_done: set[int] = set()
        self._rope: RopeInverter | None = None
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------
    def begin(self, example_ids) -> None:
        """Ids for the batch rows of the next sequence (the next forward without past keys)."""
        self._pending_ids = [int(i) for i in example_ids]

    def commit(self) -> None:
        """Every example begun so far is complete: the sink makes it durable."""
        self.sink.commit(list(self._begun))
        self._begun.clear()

    def abort(self) -> None:
        """Forget the examples begun since the last commit: they will not be committed."""
        self._begun.clear()

    def committed_ids(self) -> set[int]:
        return set(self.sink.committed_ids()) if hasattr(self.sink, "committed_ids") else set(self.sink.committed)

    @property
    def rows_written(self) -> int:
        return getattr(self.sink, "rows_written", 0)

    def flush(self) -> None:
        """Write what the sink holds for committed examples now, and surface any saver error."""
        if hasattr(self.sink, "flush"):
            self.sink.flush()
        self.check()

    def check(self) -> None:
        """Re-raise an error from the sink's background work, if any."""
        if hasattr(self.sink, "check"):
            self.sink.check()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.commit()
        finally:
            self.sink.close()

    def table(self):
        """All rows captured so far (in-memory sessions, i.e. without `output`)."""
        return self.sink.table()

    # ---- inside the attention call ---------------------------------------------------
    def capture(self, module, query: torch.Tensor, key: torch.Tensor, mask, kwargs: dict) -> None:
        self.check()
        layer = module.layer_idx
        cross = is_cross_attention(module)
        self._track_sequence(layer, query, key, cross)
        plan = self._plan(module, query, key)
        sliding_window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        skip = layer in plan.excluded_layers or (self.config.full_attention_only and sliding_window is not None)
        if skip and (cross or self._text_context is not None):
            return
        if cross:
            # Text queries of a cross-attention layer have no positions of their own: they are
            # the tokens of this forward's self-attention calls.
            contexts = {"q": self._text_context, "k": None if layer in self._cross_done else cross_key_context(key, mask)}
            self._cross_done.add(layer)
        else:
            context = self._text_context = TokenContext.build(query, key, mask, kwargs.get("position_ids"))
            if skip:
                return
            contexts = {"q": context, "k": context}
        for kind, states in (("q", query.detach()), ("k", key.detach())):
            heads = plan.heads(layer, kind)
            context = contexts[kind]
            if heads and context is not None:
                self.sink.put(self._batch(module, layer, kind, states, heads, context, sliding_window, cross))

    def _batch(self, module, layer, kind, states, heads, context, sliding_window, cross) -> CaptureBatch:
        device = states.device
        batch_size, num_tokens = context.positions.shape
        capacity = batch_size * self.sampler.capacity(num_tokens)
        pre_rope = self.config.rope == "pre" and not cross
        out_dtype = torch.float32 if pre_rope else _DTYPES[self.config.vector_dtype]
        count, row, position, bucket, vectors = select_rows(
            states,
            context.offset if kind == "k" else 0,  # queries are only the new tokens
            self._heads_on(heads, device),
            context.positions,
            context.valid,
            self._example_ids_on(device),
            self.sampler,
            layer,
            kind,
            capacity,
            out_dtype,
        )
        if pre_rope:
            vectors = self._rope_inverter(module, device).invert(module, layer, kind, vectors, position)
            vectors = vectors.to(_DTYPES[self.config.vector_dtype])
        return CaptureBatch(
            layer=layer,
            kind=kind,
            heads=tuple(heads),
            example_ids=tuple(self._ids),
            sliding_window=sliding_window,
            cross_attention=cross,
            count=count,
            row=row,
            position=position,
            bucket=bucket,
            vectors=vectors,
            valid=context.valid.sum(1),
        )

    # ---- bookkeeping (host only) -----------------------------------------------------
    def _track_sequence(self, layer: int, query, key, cross: bool) -> None:
        """A call at a layer index not above the previous one starts a forward. It starts a
        new sequence (new example ids) unless it is a decode step: one new token, past keys."""
        new_forward = self._last_layer is None or layer <= self._last_layer
        self._last_layer = layer
        if not new_forward or cross:
            return
        self._text_context = None
        num_new, num_keys = query.shape[2], key.shape[2]
        if self._ids and num_new == 1 and num_keys > 1:
            return  # decode step: same sequences
        batch = query.shape[0]
        if self._pending_ids is not None:
            ids, self._pending_ids = self._pending_ids, None
            if len(ids) != batch:
                raise ValueError(f"example_ids has {len(ids)} ids but the forward has batch size {batch}")
        else:
            ids = list(range(self._next_auto_id, self._next_auto_id + batch))
        self._next_auto_id = max(self._next_auto_id, max(ids) + 1)
        self._ids = ids
        self._ids_on_device.clear()
        self._cross_done.clear()
        self._begun.extend(i for i in ids if i not in self._begun)

    def _example_ids_on(self, device: torch.device) -> torch.Tensor:
        """The current example ids on `device`, copied once per sequence and device."""
        ids = self._ids_on_device.get(device)
        if ids is None:
            host = torch.tensor(self._ids, dtype=torch.int64)
            if device.type == "cuda":
                host = host.pin_memory()
            ids = self._ids_on_device[device] = host.to(device, non_blocking=True)
        return ids

    def _heads_on(self, heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Head ids as a device tensor, copied once per (heads, device)."""
        key = (heads, device)
        if key not in self._device_heads:
            self._device_heads[key] = torch.tensor(heads, dtype=torch.int64).to(device)
        return self._device_heads[key]

    def _plan(self, module, query, key) -> HeadPlan:
        if self.plan is None:
            self.plan = HeadPlan.build(self.config, ModelShape.from_module(module, query, key))
            if hasattr(self.sink, "bind_model"):
                self.sink.bind_model(module.config, self.plan)
        return self.plan

    def _rope_inverter(self, module, device) -> RopeInverter:
        if self._rope is None:
            self._rope = RopeInverter(module, device)
        return self._rope


def _parquet_sink(config: SniffConfig, overwrite: bool, source):
    from .saver import ParquetSink

    return ParquetSink(config.output, config, overwrite=overwrite, source=source)


# ---- the active session --------------------------------------------------------------
_local = threading.local()
_env_config: SniffConfig = SniffConfig.from_env()
_default_session: Session | None = None


def _stack() -> list[Session]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def current_config() -> SniffConfig:
    stack = _stack()
    return stack[-1].config if stack else _env_config


def current_session() -> Session | None:
    """The innermost `session()`, else the env-configured default (None when capture is off)."""
    global _default_session
    stack = _stack()
    if stack:
        return stack[-1]
    if _env_config.output is None:
        return None
    if _default_session is None:
        _default_session = Session(_env_config)
        atexit.register(_default_session.close)
    return _default_session


@contextlib.contextmanager
def session(*, example_ids=None, overwrite: bool = False, source: dict | None = None, sink=None, **settings: Any) -> Iterator[Session]:
    """Capture inside this block. `settings` are SniffConfig fields; they override QK_SNIFF_*."""
    config = SniffConfig.from_env(**settings)
    active = Session(config, sink=sink, example_ids=example_ids, overwrite=overwrite, source=source)
    _stack().append(active)
    try:
        yield active
    except BaseException:
        # Examples in flight when the block fails (Ctrl-C mid-forward) are incomplete:
        # never commit them, so that a re-run redoes them.
        active.abort()
        raise
    finally:
        _stack().pop()
        active.close()


def flush() -> None:
    """Commit what the environment-configured default session holds."""
    if _default_session is not None:
        _default_session.commit()
        _default_session.flush()


def reload_env() -> SniffConfig:
    """Re-read QK_SNIFF_* (closing a running default session first)."""
    global _env_config, _default_session
    if _default_session is not None:
        _default_session.close()
        _default_session = None
    _env_config = SniffConfig.from_env()
    return _env_config
