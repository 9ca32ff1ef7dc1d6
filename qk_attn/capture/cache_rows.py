"""Caches whose batch rows were moved between forwards.

`Cache.reorder_cache` (beam search), `batch_select_indices` and `batch_repeat_interleave`
(custom decoding loops, Hub `custom_generate` strategies) give a batch row another row's history.
A sequence continued on such a cache would key each row's new tokens by the example that row held
before, so the tracker refuses the forward that continues it (`SequenceTracker._start_sequence`).
The three methods are wrapped on the `Cache` base class, which DynamicCache, StaticCache and
QuantizedCache inherit them from (fact `cache_row_methods`); each call counts one move of the
cache's rows.
"""

from __future__ import annotations

import functools
import weakref

from transformers import cache_utils

ROW_METHODS = ("reorder_cache", "batch_select_indices", "batch_repeat_interleave")

_moves: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> times its rows were moved


def row_moves(cache) -> int:
    """How many times the rows of `cache` were moved (0 for None or a cache never moved)."""
    return 0 if cache is None else _moves.get(cache, 0)


def watch_row_moves() -> None:
    """Wrap the Cache methods that move rows (idempotent)."""
    for name in ROW_METHODS:
        method = getattr(cache_utils.Cache, name)
        if getattr(method, "_counts_row_moves", False):
            continue
        setattr(cache_utils.Cache, name, _counting(method))


def _counting(method):
    @functools.wraps(method)
    def counted(cache, *args, **kwargs):
        _moves[cache] = _moves.get(cache, 0) + 1
        return method(cache, *args, **kwargs)

    counted._counts_row_moves = True
    return counted
