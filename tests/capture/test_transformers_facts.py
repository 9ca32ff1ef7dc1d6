"""What qk-attn assumes about transformers holds on the installed version (qk_attn.capture.facts)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import qk_attn
from qk_attn.capture import facts
from qk_attn.capture import name_branches as branches
from qk_attn.capture.known_branches import ALIKE, NAME_BRANCHES
from qk_attn.errors import CaptureError, TransformersMismatch


@pytest.mark.parametrize("fact", facts.FACTS, ids=lambda fact: fact.name)
def test_fact_holds(fact):
    findings = facts.check_all((fact,))
    assert not findings, str(findings[0])


def test_a_broken_fact_names_the_version_and_the_fact(monkeypatch):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def sdpa_mask(batch_size, q_length, kv_length, attention_mask=None):  # lost q_offset and kv_offset
        return None

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", sdpa_mask)
    (finding,) = facts.check_all()
    assert (finding.fact, finding.transformers) == ("mask_functions", tf.__version__)
    assert "sdpa_mask(batch_size, q_length, kv_length, attention_mask=None)" in finding.found
    facts.require.cache_clear()
    with pytest.raises(TransformersMismatch, match=rf"transformers {tf.__version__} .*mask_functions"):
        facts.require()
    facts.require.cache_clear()


def test_a_changed_attention_signature_is_found(monkeypatch):
    """transformers' own sdpa attention (a user's function registered as "sdpa" is what "sdpa" runs: not a fact)."""
    from transformers.integrations import sdpa_attention

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda module, q, k, v, mask, **kw: None)
    assert [f.fact for f in facts.check_all()] == ["sdpa_forward"]


def test_attention_parameters_renamed_in_place_keep_the_fact(monkeypatch):
    """qk-attn passes them by position: `query` -> `query_states` keeps each in its place; a swap does not."""
    from transformers.integrations import sdpa_attention

    def renamed(module, query_states, key_states, value_states, attention_mask, **kwargs):
        return None

    def swapped(module, query, value, key, attention_mask, **kwargs):
        return None

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", renamed)
    assert facts.check_all() == []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", swapped)
    assert [f.fact for f in facts.check_all()] == ["sdpa_forward"]


@pytest.fixture(scope="module")
def found():
    """The installed transformers' branches on the implementation's name (reading its source takes seconds)."""
    return branches.name_branches()


def test_every_name_branch_is_classified(found):
    unclassified = [f"{b.path} line {found[b][0]}: {b.condition}" for b in found if b not in NAME_BRANCHES]
    assert not unclassified, (
        f"transformers {tf.__version__} branches on the attention implementation's name where "
        "qk_attn.capture.known_branches.NAME_BRANCHES does not say how 'qk_sniff' is handled: "
        + "; ".join(unclassified)
    )


def test_branches_said_alike_are_alike():
    wrong = [b for b, handling in NAME_BRANCHES.items() if handling == ALIKE and not branches.alike(b.condition)]
    assert not wrong


def test_the_enumeration_finds_a_new_branch(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "modeling_new.py").write_text(
        'def f(self):\n    if self.config._attn_implementation   ==  "sdpa":\n        return 1\n'
    )
    (tmp_path / "models" / "modular_new.py").write_text("x = config._attn_implementation == 'eager'\n")
    assert branches.name_branches(tmp_path) == {
        branches.Branch("models/modeling_new.py", "self.config._attn_implementation == 'sdpa'"): [2]
    }
    assert not branches.alike("self.config._attn_implementation == 'sdpa'")


def test_followed_branches_have_their_method(found):
    followed = [b for b in found if NAME_BRANCHES.get(b, "").startswith("qk_sniff takes the wrapped")]
    for branch in followed:
        module_name = "transformers." + branch.path.removesuffix(".py").replace("/", ".")
        class_name, method = branches.FOLLOWED_METHODS[module_name]
        module = __import__(module_name, fromlist=[class_name])
        assert callable(getattr(getattr(module, class_name), method)), branch


def tiny_gemma4():
    config = tf.Gemma4TextConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=4,
        pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=96,
        hidden_size_per_layer_input=8,
        global_head_dim=16,
    )
    torch.manual_seed(0)
    return tf.Gemma4ForCausalLM(config).eval()


def logits(model, implementation, ids, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.fixture
def not_yet_followed(monkeypatch):
    """Gemma 4 as transformers ships it: the "qk_sniff" mask function itself must make it follow sdpa."""
    from transformers.models.gemma4 import modeling_gemma4

    method = getattr(modeling_gemma4.Gemma4TextModel, "_maybe_slice_kv_shared_inputs", None)
    if method is not None:
        monkeypatch.setattr(
            modeling_gemma4.Gemma4TextModel, "_maybe_slice_kv_shared_inputs", getattr(method, "__wrapped__", method)
        )
    monkeypatch.setattr(branches, "_followed", set())


def test_a_broken_fact_stops_the_first_captured_forward_and_only_it(monkeypatch):
    from support.models import build

    model = build("llama3", "qk_sniff")
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    broken = facts.Finding("mask_call_keywords", tf.__version__, "the keywords", "none of them")
    monkeypatch.setattr(facts, "check_all", lambda: [broken])
    facts.require.cache_clear()
    try:
        with torch.no_grad():
            model(input_ids=ids)  # no session: the model runs as it is
            with pytest.raises(TransformersMismatch, match=rf"transformers {tf.__version__} .*mask_call_keywords"):
                with qk_attn.session(sampler="all", example_ids=[0]):
                    model(input_ids=ids)
    finally:
        facts.require.cache_clear()


@pytest.mark.parametrize("capture", [False, True], ids=["capture_off", "capture_on"])
def test_gemma4_logits_to_keep_equal_sdpa(not_yet_followed, capture):
    model = tiny_gemma4()
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = logits(model, "sdpa", ids, logits_to_keep=3)
    if capture:
        with qk_attn.session(sampler="all", example_ids=[0, 1]) as s:
            got = logits(model, "qk_sniff", ids, logits_to_keep=3)
        assert s.table().num_rows > 0
    else:
        got = logits(model, "qk_sniff", ids, logits_to_keep=3)
    assert got.shape == (2, 3, 96)
    assert torch.equal(got, expected)
    assert model.config._attn_implementation == "qk_sniff"  # the name is back after the followed method


def test_sparse_indexer_models_are_refused():
    config = tf.DeepseekV32Config() if hasattr(tf, "DeepseekV32Config") else pytest.skip("no DeepSeek-V3.2 here")
    with pytest.raises(CaptureError, match="deepseek_v32 .*load it with attn_implementation='sdpa'"):
        branches.follow_wrapped_backend(config, "sdpa")


def test_gpt2_upcast_attention_is_refused_under_eager_only():
    config = tf.GPT2Config(reorder_and_upcast_attn=True)
    branches.follow_wrapped_backend(config, "sdpa")  # sdpa ignores reorder_and_upcast_attn, as "sdpa" does
    with pytest.raises(CaptureError, match="reorder_and_upcast_attn=True .*QK_SNIFF_BACKEND=sdpa"):
        branches.follow_wrapped_backend(config, "eager")


def test_a_cache_that_overrides_a_row_method_is_found(monkeypatch):
    """A cache class with its own reorder_cache would bypass the wrapper on Cache: a broken fact."""
    monkeypatch.setattr(tf.DynamicCache, "reorder_cache", lambda self, beam_idx: None, raising=False)
    assert [f.fact for f in facts.check_all()] == ["cache_row_methods"]


def test_a_trusted_cache_layer_that_moved_is_found(monkeypatch):
    """capture/caches trusts transformers' layer types by their update method: one renamed or moved
    would otherwise be refused (or, kept under its name, trusted) without anyone reading it."""
    from transformers import cache_utils

    monkeypatch.delattr(cache_utils, "StaticSlidingWindowLayer")
    assert [f.fact for f in facts.check_all()] == ["cache_layer_updates"]


@pytest.mark.parametrize("renamed", ["FlashAttentionKwargs", "_flash_attention_forward"])
def test_packed_sequence_keywords_renamed_by_a_release_are_found(renamed, monkeypatch):
    """attention.refuse_packed reads cu_seq_lens_q/k: renamed, packed documents would be recorded as one."""
    from transformers import modeling_flash_attention_utils as flash_utils

    if renamed == "FlashAttentionKwargs":
        annotations = {"cu_seqlens_q": torch.Tensor, "cu_seqlens_k": torch.Tensor}
        monkeypatch.setattr(flash_utils.FlashAttentionKwargs, "__annotations__", annotations)
    else:
        monkeypatch.setattr(flash_utils, "_flash_attention_forward", lambda q, k, v, mask, cu_seqlens_q=None: None)
    assert [f.fact for f in facts.check_all()] == ["packed_sequence_keywords"]


def test_image_inputs_renamed_by_a_release_are_found(monkeypatch):
    """frames.model_forward tells a forward with images by its pixel_values (mrope positions are refused)."""
    from transformers.models.gemma3 import modeling_gemma3

    def forward(self, input_ids=None, images=None, **kwargs):
        return None

    monkeypatch.setattr(modeling_gemma3.Gemma3ForConditionalGeneration, "forward", forward)
    findings = {finding.fact: finding.found for finding in facts.check_all()}
    assert findings.keys() == {"image_inputs"}
    assert findings["image_inputs"].startswith(
        "Gemma3ForConditionalGeneration.forward(self, input_ids=None, images=None"
    )


def test_an_import_that_fails_before_registering_is_not_blamed_on_transformers():
    """`import qk_attn` blamed any failure on transformers when "qk_sniff" was then missing from its registries:
    a missing pyarrow read as "transformers 5.25.0 breaks what qk-attn relies on"."""
    import subprocess
    import sys

    code = "import sys; sys.modules['pyarrow'] = None; import qk_attn"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("ModuleNotFoundError: import of pyarrow halted"), last


def test_the_mismatch_of_a_release_below_the_range_says_so_and_one_shared_error_is_told_once():
    """4.57.6 (outside the range) was told as 15 broken facts in 4,415 characters, never as "older than the
    lowest release"; an environment where transformers' own imports fail (every check failing alike) blamed
    15 facts with the same error."""
    from qk_attn.capture.fact_report import mismatch
    from qk_attn.capture.facts import Finding

    old = [Finding("mask_functions", "4.57.6", "x", "y"), Finding("attention_call", "4.57.6", "a", "b")]
    message = str(mismatch(old))
    assert message.startswith("qk_sniff: transformers 4.57.6, older than 5.17.0, the lowest release qk-attn supports,")
    assert "mask_functions: expected x, found y; attention_call: expected a, found b" in message
    shared = [Finding(name, tf.__version__, "z", "ValueError: Either a revision or a version") for name in "abc"]
    message = str(mismatch(shared))
    assert "older than" not in message and message.count("Either a revision") == 1
    assert "every check of it failed with the same error (ValueError: Either a revision" in message
