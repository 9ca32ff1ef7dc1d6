"""Whether the 2-D attention_mask the mask function was given says which of a forward's tokens are real.

It is the only place qk-attn learns which tokens are padding (forwards.on_mask); transformers builds
the attention from it and from whatever it folds into its mask function, so a mask that says something
else (none, a 4-D one, an inverted one) leaves the logits right and the rows wrong. The fact
mask_padding checks what create_causal_mask hands over once per process; these check each forward:
its shape against the forward's tokens, and against the `attention_mask` the model forward building
the mask was given (a model or remote code that builds its mask otherwise than the fact saw).
"""

from __future__ import annotations

import torch

from qk_attn.errors import CaptureError


def refuse_other_padding(given, own, builder, host: bool) -> None:
    """Refuse a forward whose model forward (`builder`) holds a 2-D `attention_mask` (`own`) that the mask
    function was not given as the same (batch, keys) bool mask (`given`). A shape and dtype check (and an
    identity, for a bool mask given as it is); the values are compared only where both lie on the host
    (`host`) with the same shape: on a GPU that would be a device read per forward, and the fact covers a
    release."""
    if not (isinstance(own, torch.Tensor) and own.dim() == 2) or given is own:
        return  # (no 2-D mask of its own: none, prepared 4-D masks, another name)
    if isinstance(given, torch.Tensor) and given.dim() == 2 and given.dtype == torch.bool:
        # (another 2-D shape: a model that hands its builder a slice of its mask; refuse_mask_shape judges it)
        if not host or given.shape != own.shape or given.device != own.device or torch.equal(given, own != 0):
            return
        found = "a mask that marks other tokens as padding"
    else:
        found = (
            f"a {tuple(given.shape)} {given.dtype} mask"
            if isinstance(given, torch.Tensor)
            else "None"
            if given is None
            else f"a {type(given).__name__}"
        )
    import transformers

    raise CaptureError(
        f"qk_sniff: {type(builder).__name__}.forward was given a {tuple(own.shape)} attention_mask, but its mask "
        f"function was handed {found} (transformers {transformers.__version__}); qk-attn reads which tokens are "
        "padding from that one (fact mask_padding), so it could not tell them; not recorded"
    )


def refuse_mask_shape(mask: torch.Tensor | None, batch_size: int, past: int, num_new: int) -> None:
    """The 2-D mask must have one row per batch row and cover exactly the cache's tokens and the new ones:
    validity is read from its last `num_new` columns. transformers accepts other shapes (it broadcasts
    another number of rows, reads the first columns it needs and pads a short mask with 0: a decode loop
    that did not extend its mask masks its new tokens), so another shape would label other tokens real or
    padding than attention did."""
    if mask is not None and mask.shape[0] != batch_size:
        raise CaptureError(
            f"qk_sniff: the 2-D attention_mask has {mask.shape[0]} rows for a batch of {batch_size}, so it does not "
            f"say which tokens of each row are real; pass a mask of shape ({batch_size}, {past + num_new}); "
            "not recorded"
        )
    if mask is not None and mask.shape[-1] != past + num_new:
        longer = (
            f", or the cache said it held {past} tokens where it holds more (a cache that reads its length from a "
            "layer holding no keys, as MiniMax's with linear attention first, says 0)"
            if mask.shape[-1] > past + num_new
            else ""
        )
        raise CaptureError(
            f"qk_sniff: the 2-D attention_mask has {mask.shape[-1]} columns, but this forward's keys are the "
            f"cache's {past} tokens and its {num_new} new ones ({past + num_new}), so it does not say which new "
            f"tokens are real; pass a mask of exactly {past + num_new} columns (extend it by the new tokens at "
            f"every step, as generate() does){longer}; not recorded"
        )
