"""Which queries a layer got when it got fewer than its forward's new tokens.

Gemma 4's KV-shared layers (and Gemma 4 Unified's) get only the last `logits_to_keep` queries from
transformers 5.25 on: their model's `_maybe_slice_kv_shared_inputs` slices the hidden states, cos/sin and
masks with `slice(-logits_to_keep, None)`. Nothing an attention call receives says which queries it got
(`position_ids` are the forward's; sdpa's mask may be None), so a call with fewer queries is recorded as the
last ones only where that method was read and slices the last ones; anywhere else it is refused, never keyed
by guessed positions.
"""

from __future__ import annotations

import inspect
import sys

from qk_attn.capture.name_branches import modeling_name
from qk_attn.errors import CaptureError

# modeling module -> (class, method) that gives a model's layers only the last queries of a forward
LAST_QUERY_SLICERS = {
    "transformers.models.gemma4.modeling_gemma4": ("Gemma4TextModel", "_maybe_slice_kv_shared_inputs"),
    "transformers.models.gemma4_unified.modeling_gemma4_unified": (
        "Gemma4UnifiedTextModel",
        "_maybe_slice_kv_shared_inputs",
    ),
}
SLICES_LAST = "slice(-logits_to_keep, None)"  # what the method must slice with

_refusals: dict[str, str | None] = {}  # modeling module -> its refusal (None: it slices the last queries)


def note_unseen(forward, staging, layer: int, everything, num_queries: int, warn_once) -> None:
    """A layer given only the last `num_queries` queries: the positions it did not get, per example, for the
    manifest (`staging.unseen`). One host read per forward (on a GPU, a sync: such forwards are prefills,
    where it is small against the forward's work)."""
    spans = forward.unseen.get(num_queries)
    if spans is None:
        refuse_unread_query_slicing(forward.config, layer, num_queries, forward.num_new)
        spans = forward.unseen[num_queries] = everything.unseen(num_queries)
        warn_once(
            "unseen",
            f"qk-attn: layer {layer} was given only the last {num_queries} of the forward's {forward.num_new} "
            "queries (Gemma 4's KV-shared layers, from transformers 5.25): the positions it did not get are not "
            "recorded; a folder's manifest lists them per example (`unseen_queries`), where verify and the card "
            "account for them",
        )
    staging.unseen.extend((example, layer, *span) for example, span in zip(forward.example_ids, spans) if span)


def refuse_unread_query_slicing(config, layer: int, num_queries: int, num_new: int) -> None:
    """CaptureError (one line) unless `config`'s model is known to give its layers the last queries."""
    modeling = modeling_name(type(config))
    if modeling not in _refusals:
        _refusals[modeling] = _refusal(modeling)
    if (why := _refusals[modeling]) is not None:
        raise CaptureError(
            f"qk_sniff: layer {layer} got {num_queries} of its forward's {num_new} queries; {why}, so which "
            "positions they are is not known; not recorded"
        )


def _refusal(modeling: str) -> str | None:
    if modeling not in LAST_QUERY_SLICERS:
        return f"qk-attn knows which queries a layer gets only in {_known()}"
    class_name, method_name = LAST_QUERY_SLICERS[modeling]
    method = getattr(getattr(sys.modules.get(modeling), class_name, None), method_name, None)
    try:
        source = inspect.getsource(inspect.unwrap(method)) if method is not None else ""
    except (OSError, TypeError):
        source = ""
    if SLICES_LAST.replace(" ", "") not in source.replace(" ", ""):
        return f"{class_name}.{method_name} does not slice them with {SLICES_LAST} as the release qk-attn read did"
    return None


def _known() -> str:
    return " and ".join(f"{cls}.{method}" for cls, method in LAST_QUERY_SLICERS.values())
