"""generate() dispatches each decoding mode to a method by name (GENERATION_MODES_MAPPING); frames knows
`_sample`, `_beam_search` and `_assisted_decoding`. A release that dispatches greedy decoding to a
method under another name (`_greedy_search`, as transformers had until 4.39) while `_sample` stays
breaks fact generation_dispatch, and at run time (a process whose facts were checked before) the
generate() is refused at its first forward: the padding rule and the use_cache=False refusal look for
`_sample` by name, so its batch rows' padding after an EOS and its uncached steps would be recorded."""

from __future__ import annotations

import inspect
import textwrap

import pytest
import torch
import transformers as tf
from transformers.generation import utils as generation_utils
from transformers.generation.utils import GenerationMixin, GenerationMode

import qk_attn
from qk_attn.capture import facts
from qk_attn.errors import CaptureError, TransformersMismatch
from support.models import build

torch.set_grad_enabled(False)

IDS = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
BEFORE = torch.arange(2, 8)[None]  # a complete example before the refused generate()


def _greedy_search(tmp_path, monkeypatch) -> None:
    """Greedy decoding dispatched to `_greedy_search`, a copy of `_sample` (as a release would), undone
    by `monkeypatch`."""
    source = textwrap.dedent(inspect.getsource(GenerationMixin._sample)).replace("def _sample(", "def _greedy_search(")
    path = tmp_path / "greedy_search.py"
    path.write_text(source, encoding="utf-8")
    namespace: dict = {}
    exec(compile(source, str(path), "exec"), generation_utils.__dict__, namespace)
    monkeypatch.setattr(GenerationMixin, "_greedy_search", namespace["_greedy_search"], raising=False)
    monkeypatch.setitem(generation_utils.GENERATION_MODES_MAPPING, GenerationMode.GREEDY_SEARCH, "_greedy_search")


def test_greedy_decoding_dispatched_under_another_name_breaks_a_fact(tmp_path, monkeypatch):
    _greedy_search(tmp_path, monkeypatch)
    (finding,) = facts.check_all()
    assert finding.fact == "generation_dispatch" and "GREEDY_SEARCH to _greedy_search" in finding.found
    facts.require.cache_clear()
    try:
        with pytest.raises(TransformersMismatch, match=rf"transformers {tf.__version__} .*generation_dispatch"):
            facts.require()
    finally:
        facts.require.cache_clear()


def _eos_of_row_0(model) -> int:
    """A token greedy decoding gives row 0 second and row 1 never: row 0 ends there, row 1 goes on."""
    tokens = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(tokens[0, 7])
    assert eos not in tokens[1, 6:].tolist()
    return eos


@pytest.mark.parametrize("case", ["rows-ending-at-eos", "use_cache=False"])
def test_a_generate_that_decodes_in_a_method_frames_does_not_know_is_refused(case, tmp_path, monkeypatch):
    facts.require()  # the facts held when this process began: the refusal does not lean on them
    model = build("llama3", "qk_sniff")
    arguments = dict(eos_token_id=_eos_of_row_0(model)) if case == "rows-ending-at-eos" else dict(use_cache=False)
    _greedy_search(tmp_path, monkeypatch)
    refusal = rf"^qk_sniff: generate\(\) runs its decoding in _greedy_search, .* \(transformers {tf.__version__}\)"
    with qk_attn.session(sampler="all", capture="k", layers="0") as s:
        s.begin([1])
        model(input_ids=BEFORE)
        with pytest.raises(CaptureError, match=refusal):
            s.begin([2, 3])
            model.generate(
                input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0, **arguments
            )
        s.begin([4])
        model.generate(input_ids=BEFORE, max_new_tokens=2, do_sample=True, pad_token_id=0)  # sampling: still _sample
    assert set(s.table().to_pydict()["example_id"]) == {1, 4}


def test_a_callers_own_decoding_loop_is_not_refused(tmp_path, monkeypatch):
    """custom_generate (a callable) is the caller's loop, not a transformers method under another name."""
    _greedy_search(tmp_path, monkeypatch)

    def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        return GenerationMixin._sample(
            model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs
        )

    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all", capture="k", layers="0", example_ids=[0]) as s:
        tokens = model.generate(
            input_ids=BEFORE, max_new_tokens=3, do_sample=False, pad_token_id=0, custom_generate=decode
        )
    positions = s.table().to_pydict()["position"]
    assert sorted(set(positions)) == list(range(tokens.shape[1] - 1))


def test_a_wrapper_of_the_sample_loop_without_functools_wraps_is_recorded(monkeypatch):
    """A profiling or logging patch of `_sample` that hands the call on: generate()'s `decoding_method` is
    the wrapper, whose name qk-attn does not know, but the known loop runs below it (prefill included)."""
    facts.require()  # checked at the first captured forward, before the patch (fact generation_frames reads _sample)
    inner = GenerationMixin._sample

    def traced_sample(self, *args, **kwargs):
        return inner(self, *args, **kwargs)

    model = build("llama3", "qk_sniff")
    expected = model.generate(input_ids=BEFORE, max_new_tokens=3, do_sample=False, pad_token_id=0)
    monkeypatch.setattr(GenerationMixin, "_sample", traced_sample)
    with qk_attn.session(sampler="all", capture="k", layers="0", example_ids=[0]) as s:
        tokens = model.generate(input_ids=BEFORE, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected)
    assert sorted(set(s.table().to_pydict()["position"])) == list(range(tokens.shape[1] - 1))


def _own_sample_loop(tmp_path):
    """A Llama whose class decodes in its own `_sample` (a copy of transformers', in a file of its own), as
    CSM, VibeVoice, Higgs Audio v2 and Pocket TTS do: that loop's use_cache and padding are unread."""
    source = textwrap.dedent(inspect.getsource(GenerationMixin._sample))
    path = tmp_path / "generation_own.py"
    path.write_text(source, encoding="utf-8")
    namespace: dict = {}
    exec(compile(source, str(path), "exec"), generation_utils.__dict__, namespace)
    model = build("llama3", "qk_sniff")
    model.__class__ = type("OwnLoopForCausalLM", (type(model),), {"_sample": namespace["_sample"]})
    return model


def _csm():
    """transformers' CSM, whose generate() decodes in models/csm/generation_csm.py's `_sample`."""
    depth = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = tf.CsmConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_codebooks=4, vocab_size=16, text_vocab_size=50, codebook_pad_token_id=15,
        codebook_eos_token_id=0, audio_token_id=49, pad_token_id=48, max_position_embeddings=64,
        depth_decoder_config=dict(depth, num_key_value_heads=1, head_dim=16, num_codebooks=4, vocab_size=16,
                                  backbone_hidden_size=32),
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.CsmForConditionalGeneration(config).eval()
    model.set_attn_implementation("qk_sniff")
    return model


@pytest.mark.parametrize("which", ["own-copy", "csm"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_model_that_decodes_in_its_own_sample_loop_is_refused(which, use_cache, tmp_path):
    """Its steps without a cache would each be recorded as a new example (position 5 under two ids), and
    its finished rows' padding as tokens: refused, with the loop's file, and the session goes on."""
    model = _own_sample_loop(tmp_path) if which == "own-copy" else _csm()
    arguments = dict(depth_decoder_do_sample=False) if which == "csm" else dict(pad_token_id=0)
    name = "OwnLoopForCausalLM" if which == "own-copy" else "CsmForConditionalGeneration"
    where = "generation_own.py" if which == "own-copy" else "generation_csm.py"
    refusal = rf"^qk_sniff: generate\(\) of {name} runs its own _sample \(.*{where}\), not transformers'"
    with qk_attn.session(sampler="all", layers="0") as s:
        with pytest.raises(CaptureError, match=refusal):
            model.generate(input_ids=BEFORE % 16, max_new_tokens=3, do_sample=False, use_cache=use_cache, **arguments)
        s.begin([7])
        model(input_ids=BEFORE % 16)  # its forward, called directly: recorded
    assert set(s.table().to_pydict()["example_id"]) == {7}


class _NoEvent:
    """torch.Event stands in for an MPS event on CPU (DeferredStopCheck records and waits on one)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass


@pytest.mark.skipif(not hasattr(generation_utils, "DeferredStopCheck"), reason="no deferred stop check")
@pytest.mark.parametrize("return_dict", [False, True])
def test_a_stop_decided_one_step_late_is_refused(return_dict, monkeypatch):
    """transformers defers generate()'s stop check by a step on MPS (DeferredStopCheck): one extra forward feeds
    the EOS token (its row was recorded, a row the CPU path never has), and with the cache returned its crop
    after the loop discarded the whole example. Simulated here as MPS runs it: refused, and the session goes on."""
    monkeypatch.setattr(torch, "Event", _NoEvent)
    monkeypatch.setattr(generation_utils.DeferredStopCheck, "is_supported", staticmethod(lambda *args, **kwargs: True))
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all", layers="0") as s:
        with pytest.raises(CaptureError, match=r"^qk_sniff: generate\(\) decides to stop one step late here "):
            model.generate(
                input_ids=BEFORE, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=return_dict
            )
        s.begin([7])
        model(input_ids=BEFORE)
    assert set(s.table().to_pydict()["example_id"]) == {7}


def test_a_sample_loop_without_its_stop_check_local_breaks_a_fact(monkeypatch):
    """The refusal above reads `_sample`'s local stop_check: a release that renames it is named."""
    source = textwrap.dedent(inspect.getsource(GenerationMixin._sample)).replace("stop_check", "stopper")
    namespace = dict(vars(generation_utils))
    exec(compile(source, generation_utils.__file__, "exec"), namespace)  # noqa: S102 - transformers' own code
    monkeypatch.setattr(GenerationMixin, "_sample", namespace["_sample"])
    found = {f.fact: f.found for f in facts.check_all()}
    assert "no local stop_check" in found["generation_frames"], found
