"""The recorder: what persists across a capture's forwards (example ids, head plans, sequences, the
sink) and what runs inside each attention call (`Session.capture`).

Sequence identity, forward start and end, and the commit protocol: docs/architecture.md.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch

from qk_attn.capture.attention import is_cross_attention, key_validity, refuse_unsupported
from qk_attn.capture.batch import CaptureBatch, MemorySink
from qk_attn.capture.facts import require as require_facts
from qk_attn.capture.forward import (ForwardContext, TextTokens, check_shapes, decoder_stack, host_int,
                                     model_forward, refuse_unrecordable_generation, running)
from qk_attn.errors import CaptureError
from qk_attn.capture.gather import Selection, gather_selected, select_rows, select_tokens, uses_kernel
from qk_attn.capture.hooks import watch_forward
from qk_attn.capture.plan import HeadPlan, ModelShape
from qk_attn.capture.rope import invert_rope, uses_rope
from qk_attn.config import SniffConfig
from qk_attn.errors import ConfigError
from qk_attn.sampler import Sampler

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class Session:
    """Holds what must persist across forwards; `capture` runs inside each attention call.

    Sequence identity is explicit (DESIGN §3): `begin(ids)` names the batch rows of the next
    forward; a later forward over the same cache (chunked prefill, decoding) continues them;
    a forward over an empty cache without `begin` gets fresh ids (after the largest committed
    id). Each model in the session has its own head plan and current sequence.
    """

    def __init__(self, config: SniffConfig, sink=None, example_ids=None):
        self.config = config
        self.sampler = Sampler.from_config(config)
        self.sink = MemorySink() if sink is None else sink
        self._pending_ids = None if example_ids is None else [int(i) for i in example_ids]
        self._models: dict[int, _Model] = {}  # id(model config) -> head plan, current sequence
        self._forwards: dict[int, object] = {}  # id(model config) -> its current forward (or _STARTED)
        self._sequences: dict[tuple, _Sequence] = {}  # (id(model config), id(cache)) -> its sequence
        self._device_tables: dict[tuple, torch.Tensor] = {}
        committed = self.committed_ids()
        self._next_auto_id = max(committed) + 1 if committed else 0
        self._begun: list[int] = []
        self._warned: set[str] = set()
        self._closed = False

    @property
    def plan(self) -> HeadPlan | None:
        """The head plan of the first model this session recorded."""
        return next(iter(self._models.values())).plan if self._models else None

    # ---- lifecycle -------------------------------------------------------------------
    def begin(self, example_ids) -> None:
        """Ids for the batch rows of the next forward; later forwards over its cache continue them."""
        self._pending_ids = [int(i) for i in example_ids]

    def commit(self) -> None:
        """Every example begun so far is complete: the sink makes it durable."""
        self._end_forwards()
        self.sink.commit(list(self._begun))
        self._begun.clear()

    def abort(self) -> None:
        """Forget the examples begun since the last commit: they will not be committed."""
        self._begun.clear()

    def committed_ids(self) -> set[int]:
        if hasattr(self.sink, "committed_ids"):
            return set(self.sink.committed_ids())
        return set(getattr(self.sink, "committed", ()))  # a MemorySink; custom sinks may keep none

    @property
    def rows_written(self) -> int:
        return getattr(self.sink, "rows_written", 0)

    def flush(self) -> None:
        """Write what the sink holds for committed examples now, and surface any saver error."""
        self._end_forwards()
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

    # ---- a forward's start and end, and its mask: once per forward and mask kind ------
    def on_mask(self, config, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask) -> None:
        require_facts()  # what the capture reads of transformers' internals holds (checked once)
        entry = self._forwards.get(id(config))
        forward = entry if isinstance(entry, ForwardContext) and entry.config is config else None
        if forward is not None and not forward.used:
            forward.add_mask_kind(kv_length, kv_offset)  # another mask kind of the same forward
            return
        if forward is not None:
            self._discard_if_unfinished(forward)
        self._end_forward()  # the previous forward is over: back-pressure belongs here, not in a layer
        caller = model_forward(batch_size, q_length)
        try:
            unfinished = refuse_unrecordable_generation()
        except CaptureError:
            self._discard(None, "was refused", config, caller.cache)
            raise
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        forward = ForwardContext(config, batch_size, q_length, host_int(q_offset), mask, caller.input_ids,
                                 caller.position_ids, caller.cache)
        forward.unfinished = unfinished
        if caller.images and caller.position_ids is not None and caller.position_ids.dim() == 3:
            self._discard(None, "was refused", config, caller.cache)
            raise CaptureError("qk_sniff: this forward has images and multimodal RoPE (mrope), whose positions repeat "
                               "across an image's tokens, so rows could not be keyed by position; record text-only "
                               "inputs of this model (no pixel_values)")
        owner, last_layer = decoder_stack(caller.module, config)
        if entry is _STARTED:  # the decoder stack's start was reported: its end will be too
            forward.armed, forward.finished = True, False
        elif owner is None:
            forward.finished = None  # nothing tells this forward's end
        elif watch_forward(owner, last_layer, config) and running(owner):
            forward.finished = False  # the first forward: its last layer's return is its end
        else:  # built before the decoder stack runs (generate(), a wrapper): its start adopts it
            forward.state, forward.finished = "pending", False
        self._forwards[id(config)] = forward
        forward.add_mask_kind(kv_length, kv_offset)

    def on_forward_start(self, config, kwargs: dict) -> None:
        """The decoder stack of `config` starts a forward (registration.watch_forward). Whatever an
        earlier forward left is over: discarded unless it ended, never reused. A mask built for this
        forward before it started (passed in as prepared masks) is adopted."""
        entry = self._forwards.get(id(config))
        if isinstance(entry, ForwardContext):
            mask = kwargs.get("attention_mask")
            prepared = mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2)
            if entry.state == "pending" and not entry.used and prepared:
                entry.adopt(kwargs)
                return
            self._discard_if_unfinished(entry)
        self._forwards[id(config)] = _STARTED

    def on_forward_end(self, config) -> None:
        """The decoder stack of `config` returned: its forward is complete and over."""
        entry = self._forwards.get(id(config))
        if isinstance(entry, ForwardContext) and entry.state == "running":
            entry.finished = True
            del self._forwards[id(config)]

    def on_layers_done(self, config) -> None:
        """The last decoder layer of a forward whose stack's own end is not reported (its first) returned:
        its end, unless the stack runs a module after it (`on_tail_start`)."""
        entry = self._first_forward(config)
        if entry is not None:
            entry.layers_done = entry.finished = True

    def on_tail_start(self, config) -> None:
        """A module of that stack starts; after the last layer (the final norm) the forward is not over."""
        entry = self._first_forward(config)
        if entry is not None and entry.layers_done:
            entry.finished = False

    def on_tail_end(self, config) -> None:
        """That module returned: the forward's end again, unless another one starts after it."""
        entry = self._first_forward(config)
        if entry is not None and entry.layers_done:
            entry.finished = True

    def _first_forward(self, config) -> ForwardContext | None:
        entry = self._forwards.get(id(config))
        if isinstance(entry, ForwardContext) and entry.state == "running" and not entry.armed:
            return entry
        return None

    def _discard_if_unfinished(self, forward: ForwardContext) -> None:
        """A forward that stopped part-way (an exception inside the model, caught by the caller, or
        an interrupt in a notebook) recorded some layers only: its sequences are discarded, never
        committed, and cannot be continued."""
        if forward.finished is not False or forward.example_ids is None:
            return
        forward.finished = None  # discarded once
        self._discard(forward, "stopped before its end (an exception inside the model)")

    def _discard(self, forward: ForwardContext | None, why: str, config=None, cache=None) -> None:
        """Forget the sequences `forward` extends (or, before it has a context, the one of `cache` of the
        model of `config`): their rows are dropped and they are neither committed nor continued."""
        ids = set(forward.example_ids or ()) if forward is not None else set()
        key = self._cache_key(forward) if forward is not None else (id(config), id(cache) if cache is not None else None)
        for sequence in (getattr(forward, "sequence", None), self._sequences.get(key)):
            if sequence is not None:
                ids |= set(sequence.ids)
        self._sequences = {k: v for k, v in self._sequences.items() if not ids & set(v.ids)}
        if not ids:
            return
        self._begun = [i for i in self._begun if i not in ids]
        if hasattr(self.sink, "discard"):
            self.sink.discard(sorted(ids))
        logger.warning("qk-attn: a forward of example(s) %s %s; their rows are discarded and they are not committed",
                       sorted(ids), why)

    @staticmethod
    def _cache_key(forward: ForwardContext) -> tuple:
        """Sequences are keyed by model and cache; those begun without a known cache by model only."""
        return id(forward.config), None if forward.cache is None else id(forward.cache)

    # ---- inside the attention call ---------------------------------------------------
    def capture(self, module, query: torch.Tensor, key: torch.Tensor, mask, kwargs: dict, rotary=None) -> None:
        """Record this call's rows. `rotary` is the (cos, sin) the layer's forward applied (rope="pre")."""
        self.check()
        entry = self._forwards.get(id(module.config))
        forward = entry if isinstance(entry, ForwardContext) and entry.config is module.config else None
        if forward is not None:
            forward.used = True
        if self._skips_training(module):
            return
        try:
            self._capture(forward, module, query, key, mask, kwargs, rotary)
        except CaptureError:
            # A refused forward takes its sequences with it, before the error reaches any caller or
            # exit handler that could commit them.
            self._discard(forward, "was refused")
            raise

    def _capture(self, forward, module, query, key, mask, kwargs, rotary) -> None:
        refuse_unsupported(module, kwargs)
        if forward is None or forward.state != "running":
            raise CaptureError(
                f"qk_sniff: layer {module.layer_idx} ran without transformers building its mask (the model was given "
                "a prepared 4-D attention mask, or does not use transformers' mask functions); pass the 2-D "
                "attention_mask instead")
        layer = module.layer_idx
        cross = is_cross_attention(module)
        num_queries = check_shapes(forward, layer, query, key, cross)
        if not forward.first_call(layer, query, key):
            return  # the same query and key again (DiffLlama): recorded once
        model = self._model(module, query, key)
        self._start_sequence(model, forward)
        sliding_window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        if layer in model.plan.excluded_layers or (self.config.full_attention_only and sliding_window is not None):
            return
        position_ids = kwargs.get("position_ids")
        everything = forward.tokens(position_ids, query.device)
        text = everything if num_queries == forward.num_new else forward.tokens(position_ids, query.device,
                                                                                num_queries)
        sequence = forward.sequence
        if cross:
            # Text queries of a cross-attention layer are this forward's tokens; its keys are
            # vision tokens, recorded once per sequence.
            keys = None if layer in sequence.cross_done else cross_attention_keys(key, mask)
            sequence.cross_done.add(layer)
            tokens = {"q": (0, text), "k": keys}
        else:
            offset = forward.key_slot(layer, key.shape[2]) if model.plan.heads(layer, "k") else 0
            tokens = {"q": (0, text), "k": (offset, everything)}
        ids = self._on_device("ids", forward.example_ids, query.device)
        keep, keeps_any = forward.decisions(self.sampler, model.plan.shape.num_layers, ids, everything)
        for index, (kind, states) in enumerate((("q", query.detach()), ("k", key.detach()))):
            heads = model.plan.heads(layer, kind)
            if not heads or tokens[kind] is None:
                continue
            offset, these = tokens[kind]
            decided = None
            if keep is not None and these is everything:
                if not keeps_any[layer][index]:  # the sampler keeps nothing of this call (known on the CPU
                    if hasattr(self.sink, "put_empty"):  # without a sync): the sink still learns that it ran
                        self.sink.put_empty(layer, kind, heads, forward.example_ids, sliding_window, cross, these)
                    continue
                decided = keep[layer, index]
            self.sink.put(self._batch(module, forward, layer, kind, states, heads, offset, these,
                                      sliding_window, cross, rotary, decided))

    def _batch(self, module, forward, layer, kind, states, heads, offset, tokens, sliding_window, cross, rotary,
               keep=None):
        """Select, gather and (rope="pre") un-rotate one kind of one call; stays on the device."""
        device = states.device
        batch_size, num_tokens = tokens.positions.shape
        pre_rope = self.config.rope == "pre" and not cross and uses_rope(module)
        out_dtype = torch.float32 if pre_rope else _DTYPES[self.config.vector_dtype]
        capacity = batch_size * self.sampler.capacity(num_tokens)
        example_ids = self._on_device("ids", forward.example_ids, device)
        head_ids = self._on_device("heads", heads, device)
        if pre_rope or uses_kernel(states, out_dtype):
            count, row, position, bucket, vectors, token_id = self._select_and_gather(
                module, kind, layer, states, head_ids, offset, tokens, example_ids, capacity, out_dtype, pre_rope,
                rotary, keep)
        else:  # the torch path: one selection serves the vectors and the token ids
            selection = self._selection(forward, layer, kind, tokens, example_ids, capacity, keep)
            every_head = len(heads) == states.shape[1] and tuple(heads) == tuple(range(len(heads)))
            vectors = gather_selected(states, selection, offset, None if every_head else head_ids, out_dtype)
            count, row, position, bucket = selection.count, selection.row, selection.position, selection.bucket
            token_id = None
            if tokens.token_ids is not None:
                token_id = tokens.token_ids[selection.batch, 0, selection.token, 0].to(torch.int32)
        return CaptureBatch(
            layer=layer,
            kind=kind,
            heads=tuple(heads),
            example_ids=forward.example_ids,
            sliding_window=sliding_window,
            cross_attention=cross,
            count=count,
            row=row,
            position=position,
            bucket=bucket,
            vectors=vectors,
            valid=tokens.valid_count,  # the forward's, also for a suffix of its queries
            token_id=token_id,
            first_position=None if cross and kind == "k" else tokens.first_position,
            packed=tokens.packed,
        )

    def _selection(self, forward, layer, kind, tokens, example_ids, capacity, keep) -> Selection:
        """The sampler's selection of one call. Under "all" it is every valid token for every
        layer and kind, so it is made once per forward (a dense decode step has 2 x layers calls)."""
        if self.sampler.strategy == "all":
            cached = forward.selections.get(id(tokens))
            if cached is None or cached[0] is not tokens:
                cached = forward.selections[id(tokens)] = (
                    tokens, select_tokens(tokens.valid, tokens.positions, self.sampler, capacity))
            return cached[1]
        if keep is None:
            keep = self.sampler.keep(example_ids, layer, kind, tokens.positions) & tokens.valid
        return select_tokens(keep, tokens.positions, self.sampler, capacity)

    def _select_and_gather(self, module, kind, layer, states, head_ids, offset, tokens, example_ids, capacity,
                           out_dtype, pre_rope, rotary, keep):
        """The kernel path (and rope="pre"): per-token columns (token id, cos/sin) are gathered by
        the same selection as the vectors, as one-head states."""
        device = states.device
        select = functools.partial(
            select_rows, positions=tokens.positions, valid=tokens.valid, example_ids=example_ids,
            sampler=self.sampler, layer=layer, kind=kind, capacity=capacity)
        count, row, position, bucket, vectors = select(states, offset, head_ids, out_dtype=out_dtype, keep=keep)
        one_head = self._on_device("heads", (0,), device)
        batch_size = tokens.positions.shape[0]
        if pre_rope:
            if rotary is None:
                raise ConfigError(f"rope='pre': {type(module).__name__} did not expose the cos/sin it applied (no "
                                  "position_embeddings in its forward); use rope='post'")
            cos, sin = (select(_as_states(t, batch_size, device), 0, one_head, out_dtype=torch.float32, keep=keep)[4]
                        for t in rotary)
            vectors = invert_rope(module, kind, vectors, position, (cos, sin)).to(_DTYPES[self.config.vector_dtype])
        token_id = None
        if tokens.token_ids is not None:
            token_id = select(tokens.token_ids, 0, one_head, out_dtype=torch.float32, keep=keep)[4]
            token_id = token_id.reshape(-1).to(torch.int32)
        return count, row, position, bucket, vectors, token_id

    # ---- bookkeeping (host only) -----------------------------------------------------
    def _end_forwards(self) -> None:
        """Outside every forward (commit, flush): discard what an unfinished forward recorded."""
        for forward in list(self._forwards.values()):
            if isinstance(forward, ForwardContext):
                self._discard_if_unfinished(forward)
        self._end_forward()

    def _end_forward(self) -> None:
        """Between forwards: the sink sends what waited on the device (waiting for pool space)."""
        if hasattr(self.sink, "end_forward"):
            self.sink.end_forward()

    def _skips_training(self, module) -> bool:
        """No capture while gradients flow (training) or in a checkpoint recompute during backward."""
        if torch._C._current_graph_task_id() != -1:
            return True  # backward is recomputing a checkpointed layer: its forward was already seen
        if module.training and torch.is_grad_enabled():
            self._warn_once("training", "qk-attn: not recording forwards in training mode with gradients enabled "
                                        "(call model.eval() or use torch.no_grad() to record)")
            return True
        return False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _start_sequence(self, model: "_Model", forward: ForwardContext) -> None:
        """Give this forward its example ids, once (see the class docstring for the rules). A
        sequence belongs to its cache: a forward continues the sequence of the cache it extends."""
        if forward.example_ids is not None:
            return
        batch = forward.batch_size
        key = self._cache_key(forward)
        sequence = self._sequences.get(key)
        if sequence is not None and sequence.cache() is not forward.cache:
            sequence = None  # a cache that is gone, whose id a new one took
        if self._pending_ids is not None:
            ids, self._pending_ids = self._pending_ids, None
            if len(ids) != batch:
                raise ValueError(f"example_ids has {len(ids)} ids but the forward has batch size {batch}")
            if len(set(ids)) != len(ids):
                raise ValueError(f"example_ids {ids} repeats an id: every batch row is its own example")
            sequence = None
        elif forward.past == 0:
            ids, sequence = list(range(self._next_auto_id, self._next_auto_id + batch)), None
        elif sequence is None or sequence.end != forward.past or len(sequence.ids) != batch:
            where = "no sequence of this model was started on this cache" if sequence is None else (
                f"the sequence {list(sequence.ids)} of this cache is at position {sequence.end}")
            raise CaptureError(
                f"qk_sniff: this forward continues a cache at position {forward.past} but {where} (a rolled-back or "
                "different cache); call session.begin(ids) before it to name its sequences")
        else:
            ids = list(sequence.ids)
        committed = set(ids) & self._committed_now()
        if committed:
            raise ValueError(f"example ids {sorted(committed)} are already committed in this output; "
                             "rows of a committed example are never added (use new ids)")
        if sequence is None:
            sequence = self._sequences[key] = _Sequence(ids, forward.cache)
        else:  # rows of a batched generate() that had finished before this step's tokens
            forward.alive = sequence.unfinished
        sequence.unfinished = forward.unfinished
        sequence.end = forward.past + forward.num_new
        forward.sequence = sequence
        forward.example_ids = tuple(ids)
        self._next_auto_id = max(self._next_auto_id, max(ids) + 1)
        self._begun.extend(i for i in ids if i not in self._begun)

    def _committed_now(self) -> set[int]:
        return self.committed_ids() if hasattr(self.sink, "committed_ids") else set()

    def _on_device(self, what: str, values: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Small host tables (example ids, head ids) as int64 device tensors, copied once per value."""
        key = (what, tuple(values), device)
        table = self._device_tables.get(key)
        if table is None:
            if len(self._device_tables) > 256:
                self._device_tables.clear()
            host = torch.tensor(values, dtype=torch.int64)
            if device.type == "cuda":
                host = host.pin_memory()
            table = self._device_tables[key] = host.to(device, non_blocking=True)
        return table

    def _model(self, module, query, key) -> "_Model":
        model = self._models.get(id(module.config))
        if model is None or model.config is not module.config:
            if self._models and hasattr(self.sink, "bind_model"):
                raise CaptureError(
                    f"qk_sniff: a second model ({type(module).__module__.rsplit('.', 1)[-1]}) in a session that writes "
                    f"{self.config.output}, which holds one model's dataset; give each model its own session and output")
            plan = HeadPlan.build(self.config, ModelShape.from_module(module, query, key))
            model = self._models[id(module.config)] = _Model(module.config, plan)
            if hasattr(self.sink, "bind_model"):
                self.sink.bind_model(module.config, plan)
        return model


class _Model:
    """Per model in a session: its config and head plan."""

    def __init__(self, config, plan: HeadPlan):
        self.config = config
        self.plan = plan


class _Sequence:
    """The examples one cache holds (one per batch row), and how far they go."""

    def __init__(self, ids: list[int], cache):
        self.ids = ids
        self.cache = weakref.ref(cache) if cache is not None else (lambda: None)
        self.end = 0  # cache position after the last recorded forward
        self.unfinished = None  # generate()'s unfinished rows after the last step (device), if any
        self.cross_done: set[int] = set()  # cross-attention layers whose vision keys are recorded


_STARTED = object()  # Session._forwards entry: the decoder stack started a forward, no mask yet


def cross_attention_keys(key: torch.Tensor, mask) -> tuple[int, TextTokens]:
    """Vision keys of a cross-attention layer: position = vision token index, no token ids."""
    batch, num_keys = key.shape[0], key.shape[2]
    valid = key_validity(mask, batch)
    if valid is None:
        valid = torch.ones(batch, num_keys, dtype=torch.bool, device=key.device)
    positions = torch.arange(num_keys, device=key.device).expand(batch, num_keys)
    none_packed = torch.zeros(batch, dtype=torch.bool, device=key.device)
    return 0, TextTokens(positions, valid, valid.sum(1), positions[:, 0], none_packed, None)


def _as_states(table: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """A per-token table (B|1, T, R) as one-head attention states (B, 1, T, R)."""
    table = table.to(device)
    table = table if table.dim() == 3 else table[None]
    return table[:, None].expand(batch_size, 1, *table.shape[1:])
