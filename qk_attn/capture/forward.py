"""One capture context per model forward, built from what transformers tells the mask function.

transformers calls the registered mask function once per forward and mask kind (full,
sliding) before any layer runs. Its arguments are the facts no attention call can see on
its own (positions and identity: docs/architecture.md):

    q_offset           tokens already in the cache: the new tokens are cache positions
                       [q_offset, q_offset + q_length)
    kv_length, kv_offset  the key tensor of a layer of this kind has kv_length slots and slot
                       j holds cache position kv_offset + j, so the new keys start at slot
                       q_offset - kv_offset (dynamic, static and sliding caches alike)
    attention_mask     the 2-D (B, q_offset + q_length) padding mask, or None

Every attention call of that forward looks its `ForwardContext` up (by the model's config)
instead of guessing from layer order or mask shapes. Its new tokens are built by
`qk_attn.capture.forward_tokens`, once per forward and device.
"""

from __future__ import annotations

import itertools
import threading
import weakref

import torch

from qk_attn.capture.decisions import DECODE_TOKENS, Decisions, decide
from qk_attn.capture.forward_tokens import text_tokens
from qk_attn.capture.frames import (
    cache_of,
    encloses_this_call,
    renumbered_positions,
    running_encoder_decoder,
    running_in,
)
from qk_attn.capture.tokens import HostMirror, TextTokens, check_position_source
from qk_attn.errors import CaptureError

_serials = itertools.count()  # ForwardContext.serial: never reused, unlike id()


def serial_mark() -> int:
    """A number below the serial of every forward that starts after this call."""
    return next(_serials)


DECIDE_AT_ONCE = 1 << 21  # (layer, kind, token) decisions made in one go per CPU forward


class ForwardContext:
    """The facts of one forward of one model, shared by all its attention calls."""

    def __init__(
        self,
        config,
        batch_size: int,
        num_new: int,
        past: int,
        attention_mask: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ):
        self.config = config
        self.input_ids = input_ids  # (B, T) token ids of the new tokens, None when the model got embeddings
        self.position_ids = position_ids  # the model forward's own, when it has them
        self.numbers_positions = True  # the forward that built the mask has position_ids (frames.ModelForward)
        self.builder_code = None  # that forward's code, and the position_ids it held when it built the mask
        self.builder_positions: torch.Tensor | None = None
        self._renumbering_read = False  # `_follow_renumbering` ran
        self.cache = cache  # the cache object this forward extends (None: none, or not known yet)
        self.batch_size = batch_size
        self.num_new = num_new
        self.past = past
        self.attention_mask = attention_mask
        self.key_slots: dict[int, int | None] = {}  # kv_length -> slot of new token 0 (None: ambiguous)
        self.mask_windows: set[int | None] = set()  # the windows of the mask kinds it built (None: full)
        self.used = False  # an attention call has looked this context up
        self.training: bool | None = None  # a layer of it ran in training mode (not recorded); None: no call yet
        self.recorded = False  # a call got past the layer filters (its rows, maybe none, are taken)
        self.skipped_sliding = False  # a call was skipped as a sliding-window layer (full_attention_only)
        # "running": its model forward has started; "pending": the mask was built before the forward
        # (generate()'s prepared masks, a multimodal wrapper); the decoder stack's start adopts it.
        self.state = "running"
        # Whether the decoder stack's own hooks report this forward's start and end
        # (registration.watch_forward); otherwise the end is the return of the last module the stack
        # runs after its last layer has returned (`layers_done`).
        self.armed = False
        self.layers_done = False
        self.mask_skipped = False  # its mask function returned None (no padding: the backend attends without one)
        self.adopted_without_mask = False  # a pending forward adopted by a stack given no mask (see on_forward_start)
        # Whether the model forward ran to its end: False until its end is reported, None when it cannot be.
        self.finished: bool | None = None
        self.discarded = False  # refused or stopped part-way: its sequences are gone (warned once)
        self.thread = threading.current_thread()  # the thread running it (one forward of a model at a time)
        self.thread_id = threading.get_ident()  # (compared in every attention call: a C call, no Thread object)
        self.serial = next(_serials)
        self.builder = None  # the module whose forward built its mask (frames.model_forward), if found
        self.builder_depth = 0  # the place of that forward's frame on the stack (`encloses_this_call`)
        self.example_ids: tuple[int, ...] | None = None  # set by the session at the first recorded call
        self.begun_ids: list[int] | None = None  # `begin()`'s ids, taken by this forward at its start
        self.sequence = None  # the session's sequence this forward extends
        self.unfinished = None  # generate()'s (B,) unfinished_sequences at this step (device), if any
        self.decode_step = False  # a step of generate()'s decoding loop (not its prefill)
        self.images = False  # the forward has images (or vision states): its cross-attention layers attend to them
        self.draft = False  # early-exit assisted decoding's draft: not recorded (its verification is refused)
        self.alive = None  # (B,) rows still generating when this forward's tokens were produced (device)
        # (B,) the position after each row's last recorded token in the sequence's previous forwards
        # (-1: none yet), or None for a new sequence: the forward must continue there.
        self.continues_from = None
        self._calls: dict[int, tuple] = {}  # layer -> weak refs to the query and key it was called with
        self._tokens: dict = {}  # (device, length) -> (position_ids it was built from, TextTokens)
        self._decisions: Decisions | None = None  # see `decisions`
        self._mirror: HostMirror | None = None  # a GPU decode step's tokens, copied to the host (`decisions`)
        self._decided_for: TextTokens | None = None  # the host tokens `_decisions` was last returned for
        self.selections: dict = {}  # id(tokens) -> (tokens, Selection): Session._selection under "all"
        self.unseen: dict[
            int, list
        ] = {}  # queries given -> per row, the [start, stop) not given (query_slicing.note_unseen)
        self.staging = None  # its rows until its end (qk_attn.capture.staging), from its first recorded call
        self.offset_check = None  # the derived `past` of a static cache, checked by the sink (OffsetCheck)

    def in_progress(self) -> bool:
        """Whether this forward is still running: not ended, and its thread is inside the forward of the
        module that built its mask (the decoder stack, a wrapper, or generate()'s model, which encloses the
        forwards it prepares). One that raised is over."""
        if self.finished is not False or self.discarded or self.builder is None:
            return False
        return self.thread.is_alive() and running_in(self.builder, self.thread)

    def encloses_this_call(self) -> bool:
        """Whether this forward's layers ran and the forward is still running around the current call, in
        its own thread: a forward that starts now started from a hook or callback inside it."""
        if not self.used or self.finished is not False or self.discarded or self.builder is None:
            return False
        return self.thread is threading.current_thread() and encloses_this_call(self.builder, self.builder_depth)

    def refuse_call_from_another_thread(self, layer) -> None:
        """An attention call of this forward's model made in another thread than this forward's, by a forward
        not known to run with capture off: its rows could be told from neither forward's."""
        raise CaptureError(
            f"qk_sniff: layer {layer} of this model ran in thread {threading.current_thread().name!r} while a "
            f"forward of it runs in thread {self.thread.name!r}; qk-attn records a forward's layers in the thread "
            "that runs the forward, and one forward of a model at a time: give each thread its own copy of the "
            "model (copy.deepcopy(model)), or run the forwards one after the other; not recorded"
        )

    def adopt(self, kwargs: dict) -> None:
        """The decoder stack started with the mask this context was built from: its own arguments
        are the forward's (the token ids and cache a wrapper or generate() hands it)."""
        self.state, self.armed = "running", True
        ids, positions, cache = (kwargs.get("input_ids"), kwargs.get("position_ids"), cache_of(kwargs))
        if isinstance(ids, torch.Tensor) and ids.shape == (self.batch_size, self.num_new):
            self.input_ids = ids
        if isinstance(positions, torch.Tensor) and positions.shape[-1] == self.num_new:
            self.position_ids = positions
        if cache is not None:
            self.cache = cache

    def add_mask_kind(self, kv_length: int, kv_offset: int, local_size=None) -> None:
        self.mask_windows.add(None if local_size is None else int(local_size))  # a sliding (or chunked) kind
        slot = self.past - int(kv_offset)
        if self.key_slots.setdefault(int(kv_length), slot) != slot:
            self.key_slots[int(kv_length)] = None

    def mask_window(self, layer: int, layer_type: str | None) -> int | None:
        """The window of a layer whose attention call names none. By its `layer_type` (config.layer_types):
        None for a full or chunked layer, and for a sliding one the one window its forward's masks were
        built with; without layer types, that window when the forward built only local masks (Mistral,
        PhiMoE), else None. CaptureError when the masks have several windows."""
        if layer_type is not None and "sliding" not in layer_type:
            return None
        if layer_type is None and None in self.mask_windows:
            return None
        windows = self.mask_windows - {None}
        if len(windows) != 1:
            raise CaptureError(
                f"qk_sniff: layer {layer} attends through a sliding window, but its attention call passed none and "
                f"its forward built masks with windows {sorted(windows)}, so its rows could not be labelled; "
                "not recorded"
            )
        return next(iter(windows))

    def key_slot(self, layer: int, num_keys: int) -> int:
        """Index along K of the first new key, for a layer whose key tensor has num_keys slots."""
        slot = self.key_slots.get(num_keys)
        if slot is None:
            if num_keys in self.key_slots:
                reason = "two mask kinds disagree on it"
            else:
                reason = f"the mask function was told of key lengths {sorted(self.key_slots)} only"
                if num_keys > self.past + self.num_new:  # the cache said it held fewer tokens than its layers hold
                    reason += (
                        f" (the cache said it held {self.past} tokens before this forward's {self.num_new}: a cache that "
                        "reads its length from a layer holding no keys, as MiniMax's with linear attention first, says 0)"
                    )
            raise CaptureError(
                f"qk_sniff: layer {layer} has {num_keys} keys and {reason}; cannot tell where this "
                "forward's new keys sit, so nothing is recorded for it"
            )
        if not 0 <= slot <= num_keys - self.num_new:
            raise CaptureError(
                f"qk_sniff: layer {layer}: this forward's {self.num_new} new keys would start at slot "
                f"{slot} of {num_keys}; the cache does not hold them where transformers said"
            )
        return slot

    def first_call(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> bool:
        """True for a layer's first call in this forward; False for a repeat with the same query and
        key tensors (DiffLlama calls attention twice per layer). Anything else is refused: the
        model either called the layer again with other inputs or started a forward without
        transformers building its mask (a prepared 4-D mask), and rows would be attributed wrongly."""
        seen = self._calls.get(layer)
        if seen is None:
            self._calls[layer] = (weakref.ref(query), weakref.ref(key))
            return True
        if seen[0]() is query and seen[1]() is key:
            return False
        outer = running_encoder_decoder()
        if outer is not None:  # its encoder's and decoder's layers share their numbers
            raise CaptureError(
                f"qk_sniff: layer {layer} belongs to an encoder-decoder model ({type(outer).__name__}); qk-attn "
                "records decoder-only models"
            )
        raise CaptureError(
            f"qk_sniff: layer {layer} ran again with other inputs and no new mask: either the model passed a "
            "prepared 4-D attention mask (qk_sniff needs the 2-D attention_mask so that transformers builds the "
            "mask), or it calls one layer twice per forward with different inputs (as a BERT-style decoder given "
            "encoder_hidden_states: its cross-attention shares the layer's layer_idx); not recorded"
        )

    def tokens(self, position_ids: torch.Tensor | None, device: torch.device, length: int | None = None) -> TextTokens:
        """The forward's new tokens, computed once per forward (per position_ids tensor) on `device`;
        with `length`, its last `length` tokens (a layer given only a suffix of the queries)."""
        if not self._renumbering_read:
            self._follow_renumbering()
        if position_ids is None:  # a layer that does not pass them on: the forward's own
            position_ids = self.position_ids
        length = self.num_new if length is None else length
        cached = self._tokens.get((device, length))  # per device: layers of one forward may sit on several
        if cached is None or cached[0] is not position_ids:
            departing = None
            if position_ids is not None:
                valid = self.attention_mask[:, -self.num_new :] if self.attention_mask is not None else None
                departing = check_position_source(
                    self.config,
                    position_ids,
                    self.position_ids,
                    valid,
                    self.num_new,
                    builds_on_host(device),
                    self.numbers_positions,
                )
            tokens = text_tokens(self, position_ids, device, builds_on_host(device))
            if departing is not None:
                tokens = tokens._replace(misnumbered=tokens.misnumbered | departing.to(tokens.misnumbered.device))
            if length != self.num_new:
                tokens = tokens.suffix(length)
            cached = self._tokens[(device, length)] = (position_ids, tokens)
        return cached[1]

    def _follow_renumbering(self) -> None:
        """Once per forward, at its first recorded call: positions its forward bound anew after its mask
        (`frames.renumbered_positions`) key its rows."""
        self._renumbering_read = True
        if self.builder_code is not None and self.numbers_positions:
            now = renumbered_positions(self.builder_code, self.builder, self.builder_positions, self.num_new)
            if now is not None:
                self.position_ids = now

    def decisions(self, sampler, num_layers: int, tokens: TextTokens) -> Decisions | None:
        """For forwards up to DECIDE_AT_ONCE decisions whose positions the host knows: the sampler's
        decisions of every (layer, kind) at once (`Decisions`), made from the host tokens, so that the
        attention calls that select nothing cost a lookup; else None and the call decides for itself
        (a long prefill, or a GPU forward whose positions have not reached the host yet: `HostMirror`).

        On the CPU the tokens are host tensors. On a GPU a decode step's are copied to the host
        without a wait (`HostMirror`), and asked for again at each call until they have arrived."""
        if tokens is self._decided_for:  # the same tokens as the last call: its answer
            return self._decisions
        if self._decisions is None:
            host = tokens if builds_on_host(tokens.valid.device) else self._mirrored(sampler, tokens)
            if host is None or num_layers * 2 * host.valid.numel() > DECIDE_AT_ONCE:
                return None
            self._decisions = decide(sampler, self, num_layers, host)
        self._decided_for = tokens
        return self._decisions

    def _mirrored(self, sampler, tokens: TextTokens) -> TextTokens | None:
        """A GPU decode step's tokens on the host once their copy has landed (None until then). A
        prefill decides in the kernel, and under "all" every call keeps every valid token."""
        if self.num_new > DECODE_TOKENS or sampler.strategy == "all":
            return None
        if self._mirror is None:
            self._mirror = HostMirror(tokens)
        return self._mirror.tokens()


def builds_on_host(device: torch.device) -> bool:
    """Whether a forward's tokens on `device` are built and decided on the host (the CPU) or on the
    device, where the kernel decides per call."""
    return device.type == "cpu"


def host_int(value) -> int:
    """q_offset as a host int. Static caches give a 0-d device tensor: read at a sequence's first
    forward only, at the mask call before any layer is queued (never in an attention call)."""
    return int(value) if isinstance(value, torch.Tensor) else int(value or 0)
