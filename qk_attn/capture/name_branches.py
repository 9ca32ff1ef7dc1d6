"""Every place where transformers branches on the attention implementation's name, and how
"qk_sniff" is handled there.

`name_branches()` finds the branches in the installed source (ast), so a new or changed branch
is noticed by tests/test_transformers_facts.py; NAME_BRANCHES says, for each, why it is harmless,
which followed method takes the wrapped backend's path (`follow_wrapped_backend`), or why the
model is refused.
"""

from __future__ import annotations

import ast
import functools
import operator
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from qk_attn.capture.active import current_config
from qk_attn.errors import CaptureError

NAME = "qk_sniff"
WRAPPED = ("sdpa", "eager")  # what "qk_sniff" may wrap (flash is recorded under its own name)

# Identifiers that hold an attention implementation's name in transformers' source.
NAME_HOLDERS = ("_attn_implementation", "attn_implementation", "attn_impl", "requested_attention_implementation",
                "checked_attention_implementation", "applicable_attention", "requested_attention", "target_implem",
                "original_attn_impl", "sub_implementation", "implementation",
                "_loaded_implementation")
NOT_ATTENTION = ("experts", "cache_implementation")  # other "implementation" settings
REGISTRIES = ("ALL_ATTENTION_FUNCTIONS", "ALL_MASK_ATTENTION_FUNCTIONS")  # lookups "qk_sniff" is registered in


class Branch(NamedTuple):
    """One condition on the implementation's name: the file (relative to the transformers package)
    and the condition as `ast.unparse` writes it."""

    path: str
    condition: str


def _holds_name(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr in NAME_HOLDERS) or (
        isinstance(node, ast.Name) and node.id in NAME_HOLDERS)


def _name_condition(node: ast.AST) -> bool:
    """A comparison, call, method call or table lookup that tests an attention implementation's name."""
    if isinstance(node, ast.Subscript):  # CLASSES[config._attn_implementation]; the registries are facts
        if ast.unparse(node.value) in REGISTRIES:
            return False
        operands = (node.slice,)
    elif isinstance(node, ast.Compare):
        if any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            return False  # `is None`: the default implementation, never "qk_sniff"
        operands = (node.left, *node.comparators)
    elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == \
            "is_flash_attention_requested":
        return True
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
            "startswith", "endswith", "split"):
        operands = (node.func.value,)
    else:
        return False
    names = [n for operand in operands for n in ast.walk(operand) if _holds_name(n)]
    text = ast.unparse(node)
    return bool(names) and not any(word in text for word in NOT_ATTENTION)


def transformers_root() -> Path:
    import transformers

    return Path(transformers.__file__).parent


def name_branches(root: Path | None = None) -> dict[Branch, list[int]]:
    """Every condition on the attention implementation's name in transformers' runtime source
    (modular_*.py files are code-generation sources, never imported), with its line numbers."""
    root = root or transformers_root()
    found: dict[Branch, list[int]] = {}
    for path in sorted(root.rglob("*.py")):
        if path.name.startswith("modular_"):
            continue
        relative = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if _name_condition(node):
                found.setdefault(Branch(relative, ast.unparse(node)), []).append(node.lineno)
    return found


COMPARISONS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.In: lambda a, b: a in b,
               ast.NotIn: lambda a, b: a not in b}


def outcome(condition: str, name: str):
    """The condition's value when the implementation is `name`; None when it depends on more than
    the name (another variable, a registry) and so cannot be decided from the source alone."""
    from transformers.utils.generic import is_flash_attention_requested

    node = ast.parse(condition, mode="eval").body
    try:
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "is_flash_attention_requested":
            version = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "version"), None)
            return is_flash_attention_requested(requested_attention_implementation=name, version=version)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _holds_name(node.func.value):
            if node.func.attr in ("startswith", "endswith"):
                return getattr(name, node.func.attr)(*map(ast.literal_eval, node.args))
            return None
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if sum(map(_holds_name, operands)) != 1:
                return None
            values = [name if _holds_name(o) else ast.literal_eval(o) for o in operands]
            return all(COMPARISONS[type(op)](a, b) for op, a, b in zip(node.ops, values, values[1:]))
    except (ValueError, KeyError):  # not a literal, or not an (in)equality
        return None
    return None


def alike(condition: str) -> bool:
    """The condition has the same value for "qk_sniff" as for every backend it may wrap."""
    values = {outcome(condition, name) for name in (NAME, *WRAPPED)}
    return None not in values and len(values) == 1


# ---- how "qk_sniff" is handled at each branch (transformers 5.17 and 5.25) ----------------------

ALIKE = "harmless for qk_sniff because the condition has the same value for 'qk_sniff' as for 'sdpa' and 'eager'"
FOLLOWS = "qk_sniff takes the wrapped backend's branch via follow_wrapped_backend: {} runs under the wrapped name"
REFUSED = "refused at load for this model type with a message: {}"
MASK_REGISTERED = ("harmless for qk_sniff because qk_sniff registers its mask function, so it is in this mapping as "
                   "'sdpa' and 'eager' are")
FLASH_ONLY = "harmless for qk_sniff because only flash attention names reach it (qk_sniff wraps sdpa or eager)"
CLASS_TABLE = ("refused at load for this model type with a message: transformers looks the attention class up by "
               "name in this table and raises KeyError('qk_sniff')")
LOAD_NAME = ("harmless for qk_sniff because it compares the requested name with the one already set or checks it "
             "is registered (qk_sniff is), when loading or switching implementations")
CONTINUOUS = ("harmless for qk_sniff because continuous batching refuses 'qk_sniff' with a ValueError naming it, or "
              "(half precision, flash available) switches the model to flash attention with a warning")
OUTPUT_ATTENTIONS = ("harmless for qk_sniff because it only decides whether output_attentions=True is accepted: "
                     "transformers raises a ValueError naming 'qk_sniff'; nothing is computed differently")
HUB_NAMES = "harmless for qk_sniff because it parses Hub kernel names ('org/repo|function'); qk_sniff is no such name"
SPARSE_INDEXER = REFUSED.format(
    "the attention forward folds the indexer's top-k keys into the mask only for 'eager'/'sdpa' by name, and "
    "dispatches attention in the same forward, so no wrapper can show it the wrapped name (see REFUSED_MODELS)")
TIMM_WARNING = "harmless for qk_sniff because the 'eager' branch only logs a warning (timm owns its attention)"

MANUAL_BRANCHES: dict[Branch, str] = {
    Branch("cli/serving/model_manager.py", "self.attn_implementation not in VALID_ATTN_IMPLEMENTATIONS"):
        "harmless for qk_sniff because it validates the `transformers serve` option, which qk-attn never uses",
    Branch("configuration_utils.py", "self._attn_implementation != 'eager'"): OUTPUT_ATTENTIONS,
    Branch("configuration_utils.py", "self._attn_implementation not in ['eager', None]"): OUTPUT_ATTENTIONS,
    Branch("generation/continuous_batching/continuous_api.py", "target_implem != original_attn_impl"): CONTINUOUS,
    Branch("generation/continuous_batching/continuous_api.py", "target_implem == 'eager'"): CONTINUOUS,
    Branch("generation/continuous_batching/continuous_api.py", "target_implem in ['paged|eager', 'sdpa']"): CONTINUOUS,
    Branch("generation/continuous_batching/utils.py", "config._attn_implementation in ['paged|eager', 'sdpa']"):
        CONTINUOUS,
    Branch("integrations/hub_kernels.py", "'|' in attn_implementation"): HUB_NAMES,
    Branch("integrations/hub_kernels.py", "attn_implementation.split('|')"): HUB_NAMES,
    Branch("integrations/hub_kernels.py", "is_flash_attention_requested(requested_attention_implementation=repo_id, "
           "version=flash_attn_version)"): HUB_NAMES,
    Branch("integrations/msa_attention.py", "attn_implementation.split('|')"): HUB_NAMES,
    Branch("masking_utils.py", "config._attn_implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping"):
        MASK_REGISTERED,
    Branch("models/diffusion_gemma/modeling_diffusion_gemma.py",
           "config._attn_implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping"): MASK_REGISTERED,
    Branch("modeling_flash_attention_utils.py", "_loaded_implementation != implementation"): FLASH_ONLY,
    Branch("modeling_utils.py", "attn_implementation in (getattr(self, '_compatible_flash_implementations', None) "
           "or [])"): FLASH_ONLY,
    Branch("modeling_utils.py", "attn_implementation not in compatible_flash_implementations"): FLASH_ONLY,
    Branch("modeling_utils.py", "attn_implementation == f'flash_attention_{fa_version}'"): FLASH_ONLY,
    Branch("modeling_utils.py", "FLASH_ATTN_KERNEL_FALLBACK[attn_implementation]"): FLASH_ONLY + (
        "; without flash-attn, 5.25 loads the Hub kernel named here instead of 'flash_attention_2', and "
        "wrap_flash_attention() does not cover that name"),
    Branch("modeling_utils.py", "applicable_attention not in ['eager'] + ALL_ATTENTION_FUNCTIONS.valid_keys()"):
        LOAD_NAME,
    Branch("modeling_utils.py", "requested_implementation != self.config._attn_implementation"): LOAD_NAME,
    Branch("modeling_utils.py", "sub_implementation != subconfig._attn_implementation"): LOAD_NAME,
    Branch("modeling_utils.py", "sub_implementation not in ['eager'] + ALL_ATTENTION_FUNCTIONS.valid_keys()"):
        LOAD_NAME,
    Branch("modeling_utils.py", "attn_implementation != 'eager'"): LOAD_NAME,
    Branch("modeling_utils.py", "attn_implementation not in self"): LOAD_NAME,
    Branch("modeling_utils.py", "'sdpa' in applicable_attention"): (
        "harmless for qk_sniff's logits because it only runs _sdpa_can_dispatch at load: for 'sdpa' a model without "
        "SDPA support is refused, while 'qk_sniff' loads it and runs torch SDPA anyway (QK_SNIFF_BACKEND=eager is "
        "the exact choice for such a model)"),
    Branch("modeling_utils.py", "'sdpa' in requested_attention"): "harmless for qk_sniff because it only decides "
        "whether a failed SDPA check above raises or falls back to eager; that check is not run for 'qk_sniff'",
    Branch("models/gemma4/modeling_gemma4.py", "self.config._attn_implementation == 'sdpa'"):
        FOLLOWS.format("Gemma4TextModel._maybe_slice_kv_shared_inputs"),
    Branch("models/gemma4_unified/modeling_gemma4_unified.py", "self.config._attn_implementation == 'sdpa'"):
        FOLLOWS.format("Gemma4UnifiedTextModel._maybe_slice_kv_shared_inputs"),
    Branch("models/glm5_next/modeling_glm5_next.py", "self.config._attn_implementation == 'sdpa'"):
        FOLLOWS.format("Glm5NextTextAttention.build_attention_mask_from_topk"),
    Branch("models/gpt2/modeling_gpt2.py", "self.config._attn_implementation == 'eager'"): REFUSED.format(
        "with QK_SNIFF_BACKEND=eager and reorder_and_upcast_attn=True, 'eager' computes attention in its own "
        "upcast path, which the qk_sniff attention function never reaches (see REFUSED_MODELS)"),
    Branch("models/decision_transformer/modeling_decision_transformer.py", "self.config._attn_implementation == "
           "'eager'"): REFUSED.format("as GPT-2 (the same attention code)"),
    Branch("models/qwen2_5_omni/modeling_qwen2_5_omni.py", "config._attn_implementation == 'eager'"): (
        "harmless for qk_sniff's text logits because it only picks the attention of the Token2Wav speech decoder "
        "(waveforms): 'eager' is switched to sdpa there, 'qk_sniff' is kept"),
    Branch("models/timm_backbone/modeling_timm_backbone.py", "self.config._attn_implementation == 'eager'"):
        TIMM_WARNING,
    Branch("models/timm_wrapper/modeling_timm_wrapper.py", "self.config._attn_implementation == 'eager'"):
        TIMM_WARNING,
    Branch("models/falcon/modeling_falcon.py", "self.config._attn_implementation == 'sdpa'"): (
        "harmless for qk_sniff because Falcon (5.17) cannot be loaded as 'qk_sniff': FALCON_ATTENTION_CLASSES has "
        "no 'qk_sniff' (KeyError at load)"),
    Branch("trainer.py", "model.config._attn_implementation != 'sdpa'"): "harmless for qk_sniff because only the "
        "Trainer's context parallelism checks it, raising a ValueError that names 'qk_sniff'",
    **{Branch(f"models/{model}/modeling_{model}.py", "self.config._attn_implementation in ('eager', 'sdpa')"):
       SPARSE_INDEXER for model in ("axk2", "deepseek_v32", "dots3_note", "glm_moe_dsa", "hy_v4", "hy_v4_vl",
                                    "minimax_m3_vl", "mistral_large4")},
    **{Branch(f"models/{path}", f"{table}[{key}]"): CLASS_TABLE for path, table, key in (
        ("bark/modeling_bark.py", "BARK_ATTENTION_CLASSES", "attn_implementation"),
        ("bark/modeling_bark.py", "BARK_ATTENTION_CLASSES", "config._attn_implementation"),
        ("data2vec/modeling_data2vec_vision.py", "DATA2VEC_VISION_SELF_ATTENTION_CLASSES", "config._attn_implementation"),
        ("deepseek_ocr2/modeling_deepseek_ocr2.py", "DEEPSEEK_OCR2_SAM_VISION_ATTENTION_CLASSES",
         "config._attn_implementation"),
        ("falcon/modeling_falcon.py", "FALCON_ATTENTION_CLASSES", "config._attn_implementation"),
        ("git/modeling_git.py", "GIT_SELF_ATTENTION_CLASSES", "config._attn_implementation"),
        ("gpt_neo/modeling_gpt_neo.py", "GPT_NEO_ATTENTION_CLASSES", "attn_implementation"),
        ("gpt_neo/modeling_gpt_neo.py", "GPT_NEO_ATTENTION_CLASSES", "config._attn_implementation"),
        ("gptj/modeling_gptj.py", "GPTJ_ATTENTION_CLASSES", "config._attn_implementation"),
        ("sam/modeling_sam.py", "SAM_VISION_ATTENTION_CLASSES", "config._attn_implementation"),
        ("sam_hq/modeling_sam_hq.py", "SAM_HQ_VISION_ATTENTION_CLASSES", "config._attn_implementation"),
        ("superglue/modeling_superglue.py", "SUPERGLUE_SELF_ATTENTION_CLASSES", "config._attn_implementation"),
        ("unlimited_ocr/modeling_unlimited_ocr.py", "UNLIMITED_OCR_SAM_VISION_ATTENTION_CLASSES",
         "config._attn_implementation"))},
}
ALIKE_BRANCHES: dict[str, tuple[str, ...]] = {  # path -> conditions with one value for all three names
    'generation/continuous_batching/cache.py': ('is_flash_attention_requested(config)', 'is_flash_attention_requested(self.config)'),
    'generation/continuous_batching/continuous_api.py': ("'paged|' in target_implem", "'paged|' not in target_implem", 'is_flash_attention_requested(requested_attention_implementation=target_implem)', "target_implem == 'paged|eager'"),
    'generation/continuous_batching/initialization.py': ('is_flash_attention_requested(config)', 'is_flash_attention_requested(config, version=2)', 'is_flash_attention_requested(config, version=[2, 3])'),
    'generation/continuous_batching/utils.py': ("config._attn_implementation in ['paged|eager', 'paged|sdpa']",),
    'generation/utils.py': ('is_flash_attention_requested(self.config)',),
    'integrations/hub_kernels.py': ("'|' in attn_implementation",),
    'masking_utils.py': ('is_flash_attention_requested(config)',),
    'modeling_flash_attention_utils.py': ("implementation == 'flash_attention_2'", "implementation == 'flash_attention_3'", "implementation == 'flash_attention_4'"),
    'modeling_utils.py': ("'flex_attention' in applicable_attention", "attn_implementation != 'paged|eager'", "attn_implementation == 'flash_attention_2'", "attn_implementation.startswith('paged|')", 'is_flash_attention_requested(requested_attention_implementation=applicable_attention)', 'is_flash_attention_requested(requested_attention_implementation=applicable_attn_implementation)', 'is_flash_attention_requested(requested_attention_implementation=attn_implementation)', 'is_flash_attention_requested(requested_attention_implementation=base_implementation)'),
    'models/bark/modeling_bark.py': ('is_flash_attention_requested(config)',),
    'models/cohere_compass/modeling_cohere_compass.py': ('is_flash_attention_requested(self.config)',),
    'models/cosmos3_edge/modeling_cosmos3_edge.py': ('is_flash_attention_requested(self.config)',),
    'models/dots3_note/modeling_dots3_note.py': ('is_flash_attention_requested(self.config)',),
    'models/edgetam/modeling_edgetam.py': ('is_flash_attention_requested(self.config)',),
    'models/edgetam_video/modeling_edgetam_video.py': ('is_flash_attention_requested(self.config)',),
    'models/ernie4_5_vl_moe/modeling_ernie4_5_vl_moe.py': ('is_flash_attention_requested(self.config)',),
    'models/esmc/modeling_esmc.py': ('is_flash_attention_requested(self.config)',),
    'models/exaone4_5/modeling_exaone4_5.py': ('is_flash_attention_requested(self.config)',),
    'models/falcon/modeling_falcon.py': ('is_flash_attention_requested(self.config)',),
    'models/gemma4/modeling_gemma4.py': ('is_flash_attention_requested(self.config)', "self.config._attn_implementation == 'flex_attention'"),
    'models/gemma4_unified/modeling_gemma4_unified.py': ('is_flash_attention_requested(self.config)', "self.config._attn_implementation == 'flex_attention'"),
    'models/glm4v/modeling_glm4v.py': ('is_flash_attention_requested(self.config)',),
    'models/glm4v_moe/modeling_glm4v_moe.py': ('is_flash_attention_requested(self.config)',),
    'models/glm5_next/modeling_glm5_next.py': ('is_flash_attention_requested(self.config)',),
    'models/glm_image/modeling_glm_image.py': ('is_flash_attention_requested(self.config)',),
    'models/glm_ocr/modeling_glm_ocr.py': ('is_flash_attention_requested(self.config)',),
    'models/gpt_bigcode/modeling_gpt_bigcode.py': ('is_flash_attention_requested(self.config)',),
    'models/gpt_neo/modeling_gpt_neo.py': ('is_flash_attention_requested(config)',),
    'models/hrm_text/configuration_hrm_text.py': ('is_flash_attention_requested(requested_attention_implementation=base_implementation)', 'is_flash_attention_requested(requested_attention_implementation=value)'),
    'models/hrm_text/modeling_hrm_text.py': ('is_flash_attention_requested(requested_attention_implementation=attn_implementation)', 'is_flash_attention_requested(requested_attention_implementation=base_implementation)'),
    'models/hunyuan_vl/modeling_hunyuan_vl.py': ('is_flash_attention_requested(self.config)',),
    'models/hy_v4_vl/modeling_hy_v4_vl.py': ('is_flash_attention_requested(self.config)',),
    'models/inkling2/modeling_inkling2.py': ('is_flash_attention_requested(self.config)',),
    'models/kimi_k25/modeling_kimi_k25.py': ('is_flash_attention_requested(self.config)',),
    'models/kosmos2_5/modeling_kosmos2_5.py': ('is_flash_attention_requested(self.config)',),
    'models/lfm3_vl/modeling_lfm3_vl.py': ('is_flash_attention_requested(self.config)',),
    'models/llava_onevision1_5/modeling_llava_onevision1_5.py': ('is_flash_attention_requested(self.config)',),
    'models/minicpm_ocr/modeling_minicpm_ocr.py': ('is_flash_attention_requested(self.config)',),
    'models/minicpmv4_6/modeling_minicpmv4_6.py': ('is_flash_attention_requested(self.config)',),
    'models/minicpmv4_7/modeling_minicpmv4_7.py': ('is_flash_attention_requested(self.config)',),
    'models/minimax_m3_vl/modeling_minimax_m3_vl.py': ('is_flash_attention_requested(self.config)',),
    'models/muse_glimmer/modeling_muse_glimmer.py': ('is_flash_attention_requested(self.config)',),
    'models/muse_spark/modeling_muse_spark.py': ('is_flash_attention_requested(self.config)',),
    'models/ovis2_5/modeling_ovis2_5.py': ('is_flash_attention_requested(self.config)',),
    'models/paddleocr_vl/modeling_paddleocr_vl.py': ('is_flash_attention_requested(self.config)',),
    'models/pixtral/modeling_pixtral.py': ('is_flash_attention_requested(self.config)',),
    'models/qwen2_5_omni/modeling_qwen2_5_omni.py': ('is_flash_attention_requested(config)', 'is_flash_attention_requested(self.config)'),
    'models/qwen2_5_vl/modeling_qwen2_5_vl.py': ('is_flash_attention_requested(config)', 'is_flash_attention_requested(self.config)'),
    'models/qwen2_vl/modeling_qwen2_vl.py': ('is_flash_attention_requested(config)', 'is_flash_attention_requested(self.config)'),
    'models/qwen3_5/modeling_qwen3_5.py': ('is_flash_attention_requested(self.config)',),
    'models/qwen3_5_moe/modeling_qwen3_5_moe.py': ('is_flash_attention_requested(self.config)',),
    'models/qwen3_asr/modeling_qwen3_asr.py': ('is_flash_attention_requested(self.config)',),
    'models/qwen3_omni_moe/modeling_qwen3_omni_moe.py': ('is_flash_attention_requested(self.config)',),
    'models/qwen3_vl/modeling_qwen3_vl.py': ('is_flash_attention_requested(self.config)',),
    'models/qwen3_vl_moe/modeling_qwen3_vl_moe.py': ('is_flash_attention_requested(self.config)',),
    'models/qwen4_exp/modeling_qwen4_exp.py': ('is_flash_attention_requested(self.config)',),
    'models/radio/modeling_radio.py': ('is_flash_attention_requested(self.config)',),
    'models/sam2/modeling_sam2.py': ('is_flash_attention_requested(self.config)',),
    'models/sam2_video/modeling_sam2_video.py': ('is_flash_attention_requested(self.config)',),
    'models/sam3/modeling_sam3.py': ('is_flash_attention_requested(self.config)',),
    'models/sam3_lite_text/modeling_sam3_lite_text.py': ('is_flash_attention_requested(self.config)',),
    'models/sam3_tracker/modeling_sam3_tracker.py': ('is_flash_attention_requested(self.config)',),
    'models/sam3_tracker_video/modeling_sam3_tracker_video.py': ('is_flash_attention_requested(self.config)',),
    'models/video_llama_3/modeling_video_llama_3.py': ('is_flash_attention_requested(self.config)',),
    'utils/generic.py': ("'flash' in checked_attention_implementation", "implementation.startswith('paged|')", 'is_flash_attention_requested(config)'),
}

NAME_BRANCHES: dict[Branch, str] = {
    **{Branch(path, condition): ALIKE for path, conditions in ALIKE_BRANCHES.items() for condition in conditions},
    **MANUAL_BRANCHES,
}


# ---- making "qk_sniff" take the wrapped backend's branches ---------------------------------------

# Methods that test the implementation's name but call no attention themselves: they run under the
# wrapped backend's name, so they take exactly its branch (transformers 5.25; absent in 5.17).
FOLLOWED_METHODS: dict[str, tuple[str, str]] = {
    "transformers.models.gemma4.modeling_gemma4": ("Gemma4TextModel", "_maybe_slice_kv_shared_inputs"),
    "transformers.models.gemma4_unified.modeling_gemma4_unified": (
        "Gemma4UnifiedTextModel", "_maybe_slice_kv_shared_inputs"),
    "transformers.models.glm5_next.modeling_glm5_next": ("Glm5NextTextAttention", "build_attention_mask_from_topk"),
}


def _sparse_indexer(config, backend: str) -> str:
    return (f"qk_sniff: {config.model_type} chooses its sparse attention (the indexer's top-k keys) by the "
            f"implementation's name inside its attention forward, so under 'qk_sniff' it would attend to every key "
            f"and differ from '{backend}'; qk-attn cannot record this model: load it with "
            f"attn_implementation='{backend}'")


def _upcast_attention(config, backend: str) -> str | None:
    if backend != "eager" or not getattr(config, "reorder_and_upcast_attn", False):
        return None
    return (f"qk_sniff: {config.model_type} with reorder_and_upcast_attn=True computes 'eager' attention in its own "
            "upcast path, which the 'qk_sniff' attention function never reaches; use QK_SNIFF_BACKEND=sdpa (sdpa "
            "ignores reorder_and_upcast_attn too) or load the model with attn_implementation='eager'")


# Model types whose branch on the name sits where no wrapper can show it the wrapped name: a reason
# (one line, what to do) when the model cannot be run exactly under "qk_sniff" wrapping `backend`.
REFUSED_MODELS: dict[str, Callable[..., str | None]] = {
    **{f"transformers.models.{m}.modeling_{m}": _sparse_indexer for m in (
        "axk2", "deepseek_v32", "dots3_note", "glm_moe_dsa", "hy_v4", "hy_v4_vl", "minimax_m3_vl", "mistral_large4")},
    "transformers.models.gpt2.modeling_gpt2": _upcast_attention,
    "transformers.models.decision_transformer.modeling_decision_transformer": _upcast_attention,
}


@functools.cache
def _modeling_name(config_type: type) -> str:
    return config_type.__module__.replace(".configuration_", ".modeling_")


_followed: set[str] = set()


def follow_wrapped_backend(config, backend: str) -> None:
    """Before a "qk_sniff" forward of `config`'s model (the mask function, capture on or off): refuse
    a model whose name branches cannot take `backend`'s path (CaptureError, one line), and have the
    FOLLOWED_METHODS of its modeling module evaluate their branches under `backend`'s name.
    Costs two dict lookups after a model's first forward."""
    modeling = _modeling_name(type(config))
    refuse = REFUSED_MODELS.get(modeling)
    if refuse is not None and (reason := refuse(config, backend)) is not None:
        raise CaptureError(reason)
    if modeling in FOLLOWED_METHODS and modeling not in _followed:
        class_name, method_name = FOLLOWED_METHODS[modeling]
        cls = getattr(sys.modules.get(modeling), class_name, None)
        method = getattr(cls, method_name, None)
        if method is not None and not getattr(method, "runs_under_wrapped_name", False):
            setattr(cls, method_name, _under_wrapped_name(method))
        _followed.add(modeling)


def _under_wrapped_name(method):
    """`method`, run with its module's config naming the backend "qk_sniff" wraps, so that its
    branches on the name are the backend's. The name is restored before anything else runs (the
    method calls no attention); a second thread running the same model meanwhile would see it."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        config = self.config
        if config._attn_implementation != NAME:
            return method(self, *args, **kwargs)
        config._attn_implementation = current_config().backend
        try:
            return method(self, *args, **kwargs)
        finally:
            config._attn_implementation = NAME

    run.runs_under_wrapped_name = True
    return run
