"""What the call stack says while transformers builds a forward's mask: the module forward that is
building it (its token ids, positions and cache), whether a vision or audio tower builds it, and the
decoder stack whose hooks tell the forward's end. The generation method running it: generation_frames.

These read frame locals of transformers (named and checked in qk_attn.capture.facts): `self`,
`input_ids`, `position_ids`, `cache` / `past_key_values`, `pixel_values`, `mm_encoder_outputs`.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import NamedTuple

import torch

from qk_attn.capture.fact_checks_inputs import IMAGE_INPUTS
from qk_attn.errors import CaptureError

# Also a forward with images: videos, and vision states handed in already encoded (Mllama's text model)
VISION_STATES = ("pixel_values_videos", "cross_attention_states")


class ModelForward(NamedTuple):
    """The model forward that is building its mask: the module and its own arguments."""

    module: torch.nn.Module | None
    input_ids: torch.Tensor | None
    position_ids: torch.Tensor | None
    cache: object | None
    images: bool  # an enclosing forward was given pixel values
    # The frame that builds the mask has a `position_ids` of its own (its value may be None): without one
    # (a release that renamed it), positions its layers get came from elsewhere and cannot be checked.
    numbers_positions: bool
    code: object = None  # that frame's code: `renumbered_positions` reads its `position_ids` again
    depth: int = 0  # that frame's place on the stack, counted from its bottom (`encloses_this_call`)
    outermost: torch.nn.Module | None = None  # the outermost module whose forward encloses it (the model called)
    attention_mask: object = None  # that frame's own `attention_mask` (mask_checks compares the mask call's with it)


def _has_images(local: dict) -> bool:
    """Whether a frame's locals hold images, as arguments or in its `**kwargs` (generate()'s input
    preparation, which builds the mask for a static cache, gets them there)."""
    kwargs = local.get("kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    return any(local.get(name) is not None or kwargs.get(name) is not None for name in (*IMAGE_INPUTS, *VISION_STATES))


def model_forward(callers: list[MethodFrame], batch_size: int, num_new: int) -> ModelForward:
    """The module forward that is building its mask right now, with its arguments.

    The mask function's callers are transformers' mask builders, called by a module's own forward
    (the decoder stack, a multimodal wrapper, or generate()'s input preparation); that frame holds
    the forward's `position_ids` (already defaulted to what its rotary embedding uses) and its cache
    (already created when the caller gave none). Token ids come from the nearest enclosing module
    forward that has this forward's (B, T) `input_ids`: wrappers hand their text model embeddings.
    The whole stack is read (wrappers and hooks only add frames, and an enclosing forward's images
    missed would let a forward with images be recorded), but only the `forward` frames of modules that
    contain the one building the mask: another model whose method runs this one (a guide model inside
    a generate()) holds its own token ids and images, and generate()'s own frames hold the running
    sequences (a model run on embeddings from its own logits processor is not given them)."""
    module = positions = ids = cache = code = builder = outermost = own_mask = None
    images = numbers_positions = False
    for frame, local, this, _ in callers:
        if not isinstance(this, torch.nn.Module):
            continue
        if module is None or (this is module and not numbers_positions and _forward_above_helper(frame, builder)):
            # (a helper method of the module that built the mask without its positions: its forward holds them)
            module, positions, cache, builder = this, local.get("position_ids"), cache_of(local), frame
            own_mask = local.get("attention_mask")
            numbers_positions, code = "position_ids" in frame.f_code.co_varnames, frame.f_code
        elif not contains(this, module) or frame.f_code.co_name != "forward":
            continue  # generate()'s frames hold the running sequences, not this forward's tokens
        outermost = this
        candidate = local.get("input_ids")
        if ids is None and isinstance(candidate, torch.Tensor) and candidate.shape == (batch_size, num_new):
            ids = candidate
        images = images or _has_images(local)
        # generate() encodes images before the first forward and hands the model their features
        encoded = local.get("mm_encoder_outputs")
        images = images or (isinstance(encoded, dict) and any(v is not None for v in encoded.values()))
    positions = positions if isinstance(positions, torch.Tensor) else None
    depth = _depth(builder) if builder is not None else 0
    return ModelForward(module, ids, positions, cache, images, numbers_positions, code, depth, outermost, own_mask)


def _forward_above_helper(frame, builder) -> bool:
    return frame.f_code.co_name == "forward" and builder.f_code.co_name != "forward"


def _depth(frame) -> int:
    """How many frames lie below `frame` on its stack."""
    depth = 0
    while (frame := frame.f_back) is not None:
        depth += 1
    return depth


def _stack(frame) -> list:
    """`frame` and its callers, innermost first."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def encloses_this_call(module: torch.nn.Module, depth: int) -> bool:
    """Whether this thread is inside a method of `module` whose frame is `depth` frames above the stack's
    bottom (where a forward built its mask), with another module's method running inside it (a layer, a
    hook's model): a forward started from a hook or callback within that one. A new call of `module` after
    that one returned (or raised) may take the same place on the stack, but only its own methods and
    transformers' mask builders run inside it then."""
    stack = _stack(sys._getframe(1))
    if depth >= len(stack) or stack[-1 - depth].f_locals.get("self") is not module:
        return False
    inside = (f.f_locals.get("self") for f in _method_frames_of(stack[: -1 - depth]))
    return any(isinstance(this, torch.nn.Module) and this is not module for this in inside)


def renumbered_positions(code, module, taken, num_new: int) -> torch.Tensor | None:
    """The positions the running forward of `code` (whose `self` is `module`) bound to `position_ids` after
    it built its mask, when they are new (`taken`: what it held then); None when they are not. Read inside
    the forward, after its rotary embedding ran: BioGPT numbers its tokens there, and a release may make
    them padding-aware, handing those to its RoPE and layers. What is no positions (BART-style decoders
    reuse the name for their position embeddings) or None (dropped after use) is not new positions."""
    now = None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            local = frame.f_locals  # (a copy of the frame's variables, made at each read)
            if local.get("self") is module:
                now = local.get("position_ids")
                break
        frame = frame.f_back
    if now is taken or not isinstance(now, torch.Tensor) or now.is_floating_point():
        return None
    if now.dim() > 2 or now.shape[-1] != num_new:
        raise CaptureError(
            f"qk_sniff: {type(module).__name__}.forward gave its position_ids a {tuple(now.shape)} tensor after it "
            f"built the attention mask, for a forward of {num_new} new tokens: the positions its rows would be "
            "keyed by could not be told; not recorded"
        )
    return now


_contained: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the submodules found in it


def contains(model: torch.nn.Module, module: torch.nn.Module) -> bool:
    """Whether `module` is `model` or one of its submodules. A module found is remembered per model (a
    forward asks once per frame); one not found is looked for again, as it may be put in later."""
    if model is module:
        return True
    found = _contained.setdefault(model, weakref.WeakSet())
    if module not in found and any(child is module for child in model.modules()):
        found.add(module)
    return module in found


def building_model(callers: list[MethodFrame] | None, max_depth: int = 16):
    """The transformers model (a PreTrainedModel: the decoder stack, or a wrapper) whose forward is
    building the mask right now, within `max_depth` frames of the mask call; None when no frame of one
    is found. `callers`: the mask call's `method_frames`, or None (capture off) to read its caller's few frames."""
    from transformers import PreTrainedModel

    if callers is not None:
        return next((f.this for f in callers if f.height < max_depth and isinstance(f.this, PreTrainedModel)), None)
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        this = frame.f_locals.get("self")
        if isinstance(this, PreTrainedModel):
            return this
        frame = frame.f_back
    return None


def tower_of(config, callers: list[MethodFrame]) -> str | None:
    """The attribute (`vision_config`, `audio_config`, ...) under which a model running on the call stack
    (in any method: generate() encodes images before the first forward, in get_image_features) keeps
    `config`, when that is not its language model's config (`get_text_config(decoder=True)`, fact
    `text_config_lookup`); None for a language model and for a config no enclosing model holds (an
    assistant model run from another model's generate()). Vision and audio towers build masks and may
    number their layers; their rows are no text positions. The whole stack is read (a tower missed
    would be recorded as text layers)."""
    from transformers import PreTrainedModel

    for frame in callers:
        outer = frame.this.config if isinstance(frame.this, PreTrainedModel) else None
        if outer is not None and config is not outer and config is not outer.get_text_config(decoder=True):
            name = next((name for name, value in vars(outer).items() if value is config), None)
            if name is not None:
                return name
    return None


def outermost_forward(inner: torch.nn.Module) -> torch.nn.Module | None:
    """The outermost module whose forward runs now in this thread around `inner` (the model the caller
    called: a causal LM around its decoder stack, or a wrapper of it); None when that is `inner` itself."""
    return next(iter(enclosing_forwards(inner, method_frames(sys._getframe(1)))[-1:]), None)


def enclosing_forwards(inner: torch.nn.Module, callers: list[MethodFrame]) -> list[torch.nn.Module]:
    """The modules whose forward runs now around `inner` (among `callers`, `method_frames`), innermost first."""
    found = []
    for method, _, this, _ in callers:
        if method.f_code.co_name == "forward" and isinstance(this, torch.nn.Module) and this is not inner:
            if this not in found and contains(this, inner):
                found.append(this)
    return found


def _method_frames_of(frames: list):
    return (f for f in frames if "self" in f.f_code.co_varnames or "self" in f.f_code.co_freevars)


class MethodFrame(NamedTuple):
    """A frame on the stack that has a `self`, with its locals as read once."""

    frame: object
    local: dict
    this: object  # its `self`
    height: int  # frames between the stack's start and it (0: the start itself)


def method_frames(frame) -> list[MethodFrame]:
    """`frame` and its callers that have a `self`, innermost first, each one's locals read once: reading them
    copies them, and a mask call's checks (`building_model`, `tower_of`, `model_forward`,
    `generation_frames`) all read the same frames. Taken once per mask call, inside it."""
    found, height = [], 0
    while frame is not None:
        code = frame.f_code
        if "self" in code.co_varnames or "self" in code.co_freevars:
            local = frame.f_locals
            found.append(MethodFrame(frame, local, local.get("self"), height))
        frame, height = frame.f_back, height + 1
    return found


def cache_of(arguments: dict):
    """The cache among a forward's arguments (`cache` from transformers 5.25, `past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        value = arguments.get(name)
        if value is not None and hasattr(value, "get_seq_length"):
            return value
    return None


def decoder_stack(module: torch.nn.Module | None, config) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(owner, last layer): the module whose forward runs the decoder layers of `config`'s attention
    modules (a child ModuleList holds them), and the layer that runs last. Found by structure, not by
    attribute names, inside `module` (the module that built the mask, or one enclosing the stack)."""
    if module is None:
        return None, None
    for owner in module.modules():
        for child in owner.children():
            if not isinstance(child, torch.nn.ModuleList) or not len(child):
                continue
            layers = list(child)[: getattr(config, "num_hidden_layers", None) or len(child)]
            if any(
                getattr(m, "config", None) is config and getattr(m, "layer_idx", None) is not None
                for layer in layers
                for m in layer.modules()
            ):
                return owner, layers[-1]
    return None, None


def running_encoder_decoder():
    """The encoder-decoder model whose forward runs in this thread, if any (read where a call is refused, to
    name that cause: T5Gemma's encoder and decoder have configs of their own, not an encoder-decoder's)."""
    from transformers import PreTrainedModel

    frame = sys._getframe(1)
    while frame is not None:
        this = frame.f_locals.get("self")
        if isinstance(this, PreTrainedModel) and getattr(this.config, "is_encoder_decoder", False):
            return this
        frame = frame.f_back
    return None


def running_in(module: torch.nn.Module, thread: threading.Thread | None = None) -> bool:
    """Whether `module`'s forward is on the call stack of `thread` (None: this thread), at any depth."""
    thread = thread or threading.current_thread()
    frame = sys._getframe(1) if thread is threading.current_thread() else sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_locals.get("self") is module:
            return True
        frame = frame.f_back
    return False


def cache_length(cache) -> int | None:
    """Tokens a transformers cache holds, as the host knows them: `get_seq_length()` where it is an int
    (dynamic caches, full and sliding layers; fact `cache_lengths`); None when unknown (a static
    cache gives a device tensor)."""
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        return None
    try:
        held = get()
    except Exception:  # noqa: BLE001 - a cache of a model's own kind: its length is not ours to judge
        return None
    return held if type(held) is int else None
