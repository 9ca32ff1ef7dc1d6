"""Checks of what transformers hands qk_sniff's two functions (facts mask_every_forward, mask_padding and
attention_call):
run, not read, where a release could keep the signatures and change what the values mean."""

from __future__ import annotations

import ast
import inspect

PROBE = "qk_sniff_fact_probe_{}"  # a mask name registered only while a check runs (one per call: threads
# may check the facts at once, at two models' first forwards)


def _calls(attention_mask) -> list:
    """What a causal mask built for two rows of five tokens (no cache) hands the mask function: the
    attention_mask of each call."""
    import torch
    from transformers import LlamaConfig
    from transformers.masking_utils import AttentionMaskInterface, create_causal_mask

    seen = []

    def probe(*args, **kwargs):
        seen.append(kwargs.get("attention_mask", "not passed as attention_mask="))

    name = PROBE.format(id(seen))
    config = LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    config._attn_implementation = name
    AttentionMaskInterface.register(name, probe)
    try:
        create_causal_mask(config, torch.zeros(2, 5, 8), attention_mask, None)  # (the cache: None, positionally)
    finally:
        AttentionMaskInterface._global_mapping.pop(name, None)
    return seen


def mask_every_forward() -> str | None:
    """create_causal_mask calls the mask function also for a plain causal forward (no padding, no cache):
    that call is where qk-attn learns a forward started (forwards.on_mask); a release that returns early
    instead would leave the layers' calls without their forward."""
    import torch

    for given in (None, torch.ones(2, 5, dtype=torch.long)):
        if len(seen := _calls(given)) != 1:
            return f"create_causal_mask called the mask function {len(seen)} times for attention_mask={given!r}"
    return None


def mask_padding() -> str | None:
    """create_causal_mask hands the registered mask function the 2-D attention_mask it was given as an equal
    (batch, keys) bool tensor, True for real tokens: the only place qk-attn learns which tokens are padding
    (forwards.on_mask). A release that folds the padding into mask_function (passing None), hands a 4-D
    mask, or inverts it keeps every signature: only a call tells."""
    import torch

    given = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])  # left and right padding
    seen = _calls(given)
    if len(seen) != 1:
        return f"create_causal_mask called the mask function {len(seen)} times"
    (mask,) = seen
    if not isinstance(mask, torch.Tensor):
        return f"the mask function got attention_mask={mask!r} for a padded (2, 5) attention_mask"
    if mask.dtype != torch.bool or mask.shape != given.shape or not torch.equal(mask, given.bool()):
        return f"the mask function got a {tuple(mask.shape)} {mask.dtype} attention_mask: {mask.tolist()}"
    return None


def attention_call() -> str | None:
    """Each seed attention forward calls the attention function with arguments that qk_sniff_attention
    accepts (bound against its signature: extra positional arguments, or a keyword it lacks, would fail
    or be lost in the call, not in transformers' own backends)."""
    from qk_attn.capture.attention import qk_sniff_attention
    from qk_attn.capture.fact_checks import ROTATING_CLASSES, _forward_tree, _modeling
    from qk_attn.capture.rope_syntax import attention_calls

    signature = inspect.signature(qk_sniff_attention)
    for family, name in ROTATING_CLASSES.items():
        fn = _forward_tree(getattr(_modeling(family), name)).body[0]
        calls = attention_calls(fn, fn.args.args[0].arg)
        if not calls:
            return f"{name}.forward calls no attention function with (self, query, key, value, ...)"
        for call in calls:
            if any(isinstance(a, ast.Starred) for a in call.args):
                return f"{name}.forward calls `{ast.unparse(call)}`"
            keywords = {k.arg: None for k in call.keywords if k.arg is not None}  # (`**kwargs`: any keywords)
            try:
                signature.bind(*call.args, **keywords)
            except TypeError as error:
                return (
                    f"{name}.forward calls `{ast.unparse(call)}`, which qk_sniff_attention{signature} refuses: {error}"
                )
    return None
