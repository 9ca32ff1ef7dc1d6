"""What qk-attn assumes about transformers' internals: each assumption a named fact (FACTS).

Checked by tests/capture/test_transformers_facts.py on the installed transformers, and by `require()` at
a session's first forward:

FACTS are the internal facts the capture relies on (registries, mask and attention function
signatures, the frames and attributes it reads). `check_all()` runs them all; `require()` raises
one error naming the transformers version and every broken fact. The check behind each fact is
in qk_attn.capture.fact_checks (caches and generation: fact_checks_generation; imports and torch:
fact_checks_imports; a forward's inputs: fact_checks_inputs). Branches on the implementation's
name are listed in qk_attn.capture.name_branches.

Where the capture code relies on each fact (the module that reads it):

    imported_names                 what qk_attn imports from transformers at its import, and what
                                   hooks.register wraps (fact_checks_imports.IMPORTED_NAMES)
    attention_interface_register   hooks.register, wrap_flash_attention
    mask_interface_register        hooks.register, wrap_flash_attention
    mask_functions                 backends.mask_function, hooks._noting_context
    mask_call_keywords             hooks._noting_context (batch_size, q_length, kv_length,
                                   q_offset, kv_offset, attention_mask, config, local_size)
    mask_every_forward             forwards.on_mask (a forward's start: its mask call, also with no padding);
                                   a mask built around the decoder stack (BERT's model around its encoder)
                                   reaches the stack as its attention_mask, None where the mask function
                                   returned None (forwards.on_forward_start; held by tests: test_forward_context)
    mask_padding                   forwards.on_mask, mask_checks (which tokens are padding: the mask call's
                                   attention_mask, checked per forward against the model forward's own)
    text_config_lookup             frames.tower_of (a vision or audio tower's mask and attention: not recorded)
    attention_call                 attention.qk_sniff_attention (the seed forwards' attention calls bind
                                   to its signature), attention.attend_and_capture
    sdpa_forward                   backends.attention_forward("sdpa")
    flash_forward                  hooks.wrap_flash_attention
    eager_forward                  backends.eager_forward
    backend_support_flags          backends.check_backend_support (_supports_sdpa, _supports_flash_attn);
                                   which reason its refusal names, wording only: a modeling module without
                                   ALL_ATTENTION_FUNCTIONS, a running model whose config.is_encoder_decoder
                                   (frames.running_encoder_decoder; held by tests: test_refused_models)
    rotary_helpers                 rope.invert_rope (apply_rotary_pos_emb), rope.query_scale
    attention_call_layout          call_rows, gather (query and key read as (batch, heads, tokens, head_dim))
    attention_forward_locals       attention.applied_rotary (frame locals self, position_embeddings)
    attention_forward_rotation     rope.uses_rope, rope.pre_rope_rows, rope.invert_rope (rope_check.rotation:
                                   which rotation a forward applies, read from its syntax tree)
    model_forward_locals           frames.model_forward, frames.cache_of (frame locals self,
                                   input_ids, position_ids, cache (5.25) or past_key_values (5.17));
                                   frames.renumbered_positions (position_ids again, at the first call);
                                   also checked at run time on every mask-building and decoder-stack
                                   forward: rotary_positions (self.rotary_emb given position_ids as is);
                                   a mask built in a helper method without position_ids takes its
                                   module's `forward` frame's (transformers 4.x's _update_causal_mask)
    cache_lengths                  frames.cache_length (sequences._past compares it with q_offset)
    cache_row_methods              caches.watch_row_moves (Cache.reorder_cache, batch_select_indices,
                                   batch_repeat_interleave, crop, inherited by Dynamic/Static/QuantizedCache)
    encoded_image_inputs           frames.model_forward (mm_encoder_outputs: a forward given images by generate())
    image_inputs                   frames.model_forward (pixel_values: a forward given images, also in
                                   the **kwargs of generate()'s input preparation, which builds a static
                                   cache's mask; not a fact of its own, held by tests (test_capture_models:
                                   Mllama over a static cache): if it moves, a cross-attention layer is
                                   not recorded (caches.holds_vision), with a warning, never recorded wrong)
    packed_sequence_keywords       attention.refuse_packed (cu_seq_lens_q, cu_seq_lens_k)
    (run time, no fact of its own)  query_slicing.refuse_unread_query_slicing (a layer given fewer queries
                                   than its forward's tokens got the last ones only where the slicing
                                   method was read: Gemma 4's _maybe_slice_kv_shared_inputs slicing with
                                   slice(-logits_to_keep, None); anywhere else the call is refused)
    cache_layer_updates            caches.refuse_rounding_cache (transformers' own layer types are
                                   trusted only with an update qk-attn read: VETTED_UPDATES, each
                                   checked to return the keys it is given)
    layer_type_names               plan.ModelShape.local_attention (full_attention_only)
    generation_frames              hooks.watch_generate (GenerationMixin.generate),
                                   generation_frames.refuse_unrecordable_generation (_beam_search, _sample,
                                   _assisted_decoding, _prefill in generation/utils.py, locals
                                   model_kwargs, unfinished_sequences, has_eos_stopping_criteria,
                                   stop_check: a stop decided a step late, DeferredStopCheck, is refused)
    generation_dispatch            generation_frames._refuse_unknown_decoding (generate()'s locals decoding_method and
                                   custom_generate; GENERATION_MODES_MAPPING names only DECODING_METHODS;
                                   at run time, the method's code is generation/utils.py's: a model's own
                                   `_sample` (CSM's) is refused)
    attention_module_attributes    capture/session: module.layer_idx (none: refused where the module's
                                   config is the running forward's, recorder.refuse_unnumbered), module.config,
                                   module.sliding_window, rope.uses_rope (module.use_rope); which layers
                                   attend (plan.attention_layers: a module of the first caller's class, or
                                   one whose forward names ALL_ATTENTION_FUNCTIONS; a layer missed that
                                   calls attention is refused, binder._model); not a
                                   fact of its own, held by tests (test_forward_context, test_release_changes):
                                   a causal module's sliding_window is its sliding masks' local_size, a
                                   bidirectional one's (module.is_causal False) one more (attention.call_window)
    backward_marker                recorder._not_recorded (torch's, not transformers': a checkpoint's
                                   recompute during backward, by torch._C._current_graph_task_id)
    module_call_hooks              calls: a call's frame in Module._call_impl, run_last's hook order (torch's)
    (torch, not transformers: forward hooks on the decoder stack, frames.decoder_stack, which
    finds it by structure: a ModuleList child whose attention modules share `config`; and a pre-hook
    and an `always_call` forward hook on the outermost module whose `forward` frame encloses the stack,
    frames.outermost_forward and calls.watch_call: should a release call its stack otherwise, only the
    discarding of a forward whose model call raised after the stack returned is lost, never a row)
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from qk_attn.capture.fact_checks import (
    MASK_KEYWORDS,
    attention_call_layout,
    attention_forward_locals,
    attention_forward_rotation,
    attention_interface_register,
    attention_module_attributes,
    backend_support_flags,
    eager_forward,
    flash_forward,
    mask_call_keywords,
    mask_functions,
    mask_interface_register,
    model_forward_locals,
    rotary_helpers,
    sdpa_forward,
    text_config_lookup,
)
from qk_attn.capture.fact_checks_calls import attention_call, mask_every_forward, mask_padding
from qk_attn.capture.fact_checks_generation import (
    cache_layer_updates,
    cache_lengths,
    cache_row_methods,
    encoded_image_inputs,
    generation_dispatch,
    generation_frames,
    layer_type_names,
)
from qk_attn.capture.fact_checks_imports import IMPORTED_NAMES, backward_marker, imported_names, module_call_hooks
from qk_attn.capture.fact_checks_inputs import IMAGE_INPUTS, PACKED_KEYWORDS, image_inputs, packed_sequence_keywords
from qk_attn.capture.fact_report import mismatch, untested_release
from qk_attn.errors import TransformersMismatch  # noqa: F401 - (tests read it here)

logger = logging.getLogger(__name__)

# ---- facts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A fact that does not hold on the installed transformers."""

    fact: str
    transformers: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.fact} (transformers {self.transformers}): expected {self.expected}; found {self.found}"


class Fact(NamedTuple):
    name: str
    expected: str  # one line: what qk-attn relies on
    check: Callable[[], str | None]  # None when it holds, else what was found


def transformers_version() -> str:
    import transformers

    return transformers.__version__


FACTS: tuple[Fact, ...] = (
    Fact(
        "imported_names",
        f"the {len(IMPORTED_NAMES)} names qk-attn takes from transformers exist where it takes them "
        "(transformers.AttentionInterface, masking_utils.flash_attention_mask, ...)",
        imported_names,
    ),
    Fact(
        "attention_interface_register",
        "AttentionInterface.register(name, fn) makes fn ALL_ATTENTION_FUNCTIONS.get_interface(name)",
        attention_interface_register,
    ),
    Fact(
        "mask_interface_register",
        "AttentionMaskInterface.register(name, fn) makes fn ALL_MASK_ATTENTION_FUNCTIONS[name]",
        mask_interface_register,
    ),
    Fact(
        "mask_functions",
        f"ALL_MASK_ATTENTION_FUNCTIONS['sdpa'/'eager'/'flash_attention_2'] accept {MASK_KEYWORDS}",
        mask_functions,
    ),
    Fact(
        "mask_call_keywords",
        f"create_causal_mask, create_sliding_window_causal_mask and create_chunked_causal_mask call the "
        f"registered mask with {MASK_KEYWORDS} and config= (the sliding and chunked ones with local_size=)",
        mask_call_keywords,
    ),
    Fact(
        "mask_every_forward",
        "create_causal_mask calls the mask function for a plain causal forward too (no padding, no cache)",
        mask_every_forward,
    ),
    Fact(
        "mask_padding",
        "create_causal_mask hands the mask function the 2-D attention_mask it was given as an equal (batch, keys) "
        "bool tensor, True for real tokens",
        mask_padding,
    ),
    Fact(
        "text_config_lookup",
        "config.get_text_config(decoder=True) is a composite config's text_config (a language model's: itself); "
        "its towers' configs are its attributes",
        text_config_lookup,
    ),
    Fact(
        "sdpa_forward",
        "integrations.sdpa_attention.sdpa_attention_forward (what transformers registers as 'sdpa') is a "
        "function(module, query, key, value, attention_mask, **kwargs) (renames that keep each in its place, "
        "as query_states, are the same: qk-attn passes them by position)",
        sdpa_forward,
    ),
    Fact(
        "attention_call",
        "each seed attention forward calls the attention function with arguments qk_sniff_attention accepts",
        attention_call,
    ),
    Fact(
        "flash_forward",
        "integrations.flash_attention.flash_attention_forward(module, query, key, value, attention_mask, **kwargs)",
        flash_forward,
    ),
    Fact(
        "backend_support_flags",
        "a model class that transformers runs with sdpa (flash) sets _supports_sdpa (_supports_flash_attn), "
        "False on PreTrainedModel",
        backend_support_flags,
    ),
    Fact(
        "eager_forward",
        "each rotary decoder's modeling module defines eager_attention_forward(module, query, "
        "key, value, attention_mask, ...)",
        eager_forward,
    ),
    Fact(
        "rotary_helpers",
        "apply_rotary_pos_emb(q, k, cos, sin, ...) in each seed modeling module; Ministral 3's "
        "get_llama_4_attn_scale(positions, beta, original_max)",
        rotary_helpers,
    ),
    Fact(
        "attention_call_layout",
        "each seed attention forward hands attention (batch, heads, tokens, head_dim) states: query_states and "
        "key_states are `proj(hidden_states).view((*input_shape, -1, self.head_dim))...transpose(1, 2)`",
        attention_call_layout,
    ),
    Fact(
        "attention_forward_locals",
        "attention forward(self, hidden_states, position_embeddings, ...) holds the cos/sin it applied",
        attention_forward_locals,
    ),
    Fact(
        "attention_forward_rotation",
        "each seed attention forward rotates with one `q, k = apply_rotary_pos_emb(q, k, cos, sin)` (cos, sin = "
        "position_embeddings; SmolLM3's under `if self.use_rope:`) and changes q, k after it only by the cache "
        "update (and Ministral 3's get_llama_4_attn_scale)",
        attention_forward_rotation,
    ),
    Fact(
        "model_forward_locals",
        "the base model's forward(self, input_ids, ..., position_ids, cache or "
        "past_key_values) calls create_causal_mask itself and self.rotary_emb(..., position_ids)",
        model_forward_locals,
    ),
    Fact(
        "generation_frames",
        "GenerationMixin.generate/_sample/_beam_search/_assisted_decoding exist; _sample has locals model_kwargs, "
        "unfinished_sequences and has_eos_stopping_criteria (it pads finished rows only under `if "
        "has_eos_stopping_criteria:`), reads model_kwargs['use_cache'] and runs its first forwards in _prefill; "
        "where DeferredStopCheck exists, _sample's local stop_check holds its stop check",
        generation_frames,
    ),
    Fact(
        "generation_dispatch",
        "generate() calls decoding_method, picked from GENERATION_MODES_MAPPING, whose methods are _sample, "
        "_beam_search and _assisted_decoding (deprecated modes: a Hub repo)",
        generation_dispatch,
    ),
    Fact(
        "cache_lengths",
        "a dynamic cache's get_seq_length() (full and sliding layers) is a host int: the tokens it holds",
        cache_lengths,
    ),
    Fact(
        "cache_row_methods",
        "Cache.reorder_cache/batch_select_indices/batch_repeat_interleave move batch rows, Cache.crop rolls "
        "tokens back, and DynamicCache, StaticCache and QuantizedCache inherit them from Cache",
        cache_row_methods,
    ),
    Fact(
        "encoded_image_inputs",
        "generate() that encodes images before its first forward hands the model their features as "
        "mm_encoder_outputs (5.18+; before, pixel_values)",
        encoded_image_inputs,
    ),
    Fact(
        "image_inputs",
        f"Gemma 3's and Mllama's ForConditionalGeneration.forward take their images as {', '.join(IMAGE_INPUTS)}",
        image_inputs,
    ),
    Fact(
        "packed_sequence_keywords",
        f"packed documents reach the attention call as {', '.join(PACKED_KEYWORDS)} (FlashAttentionKwargs, "
        "_flash_attention_forward)",
        packed_sequence_keywords,
    ),
    Fact(
        "cache_layer_updates",
        "cache_utils' Dynamic, DynamicSlidingWindow, Static, StaticSlidingWindow and Quantized layers exist and "
        "return the keys an update is given bit for bit (each updated with float32 keys); a Cache keeps its "
        "layers in layers and layer_class_to_replicate; Fp8QuantizedLayer is refused",
        cache_layer_updates,
    ),
    Fact(
        "layer_type_names",
        "config.layer_types name local layers with 'sliding' (Gemma 3) or 'chunked' (Llama 4) in them",
        layer_type_names,
    ),
    Fact(
        "attention_module_attributes",
        "attention modules set layer_idx and config (use_rope: SmolLM3, "
        "sliding_window: Gemma 3); Mllama's cross-attention class is MllamaTextCrossAttention",
        attention_module_attributes,
    ),
    Fact(
        "backward_marker",
        "torch._C._current_graph_task_id() is -1 outside a backward pass and a task id inside one (torch)",
        backward_marker,
    ),
    Fact(
        "module_call_hooks",
        "a forward pre-hook runs inside a frame of Module._call_impl, and forward hooks run in the order of "
        "Module._forward_hooks (an ordered dict), an always_call one moved last also after one that raised (torch)",
        module_call_hooks,
    ),
)


def check_all(facts: tuple[Fact, ...] = FACTS) -> list[Finding]:
    """Every fact that does not hold on the installed transformers (empty when all hold)."""
    version = transformers_version()
    findings = []
    for fact in facts:
        try:
            found = fact.check()
        except Exception as error:  # a moved module or attribute is a broken fact, not a crash
            found = f"{type(error).__name__}: {error}"
        if found is not None:
            findings.append(Finding(fact.name, version, fact.expected, found))
    return findings


@functools.cache
def require() -> None:
    """Raise TransformersMismatch naming the transformers version and every broken fact (once per process)."""
    findings = _check_all_apart()
    if findings:
        raise mismatch(findings)
    untested = untested_release(transformers_version())
    if untested:
        logger.warning(untested)


def _check_all_apart() -> list[Finding]:
    """`check_all` in a thread of its own: its probes run tiny forwards and read torch's state, which the caller's
    first recorded forward may run under (a torch.func transform, a jit trace, an export, a backward pass: all
    per thread), where they would find transformers broken."""
    findings: list[Finding] = []
    thread = threading.Thread(target=lambda: findings.extend(check_all()), name="qk-attn facts")
    thread.start()
    thread.join()
    return findings


REGISTRATION_FACTS = frozenset(("attention_interface_register", "mask_interface_register"))


def mismatch_at_import(error: Exception, registered: bool = True) -> Exception:
    """What `import qk_attn` raises when registering failed with `error` (and a capture-off forward when
    reading transformers' source did: hooks.qk_sniff_mask): TransformersMismatch naming the broken facts
    (a moved or removed transformers name), or `error` itself when every fact holds. When `error` came
    before "qk_sniff" was registered (`registered` False), its absence from the registries is no finding."""
    findings = [f for f in check_all() if registered or f.fact not in REGISTRATION_FACTS]
    return mismatch(findings) if findings else error
