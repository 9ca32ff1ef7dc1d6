"""The generation method on the call stack while a forward builds its mask (read from the mask call's
`frames.method_frames`): refused when its steps cannot be one sequence (beam search, assisted decoding,
use_cache=False, a decoding method qk-attn does not know), else which step of it this forward is.

These read code names and locals of transformers' generation/utils.py (named and checked in
qk_attn.capture.facts): `_sample`, `_prefill`, `_assisted_decoding`, `_beam_search`, `model_kwargs`,
`unfinished_sequences`, `has_eos_stopping_criteria`, and generate()'s `decoding_method` and `custom_generate`.
"""

from __future__ import annotations

import inspect
import os

import torch

from qk_attn.capture.frames import MethodFrame, contains
from qk_attn.errors import CaptureError

GENERATION_FILE = os.path.join("generation", "utils.py")


def refuse_unrecordable_generation(callers: list[MethodFrame], builder):
    """Generation whose steps cannot be recorded as one sequence, found by the generation method
    on the call stack (once per forward), at any depth: wrappers and hooks between generate() and the
    mask only add frames, and a refusal or the padding rule missed there would record wrong rows. Only
    a generation method of a model that contains `builder` (the module building this forward's mask)
    counts: a model run inside another model's generate() (a guide model in a logits processor, even
    one built on the same config) is not that generation's step.

    Beam search reorders the cache rows between steps, so a batch row's earlier keys belong to another
    beam's history. Without a cache every step
    re-runs the whole sequence, which would record it again as a new example per token. Assisted
    decoding (an assistant model, prompt lookup, early exit) verifies draft tokens in one forward
    and crops the rejected ones from the cache after it returned, its rows already taken.

    Returns generate()'s (B,) `unfinished_sequences` of this step (a device tensor), or None when
    there is none or it does not pad finished rows (no EOS stopping criterion);
    whether this forward is a step of its decoding loop rather than of its prefill (`_prefill`,
    which feeds only the caller's tokens, also when it continues an earlier generate()'s cache); and
    whether it drafts for early-exit assisted decoding (not recorded: the verifying forward that
    follows is refused, once transformers has restored the layer count the draft ran with)."""
    _refuse_unknown_decoding(callers, builder)
    prefill = False
    for frame, local, this, _ in callers:  # (generation's methods all have a `self`)
        name = frame.f_code.co_name
        in_generation = frame.f_code.co_filename.endswith(GENERATION_FILE)
        if in_generation and name in GENERATION_METHODS and not _generates_for(this, builder):
            continue  # another model's generation
        prefill = prefill or (name == "_prefill" and in_generation)
        if name == "_beam_search":
            raise CaptureError(
                "qk_sniff: beam search reorders the cache between steps, so rows could not be "
                "attributed to one sequence; record with num_beams=1 (greedy or sampling)"
            )
        if name == "_assisted_decoding" and in_generation:
            raise CaptureError(ASSISTED)
        if name == "_sample" and in_generation:
            model_kwargs = local.get("model_kwargs")
            if isinstance(model_kwargs, dict) and model_kwargs.get("use_cache") is False:
                raise CaptureError(
                    "qk_sniff: generate(use_cache=False) re-runs the whole sequence at every step, "
                    "which would record it once per new token; generate with use_cache=True"
                )
            stop_check = local.get("stop_check")  # (set after the prefill)
            if stop_check is not None and type(stop_check).__name__ != "StopCheck":
                raise CaptureError(
                    f"qk_sniff: generate() decides to stop one step late here ({type(stop_check).__name__}, as "
                    "transformers does on MPS): its extra forward and the cache crop after it would record a token "
                    "the sequence does not keep, or discard the example; not recorded: generate on CPU or CUDA"
                )
            draft = _assistant_draft(frame, this)
            unfinished = local.get("unfinished_sequences")
            if not (isinstance(unfinished, torch.Tensor) and unfinished.dim() == 1):
                return None, False, draft
            if local.get("has_eos_stopping_criteria") is False:
                # Without an EOS criterion a finished row is fed real tokens, not padding: every row goes on.
                return None, not prefill, draft
            return unfinished, not prefill, draft
    return None, False, False


DECODING_METHODS = frozenset(("_sample", "_beam_search", "_assisted_decoding"))  # what generate() may call
GENERATION_METHODS = DECODING_METHODS | {"_prefill"}


def _refuse_unknown_decoding(callers: list[MethodFrame], builder) -> None:
    """Refuse a generate() (of a model containing `builder`) whose decoding method is none of
    DECODING_METHODS: the refusals and the padding rule above find their method by its name, so one
    renamed (greedy search's own `_greedy_search`, as before transformers 4.39) would record padding and
    use_cache=False steps. generate() picks it by name (GENERATION_MODES_MAPPING, fact generation_dispatch)
    into its local `decoding_method` before any forward of its own (image encoding, prefill), so that
    local is read rather than the frame below generate(), which may be such a helper; a caller's own
    `custom_generate` loop is not transformers' and goes on (its cache moves are watched: caches). So
    does a wrapper of a known method (a profiling patch of `_sample` without functools.wraps): the known
    method's frame lies between generate() and this forward, in its steps and its prefill alike."""
    known_below = False  # a DECODING_METHODS frame between this forward and the generate() frame above it
    for frame, local, this, _ in callers:  # (generate() and its decoding methods have a `self`)
        code = frame.f_code
        if code.co_filename.endswith(GENERATION_FILE) and code.co_name in DECODING_METHODS:
            known_below = True
        elif code.co_name == "generate" and code.co_filename.endswith(GENERATION_FILE):
            method = local.get("decoding_method")
            if (
                method is not None
                and not known_below
                and method is not local.get("custom_generate")
                and _generates_for(this, builder)
            ):
                name, filename = _code_name(method)
                if name not in DECODING_METHODS:
                    import transformers

                    raise CaptureError(
                        f"qk_sniff: generate() runs its decoding in {name}, which qk-attn does not know "
                        f"(transformers {transformers.__version__}); not recorded"
                    )
                if not filename.endswith(GENERATION_FILE):
                    # A model's own loop (CSM's, VibeVoice's): its use_cache and padding of finished rows unread.
                    raise CaptureError(
                        f"qk_sniff: generate() of {type(this).__name__} runs its own {name} ({_short(filename)}), "
                        "not transformers' generation/utils.py, which is the one qk-attn read (its use_cache and "
                        "padding of finished rows); not recorded: call the model's forward directly"
                    )
            known_below = False  # frames above belong to an enclosing generate()


def _code_name(method) -> tuple[str, str]:
    """The name and file of the code a decoding method runs (its frame's), through decorators."""
    inner = inspect.unwrap(method)
    code = getattr(inner, "__code__", None)
    if code is None:
        return getattr(inner, "__name__", type(inner).__name__), ""
    return code.co_name, code.co_filename


def _short(filename: str) -> str:
    """A file under transformers/ from there; any other whole."""
    head, marker, tail = filename.rpartition(os.sep + "transformers" + os.sep)
    return "transformers" + os.sep + tail if marker else filename


def _generates_for(model, builder) -> bool:
    """Whether the model running a generation method contains the module building this forward's mask
    (None when no module forward was found: taken as this forward's, as before)."""
    if builder is None or not isinstance(model, torch.nn.Module):
        return True
    return contains(model, builder)


ASSISTED = (
    "qk_sniff: assisted decoding (assistant_model, prompt_lookup_num_tokens, assistant_early_exit) verifies "
    "draft tokens in one forward and crops the rejected ones from the cache after it, when their rows are "
    "already taken; not recorded: generate without an assistant (greedy decoding gives the same tokens)"
)


def _assistant_draft(sample, model) -> bool:
    """A `_sample` that drafts tokens for assisted decoding: refused when an assistant model loaded
    with qk_sniff runs it; True when the model drafts for itself (early exit), whose drafts are not
    recorded and whose verifying forward is refused: a refusal inside the draft would leave the model
    with the draft's layer count (transformers restores it only when the draft returns)."""
    frame = sample.f_back
    while frame is not None:
        if frame.f_code.co_name == "_assisted_decoding" and frame.f_code.co_filename.endswith(GENERATION_FILE):
            if frame.f_locals.get("self") is not model:
                raise CaptureError(
                    "qk_sniff: this forward is assisted decoding's assistant model, loaded with qk_sniff (its "
                    "draft tokens are mostly thrown away); " + ASSISTED.removeprefix("qk_sniff: ")
                )
            return True
        frame = frame.f_back
    return False
