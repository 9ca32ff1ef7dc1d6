"""Caches under which a forward's rows would be wrong: refused, never recorded.

Rows moved between forwards. `Cache.reorder_cache` (beam search), `batch_select_indices` and
`batch_repeat_interleave` (custom decoding loops, Hub `custom_generate` strategies) give a batch row
another row's history. A sequence continued on such a cache would key each row's new tokens by the
example that row held before, so the tracker refuses the forward that continues it
(`SequenceTracker._start_sequence`). The three methods are wrapped on the `Cache` base class, which
DynamicCache, StaticCache and QuantizedCache inherit them from (fact `cache_row_methods`), on any
subclass that overrides them (a modeling file's cache, as MiniMax's, which does not call Cache's),
wrapped at its first forward (`watch_cache_class`), and on the cache layer types, whose own row methods
move one layer's rows; each call counts one move of the cache's (or the layer's) rows. Rows moved
otherwise (tensors edited in place, a method under another name) are not seen.

Tokens rolled back. `Cache.crop` removes a cache's last tokens (assisted decoding's rejected drafts, a
hand-written speculative loop, a deferred stop check's extra step). Rows of the removed tokens were
recorded already, so a sequence whose cache a crop left shorter than its recorded end is discarded
(`SequenceTracker`): at its commit, and when a forward continues the cache. The wrapped `crop` notes
the shortest length it left in the cache's `Rollback`, which a sequence holds (so it is read even
after the cache is gone).

A cache reset. `Cache.reset()` empties a cache for reuse (a new conversation on a user's static cache):
the sequence it held is complete, and the next forward starts a new one, as on a new cache. Its calls
are counted (`resets`), so that a static cache, whose length is on the device, is known to start
again at 0 without reading it (`ForwardTracker._past`).

Keys rounded by the cache. A cache layer that hands attention this forward's keys after a round
trip through its storage format (transformers' `Fp8QuantizedLayer`) gives keys that are not the
model's k projection with RoPE. Of transformers' own layer types (`cache_utils`), only those whose
`update` is one qk-attn has read to return the new keys as given are trusted (`VETTED_UPDATES`:
dynamic, sliding, static, and `QuantizedLayer`'s quanto/HQQ); any other, a new one included, is
refused (`rounding_layer`), so none is trusted unread. Layer types a modeling file defines are its own.
"""

from __future__ import annotations

import functools
import types
import weakref

from transformers import cache_utils

from qk_attn.capture.frames import cache_length
from qk_attn.errors import CaptureError

ROW_METHODS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")

_moves: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> times its rows were moved
_moved = 0  # moves of any cache's or layer's rows in this process: row_moves reads nothing while it is 0
_resets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> times it was reset
_rollbacks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its Rollback
_vision: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its resets when a forward gave it images


class Rollback:
    """The lengths crops left in one cache, in order (-1: unknown, a static cache's length is on the
    device), and where resets came between them. Each sequence on the cache notes how many crops it
    had seen at its last forward; crops after the next reset are another sequence's."""

    __slots__ = ("lengths", "resets_at")

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.resets_at: dict[int, int] = {}  # the cache's n-th reset -> len(lengths) then

    def below(self, end: int, seen: int, resets: int) -> bool:
        """Whether a crop since the first `seen`, before the reset after the cache's first `resets`, left
        fewer than `end` tokens."""
        stop = self.resets_at.get(resets + 1, len(self.lengths))
        return any(length < end for length in self.lengths[seen:stop])


def rollback_of(cache) -> Rollback | None:
    """The cache's Rollback (made on first use: crops are noted from then on)."""
    if cache is None:
        return None
    record = _rollbacks.get(cache)
    if record is None:
        record = _rollbacks[cache] = Rollback()
    return record


def row_moves(cache) -> int:
    """How many times the rows of `cache` were moved, by its methods or its layers' (0 for None)."""
    if cache is None or not _moved:
        return 0
    return _moves.get(cache, 0) + sum(_moves.get(layer, 0) for layer in getattr(cache, "layers", ()))


def resets(cache) -> int:
    """How many times `cache` was reset (0 for None)."""
    return 0 if cache is None else _resets.get(cache, 0)


def note_vision(cache) -> None:
    """A forward with images (or vision states) ran on `cache`: its cross-attention layers hold them
    until it is reset."""
    if cache is not None:
        _vision[cache] = resets(cache)


def holds_vision(cache) -> bool:
    """Whether a forward with images ran on `cache` since its last reset. A static cache initialised
    early holds zeros in its cross-attention layers, which Mllama attends over as if an image were
    there (transformers 5.25); those keys belong to no token."""
    return cache is not None and _vision.get(cache) == resets(cache)


def watch_row_moves() -> None:
    """Wrap the Cache methods that move rows, and crop, and the row methods of transformers' cache layer
    types (a layer's `reorder_cache` / `batch_select_indices` moves its rows alone) (idempotent)."""
    _wrap_own_methods(cache_utils.Cache)
    for layer_type in vars(cache_utils).values():
        if isinstance(layer_type, type) and issubclass(layer_type, cache_utils.CacheLayerMixin):
            _wrap_own_methods(layer_type, crop=False)


_watched_classes: weakref.WeakSet = weakref.WeakSet()


def watch_cache_class(cache) -> None:
    """Wrap the row methods and crop where a class between the cache's own and Cache overrides them, and
    the row methods of its layer types, before rows of this cache are recorded (once per class)."""
    if cache is None or not isinstance(cache, cache_utils.Cache):
        return
    layer_types = set(map(type, getattr(cache, "layers", ())))  # (map: no Python frame per layer)
    replicated = getattr(cache, "layer_class_to_replicate", None)  # layers made later, one per new layer
    layer_types.update([replicated] if isinstance(replicated, type) else [])
    for cls, base in ((type(cache), cache_utils.Cache), *((t, cache_utils.CacheLayerMixin) for t in layer_types)):
        if cls not in _watched_classes and issubclass(cls, base):
            for klass in cls.__mro__[: cls.__mro__.index(base)]:
                _wrap_own_methods(klass, crop=base is cache_utils.Cache)
            _watched_classes.add(cls)


def _wrap_own_methods(klass: type, crop: bool = True) -> None:
    """Wrap the row methods (and crop and reset) that `klass` defines itself (plain functions), unless wrapped."""
    own = vars(klass)
    for name in ROW_METHODS:
        method = own.get(name)
        if isinstance(method, types.FunctionType) and not getattr(method, "_counts_row_moves", False):
            setattr(klass, name, _counting(method))
    method = own.get("crop")
    if crop and isinstance(method, types.FunctionType) and not getattr(method, "_notes_rollbacks", False):
        klass.crop = _noting_rollbacks(method)
    method = own.get("reset")
    if crop and isinstance(method, types.FunctionType) and not getattr(method, "_counts_resets", False):
        klass.reset = _counting_resets(method)


def _noting_rollbacks(crop):
    @functools.wraps(crop)
    def noted(cache, *args, **kwargs):
        before = cache_length(cache)
        try:
            return crop(cache, *args, **kwargs)
        finally:  # also a crop that raised after cutting some layers
            after = cache_length(cache)
            record = _rollbacks.get(cache)
            if record is not None:  # a cache some sequence holds
                amount = args[0] if args else next(iter(kwargs.values()), None)
                if after is None and amount != 0:
                    record.lengths.append(-1)
                elif after is not None and before is not None and after < before:
                    record.lengths.append(after)

    noted._notes_rollbacks = True
    return noted


def _counting_resets(reset):
    @functools.wraps(reset)
    def counted(cache, *args, **kwargs):
        try:
            return reset(cache, *args, **kwargs)
        finally:
            _resets[cache] = _resets.get(cache, 0) + 1
            record = _rollbacks.get(cache)
            if record is not None:  # crops from now on are the next sequence's
                record.resets_at[_resets[cache]] = len(record.lengths)

    counted._counts_resets = True
    return counted


def _counting(method):
    @functools.wraps(method)
    def counted(cache, *args, **kwargs):
        global _moved
        _moves[cache] = _moves.get(cache, 0) + 1
        _moved += 1
        return method(cache, *args, **kwargs)

    counted._counts_row_moves = True
    return counted


def refuse_rounding_cache(cache) -> None:
    """Refuse a forward whose cache rounds the keys it hands to attention (once per forward)."""
    if cache is None:
        return
    classes = set(map(type, getattr(cache, "layers", ())))
    replicated = getattr(cache, "layer_class_to_replicate", None)
    if isinstance(replicated, type):
        classes.add(replicated)
    rounding = sorted(cls.__name__ for cls in classes if rounding_layer(cls))
    if rounding:
        raise CaptureError(
            f"qk_sniff: this forward's cache ({type(cache).__name__} of {', '.join(rounding)}) may hand attention the "
            "new keys after a round trip through its storage (fp8 rounds them), so they would not be the model's "
            "keys; not recorded: use a dynamic or static cache (or a quanto/HQQ quantized cache, which returns "
            "them as given)"
        )


# The layer types whose `update` returns this forward's keys as given (read in transformers 5.17-5.25).
VETTED_UPDATES = (
    "DynamicLayer",
    "DynamicSlidingWindowLayer",
    "StaticLayer",
    "StaticSlidingWindowLayer",
    "QuantizedLayer",
)


@functools.cache
def _vetted_updates() -> tuple:
    return tuple(getattr(cache_utils, name).update for name in VETTED_UPDATES)


def rounding_layer(cls: type) -> bool:
    """One of transformers' own cache layer types (in cache_utils, a module of its own, or a model's file)
    whose `update` qk-attn has not read to return the new keys as given (Fp8QuantizedLayer rounds them).
    A caller's own layer type is theirs, as their cache is."""
    return (
        issubclass(cls, cache_utils.CacheLayerMixin)  # attention layers: not DummyLayer, not linear attention
        and cls.__module__.partition(".")[0] == "transformers"
        and cls.update not in _vetted_updates()
    )
