"""A transformers release that changes what qk-attn relies on is refused or followed, never silently
wrong: each case edits transformers' own source as such a release would (support.release)."""

from __future__ import annotations

import importlib
import re
import sys

import pytest
import torch
import transformers as tf
import transformers.models.llama.modeling_llama as modeling_llama
from transformers import DynamicCache

import qk_attn
from qk_attn.capture import backends, facts, modeling_checks, name_branches, query_slicing, rope_check
from qk_attn.errors import CaptureError
from support.models import COMMON, build, cache_kw, gemma4, padded_batch
from support.release import edit_file, edited_source, import_file, redefine

NEW_BRANCH = (
    "        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS",
    '        if self.config._attn_implementation == "sdpa":\n'
    "            attention_mask = attention_mask  # a path only sdpa takes\n"
    "        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS",
)


@pytest.fixture
def fresh_checks(tmp_path, monkeypatch):
    """Modeling files and followed methods are checked once per process: forget what was checked. The
    edited files (`edit_file(..., tmp_path, ...)`) lie under tmp_path as under the transformers package."""
    monkeypatch.setattr(modeling_checks, "_refusals", {})
    monkeypatch.setattr(modeling_checks, "transformers_root", lambda: tmp_path)
    monkeypatch.setattr(name_branches, "_followed", set())


@pytest.mark.parametrize("in_session", [False, True], ids=["capture-off", "capture-on"])
def test_a_new_branch_on_the_implementation_name_in_the_modeling_file_is_refused(
    in_session, fresh_checks, tmp_path, monkeypatch
):
    model = build("llama3", "qk_sniff")
    edit_file(modeling_llama, [NEW_BRANCH], tmp_path, monkeypatch)
    expected = r"^qk_sniff: models/llama/modeling_llama.py line \d+ branches on the attention implementation's name \(self.config"
    with pytest.raises(CaptureError, match=expected):
        if in_session:
            with qk_attn.session(sampler="all"):
                model(**padded_batch("left"))
        else:
            model(**padded_batch("left"))


NEW_BRANCH_FORMS = {
    "an alias": (
        '        impl = self.config._attn_implementation\n        if impl == "sdpa":\n'
        "            attention_mask = attention_mask\n",
        r"\(impl == 'sdpa'\)",
    ),
    "a match": (
        "        match self.config._attn_implementation:\n            case 'sdpa':\n"
        "                attention_mask = attention_mask\n",
        r"\(match self.config._attn_implementation\)",
    ),
    "a helper given the config": (
        "        if is_sdpa_requested(self.config):\n            attention_mask = attention_mask\n",
        r"\(is_sdpa_requested\(self.config\)\)",
    ),
    "a table lookup": (
        "        attention_mask = {'sdpa': attention_mask}.get(self.config._attn_implementation, attention_mask)\n",
        r"\(\{'sdpa': attention_mask\}.get\(self.config._attn_implementation, attention_mask\)\)",
    ),
}


@pytest.mark.parametrize("form", NEW_BRANCH_FORMS)
def test_a_new_branch_written_another_way_is_refused_too(form, fresh_checks, tmp_path, monkeypatch):
    """A release may test the name through a local alias, a `match`, a helper in the style of
    is_flash_attention_requested or a table's `.get`: still a branch."""
    code, condition = NEW_BRANCH_FORMS[form]
    anchor = "        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS"
    model = build("llama3", "qk_sniff")
    edit_file(modeling_llama, [(anchor, code + anchor)], tmp_path, monkeypatch)
    with pytest.raises(CaptureError, match=r"branches on the attention implementation's name " + condition):
        model(**padded_batch("left"))


def test_remote_code_on_a_transformers_config_class_has_its_own_file_checked(fresh_checks, tmp_path, monkeypatch):
    """Remote code may reuse a transformers config class (here LlamaConfig): the config names
    modeling_llama, but the attention runs from the remote file, which is checked at its first call."""
    import re

    source = edited_source(modeling_llama, [NEW_BRANCH])
    source = re.sub(r"^from \.\.\.", "from transformers.", source, flags=re.M)
    source = source.replace("from .configuration_llama", "from transformers.models.llama.configuration_llama")
    path = tmp_path / "remote_llama.py"
    path.write_text(source, encoding="utf-8")
    remote = import_file(path, "remote_llama", monkeypatch)
    config = build("llama3").config
    model = remote.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("qk_sniff")
    with pytest.raises(CaptureError, match=r"^qk_sniff: remote_llama.py line \d+ branches on the attention"):
        with qk_attn.session(sampler="all"):
            model(**padded_batch("left"))


def test_a_branch_alike_for_qk_sniff_and_its_backends_is_not_refused(fresh_checks, tmp_path, monkeypatch):
    alike = (NEW_BRANCH[0], NEW_BRANCH[1].replace('== "sdpa"', '== "flex_attention"'))
    model = build("llama3", "qk_sniff")
    edit_file(modeling_llama, [alike], tmp_path, monkeypatch)
    with qk_attn.session(sampler="all") as s:
        model(**padded_batch("left"))
    assert s.table().num_rows > 0


@pytest.mark.parametrize("lookup", ["get_interface", "get"])
def test_an_eager_default_renamed_by_a_release_is_the_one_qk_sniff_runs(lookup, tmp_path, monkeypatch):
    """transformers runs, for "eager", the default the attention forward gives get_interface (or a plain
    mapping `.get`): a release that gives it another function (here: softmax in float64) changes eager's
    logits, and qk_sniff's."""

    def eager_in_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            weights = weights + attention_mask
        weights = torch.softmax(weights, dim=-1, dtype=torch.float64).to(query.dtype)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights

    monkeypatch.setattr(modeling_llama, "eager_in_float64", eager_in_float64, raising=False)
    redefine(
        modeling_llama.LlamaAttention,
        "forward",
        [
            ("ALL_ATTENTION_FUNCTIONS.get_interface(", f"ALL_ATTENTION_FUNCTIONS.{lookup}("),
            (
                "self.config._attn_implementation, eager_attention_forward",
                "self.config._attn_implementation, eager_in_float64",
            ),
        ],
        tmp_path,
        monkeypatch,
    )
    backends._eager_attention_of.cache_clear()
    batch = padded_batch("left")
    model = build("llama3", "eager")
    want = model(**batch).logits
    model.set_attn_implementation("qk_sniff")
    with qk_attn.session(sampler="all", backend="eager"):
        got = model(**batch).logits
    backends._eager_attention_of.cache_clear()
    assert torch.equal(got, want)


def test_a_followed_branch_that_moved_to_another_method_is_refused(fresh_checks, tmp_path, monkeypatch):
    """Gemma 4 slices its shared key/value inputs by the implementation's name: qk-attn runs that
    method under the backend's name. A release that moves the branch into another method (here: the
    method renamed) would take qk_sniff's path there. (A release without the method has no branch.)"""
    modeling_gemma4 = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    if not hasattr(modeling_gemma4.Gemma4TextModel, "_maybe_slice_kv_shared_inputs"):
        pytest.skip("no Gemma 4 branch to follow in this transformers")
    model = gemma4()
    model.set_attn_implementation("qk_sniff")
    moved = ("def _maybe_slice_kv_shared_inputs(", "def _slice_kv_shared_inputs(")
    edit_file(modeling_gemma4, [moved], tmp_path, monkeypatch)
    with pytest.raises(
        CaptureError, match=r"in Gemma4TextModel._slice_kv_shared_inputs, where qk-attn runs Gemma4TextModel._maybe"
    ):
        model(**padded_batch("left"))


@pytest.mark.parametrize(
    "edit, found",
    [
        (
            ("if has_eos_stopping_criteria:\n", "if has_eos_stopping_criteria or True:\n"),
            "pads finished rows under `has_eos_stopping_criteria or True`",
        ),
        (
            ('next_sequence_length = 1 if model_kwargs["use_cache"] else None', "next_sequence_length = 1"),
            "does not read model_kwargs['use_cache']",
        ),
    ],
    ids=["pads-without-eos-criteria", "use-cache-out-of-model-kwargs"],
)
def test_a_sample_loop_that_changes_what_frames_read_breaks_a_fact(edit, found, tmp_path, monkeypatch):
    """frames reads `has_eos_stopping_criteria` to tell pad tokens from real ones, and
    `model_kwargs["use_cache"]` to refuse generate(use_cache=False): both are checked in the source."""
    from transformers.generation.utils import GenerationMixin

    redefine(GenerationMixin, "_sample", [edit], tmp_path, monkeypatch)
    (finding,) = facts.check_all()
    assert finding.fact == "generation_frames" and found in finding.found


@pytest.mark.parametrize("released", [False, True])
def test_a_sliding_layer_whose_call_passes_no_window_is_labelled_with_its_masks(released, tmp_path, monkeypatch):
    """A release of Mistral that stops passing sliding_window= to the attention call (as PhiMoE and Doge
    never do): its forward built only the sliding mask, whose window labels the rows (and
    full_attention_only still skips them)."""
    import transformers.models.mistral.modeling_mistral as modeling_mistral

    model = tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=4)).eval()
    model.set_attn_implementation("qk_sniff")
    if released:
        edit = ('sliding_window=getattr(self.config, "sliding_window", None),  # main diff with Llama', "")
        redefine(modeling_mistral.MistralAttention, "forward", [edit], tmp_path, monkeypatch)
    with qk_attn.session(sampler="all") as s:
        model(**padded_batch("left"))
    assert set(s.table()["sliding_window"].to_pylist()) == {4}
    with pytest.raises(CaptureError, match="full_attention_only=True, but every layer of this mistral model"):
        with qk_attn.session(sampler="all", full_attention_only=True):
            model(**padded_batch("left"))


def test_phimoe_whose_calls_never_pass_a_window_is_labelled_with_its_masks():
    """PhiMoE builds a sliding mask whenever its config sets sliding_window, and passes no window to
    the attention call: its rows carry that window (they were labelled full attention)."""
    config = tf.PhimoeConfig(**COMMON, sliding_window=4, num_local_experts=2, num_experts_per_tok=1)
    model = tf.PhimoeForCausalLM(config).eval()
    model.set_attn_implementation("qk_sniff")
    with qk_attn.session(sampler="all") as s:
        model(**padded_batch("left"))
    assert set(s.table()["sliding_window"].to_pylist()) == {4}


def test_chunked_layers_are_not_labelled_with_their_chunk_as_a_sliding_window():
    """Llama 4's chunked layers build only local masks (their chunk) and pass no window: their layer type
    says chunked, so the chunk size is not taken for a sliding window."""
    config = tf.Llama4TextConfig(**COMMON, head_dim=16)
    assert set(config.layer_types) == {"chunked_attention"}
    model = tf.Llama4ForCausalLM(config).eval()
    model.set_attn_implementation("qk_sniff")
    with qk_attn.session(sampler="all") as s:
        model(**padded_batch("left"))
    assert set(s.table()["sliding_window"].to_pylist()) == {None}


def test_a_sliding_mask_builder_that_passes_the_mask_under_another_keyword_breaks_a_fact(tmp_path, monkeypatch):
    """All-sliding models (Mistral with a window) build only the sliding mask: a builder that hands the
    2-D mask over as `padding_mask=` would give qk_sniff no padding, and padding would be recorded."""
    from transformers import masking_utils

    edit = (
        "        attention_mask=attention_mask,\n        allow_is",
        "        padding_mask=attention_mask,\n        allow_is",
    )
    redefine(masking_utils, "create_sliding_window_causal_mask", [edit], tmp_path, monkeypatch)
    (finding,) = facts.check_all()
    assert finding.fact == "mask_call_keywords" and "create_sliding_window_causal_mask calls" in finding.found


def _forward_rotating_other_positions(self, input_ids=None, attention_mask=None, position_ids=None, cache=None):
    """LlamaModel.forward as a release might write it: RoPE gets positions computed in a new local."""
    mask = create_causal_mask(config=self.config, attention_mask=attention_mask)  # noqa: F821 (never run)
    rope_positions = attention_mask.cumsum(-1) - 1
    return self.rotary_emb(input_ids, position_ids=rope_positions), mask


def test_a_model_forward_that_rotates_by_other_positions_breaks_a_fact(monkeypatch):
    """Rows are keyed by the model forward's `position_ids` local: a release that hands its rotary
    embedding other positions (padding-aware ones in a new local) would mislabel every row."""
    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", _forward_rotating_other_positions)
    (finding,) = facts.check_all()
    assert (
        finding.fact == "model_forward_locals" and "does not call self.rotary_emb(..., position_ids)" in finding.found
    )


def test_a_sliding_mask_builder_that_passes_its_window_under_another_keyword_breaks_a_fact(tmp_path, monkeypatch):
    """A sliding layer whose call names no window (PhiMoE) is labelled with its mask's `local_size`."""
    from transformers import masking_utils

    edit = ("local_size=sliding_window,", "window_size=sliding_window,")
    redefine(masking_utils, "create_sliding_window_causal_mask", [edit], tmp_path, monkeypatch)
    (finding,) = facts.check_all()
    assert finding.fact == "mask_call_keywords" and "create_sliding_window_causal_mask calls" in finding.found


def test_a_sample_loop_renamed_with_an_alias_breaks_a_fact(monkeypatch):
    """frames tells the decoding loop by its code's name: `_sample = _decode` keeps the attribute but
    not the name (the finished rows' padding would be recorded as tokens)."""
    from transformers.generation.utils import GenerationMixin

    def _decode(self, *args, **kwargs):
        return None

    monkeypatch.setattr(GenerationMixin, "_sample", _decode)
    (finding,) = facts.check_all()
    assert finding.fact == "generation_frames" and "GenerationMixin._sample runs code named '_decode'" in finding.found


@pytest.fixture
def fresh_rotation():
    """Each attention class's rotation is read once per process (rope_check.rotation): read it anew."""
    rope_check.rotation.cache_clear()
    yield
    rope_check.rotation.cache_clear()


def test_a_query_scale_read_from_other_settings_breaks_a_fact(fresh_rotation, tmp_path, monkeypatch):
    """rope="pre" undoes Ministral 3's query scale with the arguments its forward passes today: a
    forward that reads them from other settings would be undone with the wrong length."""
    from transformers.models.ministral3 import modeling_ministral3

    other_length = (
        'self.config.rope_parameters.get("original_max_position_embeddings"),',
        "self.config.max_position_embeddings,",
    )
    redefine(modeling_ministral3.Ministral3Attention, "forward", [other_length], tmp_path, monkeypatch)
    (finding,) = facts.check_all()
    assert finding.fact == "attention_forward_rotation"
    assert "Ministral3Attention.forward changes query_states after rotating it" in finding.found


def test_a_window_passed_under_another_keyword_is_refused(fresh_checks, tmp_path, monkeypatch):
    """The recorder reads a call's window from `sliding_window=`: a release passing it as `window_size=`
    would record every row with no window, and full_attention_only would record sliding layers."""
    from transformers.models.mistral import modeling_mistral

    model = tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=4, attn_implementation="qk_sniff"))
    renamed = (
        'sliding_window=getattr(self.config, "sliding_window", None)',
        'window_size=getattr(self.config, "sliding_window", None)',
    )
    edit_file(modeling_mistral, [renamed], tmp_path, monkeypatch)
    with pytest.raises(
        CaptureError,
        match=r"^qk_sniff: models/mistral/modeling_mistral.py line \d+ passes the attention call a window as window_size=",
    ):
        with qk_attn.session(sampler="all", full_attention_only=True):
            model.eval()(**padded_batch("left"))


def test_an_eager_default_qk_attn_cannot_resolve_is_an_error(tmp_path, monkeypatch):
    """A forward whose eager default is no name of its module (here an attribute of its class): named, not guessed."""
    monkeypatch.setattr(
        modeling_llama.LlamaAttention, "eager", staticmethod(modeling_llama.eager_attention_forward), raising=False
    )
    edit = ("self.config._attn_implementation, eager_attention_forward", "self.config._attn_implementation, self.eager")
    redefine(modeling_llama.LlamaAttention, "forward", [edit], tmp_path, monkeypatch)
    backends._eager_attention_of.cache_clear()
    model = build("llama3", "qk_sniff")
    with pytest.raises(
        ValueError, match=r"=eager: the eager attention of LlamaAttention .* names self.eager, which its"
    ):
        with qk_attn.session(sampler="all", backend="eager"):
            model(**padded_batch("left"))
    backends._eager_attention_of.cache_clear()


def test_a_cache_that_keeps_its_layers_elsewhere_breaks_a_fact(tmp_path, monkeypatch):
    """refuse_rounding_cache finds a cache's layer types in `layers`: a release that keeps them under another
    name would leave it nothing to refuse."""
    from transformers import cache_utils

    edit_file(
        cache_utils,
        [("        self.layers = layers if", "        self.cache_layers = layers if")],
        tmp_path,
        monkeypatch,
    )
    (finding,) = facts.check_all()
    assert finding.fact == "cache_layer_updates" and "not layers and layer_class_to_replicate" in finding.found


def test_a_cache_argument_under_a_name_qk_attn_does_not_know_is_refused(monkeypatch):
    """A release (or remote code) that renames the forward's cache argument: the cache is not found,
    so two caches of one model could not be told apart. A forward that continues a cache is refused."""
    from qk_attn.capture import frames

    model = build("llama3", "qk_sniff")
    monkeypatch.setattr(frames, "cache_of", lambda arguments: None)  # the name frames reads is gone
    ids = torch.randint(2, 90, (1, 8))
    cache = DynamicCache(config=model.config)
    with qk_attn.session(sampler="all") as s:
        model(input_ids=ids[:, :5], **cache_kw(cache))  # a first forward: past 0, recorded
        with pytest.raises(CaptureError, match=r"at cache position 5, but its forward has no cache argument"):
            model(input_ids=ids[:, 5:], **cache_kw(cache))
    assert s.table().num_rows == 0  # the example it would continue is discarded with it: it is incomplete


def test_attention_states_handed_over_tokens_first_break_a_fact(tmp_path, monkeypatch):
    """A release whose attention forwards hand attention (batch, tokens, heads, head_dim) states (its
    attention functions transposing them themselves): rows would be read with heads and tokens swapped,
    and shapes cannot tell when a forward has as many tokens as heads. The layout is a fact."""
    edits = [
        (
            "self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)",
            "self.q_proj(hidden_states).view(hidden_shape)",
        ),
        (
            "self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)",
            "self.k_proj(hidden_states).view(hidden_shape)",
        ),
    ]
    redefine(modeling_llama.LlamaAttention, "forward", edits, tmp_path, monkeypatch)
    (finding,) = facts.check_all()
    assert finding.fact == "attention_call_layout" and "LlamaAttention.forward assigns query_states" in finding.found


def test_a_torch_whose_backward_marker_changed_breaks_a_fact(monkeypatch):
    """Checkpoint recomputes during backward are told by torch._C._current_graph_task_id() != -1: a
    torch whose sentinel changed (None here) would have every forward skipped, with a misleading warning."""
    monkeypatch.setattr(torch._C, "_current_graph_task_id", lambda: None)
    (finding,) = facts.check_all()
    assert finding.fact == "backward_marker" and "None outside a backward pass" in finding.found


@pytest.mark.parametrize("change", ["call_impl", "hook_order"])
def test_a_torch_whose_module_call_changed_breaks_a_fact(monkeypatch, change):
    """qk_attn.capture.calls keeps a call's frame of Module._call_impl (an interrupted call is one whose frame
    left the stack) and moves its end hook last among a module's forward hooks: a torch that runs its calls in
    other code, or its hooks in another order, would commit forwards that failed."""
    import types

    if change == "call_impl":  # the same body under another code object
        original = torch.nn.Module._call_impl
        copy = types.FunctionType(original.__code__.replace(co_name="_call_impl_v2"), original.__globals__)
        monkeypatch.setattr(torch.nn.Module, "_call_impl", copy)
        monkeypatch.setattr(torch.nn.Module, "__call__", lambda self, *a, **k: copy(self, *a, **k))
        expected = "no frame of Module._call_impl"
    else:  # hooks read in reverse
        call = torch.nn.Module._call_impl

        def reversed_hooks(self, *args, **kwargs):
            self._forward_hooks = type(self._forward_hooks)(reversed(list(self._forward_hooks.items())))
            return call(self, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, "__call__", reversed_hooks)
        expected = "forward hooks ran as"
    findings = [f for f in facts.check_all() if f.fact == "module_call_hooks"]
    assert len(findings) == 1 and expected in findings[0].found


@pytest.mark.parametrize(
    "release",
    [
        "import transformers.masking_utils as m; del m.flash_attention_mask",
        "import transformers.masking_utils as m; del m.AttentionMaskInterface",
        "from transformers.generation.utils import GenerationMixin; del GenerationMixin.generate",
    ],
    ids=["moved-function", "renamed-class", "removed-method"],
)
def test_a_release_that_moved_what_qk_attn_imports_fails_its_import_naming_the_fact(release):
    """`import qk_attn` registers at once: a name it imports or wraps that a release moved raised a bare
    ImportError or AttributeError, naming no version and no fact."""
    import subprocess
    import sys

    code = f"{release}\ntry:\n    import qk_attn\nexcept Exception as error:\n    print(type(error).__name__, error)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"TransformersMismatch qk_sniff: transformers {tf.__version__} (torch ")
    assert "imported_names: expected the 12 names qk-attn takes from transformers" in result.stdout
    assert f"pip install 'transformers>={qk_attn.version.TRANSFORMERS_TESTED[0]},<" in result.stdout


def test_a_mask_builder_that_renames_a_keyword_is_refused_naming_the_fact(tmp_path, monkeypatch):
    """The mask function's arguments are bound once a forward is to be recorded: a builder that passes
    `query_length=` raised a TypeError from qk_attn's own signature (capture on or off), naming no fact.
    Capture off, the model runs as its backend does on that release."""
    from transformers import masking_utils

    assert not facts.check_all()  # (imports the modeling files the facts read before the edit: they bind it)
    edit = ("        q_length=q_length,\n", "        query_length=q_length,\n")
    renamed = redefine(masking_utils, "create_causal_mask", [edit], tmp_path, monkeypatch)
    monkeypatch.setattr(modeling_llama, "create_causal_mask", renamed)
    sdpa_mask = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]

    def released_sdpa_mask(batch_size, query_length, kv_length, **kwargs):  # the release's own, renamed alike
        return sdpa_mask(batch_size=batch_size, q_length=query_length, kv_length=kv_length, **kwargs)

    monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, "sdpa", released_sdpa_mask)
    batch = padded_batch("left")
    expected = build("llama3", "sdpa")(**batch).logits
    model = build("llama3", "qk_sniff")
    assert torch.equal(model(**batch).logits, expected)
    facts.require.cache_clear()  # facts are checked once per process: as in a process on that release
    try:
        with pytest.raises(facts.TransformersMismatch, match=r"breaks what qk-attn relies on: mask_call_keywords"):
            with qk_attn.session(sampler="all"):
                model(**batch)
    finally:
        facts.require.cache_clear()


def test_a_model_forward_whose_position_ids_were_renamed_is_refused(tmp_path, monkeypatch):
    """A release that renames a decoder stack's `position_ids` (numbering its tokens itself) lets a
    caller's position_ids reach the layers through **kwargs: rows were keyed by them, silently, where
    its RoPE used its own numbering (left padding: `qk-sniff run` passes position_ids for padded batches).
    Without them, rows were keyed by token index, right only while its numbering happens to be that.
    Qwen 2: fact model_forward_locals reads the seed families' stacks only; its forward is read at run time."""
    import transformers.models.qwen2.modeling_qwen2 as modeling_qwen2

    edits = [
        ("@auto_docstring\n", ""),  # (documents a method of a class: not this function)
        ("            position_ids=position_ids,\n", ""),  # no longer handed to the layers
        ('"position_ids": position_ids', '"position_ids": positions'),
        ("self.rotary_emb(hidden_states, position_ids)", "self.rotary_emb(hidden_states, positions)"),
        ("position_ids: torch.LongTensor | None = None", "positions: torch.LongTensor | None = None"),
        ("if position_ids is None", "if positions is None"),
        ("position_ids = torch.arange", "positions = torch.arange"),
        ("position_ids = position_ids.unsqueeze(0)", "positions = positions.unsqueeze(0)"),
    ]
    redefine(modeling_qwen2.Qwen2Model, "forward", edits, tmp_path, monkeypatch)
    model = build("qwen2", "qk_sniff")
    batch = padded_batch("left")  # with position_ids counting real tokens
    positions = batch.pop("position_ids")
    renamed = r"^qk_sniff: \S*forward \(modeling_qwen2.py\) calls self.rotary_emb with [^\n]*positions\), not"
    with qk_attn.session(sampler="all") as s:
        for given in ({}, {"position_ids": positions}):
            with pytest.raises(CaptureError, match=renamed):
                model(**batch, **given, use_cache=False)
    assert s.table() is None


@pytest.mark.parametrize("handed_to_layers", [True, False])
def test_a_model_forward_that_numbers_its_tokens_anew_after_its_mask_is_recorded_at_the_new_positions(
    tmp_path, monkeypatch, handed_to_layers
):
    """A release whose decoder stack gives `position_ids` new values after it built the mask (padding-aware
    positions) has its RoPE use those: its rows were keyed by the ones it held at the mask, silently where
    its layers get none, and refused with advice the caller could not follow where they do. Recorded as
    the unedited forward records a call given those positions."""
    import transformers.models.qwen2.modeling_qwen2 as modeling_qwen2

    batch = padded_batch("left")  # position_ids: (attention_mask.cumsum(-1) - 1), what the release computes
    model = build("qwen2", "qk_sniff")
    with qk_attn.session(sampler="all") as given:
        expected = model(**batch, use_cache=False).logits
    anchor = "    hidden_states = inputs_embeds\n"
    renumber = "    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]\n"
    edits = [("@auto_docstring\n", ""), (anchor, anchor + renumber)]
    if not handed_to_layers:
        edits.append(("            position_ids=position_ids,\n", ""))
    redefine(modeling_qwen2.Qwen2Model, "forward", edits, tmp_path, monkeypatch)
    batch.pop("position_ids")  # the release numbers the tokens itself
    with qk_attn.session(sampler="all") as renumbered:
        assert torch.equal(model(**batch, use_cache=False).logits[batch["attention_mask"].bool()],
                           expected[batch["attention_mask"].bool()])  # fmt: skip
    assert renumbered.table().equals(given.table())


def test_a_model_forward_that_rebinds_its_position_ids_to_the_same_values_is_recorded(tmp_path, monkeypatch):
    """Rebinding `position_ids` after the mask to equal values (a copy, another device) changes nothing
    its rows are keyed by: recorded, as the unedited forward records them."""
    import transformers.models.qwen2.modeling_qwen2 as modeling_qwen2

    batch = padded_batch("left")
    model = build("qwen2", "qk_sniff")
    with qk_attn.session(sampler="all") as before:
        model(**batch, use_cache=False)
    anchor = "    hidden_states = inputs_embeds\n"
    edits = [("@auto_docstring\n", ""), (anchor, anchor + "    position_ids = position_ids.clone()\n")]
    redefine(modeling_qwen2.Qwen2Model, "forward", edits, tmp_path, monkeypatch)
    with qk_attn.session(sampler="all") as after:
        model(**batch, use_cache=False)
    assert after.table().equals(before.table())


def test_a_model_forward_that_binds_position_ids_to_positions_of_another_shape_after_its_mask_is_refused(
    tmp_path, monkeypatch
):
    """Positions bound anew after the mask are followed only where they number the forward's (B, T) tokens:
    multimodal-like (3, B, T) ones cannot key a row by one position."""
    import transformers.models.qwen2.modeling_qwen2 as modeling_qwen2

    rope = "    position_embeddings = self.rotary_emb(hidden_states, position_ids)\n"
    spread = "    position_ids = position_ids[None].expand(3, -1, -1)\n"
    redefine(
        modeling_qwen2.Qwen2Model, "forward", [("@auto_docstring\n", ""), (rope, rope + spread)], tmp_path, monkeypatch
    )
    model = build("qwen2", "qk_sniff")
    batch = padded_batch("left")
    with qk_attn.session(sampler="all") as s:
        with pytest.raises(
            CaptureError, match=r"^qk_sniff: Qwen2Model.forward gave its position_ids a \(3, 2, \d+\) tensor"
        ):
            model(**batch, use_cache=False)
    assert s.table() is None


def test_generation_methods_moved_to_another_file_break_a_fact(tmp_path, monkeypatch):
    """frames tells generate()'s methods by name and file (generation/utils.py): a release that splits that
    file would leave the use_cache=False refusal, the padding rule and the assisted refusal unreached."""
    import inspect
    import textwrap

    from transformers.generation.utils import GenerationMixin

    fn = inspect.unwrap(GenerationMixin._sample)
    path = tmp_path / "generation" / "sampling.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(inspect.getsource(fn)), encoding="utf-8")
    namespace: dict = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), sys.modules[fn.__module__].__dict__, namespace)
    monkeypatch.setattr(GenerationMixin, "_sample", namespace["_sample"])
    (finding,) = facts.check_all()
    assert finding.fact == "generation_frames" and f"_sample is defined in {path}" in finding.found


def test_a_vetted_cache_layer_whose_update_rounds_the_keys_breaks_a_fact(monkeypatch):
    """The layer types whose update qk-attn read are trusted by name: a release whose update returns the keys
    rounded (a bf16 storage default) would record keys the model never computed."""
    from transformers import cache_utils

    update = cache_utils.DynamicLayer.update

    def rounding(self, key_states, value_states, *args, **kwargs):
        return update(self, key_states.to(torch.bfloat16).to(key_states.dtype), value_states, *args, **kwargs)

    monkeypatch.setattr(cache_utils.DynamicLayer, "update", rounding)
    (finding,) = facts.check_all()
    assert finding.fact == "cache_layer_updates" and "DynamicLayer.update does not return the keys" in finding.found


@pytest.mark.parametrize(
    "module, holder, name",
    [
        ("transformers", "AttentionInterface", "_global_mapping"),
        ("transformers.cache_utils", None, "CacheLayerMixin"),
        ("transformers.models.auto.modeling_auto", None, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ],
)
def test_a_release_without_what_hooks_and_caches_read_breaks_imported_names(module, holder, name, monkeypatch):
    """hooks read the registered functions from `_global_mapping`; caches tell transformers' own layer
    types by CacheLayerMixin; the CLI's preflight a model type's class by MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: gone,
    they failed with a bare AttributeError (or ImportError) at a forward, at import or before a run."""
    target = importlib.import_module(module)
    target = getattr(target, holder) if holder else target
    monkeypatch.setattr(target, name, None)
    findings = {finding.fact: finding.found for finding in facts.check_all()}
    assert findings.get("imported_names") == f"{module} has no {holder + '.' if holder else ''}{name}"


def _gemma3_windows(model, windows: dict[int, object]) -> None:
    for layer, window in windows.items():
        model.model.layers[layer].self_attn.sliding_window = window


@pytest.mark.parametrize(
    "windows, message",
    [
        (
            {1: 4},
            r"layer 1's attention call names a sliding window of 4 where its config's layer_types says full_attention and its forward built masks with windows \[4, None\]",
        ),
        ({0: (4, 0)}, r"layer 0's attention call names the sliding window \(4, 0\), not a positive int"),
        (
            {0: 3},  # (what the module keeps when config.sliding_window is edited after the model was built)
            r"layer 0's attention call names a sliding window of 3, but its forward built its sliding masks with \[4\]",
        ),
    ],
    ids=["window-on-a-full-layer", "window-as-a-pair", "window-other-than-its-masks"],
)
def test_a_window_its_rows_could_not_be_labelled_with_is_refused(windows, message):
    """Gemma 3 passes its module's `sliding_window` to every attention call, None on full layers. A release
    that sets it on full layers too (their mask still built full) labelled full-attention rows with the
    window; one that passes a (left, right) pair failed deep inside the sink, or as a saver error."""
    model = build("gemma3", "qk_sniff")
    _gemma3_windows(model, windows)
    with qk_attn.session(sampler="all") as s:
        with pytest.raises(CaptureError, match=message):
            model(**padded_batch("right"))
    assert s.table() is None


def test_minimax_whose_full_attention_layers_attend_through_its_window_is_recorded_with_it():
    """MiniMax builds the mask of its `full_attention` layers with its `sliding_window` (when set) and passes
    the window to the call: the layer type's name says full, its mask and its call agree on the window."""
    config = tf.MiniMaxConfig(
        **{**COMMON, "num_hidden_layers": 4},
        head_dim=16,
        sliding_window=4,
        num_local_experts=2,
        num_experts_per_tok=1,
        layer_types=["full_attention", "linear_attention"] * 2,
    )
    torch.manual_seed(0)
    model = tf.MiniMaxForCausalLM(config).eval()
    ids = torch.randint(2, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(input_ids=ids).logits
        model.set_attn_implementation("qk_sniff")
        with qk_attn.session(sampler="all", capture="k") as s:
            assert torch.equal(model(input_ids=ids).logits, expected)
    table = s.table()
    assert set(table.column("sliding_window").to_pylist()) == {4} and set(table.column("layer").to_pylist()) == {0, 2}
    assert table.num_rows == 12 * 2 * config.num_key_value_heads


def test_mistral_given_layer_types_whose_layers_all_attend_through_its_window_is_recorded_with_it():
    """A Ministral-style config loaded as Mistral names its layers full_attention, yet Mistral builds only its
    sliding mask and passes the window to every call: mask and call agree, so the rows carry the window."""
    config = tf.MistralConfig(**COMMON, head_dim=16, sliding_window=4, layer_types=["full_attention"] * 3)
    model = tf.MistralForCausalLM(config).eval()
    model.set_attn_implementation("qk_sniff")
    with torch.inference_mode(), qk_attn.session(sampler="all", capture="k") as s:
        model(input_ids=torch.randint(2, 90, (1, 9), generator=torch.Generator().manual_seed(0)))
    assert set(s.table().column("sliding_window").to_pylist()) == {4}


def test_the_cache_update_fact_holds_under_another_default_device(monkeypatch):
    """Its keys came from a CPU generator on the default device: under torch.set_default_device("cuda") (meta
    here) the fact broke and blamed transformers for every recorded forward."""
    from qk_attn.capture.fact_checks_generation import cache_layer_updates

    torch.set_default_device("meta")
    try:
        assert cache_layer_updates() is None
    finally:
        torch.set_default_device(None)


def test_a_quantized_layer_that_rounds_the_new_keys_breaks_a_fact(monkeypatch):
    """Quanto and HQQ layers are trusted to hand attention the new keys as given; the check's stand-in storage
    was exact, so an update that sent the new keys through the storage (as fp8 does) went unseen."""
    from transformers import cache_utils

    update = cache_utils.QuantizedLayer.update

    def rounding(self, key_states, value_states, *args, **kwargs):
        rounded = self._dequantize(self._quantize(key_states, axis=self.axis_key))
        return update(self, rounded, value_states, *args, **kwargs)

    monkeypatch.setattr(cache_utils.QuantizedLayer, "update", rounding)
    (finding,) = facts.check_all()
    assert finding.fact == "cache_layer_updates" and "QuantizedLayer.update does not return" in finding.found


def test_a_window_on_a_layer_not_recorded_does_not_refuse_the_forward():
    """Only the recorded layers' windows are read: a layer left out by `layers=` is not refused for its own."""
    model = build("gemma3", "qk_sniff")
    _gemma3_windows(model, {1: 4})
    with qk_attn.session(sampler="all", layers="0") as s:
        model(**padded_batch("right"))
    assert set(s.table().column("layer").to_pylist()) == {0}


def test_a_mask_function_called_positionally_is_refused_in_one_line_and_the_next_forward_records():
    """A model file calling the registered mask function itself, positionally (as sdpa_mask's parameters
    come): a 45-line TypeError from qk-attn's own function, and six arguments would bind the mask
    function as the padding mask."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    model = build("llama3", "qk_sniff")
    mask = ALL_MASK_ATTENTION_FUNCTIONS["qk_sniff"]
    with torch.no_grad(), qk_attn.session(sampler="all", layers="0", heads="0", capture="q") as s:
        for args in [(1, 6, 6, 0, 0, causal_mask_function, None), (1, 6, 6, 0, 0, causal_mask_function)]:
            with pytest.raises(CaptureError, match=rf"^[^\n]*called with {len(args)} positional argument\(s\)[^\n]*$"):
                mask(*args, config=model.config)
        s.begin([4])
        model(input_ids=torch.arange(3, 9)[None])
        s.commit()
        table = s.table().to_pydict()
    assert table["example_id"] == [4] * 6 and sorted(table["position"]) == list(range(6))
    mask(1, 6, 6, 0, 0, causal_mask_function)  # capture off: the backend's mask, however it is called


@pytest.mark.parametrize("positions", ["position_ids + 3", "rope_ids"])
def test_a_model_forward_rotating_by_other_positions_than_its_position_ids_is_refused(positions, tmp_path, monkeypatch):
    """Rows are keyed by the mask-building forward's position_ids local. A model outside the seeds whose
    forward rotates by other positions (shifted, or numbered into another local) was recorded keyed by
    position_ids, every row off, with no error: fact model_forward_locals reads the seed models only."""
    import transformers.models.mistral.modeling_mistral as modeling_mistral

    call = "self.rotary_emb(hidden_states, position_ids=position_ids)"
    new = f"self.rotary_emb(hidden_states, position_ids={positions})"
    prefix = "rope_ids = position_ids + 3\n    " if positions == "rope_ids" else ""
    edits = [("@auto_docstring\n", ""), (f"position_embeddings = {call}", prefix + f"position_embeddings = {new}")]
    redefine(modeling_mistral.MistralModel, "forward", edits, tmp_path, monkeypatch)  # (auto_docstring: on classes)
    torch.manual_seed(0)
    model = tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=None)).eval()
    model.set_attn_implementation("qk_sniff")
    with torch.no_grad(), qk_attn.session(sampler="all", layers="0", heads="0", capture="q") as s:
        with pytest.raises(
            CaptureError, match=rf"^qk_sniff: [^\n]*calls self.rotary_emb with [^\n]*{re.escape(positions)}"
        ):
            model(input_ids=torch.arange(3, 9)[None])
        # generate() over a static cache builds a padded batch's mask in its input preparation, and hands it
        # to the forward, which builds none: the stack's own forward is read
        batch = padded_batch("left")
        prompt = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with pytest.raises(
            CaptureError, match=rf"^qk_sniff: [^\n]*calls self.rotary_emb with [^\n]*{re.escape(positions)}"
        ):
            model.generate(**prompt, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
        monkeypatch.undo()  # the released forward again: recorded at the positions RoPE used
        s.begin([4])
        model(input_ids=torch.arange(3, 9)[None])
        s.commit()
        table = s.table().to_pydict()
    assert table["example_id"] == [4] * 6 and sorted(table["position"]) == list(range(6))


@pytest.mark.parametrize("tokens", [3, 6])
def test_states_handed_over_tokens_first_are_refused_naming_the_layout(tokens, tmp_path, monkeypatch):
    """A model that hands attention (batch, tokens, heads, head_dim) states was told it "got 4 queries in a
    forward of 3 new tokens": the refusal now names the layout."""
    import transformers.models.mistral.modeling_mistral as modeling_mistral

    states = "query_states, key_states, value_states"
    swap = f"{states} = (s.transpose(1, 2) for s in ({states}))\n    "
    edit = ("attention_interface: Callable", swap + "attention_interface: Callable")
    redefine(modeling_mistral.MistralAttention, "forward", [edit], tmp_path, monkeypatch)
    model = tf.MistralForCausalLM(tf.MistralConfig(**dict(COMMON, num_key_value_heads=4), sliding_window=None)).eval()
    model.set_attn_implementation("qk_sniff")
    layout = rf"\(1, {tokens}, 4, \d+\) tensor: tokens on axis 1, not \(batch, heads, tokens, head_dim\)"
    with torch.no_grad(), qk_attn.session(sampler="all"), pytest.raises(CaptureError, match=layout):
        model(input_ids=torch.arange(3, 3 + tokens)[None])


def test_layers_given_other_than_the_last_queries_are_refused(fresh_checks, tmp_path, monkeypatch):
    """Which queries a layer got is read from the method that slices them (Gemma 4's KV-shared layers):
    a release that slices others (here: the first ones) is refused in one line, never keyed by guessed
    positions."""
    modeling_gemma4 = pytest.importorskip("transformers.models.gemma4.modeling_gemma4")
    if not hasattr(modeling_gemma4.Gemma4TextModel, "_maybe_slice_kv_shared_inputs"):
        pytest.skip("no Gemma 4 layers given only the last queries in this transformers")
    monkeypatch.setattr(query_slicing, "_refusals", {})
    first = ("slice(-logits_to_keep, None)", "slice(0, logits_to_keep)")
    redefine(modeling_gemma4.Gemma4TextModel, "_maybe_slice_kv_shared_inputs", [first], tmp_path, monkeypatch)
    model = gemma4(global_head_dim=16, num_kv_shared_layers=2, hidden_size_per_layer_input=8)
    model.set_attn_implementation("qk_sniff")
    ids = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(
        CaptureError,
        match=r"^qk_sniff: layer 2 got 1 of its forward's 6 queries; Gemma4TextModel._maybe_slice_kv_shared_inputs "
        r"does not slice them with slice\(-logits_to_keep, None\) .*; not recorded$",
    ):
        with qk_attn.session(sampler="all") as s:
            model(input_ids=ids, logits_to_keep=1)
    assert s.table() is None


def test_a_layer_of_another_model_given_fewer_queries_than_its_tokens_is_refused(monkeypatch):
    """Only the method read for Gemma 4 says which queries a layer got: elsewhere they are not guessed."""
    monkeypatch.setattr(query_slicing, "_refusals", {})
    ids = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(1))
    llama = build("llama3", "qk_sniff")
    interfaces = modeling_llama.ALL_ATTENTION_FUNCTIONS

    class LastQueryOfLayer1:  # as a model that gives layer 1 only its last query, over every key
        def get_interface(self, name, default):
            attention = interfaces.get_interface(name, default)

            def last_query(module, query, *args, **kwargs):
                return attention(module, query[:, :, -1:] if module.layer_idx == 1 else query, *args, **kwargs)

            return last_query

    monkeypatch.setattr(modeling_llama, "ALL_ATTENTION_FUNCTIONS", LastQueryOfLayer1())
    with pytest.raises(CaptureError, match=r"^qk_sniff: layer 1 got 1 of its forward's 6 queries; qk-attn knows which"):
        with qk_attn.session(sampler="all") as s:
            llama(input_ids=ids)
    assert s.table() is None


@pytest.mark.parametrize("handed_to_layers", [True, False])
def test_a_model_that_builds_its_mask_in_a_helper_method_is_keyed_by_its_forwards_positions(
    tmp_path, monkeypatch, handed_to_layers
):
    """A release (or remote code) whose decoder stack builds its mask in a method of its own, as
    transformers 4.x did in `_update_causal_mask`, holding the positions under another name there: they were
    read from that helper's frame (none: counted from the cache), so a left-padded example was keyed at
    positions 3.. where its RoPE used 0.., silently where its layers get no position_ids, and refused with
    advice the caller could not follow where they do. Its forward's own are read: recorded as unedited."""
    import transformers.models.qwen2.modeling_qwen2 as modeling_qwen2

    batch = padded_batch("left")  # with position_ids counting real tokens
    model = build("qwen2", "qk_sniff")
    with qk_attn.session(sampler="all") as unedited:
        expected = model(**batch, use_cache=False).logits

    def build_mask(self, arguments):
        positions = arguments.pop("position_ids")
        return modeling_qwen2.create_causal_mask(**arguments, position_ids=positions)

    edits = [
        ("@auto_docstring\n", ""),
        ('"full_attention": create_causal_mask(**mask_kwargs)', '"full_attention": self.build_mask(mask_kwargs)'),
    ]
    if not handed_to_layers:
        edits.append(("            position_ids=position_ids,\n", ""))
    redefine(modeling_qwen2.Qwen2Model, "forward", edits, tmp_path, monkeypatch)
    monkeypatch.setattr(modeling_qwen2.Qwen2Model, "build_mask", build_mask, raising=False)
    with qk_attn.session(sampler="all") as helper:
        assert torch.equal(model(**batch, use_cache=False).logits, expected)
    assert helper.table().equals(unedited.table())
