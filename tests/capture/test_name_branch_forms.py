"""A branch on the implementation's name is refused however it reads the name (getattr, the config's
internal attribute, a walrus alias), and wherever "qk_sniff" hands the call on: the model's own file,
the wrapped backend's attention function (integrations/sdpa_attention.py) and its mask functions
(masking_utils.py). Each case edits transformers' own source as a release would (support.release)."""

from __future__ import annotations

import re

import pytest
import transformers.models.llama.modeling_llama as modeling_llama
from transformers import masking_utils
from transformers.integrations import sdpa_attention
from transformers.modeling_utils import AttentionInterface

import qk_attn
from qk_attn.capture import modeling_checks, name_branches
from qk_attn.errors import CaptureError
from support.models import build, padded_batch
from support.release import edit_file, edited_source, import_file, redefine


@pytest.fixture
def fresh_checks(tmp_path, monkeypatch):
    """Files are checked once per process: forget what was checked. Edited copies of transformers' files
    (`edit_file(..., tmp_path, ...)`) lie under tmp_path as under the transformers package."""
    monkeypatch.setattr(modeling_checks, "_refusals", {})
    monkeypatch.setattr(modeling_checks, "transformers_root", lambda: tmp_path)
    monkeypatch.setattr(name_branches, "_followed", set())


def run(model, in_session: bool):
    if in_session:
        with qk_attn.session(sampler="all"):
            return model(**padded_batch("left"))
    return model(**padded_batch("left"))


READ_BY_NAME = {
    # configuration_utils.py reads the name this way
    "getattr": "getattr(self.config, '_attn_implementation', None) != 'sdpa'",
    # what the config's `_attn_implementation` property returns
    "internal attribute": "self.config._attn_implementation_internal != 'sdpa'",
    "walrus alias": "(impl := getattr(self.config, '_attn_implementation')) != 'sdpa'",
    "vars": "vars(self.config)['_attn_implementation_internal'] != 'sdpa'",
    "dict get": "self.config.__dict__.get('_attn_implementation_internal') != 'sdpa'",
}


@pytest.mark.parametrize("form", READ_BY_NAME)
def test_a_branch_reading_the_name_by_getattr_or_its_internal_attribute_is_refused(
    form, fresh_checks, tmp_path, monkeypatch
):
    """These branches were invisible: "qk_sniff" took the non-sdpa path and recorded other logits."""
    anchor = "        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS"
    code = f"        if {READ_BY_NAME[form]}:\n            attention_mask = None\n"
    model = build("llama3", "qk_sniff")
    edit_file(modeling_llama, [(anchor, code + anchor)], tmp_path, monkeypatch)
    expected = r"^qk_sniff: models/llama/modeling_llama.py line \d+ branches on the attention implementation's name \("
    with pytest.raises(CaptureError, match=expected + re.escape(READ_BY_NAME[form]) + r"\)"):
        run(model, in_session=True)


def test_a_getattr_alias_of_the_name_is_followed_to_its_branch(fresh_checks, tmp_path, monkeypatch):
    anchor = "        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS"
    code = (
        "        impl = getattr(self.config, '_attn_implementation', None)\n"
        "        if impl == 'sdpa':\n            attention_mask = attention_mask\n"
    )
    model = build("llama3", "qk_sniff")
    edit_file(modeling_llama, [(anchor, code + anchor)], tmp_path, monkeypatch)
    with pytest.raises(CaptureError, match=r"branches on the attention implementation's name \(impl == 'sdpa'\)"):
        run(model, in_session=False)


SDPA_BRANCH = (
    "    is_causal = q_length > 1 and attention_mask is None and is_causal\n",
    "    is_causal = q_length > 1 and attention_mask is None and is_causal\n"
    "    if module.config._attn_implementation != 'sdpa':\n"
    "        is_causal = False  # a fast path only under the backend's own name\n",
)


@pytest.mark.parametrize("in_session", [False, True], ids=["capture-off", "capture-on"])
def test_a_branch_in_the_sdpa_attention_function_registered_by_a_release_is_refused(
    in_session, fresh_checks, tmp_path, monkeypatch
):
    """A release whose sdpa function (registered under "sdpa") branches on the name: "qk_sniff" hands
    every call to it, so it would take the other path. Its own file is read (here, where it was redefined)."""
    released = redefine(sdpa_attention, "sdpa_attention_forward", [SDPA_BRANCH], tmp_path, monkeypatch)
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", released)
    model = build("llama3", "qk_sniff")
    with pytest.raises(
        CaptureError,
        match=r"^qk_sniff: redefined_sdpa_attention_forward/transformers/integrations/sdpa_attention.py line \d+ branches on "
        r"the attention implementation's name \(module.config._attn_implementation != 'sdpa'\)",
    ):
        run(model, in_session)


def test_a_branch_in_the_sdpa_attention_file_is_refused(fresh_checks, tmp_path, monkeypatch):
    edit_file(sdpa_attention, [SDPA_BRANCH], tmp_path, monkeypatch)
    model = build("llama3", "qk_sniff")
    with pytest.raises(
        CaptureError, match=r"^qk_sniff: integrations/sdpa_attention.py line \d+ branches on the attention"
    ):
        run(model, in_session=False)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_a_branch_in_the_mask_builders_file_is_refused(backend, fresh_checks, tmp_path, monkeypatch):
    """masking_utils.py holds the backend's mask function and the builders that call it: a branch on the
    name there (here: sdpa's is_causal skip kept for "sdpa" only) changes the mask "qk_sniff" gets."""
    anchor = "    mask_factory_function = causal_mask_function\n"
    branch = "    if config._attn_implementation == 'sdpa':\n        allow_is_causal_skip = False\n"
    edit_file(masking_utils, [(anchor, branch + anchor)], tmp_path, monkeypatch)
    model = build("llama3", "qk_sniff")
    with pytest.raises(
        CaptureError,
        match=r"^qk_sniff: masking_utils.py line \d+ branches on the attention implementation's name "
        r"\(config._attn_implementation == 'sdpa'\)",
    ):
        with qk_attn.session(sampler="all", backend=backend):
            model(**padded_batch("left"))


def test_each_file_is_read_once(fresh_checks, monkeypatch):
    """The model's file, the sdpa function's, the mask functions' and those of the model's classes and of
    the decorators around their methods are each parsed at the first forward only: later forwards cost
    dict lookups."""
    read = []
    file_refusal = modeling_checks._file_refusal
    monkeypatch.setattr(
        modeling_checks, "_file_refusal", lambda source, *args: read.append(source) or file_refusal(source, *args)
    )
    model = build("llama3", "qk_sniff")
    run(model, in_session=True)
    first = sorted(str(path).rsplit("transformers/", 1)[-1] for path in read)
    for _ in range(2):
        run(model, in_session=True)
        run(model, in_session=False)
    assert len(read) == len(first) == len(set(first))
    assert {
        "integrations/sdpa_attention.py",
        "masking_utils.py",
        "models/llama/modeling_llama.py",
    } <= set(first)


# ---- files the check did not read: remote code's own model classes, the decorators around forward --------

REMOTE_MODEL = """
from transformers import LlamaForCausalLM, LlamaModel


class RemoteModel(LlamaModel):
    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        scale = 1.0 if self.config._attn_implementation == "sdpa" else 0.5  # a path written for eager
        return super().forward(inputs_embeds=self.embed_tokens(input_ids) * scale, **kwargs)


class RemoteForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model = RemoteModel(config)
        self.post_init()
"""


@pytest.mark.parametrize("in_session", [False, True], ids=["capture-off", "capture-on"])
def test_remote_code_whose_own_model_class_branches_on_the_name_is_refused(
    in_session, fresh_checks, tmp_path, monkeypatch
):
    """A remote model on LlamaConfig and LlamaAttention, whose own decoder stack lives in its own file:
    only modeling_llama.py was read, and "qk_sniff" recorded logits 0.2 away from sdpa's."""
    path = tmp_path / "remote_model.py"
    path.write_text(REMOTE_MODEL, encoding="utf-8")
    remote = import_file(path, "remote_model", monkeypatch)
    model = remote.RemoteForCausalLM(build("llama3").config).eval()
    model.set_attn_implementation("qk_sniff")
    with pytest.raises(
        CaptureError,
        match=r"^qk_sniff: remote_model.py line 7 branches on the attention implementation's name "
        r"\(self.config._attn_implementation == 'sdpa'\)",
    ):
        run(model, in_session)


OUTPUT_CAPTURING_BRANCH = (
    "            # Run the forward\n",
    "            # Run the forward\n"
    "            if self.config._attn_implementation != 'sdpa':\n"
    "                kwargs['position_ids'] = None  # (a path only sdpa skips)\n",
)


@pytest.fixture
def fresh_core_check():
    modeling_checks._core_refusal.cache_clear()  # (transformers' own files are read once per process)
    yield
    modeling_checks._core_refusal.cache_clear()


@pytest.mark.parametrize("how", ["released_file", "wrapper_from_elsewhere"])
def test_a_name_branch_in_the_decorator_around_the_decoder_forward_is_refused(
    how, fresh_checks, fresh_core_check, tmp_path, monkeypatch
):
    """utils/output_capturing.py's capture_outputs wraps every decoder forward: a branch there (here one
    that drops the positions unless the name is "sdpa") was read by no check, and "qk_sniff" recorded
    other positions than sdpa's. A release edits the file; or the decoder forward is wrapped by a
    capture_outputs compiled from another file (the model's method's wrapper is read)."""
    import inspect

    from transformers.utils import output_capturing

    if how == "released_file":
        edit_file(output_capturing, [OUTPUT_CAPTURING_BRANCH], tmp_path, monkeypatch)
    else:
        path = tmp_path / "utils" / "output_capturing.py"
        path.parent.mkdir(parents=True)
        path.write_text(edited_source(output_capturing, [OUTPUT_CAPTURING_BRANCH]), encoding="utf-8")
        edited = import_file(path, "transformers.utils.output_capturing_edited", monkeypatch)
        forward = edited.capture_outputs(inspect.unwrap(modeling_llama.LlamaModel.forward))
        monkeypatch.setattr(modeling_llama.LlamaModel, "forward", forward)
    model = build("llama3", "qk_sniff")
    with pytest.raises(
        CaptureError,
        match=r"^qk_sniff: utils/output_capturing.py line \d+ branches on the attention implementation's name "
        r"\(self.config._attn_implementation != 'sdpa'\)",
    ):
        run(model, in_session=True)


IDENTITY_BRANCHES = {
    "is": "attention_interface is eager_attention_forward",
    "is not": "attention_interface is not eager_attention_forward",
    "== registry entry": "attention_interface == ALL_ATTENTION_FUNCTIONS['sdpa']",
    "!= registry get": "attention_interface != ALL_ATTENTION_FUNCTIONS.get('sdpa')",
}


@pytest.mark.parametrize("form", IDENTITY_BRANCHES)
def test_a_branch_on_the_attention_functions_identity_is_refused(form, fresh_checks, tmp_path, monkeypatch):
    """Under "qk_sniff" the function looked up is qk-attn's, never eager's or sdpa's: a test of its identity
    is a test of the name. Here an eager-only rescaling ran under "qk_sniff" wrapping eager too, recorded."""
    anchor = "        attn_output = attn_output.reshape(*input_shape, -1).contiguous()\n"
    branch = f"        if {IDENTITY_BRANCHES[form]}:\n            attn_output = attn_output * 1.01\n"
    edit_file(modeling_llama, [(anchor, branch + anchor)], tmp_path, monkeypatch)
    model = build("llama3", "qk_sniff")
    with pytest.raises(
        CaptureError,
        match=r"^qk_sniff: models/llama/modeling_llama.py line \d+ branches on the attention implementation's name "
        + re.escape(f"({IDENTITY_BRANCHES[form]})"),
    ):
        with qk_attn.session(sampler="all", backend="eager"):
            model(**padded_batch("left"))


def test_an_attention_function_tested_against_none_is_no_branch_on_the_name():
    source = "if attention_interface is None:\n    attention_interface = eager_attention_forward\n"
    assert name_branches.tree_branches(name_branches.parse(source), "x.py") == {}
