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
from support.release import edit_file, redefine


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
    """The model's file, the sdpa function's and the mask functions' are each parsed at the first forward
    only: later forwards cost dict lookups."""
    read = []
    file_refusal = modeling_checks._file_refusal
    monkeypatch.setattr(
        modeling_checks, "_file_refusal", lambda source, followed: read.append(source) or file_refusal(source, followed)
    )
    model = build("llama3", "qk_sniff")
    for _ in range(2):
        run(model, in_session=True)
        run(model, in_session=False)
    assert sorted(str(path).rsplit("transformers/", 1)[-1] for path in read) == [
        "integrations/sdpa_attention.py",
        "masking_utils.py",
        "models/llama/modeling_llama.py",
    ]
