"""What one forward leaves behind never reaches the next: `begin()` ids of a forward that failed,
an id begun twice, session calls made while a forward runs (from a hook or another thread), a
forward that raised in a thread that lives on, and a session left by an exception. Each against an
uncached one-shot forward of the same tokens in a fresh session."""

from __future__ import annotations

import contextlib
import copy
import threading

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import qk_attn
from qk_attn import cli
from qk_attn.errors import CaptureError
from support.models import VOCAB, build, cache_kw
from support.oracle import rows_by_key

torch.set_grad_enabled(False)


class _Boom(RuntimeError):
    pass


def _tokens(length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, VOCAB - 2, (1, length), generator=torch.Generator().manual_seed(seed))


def _one_shot(model, ids, example_id: int) -> dict:
    with qk_attn.session(sampler="all", example_ids=[example_id]) as s:
        model(input_ids=ids, use_cache=False)
    return rows_by_key(s.table())


def _assert_same_rows(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key, vector in want.items():
        np.testing.assert_allclose(got[key], vector, rtol=1e-4, atol=1e-5, err_msg=str(key))


def _folder_rows(out, model) -> dict:
    """Every committed row of a capture folder, by key."""
    got = {}
    for layer in range(model.config.num_hidden_layers):
        got.update(rows_by_key(qk_attn.load(out, layer=layer)))
    return got


def _raise(*_):
    raise _Boom("inside the model")


def _fail_in_embeddings(model, ids):
    """A forward that raises before its mask is built and before any attention call."""
    handle = model.model.embed_tokens.register_forward_hook(_raise)
    try:
        with pytest.raises(_Boom):
            model(input_ids=ids)
    finally:
        handle.remove()


def _refused_4d_mask(model, ids):
    """A forward refused at its first attention call (a prepared 4-D mask: no mask built through qk_sniff)."""
    n = ids.shape[1]
    with pytest.raises(CaptureError, match="without transformers building its mask"):
        model(input_ids=ids, attention_mask=torch.full((1, 1, n, n), float("-inf")).triu(1))


@pytest.mark.parametrize("fail", [_fail_in_embeddings, _refused_4d_mask], ids=["raised", "refused"])
def test_begin_ids_are_used_up_by_a_forward_that_fails(fail):
    """begin() names the next forward. When that forward fails or is refused, its ids must not name
    the forward after it: here a chunk that continues example 3 would have been recorded as example 7."""
    model = build("llama3", "qk_sniff")
    document, other = _tokens(9, seed=1), _tokens(6, seed=2)
    with qk_attn.session(sampler="all") as s:
        cache = DynamicCache(config=model.config)
        s.begin([3])
        model(input_ids=document[:, :5], **cache_kw(cache))
        s.begin([7])
        fail(model, other)
        model(input_ids=document[:, 5:], **cache_kw(cache))  # example 3 goes on
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, document, 3))
    assert s.sink.committed == [3]


def test_an_example_id_begun_and_not_committed_cannot_be_begun_again(tmp_path):
    """Two documents begun under one id would be committed as one example with every position twice."""
    model = build("llama3", "qk_sniff")
    first, second = _tokens(7, seed=1), _tokens(6, seed=2)
    out = tmp_path / "out"
    with qk_attn.session(sampler="all", output=out) as s:
        s.begin([20])
        model(input_ids=first)
        with pytest.raises(ValueError, match=r"example ids \[20\] were begun already and are not committed yet"):
            s.begin([20])  # refused where the id is named (the forward would refuse it too)
        model(input_ids=second)  # an automatic id: the next after the largest one used
        s.commit()
    _assert_same_rows(_folder_rows(out, model), {**_one_shot(model, first, 20), **_one_shot(model, second, 21)})
    assert cli.verify_dataset(out, log=lambda *_: None) == []


def test_automatic_ids_after_negative_ones_are_the_same_in_a_session_and_a_reopened_one(tmp_path):
    """Automatic ids start at 0 (never negative), after the largest id used: whether the negative
    example was committed in this session or in an earlier one on the same folder."""
    model = build("llama3", "qk_sniff")
    document = _tokens(6, seed=2)
    same, reopened = tmp_path / "same", tmp_path / "reopened"
    with qk_attn.session(sampler="all", output=same, example_ids=[-5]) as s:
        model(input_ids=document)
        s.commit()
        model(input_ids=document)
    with qk_attn.session(sampler="all", output=reopened, example_ids=[-5]):
        model(input_ids=document)
    with qk_attn.session(sampler="all", output=reopened):
        model(input_ids=document)
    for out in (same, reopened):
        assert sorted(qk_attn.load_examples(out)["example_id"].to_pylist()) == [-5, 0]


@pytest.mark.parametrize(
    "ids, why",
    [([4, 4], r"example_ids \[4, 4\] repeats an id"), ([2], r"example ids \[2\] are already committed")],
    ids=["repeated", "committed"],
)
def test_begin_refuses_ids_its_arguments_show_are_taken(ids, why):
    """begin() raised nothing for ids that repeat or are committed: the next forward was refused instead."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        s.begin([2])
        model(input_ids=_tokens(5, seed=1))
        s.commit()
        with pytest.raises(ValueError, match=why):
            s.begin(ids)
        s.begin([5, 6])
        model(input_ids=torch.cat([_tokens(5, seed=2), _tokens(5, seed=3)]))
    assert sorted(s.committed_ids()) == [2, 5, 6]


@pytest.mark.parametrize("call", ["commit", "flush", "table"])
def test_a_session_call_from_inside_a_forward_is_refused_and_the_forward_is_not_kept(call):
    """A hook that commits, flushes or reads the table mid-forward would hand off a forward part-way
    through: refused, and the forward (stopped by the error) records nothing."""
    model = build("llama3", "qk_sniff")
    bad, good = _tokens(6, seed=1), _tokens(5, seed=2)
    with qk_attn.session(sampler="all") as s:
        handle = model.model.layers[1].register_forward_pre_hook(lambda *_: getattr(s, call)())
        with pytest.raises(
            RuntimeError, match=rf"{call}\(\) was called while a forward of this session is running from inside it"
        ):
            model(input_ids=bad)
        handle.remove()
        s.begin([1])
        model(input_ids=good)
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, good, 1))
    assert s.sink.committed == [1]


def test_a_session_opened_inside_a_forward_and_left_open_is_named_in_the_refusal():
    """The forward's next layer found no forward in the newest session and was refused as a config replaced
    after loading, advising a 2-D attention_mask. Nothing of it is kept; the outer session records on."""
    model = build("llama3", "qk_sniff")
    bad, good = _tokens(6, seed=1), _tokens(5, seed=2)
    inner = []
    with qk_attn.session(sampler="all") as s:
        opener = qk_attn.session(sampler="all")
        handle = model.model.layers[0].register_forward_hook(lambda *_: inner or inner.append(opener.__enter__()))
        with pytest.raises(CaptureError, match=r"^qk_sniff: layer 1 ran in a forward that another session records: a "):
            model(input_ids=bad)
        handle.remove()
        opener.__exit__(None, None, None)
        s.begin([1])
        model(input_ids=good)
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, good, 1))
    assert s.sink.committed == [1] and inner[0].table() is None


def test_a_session_call_from_another_thread_during_a_forward_is_refused_there():
    """The forward goes on and is recorded whole; the other thread gets the error."""
    model = build("llama3", "qk_sniff")
    ids = _tokens(6, seed=1)
    errors = []

    def commit_now():
        try:
            s.commit()
        except RuntimeError as error:
            errors.append(str(error))

    def commit_from_another_thread(*_):
        other = threading.Thread(target=commit_now)
        other.start()
        other.join()

    with qk_attn.session(sampler="all", example_ids=[4]) as s:
        handle = model.model.layers[1].register_forward_pre_hook(commit_from_another_thread)
        model(input_ids=ids)
        handle.remove()
    assert len(errors) == 1 and "is running in thread 'MainThread'; call it between forwards" in errors[0]
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, ids, 4))


@pytest.mark.parametrize("inner", ["same model", "shared config", "own config"])
@pytest.mark.parametrize("warm", [False, True])
def test_a_forward_started_inside_another_of_its_config_is_refused_naming_the_nesting(inner, warm):
    """A hook that runs the model again (or a model sharing its config object) mid-forward: both would be
    keyed by one config, so the inner one is refused in one line naming it; the outer forward stops and
    records nothing, and the next forward is recorded whole. A model with its own config nests freely."""
    model = build("llama3", "qk_sniff")
    nested = {"same model": model, "shared config": type(model)(model.config).eval()}.get(inner)
    nested = nested if nested is not None else copy.deepcopy(model)
    outer_ids, inner_ids, good = _tokens(6, seed=1), _tokens(4, seed=3), _tokens(5, seed=2)
    with qk_attn.session(sampler="all") as s:
        if warm:  # the decoder stack's own hooks report the forward's start from the second forward on
            s.begin([7])
            model(input_ids=good)
        handle = model.model.layers[0].register_forward_hook(lambda *_: [nested(input_ids=inner_ids)] and None)
        if inner == "own config":
            model(input_ids=outer_ids)
        else:
            with pytest.raises(CaptureError, match=r"^qk_sniff: a forward of this llama model started inside another"):
                model(input_ids=outer_ids)
        handle.remove()
        s.begin([3])
        model(input_ids=good)
    rows = rows_by_key(s.table())
    if inner == "own config":  # the outer forward built its mask first: it took the first automatic id
        outer_id, inner_id = sorted({k[0] for k in rows} - {3, 7})
        _assert_same_rows(_rows_of(rows, outer_id), _one_shot(model, outer_ids, outer_id))
        _assert_same_rows(_rows_of(rows, inner_id), _one_shot(nested, inner_ids, inner_id))
    else:
        assert {k[0] for k in rows} == ({3, 7} if warm else {3})
    _assert_same_rows(_rows_of(rows, 3), _one_shot(model, good, 3))


def _rows_of(rows: dict, example_id: int) -> dict:
    return {key: vector for key, vector in rows.items() if key[0] == example_id}


def test_a_forward_that_raised_in_a_thread_that_lives_on_does_not_block_the_model():
    """The worker caught its error and waits for more work: its forward is over, not running, so
    the main thread's forward of the same model is recorded (and the failed one is not)."""
    model = build("llama3", "qk_sniff")
    bad, good = _tokens(6, seed=1), _tokens(5, seed=2)
    failed, release = threading.Event(), threading.Event()

    def worker():
        handle = model.model.layers[1].register_forward_hook(_raise)
        try:
            model(input_ids=bad)
        except _Boom:
            pass
        finally:
            handle.remove()
        failed.set()
        release.wait(10)  # alive, idle

    with qk_attn.session(sampler="all") as s:
        thread = threading.Thread(target=worker, name="pool_0")
        thread.start()
        failed.wait(10)
        s.begin([2])
        model(input_ids=good)
        release.set()
        thread.join()
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, good, 2))


def test_an_in_memory_session_left_by_an_exception_keeps_only_committed_examples():
    """Example 5 was stopped between two chunks: the table shows no part of it."""
    model = build("llama3", "qk_sniff")
    done, stopped = _tokens(6, seed=1), _tokens(10, seed=2)
    with pytest.raises(KeyboardInterrupt):
        with qk_attn.session(sampler="all") as s:
            s.begin([0])
            model(input_ids=done)
            s.commit()
            s.begin([5])
            model(input_ids=stopped[:, :4], **cache_kw(DynamicCache(config=model.config)))
            raise KeyboardInterrupt
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, done, 0))


def test_an_example_discarded_after_a_flush_wrote_its_rows_leaves_the_others_committed(tmp_path):
    """flush() writes the rows of examples still in flight (1 and 2) into shared temporary shards;
    when a later chunk of 1 fails, 1 is cut out of them and 2, committed after, is kept exactly."""
    model = build("llama3", "qk_sniff")
    first, second = _tokens(8, seed=1), _tokens(6, seed=2)
    out = tmp_path / "out"
    with qk_attn.session(sampler="all", output=out) as s:
        cache = DynamicCache(config=model.config)
        s.begin([1])
        model(input_ids=first[:, :4], **cache_kw(cache))
        s.begin([2])
        model(input_ids=second)
        s.flush()
        handle = model.model.layers[1].register_forward_hook(_raise)
        with pytest.raises(_Boom):
            model(input_ids=first[:, 4:], **cache_kw(cache))
        handle.remove()
        s.commit()
        s.flush()
    _assert_same_rows(_folder_rows(out, model), _one_shot(model, second, 2))
    assert cli.verify_dataset(out, log=lambda *_: None) == []


@pytest.mark.parametrize(
    "ids, why",
    [
        ([9.7], r"holds 9\.7: example ids are integers"),
        ([True], r"holds True: example ids are integers"),
        ([2**63], r"holds 9223372036854775808: example ids fit int64"),
        ([-(2**63) - 1], r"holds -9223372036854775809: example ids fit int64"),
        (5, r"^example_ids=5: give a list of integer ids"),
        ("12", r"^example_ids='12': give a list of integer ids"),
        ({20, 3}, r"^example_ids=\{.*\}: give a list of integer ids"),  # no batch-row order
        (torch.tensor([True]), r"holds True: example ids are integers"),
        (torch.tensor(5), r"^example_ids=tensor\(5\): give a list"),
    ],
)
def test_example_ids_are_int64_integers_in_a_list(ids, why):
    model = build("llama3", "qk_sniff")
    with pytest.raises(ValueError, match=why):
        with qk_attn.session(sampler="all", example_ids=ids):
            pass
    with qk_attn.session(sampler="all") as s:
        with pytest.raises(ValueError, match=why):
            s.begin(ids)
        s.begin(np.array([9]))  # a numpy array or tensor of ids is a list of ids
        model(input_ids=_tokens(5, seed=1))
    assert s.sink.committed == [9]


def test_automatic_ids_after_the_largest_int64_are_refused_in_the_forward():
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        s.begin([2**63 - 1])
        model(input_ids=_tokens(5, seed=1))
        with pytest.raises(CaptureError, match=r"no automatic example ids are left after 9223372036854775807"):
            model(input_ids=_tokens(5, seed=2))
    assert s.sink.committed == [2**63 - 1]


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_generate_with_a_static_cache_records_under_the_begun_ids(family):
    """generate() prepares a static cache's mask before the decoder stack runs; sdpa drops it when
    it is causal only (an unpadded batch), and the stack's own forward must take the begun ids."""
    model = build(family, "qk_sniff")
    prompt = _tokens(4, seed=1)
    with qk_attn.session(sampler="all") as s:
        s.begin([17])
        out = model.generate(
            input_ids=prompt,
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            cache_implementation="static",
            disable_compile=True,
        )
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, out[:, :-1], 17))


def test_a_config_replaced_after_loading_is_named_in_the_refusal():
    """The attention modules keep the config they were built with: a model whose config object was
    replaced builds its masks for the new one, so its layers find no forward. Refused, saying so."""
    import copy

    model = build("llama3", "qk_sniff")
    model.config = model.model.config = copy.deepcopy(model.config)
    with pytest.raises(CaptureError, match="hold another config object"), qk_attn.session(sampler="all"):
        model(input_ids=torch.arange(3, 9)[None])


def test_a_module_moved_into_another_model_is_refused_and_the_first_models_example_kept():
    """Model B runs model A's attention module (it holds A's config): B's forward is refused at that call.
    A's forward had ended, yet the refusal discarded its example: a failure of one forward took another's rows."""
    a, b = build("llama3", "qk_sniff", seed=0), build("llama3", "qk_sniff", seed=3)
    ids = torch.randint(3, VOCAB - 2, (1, 7), generator=torch.Generator().manual_seed(1))
    with qk_attn.session(sampler="all") as s:
        a(input_ids=ids, use_cache=False)
        kept = s.table()
        b.model.layers[0].self_attn = a.model.layers[0].self_attn
        with pytest.raises(CaptureError, match="^qk_sniff: layer 0 ran without transformers building its mask"):
            b(input_ids=ids, use_cache=False)
    assert s.table().equals(kept)


def _fail_once(monkeypatch, owner, name: str, error: type[BaseException]) -> None:
    original = getattr(owner, name)
    fired = []

    def failing(*args, **kwargs):
        if not fired:
            fired.append(True)
            raise error("injected into the hand-off")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["put_forward", "piece"])
@pytest.mark.parametrize("warm", [True, False], ids=["later forward", "first forward"])
def test_a_hand_off_that_raises_commits_none_of_its_forwards_examples(tmp_path, monkeypatch, error, where, warm):
    """A forward's rows leave at one hand-off (`ParquetSink.put_forward`). One that raised there (an interrupt,
    no memory) had marked its forward complete, and its examples were committed with no rows: verify passed
    and a resumed run skipped them. A model's first forward is handed off at the start of its next one, so
    there the failure committed the earlier, complete forward empty. Now the forward whose rows were being
    handed off is discarded (never committed), the pool region is freed, and the session goes on exactly."""
    from qk_attn.storage.sink import ParquetSink
    from qk_attn.storage.transfer import ForwardPiece

    model = build("llama3", "qk_sniff")
    out = tmp_path / "out"
    with qk_attn.session(sampler="all", output=out) as s:
        if warm:
            s.begin([0])
            model(input_ids=_tokens(5, seed=9))
        s.begin([1])
        model(input_ids=_tokens(6, seed=1))  # handed off at its end (later forward) or at the next start (first)
        owner, name = (ParquetSink, "put_forward") if where == "put_forward" else (ForwardPiece, "__init__")
        _fail_once(monkeypatch, owner, name, error)
        s.begin([2])
        with pytest.raises(error, match="injected"):
            model(input_ids=_tokens(7, seed=2))
        monkeypatch.undo()
        s.begin([3])
        model(input_ids=_tokens(6, seed=3))
        s.commit()
        s.flush()
        assert s.sink.pool.in_use == 0  # every region freed, the failed one too
    kept = [0, 1, 3] if warm else [3]  # first forward: example 1 was the one being handed off
    assert sorted(int(i) for i in qk_attn.load_examples(out)["example_id"].to_pylist()) == kept
    want = {}
    for example, ids in ((0, _tokens(5, seed=9)), (1, _tokens(6, seed=1)), (3, _tokens(6, seed=3))):
        if example in kept:
            want.update(_one_shot(model, ids, example))
    _assert_same_rows(_folder_rows(out, model), want)
    assert cli.verify_dataset(out, log=lambda *_: None) == []


def test_a_hand_off_that_raises_at_the_close_commits_the_other_models_complete_examples(monkeypatch):
    """A model's only forward is handed off at the close. When that hand-off raised, the close stopped there:
    another model's complete examples were neither committed nor discarded (yet read by table()). Now the
    failed forward is discarded, the others are committed, and the error is raised after."""
    from qk_attn.capture.sinks import MemorySink

    first, second = build("llama3", "qk_sniff"), build("qwen2", "qk_sniff")
    ids = _tokens(6, seed=1)
    with pytest.raises(MemoryError, match="injected"):
        with qk_attn.session(sampler="all") as s:
            for example in (1, 2, 3):
                s.begin([example])
                first(input_ids=ids, use_cache=False)
            s.begin([20])
            second(input_ids=ids, use_cache=False)  # its only forward: handed off at the close
            _fail_once(monkeypatch, MemorySink, "put_forward", MemoryError)
    assert sorted(s.committed_ids()) == [1, 2, 3]
    assert sorted({key[0] for key in rows_by_key(s.table())}) == [1, 2, 3]


def test_a_second_begin_before_any_forward_replaces_the_first():
    """As the README says: the retry of a forward that failed before it took its ids is begun again."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all") as s:
        s.begin([20])
        s.begin([30])
        model(input_ids=_tokens(5, seed=1))
    assert set(s.table()["example_id"].to_pylist()) == {30}


def _wrong_labels(model, ids):
    model(input_ids=ids, labels=torch.zeros(1, 2, dtype=torch.long))  # the loss raises: wrong length


def _call_with_a_raising_hook(module, model, ids):
    handle = module.register_forward_hook(_raise)
    try:
        model(input_ids=ids)
    finally:
        handle.remove()


def _raising_head(model, ids):
    _call_with_a_raising_hook(model.lm_head, model, ids)


def _raising_hook_on_the_model(model, ids):
    """A hook of the user's on the causal LM itself, registered after the model's first call: torch runs it
    after qk-attn's end hook unless that one is moved last."""
    _call_with_a_raising_hook(model, model, ids)


class _Interrupt(KeyboardInterrupt):
    pass


def _interrupted_head(model, ids):
    """Ctrl-C in the head (caught by the caller, a notebook cell): torch runs no always_call hook on a
    BaseException; the next commit finds the call unfinished."""

    def interrupt(*_):
        raise _Interrupt

    handle = model.lm_head.register_forward_hook(interrupt)
    try:
        model(input_ids=ids)
    finally:
        handle.remove()


def _inside_an_except_block(model, ids):
    """A call that returns while the caller handles another exception: not a call that raised."""
    try:
        raise _Boom("handled by the caller")
    except _Boom:
        model(input_ids=ids)


_RAISES = {
    _wrong_labels: ValueError,
    _raising_head: _Boom,
    _raising_hook_on_the_model: _Boom,
    _interrupted_head: _Interrupt,
}


@pytest.mark.parametrize(
    "call", [_wrong_labels, _raising_head, _raising_hook_on_the_model, _interrupted_head, _inside_an_except_block]
)
def test_a_model_call_that_raises_after_its_decoder_stack_returned_commits_nothing_of_it(tmp_path, call):
    """A causal LM's call that raised in its loss or in a hook on its head, after the decoder stack returned,
    had its example committed: a caller retrying the document under a new id recorded it twice. It is
    stopped as a forward that raises inside is (from the model's second call in the session on)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(build("llama3", "qk_sniff").config).eval()
    first, ids = _tokens(4, seed=9), _tokens(6, seed=1)
    out = tmp_path / "out"
    with qk_attn.session(sampler="all", output=out) as s:
        s.begin([0])
        model(input_ids=first)  # the first call in the session arms the hooks on the model's calls
        s.begin([1])
        raised = call is not _inside_an_except_block
        with pytest.raises(_RAISES[call]) if raised else contextlib.nullcontext():
            call(model, ids)
        s.begin([2])
        model(input_ids=ids)  # the retry
    want = {**_one_shot(model, first, 0), **_one_shot(model, ids, 2)}
    if not raised:
        want.update(_one_shot(model, ids, 1))
    _assert_same_rows(_folder_rows(out, model), want)
    assert cli.verify_dataset(out, log=lambda *_: None) == []


def _raising_hook_on_the_backbone(model, ids):
    _call_with_a_raising_hook(model.model, model, ids)


class _Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model(**kwargs)


@pytest.mark.parametrize("warm", ["causal LM", "wrapper", "causal LM, then wrapper"])
@pytest.mark.parametrize("call", [_raising_head, _raising_hook_on_the_model, _raising_hook_on_the_backbone])
def test_a_models_first_recorded_call_after_forwards_with_capture_off_that_raises_after_its_stack_is_discarded(
    call, warm
):
    """The hooks that tell a forward's end were registered only by recorded forwards: a model warmed up with
    capture off had, at its first recorded call, the hole only the very first call after loading has (the
    rows of a call that raised after its stack returned were committed, and a retry under the same ids was
    refused). Forwards with capture off register them too, for each model call around the stack (a warm-up
    through a wrapper watches the causal LM called alone later)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(build("llama3", "qk_sniff").config).eval()
    ids = _tokens(6, seed=1)
    for entry in warm.split(", then "):
        (model if entry == "causal LM" else _Wrapper(model))(input_ids=_tokens(4, seed=9))  # no session: capture off
    with qk_attn.session(sampler="all") as s:
        s.begin([1])
        with pytest.raises(_Boom):
            call(model, ids)
        s.begin([1])  # the retry, under the same id: free, since nothing of the call that raised was kept
        model(input_ids=ids)
    _assert_same_rows(rows_by_key(s.table()), _one_shot(model, ids, 1))


@pytest.mark.parametrize("first", ["backbone", "wrapper"])
def test_a_model_call_that_raises_after_its_stack_is_stopped_whichever_module_made_the_first_call(first):
    """Only the module around the model's first forward in the process had its calls watched: after a
    first call through the backbone (the README's session example) or a wrapper, a causal LM call whose
    loss raised was committed. Each module the caller calls is watched, from its second call on."""
    model = build("llama3", "qk_sniff")
    ids, wrong_labels = _tokens(6, seed=1), torch.zeros(1, 5, dtype=torch.long)
    entry = model.model if first == "backbone" else _Wrapper(model)
    with qk_attn.session(sampler="all") as s:
        s.begin([0])
        entry(input_ids=ids)
        s.begin([3])
        model(input_ids=ids)  # the causal LM's first call: its calls are watched from the next one on
        s.begin([1])
        with pytest.raises(ValueError, match="batch_size"):
            model(input_ids=ids, labels=wrong_labels)
        s.begin([2])
        model(input_ids=ids)
    assert sorted({key[0] for key in rows_by_key(s.table())}) == [0, 2, 3]


def test_a_cache_whose_model_call_raised_after_its_stack_is_refused_naming_that_call():
    """Continuing the cache of an example discarded because its model call raised after the decoder stack
    returned was refused as 'no sequence of this model was started on this cache', which blamed the cache."""
    from transformers import DynamicCache

    model = build("llama3", "qk_sniff")
    document = _tokens(12, seed=3)
    with qk_attn.session(sampler="all") as s:
        s.begin([0])
        model(input_ids=_tokens(5, seed=9), use_cache=False)  # the model's calls are watched from the next one
        cache = DynamicCache(config=model.config)
        s.begin([5])
        model(input_ids=document[:, :4], **cache_kw(cache))
        with pytest.raises(ValueError, match="batch_size"):
            model(input_ids=document[:, 4:8], labels=torch.zeros(1, 3, dtype=torch.long), **cache_kw(cache))
        with pytest.raises(
            CaptureError,
            match=r"continues the cache of examples \[5\], which were discarded when a forward of theirs raised in "
            r"its model call after its decoder stack returned",
        ):
            model(input_ids=document[:, 8:], **cache_kw(cache))
    assert sorted({key[0] for key in rows_by_key(s.table())}) == [0]


def test_a_backbone_called_directly_whose_own_hook_raises_is_discarded():
    """A hook of the user's on the decoder stack itself, registered after its first forward, that raises:
    torch ran qk-attn's end hook first, so the forward was handed off and committed. The end hook now runs
    after the user's hooks; the raise stops the forward before its end."""
    model = build("llama3", "qk_sniff")
    ids = _tokens(6, seed=1)
    with qk_attn.session(sampler="all") as s:
        s.begin([0])
        model.model(input_ids=ids)
        handle = model.model.register_forward_hook(_raise)
        s.begin([1])
        with pytest.raises(_Boom):
            model.model(input_ids=ids)
        handle.remove()
        s.begin([2])
        model.model(input_ids=ids)
    assert sorted({key[0] for key in rows_by_key(s.table())}) == [0, 2]


def test_an_interrupted_model_call_nested_in_another_models_hook_is_not_committed():
    """Model B runs inside a hook of model A; Ctrl-C in B's head is caught by A's hook. A's call ends
    normally and dropped B's unfinished call without telling the session: B's examples were committed."""
    outer, inner = build("llama3", "qk_sniff"), build("qwen3", "qk_sniff")
    ids = _tokens(6, seed=1)
    with torch.no_grad(), qk_attn.session(sampler="all"):  # the models' calls are watched from their second on
        outer(input_ids=ids)
        inner(input_ids=ids)

    def interrupt(*_):
        raise _Interrupt

    inner.lm_head.register_forward_hook(interrupt)
    with torch.no_grad(), qk_attn.session(sampler="all") as s:

        def run_inner(*_):
            s.begin([20])
            with contextlib.suppress(_Interrupt):
                inner(input_ids=ids)

        outer.model.layers[0].register_forward_hook(run_inner)
        s.begin([10])
        outer(input_ids=ids)
        s.commit()
        assert s.committed_ids() == {10}


def test_the_calls_of_a_discarded_example_leave_the_manifests_call_counts(tmp_path):
    """An example whose first chunk was handed off and whose second raised is discarded: its rows went, but
    its first chunk's calls stayed in the manifest's counts (`calls`: calls seen for committed examples)."""
    from qk_attn.storage.manifest import read_manifest

    model = build("llama3", "qk_sniff")
    document = _tokens(8, seed=2)
    out = tmp_path / "out"
    with torch.no_grad(), qk_attn.session(output=out, sampler="all") as s:
        s.begin([1])
        cache = DynamicCache(config=model.config)
        model(input_ids=document[:, :4], **cache_kw(cache))
        handle = model.model.layers[1].register_forward_hook(_raise)
        with pytest.raises(_Boom):
            model(input_ids=document[:, 4:], **cache_kw(cache))
        handle.remove()
        s.begin([2])
        model(input_ids=document)
    manifest = read_manifest(out)
    assert list(manifest["examples"]) == ["2"]
    assert set(manifest["calls"].values()) == {1}


@pytest.mark.parametrize("clear", ["all hooks", "forward hooks only"])
def test_a_model_whose_hooks_another_tool_cleared_is_recorded_again(clear):
    """Some profilers clear every module's hooks when they clean up: qk-attn's were taken with them, and
    every later forward was refused as one without its mask (all hooks), or discarded as stopped before its
    end (the forward hooks only: the stack's start was told, its end never). They are registered again."""
    model = build("llama3", "qk_sniff")
    ids = _tokens(6, seed=1)
    with torch.no_grad(), qk_attn.session(sampler="all", example_ids=[0]) as before:
        model(input_ids=ids)
    for module in model.modules():
        module._forward_hooks.clear()
        if clear == "all hooks":
            module._forward_pre_hooks.clear()
    with torch.no_grad(), qk_attn.session(sampler="all") as s:
        for example in (0, 1):
            s.begin([example])
            model(input_ids=ids)
    expected = rows_by_key(before.table())
    got = rows_by_key(s.table())
    assert {key[0] for key in got} == {0, 1}
    assert all(np.array_equal(got[key], value) for key, value in expected.items())


def test_a_stack_whose_forward_hooks_were_cleared_after_forwards_with_capture_off_is_recorded():
    """Its start hook stayed, its end hook was gone: every recorded forward was discarded as stopped before
    its end, though nothing raised. The end hook is registered again at the start."""
    model = build("llama3", "qk_sniff")
    ids = _tokens(6, seed=1)
    model(input_ids=ids)  # capture off
    model.model._forward_hooks.clear()
    with qk_attn.session(sampler="all") as s:
        for example in (0, 1):
            s.begin([example])
            model(input_ids=ids)
    got = rows_by_key(s.table())
    want = _one_shot(model, ids, 0)
    assert {key[0] for key in got} == {0, 1}
    _assert_same_rows({key: v for key, v in got.items() if key[0] == 0}, want)


@pytest.mark.parametrize("warm", ["capture off", "recorded"])
def test_a_deep_copy_of_a_model_that_ran_is_recorded_as_the_model(warm):
    """A copy carries the stack's hooks: they must find what they need in themselves, not in a table keyed by
    the original module (a KeyError in every forward of the copy, capture on or off)."""
    model = build("llama3", "qk_sniff")
    ids = _tokens(6, seed=1)
    with qk_attn.session(sampler="all") if warm == "recorded" else contextlib.nullcontext():
        model(input_ids=ids)
    twin = copy.deepcopy(model)
    assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)  # capture off
    _assert_same_rows(_one_shot(twin, ids, 0), _one_shot(model, ids, 0))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_example_whose_forward_raised_inside_the_model_is_begun_again_for_its_retry(error):
    """A forward that raised in a layer's attention was settled only at the next model call or commit(), so
    `begin()` of its ids for the retry was refused as "begun already and not committed yet". begin() settles it
    (its rows discarded), and the retry is recorded as a clean run of the same ids."""
    model = build("llama3", "qk_sniff")
    tokens = torch.randint(2, VOCAB - 2, (1, 6), generator=torch.Generator().manual_seed(4))
    with qk_attn.session(sampler="all") as clean:
        clean.begin([2])
        model(input_ids=tokens)

    def fail(module, args, kwargs, output):
        raise error("boom")

    with qk_attn.session(sampler="all") as s:
        s.begin([2])
        hook = model.model.layers[1].self_attn.register_forward_hook(fail, with_kwargs=True)
        with pytest.raises(error):
            model(input_ids=tokens)
        hook.remove()
        s.begin([2])
        model(input_ids=tokens)
    assert s.table().equals(clean.table())
