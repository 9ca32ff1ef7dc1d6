"""How "qk_sniff" is handled at each place where transformers branches on the attention
implementation's name (transformers 5.17 to 5.25, constraints/range.txt between): NAME_BRANCHES,
Branch -> handling text.

qk_attn.capture.name_branches finds the branches in the installed source and follows or refuses
them at run time; tests/capture/test_transformers_facts.py checks that every branch found is in this
table, and that the branches said ALIKE are alike.
"""

from __future__ import annotations

from qk_attn.capture.name_branches import SPARSE_INDEXER_MODELS, Branch

ALIKE = "harmless for qk_sniff because the condition has the same value for 'qk_sniff' as for 'sdpa' and 'eager'"
FOLLOWS = "qk_sniff takes the wrapped backend's branch via follow_wrapped_backend: {} runs under the wrapped name"
REFUSED = "refused at load for this model type with a message: {}"
MASK_REGISTERED = (
    "harmless for qk_sniff because qk_sniff registers its mask function, so it is in this mapping as "
    "'sdpa' and 'eager' are"
)
FLASH_ONLY = "harmless for qk_sniff because only flash attention names reach it (qk_sniff wraps sdpa or eager)"
CLASS_TABLE = (
    "refused at load for this model type with a message: transformers looks the attention class up by "
    "name in this table and raises KeyError('qk_sniff')"
)
LOAD_NAME = (
    "harmless for qk_sniff because it compares the requested name with the one already set or checks it "
    "is registered (qk_sniff is), when loading or switching implementations"
)
CONTINUOUS = (
    "harmless for qk_sniff because continuous batching refuses 'qk_sniff' with a ValueError naming it, or "
    "(half precision, flash available) switches the model to flash attention with a warning"
)
OUTPUT_ATTENTIONS = (
    "harmless for qk_sniff because it only decides whether output_attentions=True is accepted: "
    "transformers raises a ValueError naming 'qk_sniff'; nothing is computed differently"
)
HUB_NAMES = "harmless for qk_sniff because it parses Hub kernel names ('org/repo|function'); qk_sniff is no such name"
SPARSE_INDEXER = REFUSED.format(
    "the attention forward folds the indexer's top-k keys into the mask only for 'eager'/'sdpa' by name, and "
    "dispatches attention in the same forward, so no wrapper can show it the wrapped name (see REFUSED_MODELS)"
)
TIMM_WARNING = "harmless for qk_sniff because the 'eager' branch only logs a warning (timm owns its attention)"

MANUAL_BRANCHES: dict[Branch, str] = {
    Branch(
        "cli/serving/model_manager.py", "self.attn_implementation not in VALID_ATTN_IMPLEMENTATIONS"
    ): "harmless for qk_sniff because it validates the `transformers serve` option, which qk-attn never uses",
    Branch("configuration_utils.py", "self._attn_implementation != 'eager'"): OUTPUT_ATTENTIONS,
    Branch("configuration_utils.py", "value.get('', current_attn)"): LOAD_NAME,  # the setter's default
    Branch("configuration_utils.py", "value.get(subconfig_key, current_subconfig_attn)"): LOAD_NAME,
    Branch("configuration_utils.py", "self._attn_implementation not in ['eager', None]"): OUTPUT_ATTENTIONS,
    Branch("generation/continuous_batching/continuous_api.py", "target_implem != original_attn_impl"): CONTINUOUS,
    Branch("generation/continuous_batching/continuous_api.py", "target_implem == 'eager'"): CONTINUOUS,
    Branch("generation/continuous_batching/continuous_api.py", "target_implem in ['paged|eager', 'sdpa']"): CONTINUOUS,
    Branch(
        "generation/continuous_batching/utils.py", "config._attn_implementation in ['paged|eager', 'sdpa']"
    ): CONTINUOUS,
    Branch("integrations/hub_kernels.py", "'|' in attn_implementation"): HUB_NAMES,
    Branch("integrations/hub_kernels.py", "attn_implementation.split('|')"): HUB_NAMES,
    Branch(
        "integrations/hub_kernels.py",
        "is_flash_attention_requested(requested_attention_implementation=repo_id, version=flash_attn_version)",
    ): HUB_NAMES,
    Branch("integrations/msa_attention.py", "attn_implementation.split('|')"): HUB_NAMES,
    Branch("integrations/hub_kernels.py", "':' in actual_attn_name"): HUB_NAMES,
    Branch("integrations/hub_kernels.py", "actual_attn_name.split(':')"): HUB_NAMES,
    **{
        Branch("modeling_flash_attention_utils.py", f"fa_fallback_version == {version}"): FLASH_ONLY
        for version in (2, 3, 4)
    },
    Branch(
        "modeling_flash_attention_utils.py", "FLASH_ATTN_KERNEL_FALLBACK.get(implementation, implementation)"
    ): FLASH_ONLY,
    Branch("modeling_utils.py", "FLASH_ATTENTION_COMPATIBILITY_MATRIX[fa_version]"): FLASH_ONLY,
    Branch("modeling_utils.py", "super().get(attn_implementation, default)"): (
        "harmless for qk_sniff because it is the attention registry's own lookup (AttentionInterface.get_interface), "
        "in which qk_sniff is registered"
    ),
    Branch("modeling_utils.py", "attn_implementation.get('', self.config._attn_implementation)"): LOAD_NAME,
    Branch("modeling_utils.py", "implementation.get(subconfig_key, subconfig._attn_implementation)"): LOAD_NAME,
    Branch("modeling_utils.py", "attn_implementation.get(subconfig_key, subconfig._attn_implementation)"): LOAD_NAME,
    Branch(
        "modeling_utils.py", "attn_implementation.get(subconfig_key, submodule.config._attn_implementation)"
    ): LOAD_NAME,
    Branch("modeling_utils.py", "sub_implementation.get('', subconfig._attn_implementation)"): LOAD_NAME,
    Branch(
        "modeling_utils.py",
        "subconfig_implementations.get(id(submodule.config), (None, None, requested_implementation))",
    ): LOAD_NAME,
    Branch(
        "masking_utils.py", "config._attn_implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping"
    ): MASK_REGISTERED,
    Branch(
        "models/diffusion_gemma/modeling_diffusion_gemma.py",
        "config._attn_implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping",
    ): MASK_REGISTERED,
    Branch("modeling_flash_attention_utils.py", "_loaded_implementation != implementation"): FLASH_ONLY,
    Branch(
        "modeling_utils.py", "attn_implementation in (getattr(self, '_compatible_flash_implementations', None) or [])"
    ): FLASH_ONLY,
    Branch("modeling_utils.py", "attn_implementation not in compatible_flash_implementations"): FLASH_ONLY,
    Branch("modeling_utils.py", "attn_implementation == f'flash_attention_{fa_version}'"): FLASH_ONLY,
    Branch("modeling_utils.py", "FLASH_ATTN_KERNEL_FALLBACK[attn_implementation]"): FLASH_ONLY
    + (
        "; without flash-attn, 5.25 loads the Hub kernel named here instead of 'flash_attention_2', and "
        "wrap_flash_attention() does not cover that name"
    ),
    Branch(
        "modeling_utils.py", "applicable_attention not in ['eager'] + ALL_ATTENTION_FUNCTIONS.valid_keys()"
    ): LOAD_NAME,
    Branch("modeling_utils.py", "requested_implementation != self.config._attn_implementation"): LOAD_NAME,
    Branch("modeling_utils.py", "sub_implementation != subconfig._attn_implementation"): LOAD_NAME,
    Branch(
        "modeling_utils.py", "sub_implementation not in ['eager'] + ALL_ATTENTION_FUNCTIONS.valid_keys()"
    ): LOAD_NAME,
    Branch("modeling_utils.py", "attn_implementation != 'eager'"): LOAD_NAME,
    Branch("modeling_utils.py", "attn_implementation not in self"): LOAD_NAME,
    Branch("modeling_utils.py", "'sdpa' in applicable_attention"): (
        "harmless for qk_sniff's logits because it only runs _sdpa_can_dispatch at load: for 'sdpa' a model without "
        "SDPA support is refused, while 'qk_sniff' loads it and runs torch SDPA anyway (QK_SNIFF_BACKEND=eager is "
        "the exact choice for such a model)"
    ),
    Branch("modeling_utils.py", "'sdpa' in requested_attention"): "harmless for qk_sniff because it only decides "
    "whether a failed SDPA check above raises or falls back to eager; that check is not run for 'qk_sniff'",
    Branch("models/gemma4/modeling_gemma4.py", "self.config._attn_implementation == 'sdpa'"): FOLLOWS.format(
        "Gemma4TextModel._maybe_slice_kv_shared_inputs"
    ),
    Branch(
        "models/gemma4_unified/modeling_gemma4_unified.py", "self.config._attn_implementation == 'sdpa'"
    ): FOLLOWS.format("Gemma4UnifiedTextModel._maybe_slice_kv_shared_inputs"),
    Branch("models/glm5_next/modeling_glm5_next.py", "self.config._attn_implementation == 'sdpa'"): FOLLOWS.format(
        "Glm5NextTextAttention.build_attention_mask_from_topk"
    ),
    Branch("models/gpt2/modeling_gpt2.py", "self.config._attn_implementation == 'eager'"): REFUSED.format(
        "with QK_SNIFF_BACKEND=eager and reorder_and_upcast_attn=True, 'eager' computes attention in its own "
        "upcast path, which the qk_sniff attention function never reaches (see REFUSED_MODELS)"
    ),
    Branch(
        "models/decision_transformer/modeling_decision_transformer.py", "self.config._attn_implementation == 'eager'"
    ): REFUSED.format("as GPT-2 (the same attention code)"),
    Branch("models/qwen2_5_omni/modeling_qwen2_5_omni.py", "config._attn_implementation == 'eager'"): (
        "harmless for qk_sniff's text logits because it only picks the attention of the Token2Wav speech decoder "
        "(waveforms): 'eager' is switched to sdpa there, 'qk_sniff' is kept"
    ),
    Branch(
        "models/timm_backbone/modeling_timm_backbone.py", "self.config._attn_implementation == 'eager'"
    ): TIMM_WARNING,
    Branch("models/timm_wrapper/modeling_timm_wrapper.py", "self.config._attn_implementation == 'eager'"): TIMM_WARNING,
    Branch("models/falcon/modeling_falcon.py", "self.config._attn_implementation == 'sdpa'"): (
        "harmless for qk_sniff because Falcon (5.17) cannot be loaded as 'qk_sniff': FALCON_ATTENTION_CLASSES has "
        "no 'qk_sniff' (KeyError at load)"
    ),
    Branch("trainer.py", "model.config._attn_implementation != 'sdpa'"): "harmless for qk_sniff because only the "
    "Trainer's context parallelism checks it, raising a ValueError that names 'qk_sniff'",
    **{
        Branch(
            f"models/{model}/modeling_{model}.py", "self.config._attn_implementation in ('eager', 'sdpa')"
        ): SPARSE_INDEXER
        for model in SPARSE_INDEXER_MODELS
    },
    **{
        Branch(f"models/{path}", f"{table}[{key}]"): CLASS_TABLE
        for path, table, key in (
            ("bark/modeling_bark.py", "BARK_ATTENTION_CLASSES", "attn_implementation"),
            ("bark/modeling_bark.py", "BARK_ATTENTION_CLASSES", "config._attn_implementation"),
            (
                "data2vec/modeling_data2vec_vision.py",
                "DATA2VEC_VISION_SELF_ATTENTION_CLASSES",
                "config._attn_implementation",
            ),
            (
                "deepseek_ocr2/modeling_deepseek_ocr2.py",
                "DEEPSEEK_OCR2_SAM_VISION_ATTENTION_CLASSES",
                "config._attn_implementation",
            ),
            ("falcon/modeling_falcon.py", "FALCON_ATTENTION_CLASSES", "config._attn_implementation"),
            ("falcon/modeling_falcon.py", "FALCON_ATTENTION_CLASSES", "attn_implementation"),  # 5.23
            ("git/modeling_git.py", "GIT_SELF_ATTENTION_CLASSES", "config._attn_implementation"),
            ("gpt_neo/modeling_gpt_neo.py", "GPT_NEO_ATTENTION_CLASSES", "attn_implementation"),
            ("gpt_neo/modeling_gpt_neo.py", "GPT_NEO_ATTENTION_CLASSES", "config._attn_implementation"),
            ("gptj/modeling_gptj.py", "GPTJ_ATTENTION_CLASSES", "config._attn_implementation"),
            ("gptj/modeling_gptj.py", "GPTJ_ATTENTION_CLASSES", "attn_implementation"),  # 5.23
            ("sam/modeling_sam.py", "SAM_VISION_ATTENTION_CLASSES", "config._attn_implementation"),
            ("sam_hq/modeling_sam_hq.py", "SAM_HQ_VISION_ATTENTION_CLASSES", "config._attn_implementation"),
            ("superglue/modeling_superglue.py", "SUPERGLUE_SELF_ATTENTION_CLASSES", "config._attn_implementation"),
            (
                "unlimited_ocr/modeling_unlimited_ocr.py",
                "UNLIMITED_OCR_SAM_VISION_ATTENTION_CLASSES",
                "config._attn_implementation",
            ),
        )
    },
}
ALIKE_BRANCHES: dict[str, tuple[str, ...]] = {  # path -> conditions with one value for all three names
    "generation/continuous_batching/cache.py": (
        "is_flash_attention_requested(config)",
        "is_flash_attention_requested(self.config)",
    ),
    "generation/continuous_batching/continuous_api.py": (
        "'paged|' in target_implem",
        "'paged|' not in target_implem",
        "is_flash_attention_requested(requested_attention_implementation=target_implem)",
        "target_implem == 'paged|eager'",
    ),
    "generation/continuous_batching/initialization.py": (
        "is_flash_attention_requested(config)",
        "is_flash_attention_requested(config, version=2)",
        "is_flash_attention_requested(config, version=[2, 3])",
    ),
    "generation/continuous_batching/utils.py": ("config._attn_implementation in ['paged|eager', 'paged|sdpa']",),
    "generation/utils.py": ("is_flash_attention_requested(self.config)",),
    "integrations/hub_kernels.py": ("'|' in attn_implementation",),
    "masking_utils.py": ("is_flash_attention_requested(config)",),
    "modeling_flash_attention_utils.py": (
        "implementation == 'flash_attention_2'",
        "implementation == 'flash_attention_3'",
        "implementation == 'flash_attention_4'",
    ),
    "modeling_utils.py": (
        "'flex_attention' in applicable_attention",
        "attn_implementation != 'paged|eager'",
        "attn_implementation == 'flash_attention_2'",
        "attn_implementation.startswith('paged|')",
        "is_flash_attention_requested(requested_attention_implementation=applicable_attention)",
        "is_flash_attention_requested(requested_attention_implementation=applicable_attn_implementation)",
        "is_flash_attention_requested(requested_attention_implementation=attn_implementation)",
        "is_flash_attention_requested(requested_attention_implementation=base_implementation)",
    ),
    "models/bark/modeling_bark.py": ("is_flash_attention_requested(config)",),
    "models/cohere_compass/modeling_cohere_compass.py": ("is_flash_attention_requested(self.config)",),
    "models/cosmos3_edge/modeling_cosmos3_edge.py": ("is_flash_attention_requested(self.config)",),
    "models/dots3_note/modeling_dots3_note.py": ("is_flash_attention_requested(self.config)",),
    "models/edgetam/modeling_edgetam.py": ("is_flash_attention_requested(self.config)",),
    "models/edgetam_video/modeling_edgetam_video.py": ("is_flash_attention_requested(self.config)",),
    "models/ernie4_5_vl_moe/modeling_ernie4_5_vl_moe.py": ("is_flash_attention_requested(self.config)",),
    "models/esmc/modeling_esmc.py": ("is_flash_attention_requested(self.config)",),
    "models/exaone4_5/modeling_exaone4_5.py": ("is_flash_attention_requested(self.config)",),
    "models/falcon/modeling_falcon.py": (
        "is_flash_attention_requested(config)",  # 5.23
        "is_flash_attention_requested(self.config)",
    ),
    "models/gemma4/modeling_gemma4.py": (
        "is_flash_attention_requested(self.config)",
        "self.config._attn_implementation == 'flex_attention'",
    ),
    "models/gemma4_unified/modeling_gemma4_unified.py": (
        "is_flash_attention_requested(self.config)",
        "self.config._attn_implementation == 'flex_attention'",
    ),
    "models/glm4v/modeling_glm4v.py": ("is_flash_attention_requested(self.config)",),
    "models/glm4v_moe/modeling_glm4v_moe.py": ("is_flash_attention_requested(self.config)",),
    "models/glm5_next/modeling_glm5_next.py": ("is_flash_attention_requested(self.config)",),
    "models/glm_image/modeling_glm_image.py": ("is_flash_attention_requested(self.config)",),
    "models/glm_ocr/modeling_glm_ocr.py": ("is_flash_attention_requested(self.config)",),
    "models/gpt_bigcode/modeling_gpt_bigcode.py": ("is_flash_attention_requested(self.config)",),
    "models/gpt_neo/modeling_gpt_neo.py": ("is_flash_attention_requested(config)",),
    "models/gptj/modeling_gptj.py": ("is_flash_attention_requested(config)",),  # 5.23
    "models/hrm_text/configuration_hrm_text.py": (
        "is_flash_attention_requested(requested_attention_implementation=base_implementation)",
        "is_flash_attention_requested(requested_attention_implementation=value)",
    ),
    "models/hrm_text/modeling_hrm_text.py": (
        "is_flash_attention_requested(requested_attention_implementation=attn_implementation)",
        "is_flash_attention_requested(requested_attention_implementation=base_implementation)",
    ),
    "models/hunyuan_vl/modeling_hunyuan_vl.py": ("is_flash_attention_requested(self.config)",),
    "models/hy_v4_vl/modeling_hy_v4_vl.py": ("is_flash_attention_requested(self.config)",),
    "models/inkling2/modeling_inkling2.py": ("is_flash_attention_requested(self.config)",),
    "models/kimi_k25/modeling_kimi_k25.py": ("is_flash_attention_requested(self.config)",),
    "models/kosmos2_5/modeling_kosmos2_5.py": ("is_flash_attention_requested(self.config)",),
    "models/lfm3_vl/modeling_lfm3_vl.py": ("is_flash_attention_requested(self.config)",),
    "models/llava_onevision1_5/modeling_llava_onevision1_5.py": ("is_flash_attention_requested(self.config)",),
    "models/minicpm_ocr/modeling_minicpm_ocr.py": ("is_flash_attention_requested(self.config)",),
    "models/minicpmv4_6/modeling_minicpmv4_6.py": ("is_flash_attention_requested(self.config)",),
    "models/minicpmv4_7/modeling_minicpmv4_7.py": ("is_flash_attention_requested(self.config)",),
    "models/minimax_m3_vl/modeling_minimax_m3_vl.py": ("is_flash_attention_requested(self.config)",),
    "models/muse_glimmer/modeling_muse_glimmer.py": ("is_flash_attention_requested(self.config)",),
    "models/muse_spark/modeling_muse_spark.py": ("is_flash_attention_requested(self.config)",),
    "models/ovis2_5/modeling_ovis2_5.py": ("is_flash_attention_requested(self.config)",),
    "models/paddleocr_vl/modeling_paddleocr_vl.py": ("is_flash_attention_requested(self.config)",),
    "models/pixtral/modeling_pixtral.py": ("is_flash_attention_requested(self.config)",),
    "models/qwen2_5_omni/modeling_qwen2_5_omni.py": (
        "is_flash_attention_requested(config)",
        "is_flash_attention_requested(self.config)",
    ),
    "models/qwen2_5_vl/modeling_qwen2_5_vl.py": (
        "is_flash_attention_requested(config)",
        "is_flash_attention_requested(self.config)",
    ),
    "models/qwen2_vl/modeling_qwen2_vl.py": (
        "is_flash_attention_requested(config)",
        "is_flash_attention_requested(self.config)",
    ),
    "models/qwen3_5/modeling_qwen3_5.py": ("is_flash_attention_requested(self.config)",),
    "models/qwen3_5_moe/modeling_qwen3_5_moe.py": ("is_flash_attention_requested(self.config)",),
    "models/qwen3_asr/modeling_qwen3_asr.py": ("is_flash_attention_requested(self.config)",),
    "models/qwen3_omni_moe/modeling_qwen3_omni_moe.py": ("is_flash_attention_requested(self.config)",),
    "models/qwen3_vl/modeling_qwen3_vl.py": ("is_flash_attention_requested(self.config)",),
    "models/qwen3_vl_moe/modeling_qwen3_vl_moe.py": ("is_flash_attention_requested(self.config)",),
    "models/qwen4_exp/modeling_qwen4_exp.py": ("is_flash_attention_requested(self.config)",),
    "models/radio/modeling_radio.py": ("is_flash_attention_requested(self.config)",),
    "models/sam2/modeling_sam2.py": ("is_flash_attention_requested(self.config)",),
    "models/sam2_video/modeling_sam2_video.py": ("is_flash_attention_requested(self.config)",),
    "models/sam3/modeling_sam3.py": ("is_flash_attention_requested(self.config)",),
    "models/sam3_lite_text/modeling_sam3_lite_text.py": ("is_flash_attention_requested(self.config)",),
    "models/sam3_tracker/modeling_sam3_tracker.py": ("is_flash_attention_requested(self.config)",),
    "models/sam3_tracker_video/modeling_sam3_tracker_video.py": ("is_flash_attention_requested(self.config)",),
    "models/video_llama_3/modeling_video_llama_3.py": ("is_flash_attention_requested(self.config)",),
    "utils/generic.py": (
        "'flash' in checked_attention_implementation",
        "implementation.startswith('paged|')",
        "is_flash_attention_requested(config)",
    ),
}

NAME_BRANCHES: dict[Branch, str] = {
    **{Branch(path, condition): ALIKE for path, conditions in ALIKE_BRANCHES.items() for condition in conditions},
    **MANUAL_BRANCHES,
}
