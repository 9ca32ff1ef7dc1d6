"""The recorder: what runs inside each attention call (`Session.capture`): the checks of the call
against its forward, the head plan, the sampler's decisions, and one CaptureBatch per kind
(`qk_attn.capture.call_rows`) staged for the forward's hand-off.

The forward and sequence lifecycle it inherits is `qk_attn.capture.forwards` and
`qk_attn.capture.sequences`; sequence identity and the commit protocol: docs/architecture.md.
"""

from __future__ import annotations

import logging
import weakref
from threading import get_ident

import torch

from qk_attn.capture import active
from qk_attn.capture.attention import (
    PACKED,
    call_window,
    check_shapes,
    cross_attention_keys,
    refuse_packed,
)
from qk_attn.capture.binder import ModuleBinder
from qk_attn.capture.caches import holds_vision
from qk_attn.capture.call_rows import CallRows
from qk_attn.capture.facts import require as require_facts
from qk_attn.capture.forward import ForwardContext
from qk_attn.capture.frames import running_in
from qk_attn.capture.lifecycle import SessionLifecycle
from qk_attn.capture.plan import HeadPlan
from qk_attn.capture.query_slicing import note_unseen
from qk_attn.capture.refusals import REFUSALS
from qk_attn.capture.sequences import SequenceTracker
from qk_attn.capture.sinks import MemorySink, as_sink
from qk_attn.capture.staging import Staging, empty_call
from qk_attn.config import SniffConfig
from qk_attn.errors import CaptureError
from qk_attn.sampler import Sampler

logger = logging.getLogger(__name__)


class Session(SessionLifecycle, ModuleBinder, SequenceTracker):
    """Holds what must persist across forwards; `capture` runs inside each attention call.

    Forwards: `ForwardTracker`; sequences and commits: `SequenceTracker`; begin, flush, close and table:
    `SessionLifecycle`. Each model in the session
    has its own head plan (and, there, its current forward and sequences).
    """

    def __init__(self, config: SniffConfig, sink=None, example_ids=None):
        self.config = config
        self.sampler = Sampler.from_config(config)
        self._init_bindings()  # (ModuleBinder)
        self._call_rows = CallRows(config, self.sampler)
        super().__init__(MemorySink() if sink is None else as_sink(sink), example_ids)
        self._warned: set[str] = set()
        self._discarded = 0  # forwards discarded (refused, stopped part-way): what "recorded nothing" blames
        self._closed = False
        self._towers: dict[int, weakref.ref] = {}  # id(config) -> config of a vision/audio tower seen at its mask

    @property
    def plan(self) -> HeadPlan | None:
        """The head plan of the first model this session recorded."""
        return next(iter(self._models.values())).plan if self._models else None

    # ---- the sink ----------------------------------------------------------------------
    @property
    def rows_written(self) -> int:
        return self.sink.rows_written

    # ---- inside the attention call ---------------------------------------------------
    def _discard(self, forward, why: str, config=None, cache=None, past: int = 0) -> None:
        super()._discard(forward, why, config, cache, past)
        if forward is not None:
            self._discarded += forward.used
            self._bindings += 1
            for model in self._models.values():
                model.layer_dtypes = {k: v for k, v in model.layer_dtypes.items() if v[1] != forward.serial}
            # A model bound only by discarded forwards is no model of the session: not the one its folder holds
            # (a model called next is no second model), and its next forward binds it again, in its own dtype.
            self._models = {key: model for key, model in self._models.items() if model.layer_dtypes}

    def on_tower_mask(self, config, where: str) -> None:
        """A vision or audio tower builds its mask (frames.tower_of): its attention calls are not text
        positions, so they are not recorded, and its forward is no forward of the language model."""
        self._towers[id(config)] = weakref.ref(config)
        self._warn_once(
            f"tower {where}",
            f"qk-attn: the {where} tower ({getattr(config, 'model_type', '?')}) is not recorded: qk-attn records "
            "the language model's attention",
        )

    def refuse_unnumbered(self, module) -> None:
        """An attention call of a module without a layer_idx: a vision tower's is not recorded, but one of the
        model whose forward runs (a release or remote code that sets none on some layers) is refused: that
        layer's rows would be missing while the others' were committed, and verify could not tell."""
        forward = self._forwards.get(id(getattr(module, "config", None)))
        if isinstance(forward, ForwardContext) and forward.config is module.config and forward.finished is not True:
            forward.used = True  # (the next mask call starts the next forward)
            self._discard(forward, "was refused")
            raise CaptureError(
                f"qk_sniff: {type(module).__name__}, an attention module of the model whose forward runs, has no "
                "layer_idx, so its rows could not be keyed by layer; nothing of this forward is recorded (qk-attn "
                "records models whose attention modules set self.layer_idx)"
            )

    def capture(self, module, query: torch.Tensor, key: torch.Tensor, mask, kwargs: dict, rotary=None) -> None:
        """Record this call's rows. `rotary` is the (cos, sin) the layer's forward applied (rope="pre").
        A decode step runs this once per layer: its common path calls as few functions as it can."""
        self.sink.check()
        config = module.config
        if self._towers:
            tower = self._towers.get(id(config))
            if tower is not None and tower() is config:
                return
        forward = self._forwards.get(id(config))  # (ForwardTracker._current, inline)
        if not isinstance(forward, ForwardContext) or forward.config is not config or forward.finished is True:
            if active.started_uncaptured(config):  # a forward begun before another thread opened this session
                return
            forward = None  # a call after its model's forward ended is none of it: refused, that forward kept
        elif forward.thread_id != get_ident():  # another thread's forward of this model: this call is none of it
            # This thread's own forward of the model, begun with capture off (its mask built then, or a prepared one
            # passed in), ends so; a layer handed here from that forward is refused.
            if active.started_uncaptured(config) or running_in(forward.builder):
                return
            forward.refuse_call_from_another_thread(getattr(module, "layer_idx", None))
        else:
            forward.used = True
            if forward.draft or forward.discarded:  # a discarded forward that runs on records nothing more
                return
        try:
            if (
                forward is None
                or forward.training is not False
                or module.training
                or torch._C._current_graph_task_id() != -1
            ) and self._not_recorded(forward, module):
                return
            self._capture(forward, module, query, key, mask, kwargs, rotary)
        except REFUSALS:
            # A refused forward takes its sequences with it, before the error reaches any caller or
            # exit handler that could commit them.
            self._discard(forward, "was refused")
            raise

    def _capture(self, forward, module, query, key, mask, kwargs, rotary) -> None:
        binding = self._modules.get(id(module))
        if binding is None or binding.module() is not module or binding.facts.layer != module.layer_idx:
            binding = self._new_binding(module)  # (a new layer_idx: layers renumbered in place, checked again)
        facts = binding.facts
        if not PACKED.isdisjoint(kwargs):
            refuse_packed(kwargs)
        if forward is None or forward.state != "running":
            _refuse_unbuilt_mask(facts.layer, mask, module.config, self)
        layer, cross = facts.layer, facts.cross
        query_shape, key_shape = query.shape, key.shape  # (read once: each read makes a torch.Size)
        num_queries = check_shapes(forward, layer, query_shape, key_shape, cross)
        if not forward.first_call(layer, query, key):
            return  # the same query and key again (DiffLlama): recorded once
        if binding.serial != self._bindings or binding.dtype is not query.dtype or binding.config is not module.config:
            self._bind(binding, module, forward, query, key)
        model, plan = binding.model, binding.plan
        shape = plan.shape
        if query_shape[1] != shape.num_heads or key_shape[1] != shape.num_kv_heads:
            raise CaptureError(
                f"qk_sniff: layer {layer} has {query_shape[1]} query and {key_shape[1]} key/value heads where the "
                f"model's first layer had {shape.num_heads} and {shape.num_kv_heads}: models whose layers differ in "
                "head counts (MiMo-V2's sliding layers, Gemma 4's global key/value heads) are not supported yet, "
                "since one head plan serves every layer; nothing of this forward is recorded"
            )
        if forward.example_ids is None:
            self._start_sequence(forward)
        if binding.excluded:
            return
        sliding_window = call_window(facts, kwargs, forward.mask_windows)
        if sliding_window is None and not cross:  # the window its mask was built with, if any
            sliding_window = forward.mask_window(layer, facts.layer_type)
        if self.config.full_attention_only and sliding_window is not None:
            forward.skipped_sliding = True
            return
        if cross and not forward.images and not holds_vision(forward.cache):
            self._warn_once(
                "no vision",
                f"qk-attn: cross-attention layer {layer} ran over a cache no forward gave images to (a static cache "
                "initialised early holds zeros there); its keys belong to no token, so it is not recorded",
            )
            return
        forward.recorded = True
        position_ids = kwargs.get("position_ids")
        device = query.device
        everything = forward.tokens(position_ids, device)
        text = everything if num_queries == forward.num_new else forward.tokens(position_ids, device, num_queries)
        query_heads, key_heads = binding.heads
        if cross:
            # Text queries of a cross-attention layer are this forward's tokens; its keys are
            # vision tokens, recorded once per sequence.
            sequence = forward.sequence
            keys = None if layer in sequence.cross_done else cross_attention_keys(key, mask)
            sequence.cross_done.add(layer)
        else:
            keys = (forward.key_slot(layer, key_shape[2]) if key_heads else 0, everything)
        decisions = forward.decisions(self.sampler, shape.num_layers, everything)
        staging = forward.staging or self._start_staging(forward, model, query)
        if text is not everything and query_heads and not cross:  # the manifest names the queries it did not get
            note_unseen(forward, staging, layer, everything, num_queries, self._warn_once)
        if decisions is not None and text is everything and not cross and not decisions.keeps_any(layer):
            # The sampler keeps nothing of this layer (known on the host without a sync), as in most
            # layers of a decode step: the sink still learns that it ran.
            host, ids = decisions.host, forward.example_ids
            if query_heads:
                staging.calls.append(empty_call((layer, "q", query_heads, ids, sliding_window, False, host)))
            if key_heads:
                staging.calls.append(empty_call((layer, "k", key_heads, ids, sliding_window, False, host)))
            return
        for index, (kind, states, heads, tokens) in enumerate(
            (("q", query, query_heads, (0, text)), ("k", key, key_heads, keys))
        ):
            if not heads or tokens is None:
                continue
            offset, these = tokens
            decided = None
            if decisions is not None and these is everything:
                if not decisions.keeps(layer, index):  # the sampler keeps nothing of this call: it ran, with 0
                    # rows. The plan's heads are tuples.
                    host = decisions.host
                    staging.calls.append(
                        empty_call((layer, kind, heads, forward.example_ids, sliding_window, cross, host))
                    )
                    continue
                # On a GPU the kernel decides; "all" keeps every valid token, which the torch path
                # selects once per forward (CallRows._selection), so it needs no decision per call.
                if decisions.host is these and self.sampler.strategy != "all":
                    decided = decisions.mask(layer, index)
            batch, staged = self._call_rows.batch(
                module,
                forward,
                layer,
                kind,
                states.detach() if states.requires_grad else states,
                heads,
                offset,
                these,
                sliding_window,
                cross,
                rotary,
                decided,
                staging,
            )
            if staged:
                staging.add(batch)
            else:  # a forward too large to stage (the run's estimate said so), or a layer on another
                self.sink.put(batch)  # device: streamed call by call

    def _start_staging(self, forward, model, query) -> Staging:
        """The forward's staging area, at its first recorded call (`CallRows.start_staging`)."""
        staging = forward.staging = self._call_rows.start_staging(forward, model, query, self.sink)
        if staging.streams:
            limit = self.sink.staging_limit
            self._warn_once(
                "streams",
                f"qk-attn: one forward's rows ({staging.nbytes / 2**20:,.0f} MiB at most) exceed the staging limit "
                f"({limit / 2**20:,.0f} MiB, half of pinned_mb): such forwards are handed to the sink call by "
                "call and may wait for the saver inside the forward; raise pinned_mb to stage them whole",
            )
        return staging

    # ---- bookkeeping (host only) -----------------------------------------------------
    def _not_recorded(self, forward, module) -> bool:
        """No capture of a forward in training mode, whatever the grad mode (dropout is active, and a
        checkpoint around the model runs its first pass without gradients), nor of a checkpoint
        recompute during backward (its forward was seen). A forward is in training mode when any of its
        layers is: rows its earlier layers took are discarded, so nothing of it is recorded in part."""
        if torch._C._current_graph_task_id() != -1:
            return True
        if forward is None:
            training = module.training
        else:
            if module.training and forward.training is False:  # earlier layers were in eval: drop their rows
                self._discard(forward, f"ran in training mode from layer {getattr(module, 'layer_idx', '?')} on")
            if forward.training is not True:
                forward.training = module.training
            training = forward.training
        if training:
            self._warn_once(
                "training",
                "qk-attn: not recording forwards in training mode (call model.eval() to record them)",
            )
        return training

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def _refuse_unbuilt_mask(layer: int, mask, config, session) -> None:
    """A layer ran in no forward whose mask qk_sniff's mask function saw. A release that changed how masks
    are built is named first (the facts, checked once); else what the call itself tells."""
    require_facts()
    for other in active.open_sessions():  # its forward began in a session that another, opened inside it, hides
        forward = other._current(config) if other is not session else None
        if forward is not None and forward.thread_id == get_ident() and forward.in_progress():
            raise CaptureError(
                f"qk_sniff: layer {layer} ran in a forward that another session records: a session was opened "
                "inside that forward (from a hook or callback) and left open; open and close sessions between "
                "forwards"
            )
    cause = (
        "transformers built no mask through qk_sniff's mask function for this forward"
        if mask is None
        else "the model was given a prepared 4-D attention mask, or does not use transformers' mask functions"
    )
    raise CaptureError(
        f"qk_sniff: layer {layer} ran without transformers building its mask for its config ({cause}; or its "
        "attention modules hold another config object than the model that built the mask: a config replaced "
        "after loading); pass the 2-D attention_mask, and keep the config the model was loaded with"
    )
