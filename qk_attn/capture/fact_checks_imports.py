"""The checks behind the facts about what qk-attn's own import and torch provide (qk_attn.capture.facts):
the transformers names it imports or wraps when imported, and torch's marker of a backward pass. One
function per fact, None when it holds, else what was found."""

from __future__ import annotations

import importlib

# What qk-attn imports from transformers when it is imported, and what `register()` wraps (module, attribute path).
IMPORTED_NAMES = (
    ("transformers", "AttentionInterface"),
    ("transformers", "AttentionInterface._global_mapping"),  # hooks: the registered functions, read by name
    ("transformers.masking_utils", "AttentionMaskInterface"),
    ("transformers.masking_utils", "AttentionMaskInterface._global_mapping"),
    ("transformers.masking_utils", "ALL_MASK_ATTENTION_FUNCTIONS"),
    ("transformers.masking_utils", "flash_attention_mask"),
    ("transformers.modeling_utils", "ALL_ATTENTION_FUNCTIONS"),
    ("transformers.cache_utils", "Cache"),
    ("transformers.cache_utils", "CacheLayerMixin"),  # caches: which layer types are transformers' own
    ("transformers.generation.utils", "GenerationMixin.generate"),
    ("transformers.utils.generic", "is_flash_attention_requested"),
    ("transformers.models.auto.modeling_auto", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),  # run.preflight.check_backend
)


def imported_names() -> str | None:
    """Every name of IMPORTED_NAMES exists where qk-attn takes it from."""
    for module, path in IMPORTED_NAMES:
        found = importlib.import_module(module)
        for part in path.split("."):
            found = getattr(found, part, None)
            if found is None:
                return f"{module} has no {path}"
    return None


def backward_marker() -> str | None:
    """torch (not transformers): `torch._C._current_graph_task_id()` is -1 outside a backward pass and a
    task id inside one, which is how a checkpoint's recompute during backward is told apart (not recorded)."""
    import torch

    inside = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            inside.append(torch._C._current_graph_task_id())
            return grad

    outside = torch._C._current_graph_task_id()
    with torch.inference_mode(False), torch.enable_grad():
        Probe.apply(torch.zeros(1, requires_grad=True)).sum().backward()
    if outside != -1 or len(inside) != 1 or type(inside[0]) is not int or inside[0] == -1:
        return f"torch {torch.__version__}: {outside!r} outside a backward pass, {inside!r} inside one"
    return None


def module_call_hooks() -> str | None:
    """torch (not transformers), what qk_attn.capture.calls relies on: a forward pre-hook runs inside a frame
    of `Module._call_impl` (the one calls._CALL_IMPL names), kept while the call runs; `_forward_hooks` is an
    ordered dict whose order, read after the forward, is the order hooks run in (`run_last` moves its own
    last), and an `always_call` hook moved last still runs when an earlier hook raises."""
    import sys

    import torch

    from qk_attn.capture.calls import _CALL_IMPL

    module, ran, frames = torch.nn.Identity(), [], []

    def pre(_module, _args):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is not _CALL_IMPL:
            frame = frame.f_back
        frames.append(frame)

    def failing(*_):
        ran.append("user")
        raise LookupError

    module.register_forward_pre_hook(pre)
    ours = module.register_forward_hook(lambda *_: ran.append("ours"), always_call=True)
    module.register_forward_hook(failing)
    hooks = module._forward_hooks
    if not hasattr(hooks, "move_to_end"):
        return f"torch {torch.__version__}: Module._forward_hooks is a {type(hooks).__name__}, without move_to_end"
    hooks.move_to_end(ours.id)
    try:
        module(torch.zeros(1))
    except LookupError:
        pass
    if frames != [frames[0]] or frames[0] is None:
        return f"torch {torch.__version__}: no frame of Module._call_impl encloses a forward pre-hook"
    if ran != ["user", "ours"]:
        return f"torch {torch.__version__}: forward hooks ran as {ran} (a user's that raises, then ours moved last)"
    return None
