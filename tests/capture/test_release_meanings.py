"""A transformers release (or a patched model) that keeps every signature qk-attn reads but changes what
the values mean: the mask call's padding, the rotation rope="pre" undoes, a name branch outside the model's
file. Each is refused naming what changed, never recorded wrongly (support.release edits the source)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import transformers as tf
import transformers.masking_utils as masking_utils
import transformers.models.llama.modeling_llama as modeling_llama

import qk_attn
from qk_attn.capture import facts, modeling_checks, rope, rope_check
from qk_attn.errors import CaptureError, TransformersMismatch
from support.models import build, padded_batch
from support.oracle import captured_and_truth
from support.release import edit_file, redefine

MASK_ANCHOR = "    # We now create the mask\n"
# What a release could do with the 2-D mask before handing it to the mask function, its sdpa_mask adapted.
PADDING_CHANGES = {
    "folded": "    if attention_mask is not None:\n"
    "        mask_factory_function = and_masks(mask_factory_function, padding_mask_function(attention_mask))\n"
    "        attention_mask = None\n"
    "        allow_is_causal_skip = False\n",
    "4d": "    if attention_mask is not None:\n        attention_mask = attention_mask[:, None, None, :]\n",
    "inverted": "    if attention_mask is not None:\n        attention_mask = ~attention_mask\n",
}


def _release_padding(change: str, tmp_path, monkeypatch, model_only: bool) -> None:
    """create_causal_mask changed as PADDING_CHANGES[change] says; `model_only`: only Llama's modeling
    module binds the changed one (a model or remote code building its mask otherwise: the fact holds)."""
    assert not facts.check_all()  # (imports what the facts read before the edit)
    code = PADDING_CHANGES[change]
    original = masking_utils.create_causal_mask
    changed = redefine(masking_utils, "create_causal_mask", [(MASK_ANCHOR, code + MASK_ANCHOR)], tmp_path, monkeypatch)
    monkeypatch.setattr(modeling_llama, "create_causal_mask", changed)
    if model_only:
        monkeypatch.setattr(masking_utils, "create_causal_mask", original)
    sdpa_mask = masking_utils.sdpa_mask

    def released_sdpa_mask(*args, attention_mask=None, **kwargs):  # that release's own mask, adapted
        if change == "4d" and attention_mask is not None:
            attention_mask = attention_mask[:, 0, 0, :]
        if change == "inverted" and attention_mask is not None:
            attention_mask = ~attention_mask
        return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, "sdpa", released_sdpa_mask)


@pytest.fixture
def fresh_facts():
    facts.require.cache_clear()  # checked once per process: as in a process on that release
    yield
    facts.require.cache_clear()


@pytest.mark.parametrize("change", sorted(PADDING_CHANGES))
def test_a_release_that_hands_the_mask_function_other_padding_breaks_a_fact(change, fresh_facts, tmp_path, monkeypatch):
    """Logits stay sdpa's (the release builds its attention from what it folded), but padding was recorded
    as real rows (folded, 4-D) or every real row lost (inverted)."""
    _release_padding(change, tmp_path, monkeypatch, model_only=False)
    batch = {k: v for k, v in padded_batch("left").items() if k != "position_ids"}
    model = build("llama3", "qk_sniff")
    assert torch.equal(model(**batch).logits, build("llama3", "sdpa")(**batch).logits)
    with pytest.raises(TransformersMismatch, match=r"breaks what qk-attn relies on: mask_padding: "):
        with qk_attn.session(sampler="all"), torch.no_grad():
            model(**batch)


@pytest.mark.parametrize("change", sorted(PADDING_CHANGES))
def test_a_model_whose_mask_function_gets_other_padding_than_its_forward_is_refused(
    change, fresh_facts, tmp_path, monkeypatch
):
    """The same change in one model's own mask building (the fact holds): each forward compares the mask
    call's 2-D mask with the attention_mask its model forward was given."""
    _release_padding(change, tmp_path, monkeypatch, model_only=True)
    assert not facts.check_all()
    batch = {k: v for k, v in padded_batch("right").items() if k != "position_ids"}
    model = build("llama3", "qk_sniff")
    with pytest.raises(CaptureError, match=r"LlamaModel.forward was given a \(2, 9\) attention_mask, but its mask"):
        with qk_attn.session(sampler="all"), torch.no_grad():
            model(**batch)


def test_a_release_whose_causal_mask_skips_the_mask_function_breaks_a_fact(tmp_path, monkeypatch):
    """A plain causal prefill built no mask: the layers ran without their forward (refused, blamed on inputs)."""
    anchor = "    batch_size, dtype, device = inputs_embeds.shape[0], inputs_embeds.dtype, inputs_embeds.device\n"
    skip = "    if attention_mask is None or bool(attention_mask.all()):\n        return None\n"
    changed = redefine(masking_utils, "create_causal_mask", [(anchor, anchor + skip)], tmp_path, monkeypatch)
    assert [f.fact for f in facts.check_all()] == ["mask_every_forward"]
    # A forward in a session: its layers, which ran in no forward, name the fact (checked before blaming inputs).
    model = build("llama3", "qk_sniff")
    monkeypatch.setattr(modeling_llama, "create_causal_mask", changed)
    facts.require.cache_clear()
    try:
        with qk_attn.session(sampler="all"), pytest.raises(TransformersMismatch, match="mask_every_forward"):
            model(input_ids=torch.arange(2, 8)[None])
    finally:
        facts.require.cache_clear()


# ---- rope="pre": the rotation undone is the one applied ------------------------------------------


def _rotate_every_two(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _interleaved_cos(forward):
    def rotary_forward(self, x, position_ids):
        cos, sin = forward(self, x, position_ids)
        half = cos.shape[-1] // 2
        return cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)

    return rotary_forward


def _apply_interleaved(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_every_two(q) * sin, k * cos + _rotate_every_two(k) * sin


@pytest.fixture
def fresh_round_trips(monkeypatch):
    monkeypatch.setattr(rope, "_round_trips", {})
    rope_check.rotation.cache_clear()
    yield
    rope_check.rotation.cache_clear()


def _max_diff(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float(np.abs(got[k] - want[k]).max()) for k in want)


@pytest.mark.parametrize("half", ["cos_sin", "apply"])
def test_a_rotation_whose_inverse_is_not_apply_with_minus_sin_is_refused(half, fresh_round_trips, monkeypatch):
    """Interleaved cos/sin with a rotate_half apply (or the reverse) rotate consistently for attention, but
    apply with -sin does not undo them: rope="pre" rows were off by ~0.7, silently."""
    if half == "cos_sin":
        forward = modeling_llama.LlamaRotaryEmbedding.forward
        monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", _interleaved_cos(forward))
    else:
        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _apply_interleaved)
    model = build("llama3", "qk_sniff")
    with pytest.raises(CaptureError, match=r"rope='pre': LlamaAttention's \w+ with -sin does not undo its rotation"):
        captured_and_truth(model, padded_batch("left"), [10, 11], stage="pre")


def test_a_rotation_replaced_after_the_first_forward_is_undone_with_the_new_one(fresh_round_trips, monkeypatch):
    """A consistent interleaved (GPT-J) rotation patched in after a recorded forward: the cached verdict
    kept undoing it with the old apply."""
    model = build("llama3", "qk_sniff")
    batch = padded_batch("left")
    assert _max_diff(*captured_and_truth(model, batch, [10, 11], stage="pre")) < 1e-5
    forward = modeling_llama.LlamaRotaryEmbedding.forward
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", _interleaved_cos(forward))
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", _apply_interleaved)
    assert _max_diff(*captured_and_truth(model, batch, [12, 13], stage="pre")) < 1e-5


# ---- name branches in transformers' own files, at run time ---------------------------------------

GENERATION_BRANCH = (
    "    # 6. Move the tensors the forward consumes onto the model device",
    "    if self.config._attn_implementation == 'sdpa':\n"
    "        model_inputs['position_ids'] = None  # (a path only sdpa takes)\n"
    "    # 6. Move the tensors the forward consumes onto the model device",
)


@pytest.fixture
def fresh_core_check():
    modeling_checks._core_refusal.cache_clear()
    yield
    modeling_checks._core_refusal.cache_clear()


@pytest.mark.parametrize("how", ["released_file", "patched_method"])
def test_a_name_branch_in_generation_utils_is_refused_at_run_time(how, fresh_core_check, tmp_path, monkeypatch):
    """generate() under qk_sniff took the path sdpa does not (other logits, no refusal): only the suite
    checked generation/utils.py. A release edits the file; a patch replaces the method."""
    from transformers.generation import utils as generation_utils

    if how == "released_file":
        in_class = tuple(textwrap.indent(part, "    ") for part in GENERATION_BRANCH)  # (the method, in its file)
        edit_file(generation_utils, [in_class], tmp_path, monkeypatch)
        monkeypatch.setattr(modeling_checks, "transformers_root", lambda: tmp_path)
    else:
        owner = generation_utils.GenerationMixin
        redefine(owner, "prepare_inputs_for_generation", [GENERATION_BRANCH], tmp_path, monkeypatch)
    model = build("llama3", "qk_sniff")
    with pytest.raises(CaptureError, match=r"generation/utils.py line \d+ branches on the attention implementation"):
        model.generate(input_ids=torch.arange(3, 9)[None], max_new_tokens=2, do_sample=False, pad_token_id=0)


LAYER_BRANCH = (  # a method of GradientCheckpointingLayer
    "    gradient_checkpointing = False\n",
    "    gradient_checkpointing = False\n\n"
    "    def _inputs(self, kwargs):\n"
    "        if self.config._attn_implementation == 'sdpa':\n"
    "            kwargs['position_embeddings'] = None  # (a path only sdpa takes)\n",
)


def test_a_name_branch_in_the_decoder_layers_base_class_is_refused_at_run_time(fresh_core_check, tmp_path, monkeypatch):
    """modeling_layers.py (GradientCheckpointingLayer, the base of every decoder layer) was not read at run
    time: a branch there made "qk_sniff" compute other logits than sdpa, recorded without a refusal."""
    from transformers import modeling_layers

    edit_file(modeling_layers, [LAYER_BRANCH], tmp_path, monkeypatch)
    monkeypatch.setattr(modeling_checks, "transformers_root", lambda: tmp_path)
    model = build("llama3", "qk_sniff")
    with pytest.raises(CaptureError, match=r"modeling_layers.py line \d+ branches on the attention implementation"):
        model(input_ids=torch.arange(3, 9)[None])


# ---- transformers outside the range: the facts first ---------------------------------------------


@pytest.mark.parametrize("capture", [False, True], ids=["capture_off", "capture_on"])
def test_a_release_without_a_name_the_checks_import_is_named_in_one_line(capture, fresh_facts, tmp_path, monkeypatch):
    """transformers 4.57 lacks is_flash_attention_requested: the first forward died 20 frames deep in an
    ImportError from the name-branch check, which ran before the facts."""
    from transformers.utils import generic

    # a branch of that release's own (its value for "qk_sniff" is worked out with that name), in a file read anew
    branch = (
        "        attention_interface: Callable",
        "        x = self.config._attn_implementation == 'sdpa'\n        attention_interface: Callable",
    )
    edit_file(modeling_llama, [branch], tmp_path, monkeypatch)
    monkeypatch.setattr(modeling_checks, "_refusals", {})
    monkeypatch.setattr(modeling_checks, "transformers_root", lambda: tmp_path)
    monkeypatch.delattr(generic, "is_flash_attention_requested")
    model = build("llama3", "qk_sniff")
    with pytest.raises(
        TransformersMismatch, match=rf"transformers {tf.__version__} .*imported_names: .*generic has no "
    ):
        with qk_attn.session(sampler="all") if capture else torch.no_grad(), torch.no_grad():
            model(input_ids=torch.arange(3, 9)[None])


# ---- a user's own "sdpa" ----------------------------------------------------------------------


def test_a_users_own_sdpa_registered_before_the_first_forward_is_recorded(fresh_facts, monkeypatch):
    """It was blamed on transformers ("breaks what qk-attn relies on ... install a tested release") before
    the first forward, and recorded exactly after it: "qk_sniff" runs what "sdpa" runs, as the model would."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def mine(mod, q, k, v, mask, **kw):
        return sdpa_attention_forward(mod, q, k, v, mask, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", mine)
    model = build("llama3", "qk_sniff")
    assert _max_diff(*captured_and_truth(model, padded_batch("left"), [10, 11])) == 0


def test_attention_calls_that_qk_sniff_attention_cannot_take_break_a_fact(tmp_path, monkeypatch):
    """The fact facts.py's docstring named and FACTS lacked: the seed forwards' attention calls bind to
    qk_sniff_attention's signature."""
    edit = ("        value_states,\n        attention_mask,\n", "        value_states,\n")
    redefine(modeling_llama.LlamaAttention, "forward", [edit], tmp_path, monkeypatch)
    assert [f.fact for f in facts.check_all()] == ["attention_call"]
