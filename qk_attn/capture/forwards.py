"""When a forward starts: its mask call (a new forward's context, or another mask kind of the running
one) and its decoder stack's start. Its end and hand-off are `ForwardEnds`' (qk_attn.capture.forward_ends),
its sequences `SequenceTracker`'s (qk_attn.capture.sequences).

The mask and decoder-stack hooks report a forward's start and its mask here; what will tell its end
is found once per forward, never guessed from layer order. Forward start and end:
docs/architecture.md.
"""

from __future__ import annotations

import torch

from qk_attn.capture import forward as forward_module
from qk_attn.capture.caches import note_vision, refuse_rounding_cache, resets, watch_cache_class
from qk_attn.capture.calls import watch_call
from qk_attn.capture.concurrency import refuse_concurrent
from qk_attn.capture.facts import require as require_facts
from qk_attn.capture.forward import ForwardContext, host_int
from qk_attn.capture.forward_ends import ForwardEnds
from qk_attn.capture.frames import (
    cache_length,
    decoder_stack,
    model_forward,
    outermost_forward,
    running_in,
)
from qk_attn.capture.generation_frames import refuse_unrecordable_generation
from qk_attn.capture.hooks import watch_forward
from qk_attn.capture.mask_checks import refuse_mask_shape, refuse_other_padding
from qk_attn.capture.rotary_positions import refuse_other_rotary_positions, refuse_stack_rotary_positions
from qk_attn.capture.staging import OffsetCheck
from qk_attn.errors import CaptureError


class ForwardTracker(ForwardEnds):
    """Each model's current forward (keyed by its config object) from its start; its end and hand-off
    are `ForwardEnds`'.

    What a forward's rows belong to is the sequence side's (`SequenceIds`): it gives a starting
    forward the ids `begin()` named (`_take_begun_ids`), knows where a cache's sequence ends
    (`_sequence_of`), and forgets the sequences of a forward that is discarded (`_discard`).
    """

    def _take_begun_ids(self) -> list[int] | None:
        raise NotImplementedError

    def _sequence_of(self, config, cache):
        raise NotImplementedError

    def _check_sequence(self, forward: ForwardContext) -> None:
        """Raise the refusal the forward's first attention call would raise naming its examples."""
        raise NotImplementedError

    def _current(self, config) -> ForwardContext | None:
        """The forward of the model of `config` that is running now (its mask was built), if any."""
        entry = self._forwards.get(id(config))
        return entry if isinstance(entry, ForwardContext) and entry.config is config else None

    # ---- a forward's start and its mask: once per forward and mask kind ------
    @staticmethod
    def require_facts() -> None:
        """TransformersMismatch when what the capture reads of transformers' internals does not hold
        (checked once per process): before the mask function's arguments are bound (hooks._noting_context)."""
        require_facts()

    def on_mask(
        self, config, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, local_size=None, *, callers
    ) -> None:
        """A mask call of a forward of the model of `config` (transformers' mask function's arguments, and the
        call's `frames.method_frames`): a new forward's context, or another mask kind of the running one."""
        require_facts()  # what the capture reads of transformers' internals holds (checked once)
        entry = self._forwards.get(id(config))
        forward = entry if isinstance(entry, ForwardContext) and entry.config is config else None
        refuse_concurrent(forward)  # (also across sessions: concurrency._refuse_concurrent_elsewhere)
        if forward is not None and not forward.used:
            if not forward.adopted_without_mask:
                forward.add_mask_kind(kv_length, kv_offset, local_size)  # another mask kind of the same forward
                return
            # The stack given no mask builds its own: the skipped mask it adopted was prepared for it and not
            # passed on (generate()'s), so this forward starts here, taking that one's ids, as a stack that got none.
            self._retire(forward)
            entry = _Started(forward.begun_ids if forward.begun_ids is not None else self._take_begun_ids())
            forward = None
        if forward is not None:
            self._retire(forward)
        self._let_go_other_models(config)
        self._end_forward()  # the previous forward is over: back-pressure belongs here, not in a layer
        begun_ids = entry.begun_ids if isinstance(entry, _Started) else self._take_begun_ids()
        caller = model_forward(callers, batch_size, q_length)
        if caller.outermost is not caller.module:  # each model the caller calls, not only the first forward's
            watch_call(caller.outermost, config)
        try:
            generation = refuse_unrecordable_generation(callers, caller.module)
            refuse_other_rotary_positions(caller.code)
            watch_cache_class(caller.cache)
            refuse_rounding_cache(caller.cache)
        except CaptureError:
            self._discard(None, "was refused", config, caller.cache)
            raise
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        try:
            # which tokens are padding: the mask call's mask must be the model forward's own (mask_checks)
            on_host = isinstance(attention_mask, torch.Tensor) and forward_module.builds_on_host(attention_mask.device)
            refuse_other_padding(attention_mask, caller.attention_mask, caller.module, on_host)
            past, check = self._past(config, caller.cache, q_offset, begun_ids is not None)
            refuse_mask_shape(mask, batch_size, past, q_length)
        except CaptureError:
            self._discard(None, "was refused", config, caller.cache, q_offset if type(q_offset) is int else 0)
            raise
        forward = ForwardContext(
            config, batch_size, q_length, past, mask, caller.input_ids, caller.position_ids, caller.cache
        )
        forward.offset_check, forward.begun_ids, forward.builder = check, begun_ids, caller.module
        forward.numbers_positions, forward.builder_code = caller.numbers_positions, caller.code
        forward.builder_positions, forward.builder_depth = caller.position_ids, caller.depth
        forward.unfinished, forward.decode_step, forward.draft = generation
        forward.images = caller.images
        if caller.images and caller.position_ids is not None and caller.position_ids.dim() == 3:
            self._discard(None, "was refused", config, caller.cache)
            raise CaptureError(
                "qk_sniff: this forward has images and multimodal RoPE (mrope), whose positions repeat "
                "across an image's tokens, so rows could not be keyed by position; record text-only "
                "inputs of this model (no pixel_values)"
            )
        if not forward.draft:  # (a draft is not recorded: nothing to refuse)
            try:
                # Refused here, before a layer writes the new tokens into the cache: a forward retried
                # after the refusal (with begin()) finds the cache as it was.
                self._check_sequence(forward)
            except CaptureError:
                if not _attention_in_training(caller.module):  # else not recorded (its first call says)
                    self._discard(None, "was refused", config, caller.cache)
                    raise
        if isinstance(entry, _Started):  # the decoder stack's start was reported: its end will be too
            forward.armed, forward.finished = True, False
        else:
            try:
                self._find_end(forward, caller.module, config)
            except CaptureError:
                self._discard(None, "was refused", config, caller.cache)
                raise
        if forward.images:
            note_vision(caller.cache)
        self._forwards[id(config)] = forward
        forward.add_mask_kind(kv_length, kv_offset, local_size)

    @staticmethod
    def _find_end(forward: ForwardContext, module, config) -> None:
        """What will tell the end of a forward whose decoder stack did not report its start (the
        stack found by structure from `module`, the one building the mask)."""
        owner, last_layer = decoder_stack(module, config)
        if owner is None:
            forward.finished = None  # nothing tells this forward's end
            return
        refuse_stack_rotary_positions(owner)  # (the mask may be built outside it: its positions are its own)
        first = watch_forward(owner, last_layer, config)
        if first:  # and the calls around the stack (its causal LM), whose exceptions also stop a forward
            watch_call(outermost_forward(owner), config)
        if first and running_in(owner):
            forward.finished = False  # the first forward: its last layer's return is its end
        else:  # built before the decoder stack runs (generate(), a wrapper): its start adopts it
            forward.state, forward.finished = "pending", False

    def _past(self, config, cache, q_offset, begun: bool) -> tuple[int, OffsetCheck | None]:
        """Tokens already in the cache. A static cache gives a device scalar: reading it would stop the
        host from running ahead, so a forward that continues this cache's sequence takes the
        sequence's end instead, and the sink checks it against the device value with the rows. A
        sequence's first forward (or one after `begin`) reads it."""
        if not isinstance(q_offset, torch.Tensor):
            past = int(q_offset or 0)
            if cache is None and past > 0:
                raise CaptureError(
                    f"qk_sniff: a {getattr(config, 'model_type', '')} model built this forward's mask for new tokens "
                    f"at cache position {past}, but its forward has no cache argument qk-attn knows (cache or "
                    "past_key_values), so its sequence could not be told from another cache's; not recorded"
                )
            held = cache_length(cache)
            if held is not None and held != past:
                raise CaptureError(
                    f"qk_sniff: a {getattr(config, 'model_type', '')} model built this forward's mask for new tokens "
                    f"at cache position {past}, but its cache holds {held} tokens, so its new keys could not be "
                    "found in the cache (BertLMHeadModel without is_decoder does so; so would a transformers release "
                    "that passes the mask's offsets under other names); not recorded"
                )
            return past, None
        sequence = self._sequence_of(config, cache) if cache is not None else None
        if sequence is None or begun or sequence.resets != resets(cache):  # (reset: a new sequence from 0)
            return host_int(q_offset), None
        # A snapshot (no host read): the cache may advance the tensor in place as the layers run.
        check = OffsetCheck(q_offset.detach().clone(), sequence.end, tuple(sequence.ids))
        if forward_module.builds_on_host(q_offset.device):  # reading it costs nothing: refused in the forward
            check.verify()
            check = None
        return sequence.end, check

    def on_mask_skipped(self, config) -> None:
        """The mask function of a forward of `config`'s model returned None (the backend attends without a mask)."""
        forward = self._current(config)
        if forward is not None and forward.state == "pending":
            forward.mask_skipped = True

    def on_forward_start(self, config, kwargs: dict) -> None:
        """The decoder stack of `config` starts a forward (registration.watch_forward). Whatever an
        earlier forward left is over: discarded unless it ended, never reused. A mask built for this
        forward before it started (passed in as prepared masks) is adopted."""
        entry = self._forwards.get(id(config))
        if isinstance(entry, ForwardContext):
            refuse_concurrent(entry)
            mask = kwargs.get("attention_mask")
            prepared = mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2)
            unused = entry.state == "pending" and not entry.used
            if unused and (prepared or (mask is None and entry.mask_skipped)):
                # A mask built around the stack (BERT's model around its encoder), passed in; or skipped there (None:
                # no padding), which the stack gets as None. Should the stack build its own, `on_mask` lets it go.
                entry.adopt(kwargs)
                entry.adopted_without_mask = not prepared
                return
            self._retire(entry)
            if unused and entry.begun_ids is not None:
                # Its mask was prepared for this forward, which did not get it (sdpa drops a mask that
                # is causal only): this forward takes the ids that one took.
                self._forwards[id(config)] = _Started(entry.begun_ids)
                return
        self._forwards[id(config)] = _Started(self._take_begun_ids())


def _attention_in_training(module) -> bool:
    """Whether an attention layer under `module` is in training mode: a forward of it is not recorded
    (`Session._not_recorded`), so a refusal of its sequence is not raised (on a refusal only: a walk
    over the model's modules)."""
    return any(m.training for m in module.modules() if getattr(m, "layer_idx", None) is not None)


class _Started:
    """Session._forwards entry: the decoder stack started a forward, no mask yet."""

    def __init__(self, begun_ids: list[int] | None):
        self.begun_ids = begun_ids  # `begin()`'s ids, which this forward took at its start
