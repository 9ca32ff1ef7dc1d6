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


def watch_forward(owner: torch.nn.Module | None, last_layer: torch.nn.Module | None, config) -> bool:
    """Have every forward of the decoder stack `owner` report its start and end to the active session
    (`Session.on_forward_start`, `on_forward_end`), and its last layer its return (`on_layers_done`).
    Returns True when the hooks were registered now (during a forward that has already started:
    torch decides whether to call a module's hooks when its call starts, so the stack's own hooks
    report from its next forward on, and this one's end is its last layer's return)."""
    if owner is None or owner in _watched:
        return False
    owner.register_forward_pre_hook(functools.partial(_forward_started, config), with_kwargs=True)
    owner.register_forward_hook(functools.partial(_forward_ended, config))
    if last_layer is not None:
        last_layer.register_forward_hook(functools.partial(_layers_done, config))
    _watched.add(owner)
    return True


@torch.compiler.disable
def _forward_started(config, _module, _args, kwargs) -> None:
    from .session import current_session

    session = current_session()
    if session is not None:
        session.on_forward_start(config, kwargs)


@torch.compiler.disable
def _forward_ended(config, _module, _args, _output) -> None:
    from .session import current_session

    session = current_session()
    if session is not None:
        session.on_forward_end(config)


@torch.compiler.disable
def _layers_done(config, _module, _args, _output) -> None:
    from .session import current_session

    session = current_session()
    if session is not None:
        session.on_layers_done(config)


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
