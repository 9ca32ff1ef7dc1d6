"""Add "qk_sniff" to transformers' attention and mask registries (idempotent), and, on request,
record flash attention under its own name."""

from __future__ import annotations

import functools
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from .backends import MASKS
from .capture import attend_and_capture, qk_sniff_attention

NAME = "qk_sniff"


def qk_sniff_mask(*args, **kwargs):
    """The mask of the wrapped backend, after the forward's capture context is noted."""
    from .session import current_config

    return _noting_context(MASKS[current_config().backend], *args, **kwargs)


@torch.compiler.disable
def _noting_context(mask_fn, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
    """`mask_fn`'s mask. Without a registered mask, transformers would hand "qk_sniff" no mask
    at all, silently losing padding and sliding windows.

    transformers calls it once per forward and mask kind before any layer: the capture
    context of the forward is established here (qk_attn.context). Kept out of compiled
    graphs so that it runs every forward, not once at trace time."""
    from .session import current_session

    session = current_session()
    if session is not None:
        session.on_mask(kwargs.get("config"), batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask)
    return mask_fn(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                   kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


_watched: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def watch_forward_end(model: torch.nn.Module | None) -> bool | None:
    """Have the end of `model`'s forwards reported to the session (`Session.on_forward_end`), so
    that a forward stopped part-way by an exception is never committed. Returns False when this
    forward's end will be reported, None when it cannot be.

    The hook goes on the model's final norm, which runs after every layer, when it has one; it is
    registered during the first forward, before the norm runs, so it reports that forward too. A
    hook on the model itself (no `norm`) reports from its next forward on: torch decides whether
    to call hooks when a module's call starts."""
    if model is None:
        return None
    norm = getattr(model, "norm", None)
    target = norm if isinstance(norm, torch.nn.Module) else model
    if target in _watched:
        return False
    target.register_forward_hook(functools.partial(_forward_ended, model.config))
    _watched.add(target)
    return False if target is norm else None


@torch.compiler.disable
def _forward_ended(config, _module, _args, _output) -> None:
    from .session import current_session

    session = current_session()
    if session is not None:
        session.on_forward_end(config)


def register() -> None:
    AttentionInterface.register(NAME, qk_sniff_attention)
    AttentionMaskInterface.register(NAME, qk_sniff_mask)


FLASH = "flash_attention_2"


def wrap_flash_attention() -> None:
    """Record models loaded with attn_implementation="flash_attention_2" (idempotent).

    transformers recognises flash attention by its name (generate()'s mask handling,
    chunked-attention guards, which kernel to load), so a wrapper under another name would
    take non-flash branches. This replaces transformers' own "flash_attention_2" entries
    with the same functions plus capture; outside a session they only add a lookup.
    Opt-in because it changes a registry entry that is not ours.
    """
    AttentionInterface.register(FLASH, functools.partial(attend_and_capture, flash_attention_forward))
    AttentionMaskInterface.register(FLASH, functools.partial(_noting_context, flash_attention_mask))
