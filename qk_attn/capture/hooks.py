"""Add "qk_sniff" to transformers' attention and mask registries (idempotent), watch the cache
methods that move rows and generate()'s failures, and, on request, record flash attention under its
own name."""

from __future__ import annotations

import functools
import logging
import sys
import threading
import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from qk_attn import config as sniff_config
from qk_attn.capture.attention import attend_and_capture, qk_sniff_attention
from qk_attn.capture.backends import check_backend_support, mask_function
from qk_attn.capture.caches import watch_row_moves
from qk_attn.capture.calls import run_last, watch_call
from qk_attn.capture.concurrency import starting
from qk_attn.capture.frames import building_model, decoder_stack, enclosing_forwards, method_frames, tower_of
from qk_attn.capture.modeling_checks import check_modeling_file
from qk_attn.capture.name_branches import follow_wrapped_backend
from qk_attn.capture.rotary_positions import refuse_stack_rotary_positions
from qk_attn.capture.transforms import active_transform, refuse_transformed_forward
from qk_attn.errors import CaptureError

NAME = "qk_sniff"

logger = logging.getLogger(__name__)


@torch.compiler.disable
def qk_sniff_mask(*args, **kwargs):
    """The mask of the wrapped backend, after the forward's capture context is noted. Every forward,
    capture on or off, first has the model's branches on the implementation's name take the
    wrapped backend's path (or refuses the model, also for a branch qk-attn does not know), so
    logits stay the backend's bit for bit. The facts come before those checks (capture off: an error of theirs).
    Kept out of compiled graphs: it reads the stack's frames, which dynamo cannot trace."""
    from qk_attn.capture.active import current_config, current_session, note_uncaptured_forward
    from qk_attn.capture.facts import mismatch_at_import, require

    callers = None
    if current_session() is not None:
        refuse_transformed_forward()  # (before the facts: an export patches what they check)
        require()  # first (once per process): a release that moved what the checks below read is named
        callers = method_frames(sys._getframe(0))  # what the checks of this mask call read of the stack
    elif (builder := _module_frame(sys._getframe(1))) is not None:
        note_uncaptured_forward(kwargs.get("config"), builder)  # (a session opened mid-way is not its)
        watch_uncaptured(builder, kwargs.get("config"))
    backend, config = current_config().backend, kwargs.get("config")
    try:
        check_modeling_file(config)
        check_backend_support(building_model(callers), backend)
        follow_wrapped_backend(config, backend)
    except CaptureError:
        raise
    except Exception as error:  # (capture off) a release qk-attn was not made for: named in one line, if so
        raise mismatch_at_import(error) from error
    return _noting_context(mask_function(backend), *args, _callers=callers, **kwargs)


def _module_frame(frame):
    """The innermost frame of a module's method above `frame`: the forward building the mask."""
    while frame is not None:
        if "self" in frame.f_code.co_varnames and isinstance(frame.f_locals.get("self"), torch.nn.Module):
            return frame
        frame = frame.f_back
    return None


@torch.compiler.disable
def _noting_context(mask_fn, *args, _callers=None, **kwargs):
    """`mask_fn`'s mask, given transformers' arguments as they came. Without a registered mask,
    transformers would hand "qk_sniff" no mask at all, silently losing padding and sliding windows.

    transformers calls it once per forward and mask kind before any layer: the capture
    context of the forward is established here (qk_attn.capture.forward). Kept out of compiled
    graphs so that it runs every forward, not once at trace time. `_callers`: the mask call's
    `method_frames`, when `qk_sniff_mask` took them (flash attention's mask calls this directly)."""
    from qk_attn.capture.active import current_session

    session = current_session()
    if session is not None:
        # Before binding the arguments: a release that renamed one is named as the broken fact
        # (mask_call_keywords), not a TypeError. Capture off, the model runs as its backend would.
        session.require_facts()
        if args:  # (which value is which would be guessed from a signature the caller may not share)
            raise CaptureError(
                f"qk_sniff: a mask function was called with {len(args)} positional argument(s); qk-attn reads the "
                "mask arguments by keyword, as transformers passes them (fact mask_call_keywords): not recorded"
            )
        callers = _callers if _callers is not None else method_frames(sys._getframe(0))
        _note(session, mask_fn, callers, **kwargs)
    mask = mask_fn(*args, **kwargs)
    if mask is None and session is not None:  # a stack that gets None then takes it as its mask (on_forward_start)
        session.on_mask_skipped(kwargs.get("config"))
    return mask


def _note(
    session,
    mask_fn,
    callers,
    *,
    batch_size,
    q_length,
    kv_length,
    q_offset=0,
    kv_offset=0,
    attention_mask=None,
    **kwargs,
) -> None:
    """The forward's capture context, from the mask function's arguments (fact mask_call_keywords)."""
    config = kwargs.get("config")
    check_recorded(config, mask_fn)
    tower = tower_of(config, callers)
    if tower is not None:  # a vision or audio tower's forward: not a text forward, nothing recorded
        session.on_tower_mask(config, tower)
        return
    local_size = kwargs.get("local_size")  # the window of a sliding (or chunked) mask kind
    with starting(session, config):
        session.on_mask(
            config, batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask, local_size, callers=callers
        )


# stack -> the id of its start hook, and [the id of its end hook] (`_end_hook` may register that one again)
_watched: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, list[int]]] = weakref.WeakKeyDictionary()
_first_forward_hooks: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()


def watch_forward(owner: torch.nn.Module | None, last_layer: torch.nn.Module | None, config) -> bool:
    """Have every forward of the decoder stack `owner` report its start and end to the active session
    (`Session.on_forward_start`, `on_forward_end`). Returns True when the hooks were registered now.

    torch decides whether to call a module's hooks when its call starts, so when this runs during a
    forward of `owner` (its first), the stack's own hooks report from its next forward on. That first
    forward's end is reported by what the stack runs after its layers, found by structure: its last
    layer's return (`on_layers_done`), then each direct child of the stack that runs after it (the
    final norm, whatever its name: `on_tail_start`, `on_tail_end`). Those hooks are removed when the
    stack's own start is first reported."""
    if owner is None:
        return False
    if owner in _watched:  # hooks cleared by another tool (as some profilers do when they clean up), either of
        started_id, ended = _watched[owner]  # the two: registered again, both, so that every start has its end
        if started_id in owner._forward_pre_hooks and ended[0] in owner._forward_hooks:
            return False
        owner._forward_pre_hooks.pop(started_id, None)
        owner._forward_pre_hooks_with_kwargs.pop(started_id, None)
        owner._forward_hooks.pop(ended[0], None)
    # The end hook's id travels with the start hook (a deep copy of the model keeps both, under the same ids).
    ended = [owner.register_forward_hook(functools.partial(_forward_ended, config)).id]
    started = owner.register_forward_pre_hook(functools.partial(_forward_started, config, ended), with_kwargs=True)
    handles = []
    if last_layer is not None:
        handles.append(last_layer.register_forward_hook(functools.partial(_report, "on_layers_done", config)))
    for child in owner.children():
        if not isinstance(child, torch.nn.ModuleList):
            handles.append(child.register_forward_pre_hook(functools.partial(_report, "on_tail_start", config)))
            handles.append(child.register_forward_hook(functools.partial(_report, "on_tail_end", config)))
    _first_forward_hooks[owner] = handles
    _watched[owner] = (started.id, ended)
    return True


_stacks: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()  # builder -> its stack


def watch_uncaptured(frame, config) -> None:
    """A forward with capture off registers what tells a recorded forward's end, as a recorded one does
    (`ForwardTracker.on_mask`, `_find_end`): the decoder stack's hooks, and the hooks of the model call around it
    (each module the caller calls). Else the model's first recorded call, after any number of forwards with
    capture off, would have the hole only the very first call after loading has (a call that raised after its
    stack returned, committed). `frame`: the mask call's caller. Vision and audio towers are none of it."""
    if config is None:
        return
    builder, callers = frame.f_locals["self"], method_frames(frame)
    if tower_of(config, callers) is not None:
        return
    if builder not in _stacks:
        _stacks[builder] = decoder_stack(builder, config)
    owner, last_layer = _stacks[builder]
    if owner is not None:
        watch_forward(owner, last_layer, config)
        for outer in enclosing_forwards(owner, callers):  # a causal LM called later without this wrapper, too
            watch_call(outer, config)


@torch.compiler.disable
def _forward_started(config, ended: list[int], module, _args, kwargs) -> None:
    from qk_attn.capture.active import current_session

    _keep_end_hook(module, config, ended)
    run_last(module, ended[0])  # a hook of the user's on the stack that raises stops the forward before its end

    session = current_session()
    if session is not None:
        refuse_transformed_forward()  # (before an earlier forward is handed off inside the transform)
        # May refuse this forward (another thread is inside the model's first forward, whose end
        # only the hooks below report): they are removed only once a forward has started.
        with starting(session, config):
            refuse_stack_rotary_positions(module)  # (before anything of this forward is noted)
            session.on_forward_start(config, kwargs)
    if module in _first_forward_hooks and not _first_forward_elsewhere(config):
        for handle in _first_forward_hooks.pop(module):  # the stack's own hooks report from now on
            handle.remove()


def _keep_end_hook(module, config, ended: list[int]) -> None:
    """The stack's end hook, registered again where another tool cleared its forward hooks only (torch reads them
    after the forward, so it reports this forward's end too): every start has its end."""
    if ended[0] not in module._forward_hooks:
        ended[0] = module.register_forward_hook(functools.partial(_forward_ended, config)).id


def _first_forward_elsewhere(config) -> bool:
    """Whether another thread runs the model's first recorded forward, whose end only the first-forward hooks
    tell (its stack's own start hook came too late for it): they stay until it is over."""
    from qk_attn.capture.active import open_sessions

    for session in open_sessions():
        forward = session._current(config)
        if forward is not None and not forward.armed and forward.thread_id != threading.get_ident():
            if forward.in_progress():
                return True
    return False


@torch.compiler.disable
def _forward_ended(config, _module, _args, _output) -> None:
    from qk_attn.capture.active import existing_session

    # (existing: an end makes no default session, and in a forked child the start's refusal is not raised twice)
    session = existing_session()
    # (a closed session, or a transform, refused the forward at its start)
    if session is not None and not session.closed and active_transform() is None:
        session.on_forward_end(config)


@torch.compiler.disable
def _report(event: str, config, *_hook_args) -> None:
    from qk_attn.capture.active import existing_session

    session = existing_session()
    if session is not None and not session.closed and active_transform() is None:
        getattr(session, event)(config)


def register() -> None:
    """Register "qk_sniff" (attention and mask functions) with transformers, and the watchers of cache row moves
    and generate(); `import qk_attn` calls it."""
    AttentionInterface.register(NAME, qk_sniff_attention)
    AttentionMaskInterface.register(NAME, qk_sniff_mask)
    watch_row_moves()
    watch_generate()


def watch_generate() -> None:
    """A generate() that raises (a logits processor, a stopping criterion, an interrupt between two
    steps) stopped its sequences part-way: the session forgets what its forwards extended, as it does
    for a forward stopped part-way. Wrapped on GenerationMixin.generate, which every model's generate()
    is or calls (idempotent)."""
    from transformers.generation.utils import GenerationMixin

    generate = GenerationMixin.generate
    if getattr(generate, "_forgets_when_raising", False):
        return

    @functools.wraps(generate)
    def generate_or_forget(model, *args, **kwargs):
        from qk_attn.capture.active import generation_ends, generation_starts

        generation = generation_starts()  # the session it records into, from start to end (qk_attn.capture.active)
        returned = False
        try:
            output = generate(model, *args, **kwargs)
            returned = True
            return output
        except BaseException:
            session = generation.session  # None: it recorded nothing; closed: closing dropped what it extended
            if session is not None and not session.closed:
                try:  # only what this thread extended since: not another thread's, nor a nested generate()'s
                    session.drop_open_sequences("generate() raised", since=generation.since, kept=generation.inner_done)
                except Exception as error:  # noqa: BLE001 - the generate()'s own error is the one to raise
                    logger.warning("qk-attn: could not forget what the failed generate() recorded: %r", error)
            raise
        finally:
            generation_ends(generation, returned)

    generate_or_forget._forgets_when_raising = True
    GenerationMixin.generate = generate_or_forget


FLASH = "flash_attention_2"


def wrap_flash_attention() -> None:
    """Record models that run flash attention (idempotent): `flash_attention_2/3/4`, and the Hub
    kernels transformers swaps in for them (`kernels-community/flash-attn2` when flash-attn is absent),
    which it registers with the flash mask function.

    transformers recognises flash attention by its name (generate()'s mask handling,
    chunked-attention guards, which kernel to load), so a wrapper under another name would
    take non-flash branches. This replaces transformers' own entries with the same functions
    plus capture; outside a session they only add a lookup. A Hub kernel registered later (at
    model load) gets our flash mask, and its attention is wrapped at its first mask call.
    Opt-in because it changes registry entries that are not ours."""
    for name, mask in list(AttentionMaskInterface._global_mapping.items()):
        if name.startswith("flash_attention") or mask is flash_attention_mask:
            _wrap(name)


def _wrap(name: str) -> None:
    attention = AttentionInterface._global_mapping.get(name)
    if attention is None or _records(name):
        return
    AttentionInterface.register(name, functools.partial(attend_and_capture, attention))
    mask = AttentionMaskInterface._global_mapping.get(name, flash_attention_mask)  # the registered one, as for sdpa
    if not (isinstance(mask, functools.partial) and mask.func is _noting_context):  # a copy of ours: kept
        AttentionMaskInterface.register(name, functools.partial(_noting_context, mask))


def _records(name: str) -> bool:
    """Whether the attention registered under `name` records (is ours)."""
    attention = AttentionInterface._global_mapping.get(name)
    return attention is qk_sniff_attention or getattr(attention, "func", None) is attend_and_capture


sniff_config.backend_records = _records  # QK_SNIFF_BACKEND and session(backend=...) take flash once it records


def check_recorded(config, mask_fn) -> None:
    """At the mask call of a forward inside an active session: the model's attention records. A Hub
    kernel that transformers registered with our flash mask (it copies the "flash_attention_2" entry)
    is wrapped now, before its layers look it up; anything else is refused, never recorded as nothing."""
    name = getattr(config, "_attn_implementation", None)
    if name is None or _records(name):
        return
    if mask_fn is flash_attention_mask and name in AttentionInterface._global_mapping:
        _wrap(name)
        return
    raise CaptureError(
        f"qk_sniff: the model runs the attention implementation {name!r}, which qk-attn does not "
        'wrap, so nothing would be recorded; load it with attn_implementation="qk_sniff" (or call '
        'qk_attn.wrap_flash_attention() before loading it with "flash_attention_2")'
    )
