"""A session's life against forwards that outlive it or overlap it: a session closed while a generate()
still extends its examples (another thread's, or its own from a callback: reload_env()), a session
opened in the middle of another thread's generate(), a forward after close(), and one model running
forwards in two threads that record into two sessions."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import transformers as tf

import qk_attn
from qk_attn.errors import CaptureError
from support.models import CACHE_ARG, build
from support.oracle import rows_by_key

torch.set_grad_enabled(False)

PROMPT = torch.arange(5, 11)[None]  # 6 tokens
GENERATE = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)  # 12 tokens, 11 fed
SMALL = dict(sampler="all", layers="0", heads="0", capture="q")  # every position of one head: lengths are clear


class PauseAt(tf.LogitsProcessor):
    """At its `step`-th call (between two decode steps of its generate()): sets `paused`, waits for `go`."""

    def __init__(self, step: int):
        self.step, self.calls = step, 0
        self.paused, self.go = threading.Event(), threading.Event()

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            self.paused.set()
            self.go.wait(30)
        return scores


class CallAt(tf.LogitsProcessor):
    """Calls `action` at its `step`-th call, in generate()'s own thread between two decode steps."""

    def __init__(self, step: int, action):
        self.step, self.calls, self.action = step, 0, action

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            self.action()
        return scores


def _in_thread(model, pause: PauseAt, result: dict) -> threading.Thread:
    """generate() of PROMPT in thread 'T' (which opened no session), paused between two decode steps."""

    def run():
        try:
            result["out"] = model.generate(PROMPT, logits_processor=tf.LogitsProcessorList([pause]), **GENERATE)
        except Exception as error:  # noqa: BLE001 - the test reads it
            result["error"] = error

    return threading.Thread(target=run, name="T")


def _positions(table) -> dict[int, list[int]]:
    data = table.to_pydict()
    found: dict[int, list[int]] = {}
    for example, position in zip(data["example_id"], data["position"], strict=True):
        found.setdefault(example, []).append(position)
    return {example: sorted(found[example]) for example in sorted(found)}


def _in_threads_a_and_b(model, pre_hook, run) -> None:
    """`run(name)` in threads 'A' and 'B' at once, with `pre_hook` on layer 1 meanwhile."""
    handle = model.model.layers[1].register_forward_pre_hook(pre_hook)
    threads = [threading.Thread(target=run, args=(name,), name=name) for name in "AB"]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    handle.remove()


def _alone(model, ids, example_ids: list[int]) -> dict:
    """The rows of `ids` in one uncached forward, under `example_ids`, in a session of their own."""
    with qk_attn.session(example_ids=example_ids, **SMALL) as s:
        model(input_ids=ids, use_cache=False)
    return rows_by_key(s.table())


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, vector in want.items():  # a decode step and an uncached forward round alike on the CPU
        torch.testing.assert_close(torch.from_numpy(got[key]), torch.from_numpy(vector), rtol=1e-5, atol=1e-6)


# ---- a session closed while a generate() is still extending its examples ------------------------


def test_leaving_the_session_while_a_worker_generate_runs_commits_none_of_its_example(tmp_path, caplog):
    """The streamer pattern: generate() in a worker thread, the reader leaves the with block between two
    decode steps. The example it was extending is discarded with a warning, never committed short, and
    the generate()'s next forward is refused with why; the complete example before it is committed."""
    model, out = build("llama3", "qk_sniff"), tmp_path / "out"
    pause, result = PauseAt(2), {}
    worker = _in_thread(model, pause, result)
    with qk_attn.session(output=out, **SMALL) as s:
        s.begin([0])
        model(input_ids=PROMPT)
        s.begin([1])
        worker.start()
        assert pause.paused.wait(30)
    pause.go.set()
    worker.join(30)
    assert (
        "example(s) [1] could still be continued (their cache is alive) when the session closed while generate() "
        "ran in thread 'T'; they may be incomplete" in caplog.text
    )
    assert isinstance(result.get("error"), CaptureError), result
    assert str(result["error"]).startswith(
        "qk_sniff: the session this generate() records into was closed while it ran; the examples it was extending "
        "were discarded"
    )
    assert qk_attn.load_examples(out)["example_id"].to_pylist() == [0]
    assert _positions(qk_attn.load(out)) == {0: list(range(6))}


@pytest.mark.parametrize("where", ["another thread", "its own callback"])
def test_a_commit_while_a_generate_runs_keeps_its_example_for_a_later_commit(tmp_path, where):
    """commit() (qk_attn.flush() in env mode) between two decode steps of a generate(): the examples
    before it are committed, the one it is extending is not complete, so it stays begun and the next
    commit takes it whole. It was committed short, and the next step was refused."""
    model, out = build("llama3", "qk_sniff"), tmp_path / "out"
    with qk_attn.session(output=out, **SMALL) as s:
        s.begin([0])
        model(input_ids=PROMPT)
        s.begin([1])
        if where == "another thread":
            pause, result = PauseAt(2), {}
            worker = _in_thread(model, pause, result)
            worker.start()
            assert pause.paused.wait(30)
            s.commit()
            pause.go.set()
            worker.join(30)
            assert "error" not in result, result
            sequence = result["out"]
        else:
            commit = CallAt(2, s.commit)
            sequence = model.generate(PROMPT, logits_processor=tf.LogitsProcessorList([commit]), **GENERATE)
        assert s.committed_ids() == {0}
    assert qk_attn.load_examples(out)["example_id"].to_pylist() == [0, 1]
    assert _positions(qk_attn.load(out)) == {0: list(range(6)), 1: list(range(sequence.shape[1] - 1))}


def test_a_worker_thread_that_is_alive_holds_back_only_the_generate_it_runs_now(tmp_path, caplog):
    """A thread-pool worker outlives its generate() calls. The example of one that returned is complete
    and committed, even with its cache kept alive (return_dict_in_generate); only the example of the
    generate() it runs when the session closes is discarded."""
    model, out = build("llama3", "qk_sniff"), tmp_path / "out"
    pause = PauseAt(2)
    with ThreadPoolExecutor(1, thread_name_prefix="pool") as pool:
        with qk_attn.session(output=out, **SMALL) as s:
            s.begin([1])
            kept = pool.submit(model.generate, PROMPT, return_dict_in_generate=True, **GENERATE).result(30)
            s.begin([2])
            running = pool.submit(model.generate, PROMPT, logits_processor=tf.LogitsProcessorList([pause]), **GENERATE)
            assert pause.paused.wait(30)
        pause.go.set()
        with pytest.raises(CaptureError, match="records into was closed while it ran"):
            running.result(30)
    assert getattr(kept, CACHE_ARG) is not None  # its cache is alive: example 1 could be continued, but is complete
    assert "example(s) [2] could still be continued" in caplog.text and "[1]" not in caplog.text
    assert qk_attn.load_examples(out)["example_id"].to_pylist() == [1]
    assert _positions(qk_attn.load(out)) == {1: list(range(11))}


def test_closing_a_session_from_inside_its_own_generate_commits_none_of_it(caplog):
    """close() from a logits processor, in generate()'s own thread: its examples are discarded, and its
    next forward is refused (the in-memory table never shows the part recorded)."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(**SMALL) as s:
        s.begin([0])
        model(input_ids=PROMPT)
        s.begin([1])
        with pytest.raises(CaptureError, match="^qk_sniff: the session this generate\\(\\) records into was closed"):
            model.generate(PROMPT, logits_processor=tf.LogitsProcessorList([CallAt(2, s.close)]), **GENERATE)
    assert "example(s) [1] could still be continued" in caplog.text
    assert _positions(s.table()) == {0: list(range(6))}


def test_reload_env_inside_a_generate_commits_none_of_it_and_says_so(tmp_path, monkeypatch, caplog):
    """QK_SNIFF_* mode, reload_env() called between two decode steps: the default session it closes
    does not commit the generate()'s example part-way, and the next step's refusal names reload_env()
    (not a cache that "no sequence" holds)."""
    out = tmp_path / "out"
    model = build("llama3", "qk_sniff")
    monkeypatch.setenv("QK_SNIFF_OUTPUT", str(out))
    monkeypatch.setenv("QK_SNIFF_SAMPLER", "all")
    try:
        qk_attn.reload_env()
        model(input_ids=PROMPT)  # example 0, complete
        with pytest.raises(CaptureError) as refused:
            model.generate(PROMPT, logits_processor=tf.LogitsProcessorList([CallAt(2, qk_attn.reload_env)]), **GENERATE)
        assert str(refused.value).startswith(
            "qk_sniff: the session this generate() records into was closed by qk_attn.reload_env() while it ran"
        )
        assert "example(s) [1] could still be continued" in caplog.text
        assert qk_attn.load_examples(out)["example_id"].to_pylist() == [0]
        model(input_ids=PROMPT)  # outside generate(): the new default session, on the same folder
        qk_attn.flush()
        assert qk_attn.load_examples(out)["example_id"].to_pylist() == [0, 1]
    finally:
        monkeypatch.delenv("QK_SNIFF_OUTPUT")
        monkeypatch.delenv("QK_SNIFF_SAMPLER")
        qk_attn.reload_env()


# ---- a session opened while another thread's generate() runs ------------------------------------


def test_a_session_a_callback_opens_inside_a_generate_is_not_the_generates():
    """Capture off when generate() starts; a logits processor opens its own session around a guide model
    at each step. The guide is recorded there; the generate() itself records nothing and is not refused
    when that session closes (it never recorded into it)."""
    model, guide = build("llama3", "qk_sniff"), build("qwen2", "qk_sniff")
    tables = []

    def score():
        with qk_attn.session(**SMALL) as s:
            guide(input_ids=PROMPT)
        tables.append(s.table())

    sequence = model.generate(PROMPT, logits_processor=tf.LogitsProcessorList([CallAt(2, score)]), **GENERATE)
    assert sequence.shape == (1, 12) and len(tables) == 1
    _same(rows_by_key(tables[0]), _alone(guide, PROMPT, [0]))


def test_a_session_opened_in_the_middle_of_a_worker_generate_keeps_each_its_own(tmp_path, caplog):
    """Thread 'T' opened no session: its generate() records into the session that was the latest when it
    started (A) until it returns, though the main thread opens B in the middle of it and records another
    model there. Both examples are whole and exact, and nothing is discarded."""
    model, other, out = build("llama3", "qk_sniff"), build("qwen2", "qk_sniff"), tmp_path / "a"
    pause, result = PauseAt(2), {}
    worker = _in_thread(model, pause, result)
    with qk_attn.session(output=out, **SMALL) as a:
        a.begin([1])
        worker.start()
        assert pause.paused.wait(30)
        with qk_attn.session(**SMALL) as b:
            other(input_ids=PROMPT)  # B's example 0
            pause.go.set()
            worker.join(30)
    assert "error" not in result, result
    assert "discarded" not in caplog.text, caplog.text
    sequence = result["out"]
    _same(rows_by_key(qk_attn.load(out)), _alone(model, sequence[:, :-1], [1]))
    _same(rows_by_key(b.table()), _alone(other, PROMPT, [0]))


def test_a_generate_that_raises_discards_only_what_its_own_thread_extended(caplog):
    """A worker's generate() raises between two steps: its example goes, but not the example the main
    thread recorded into the same session (another model) while it ran."""
    model, other = build("llama3", "qk_sniff"), build("qwen2", "qk_sniff")
    pause, result = PauseAt(2), {}

    def fail():
        pause.paused.set()
        pause.go.wait(30)
        raise RuntimeError("a logits processor failed")

    def run():
        try:
            model.generate(PROMPT, logits_processor=tf.LogitsProcessorList([CallAt(2, fail)]), **GENERATE)
        except RuntimeError as error:
            result["error"] = error

    worker = threading.Thread(target=run, name="T")
    with qk_attn.session(**SMALL) as s:
        s.begin([1])
        worker.start()
        assert pause.paused.wait(30)
        s.begin([2])
        other(input_ids=PROMPT)  # complete, begun after the generate() started
        pause.go.set()
        worker.join(30)
    assert "a logits processor failed" in str(result.get("error"))
    assert "example(s) [1] stopped between two forwards: generate() raised" in caplog.text
    _same(rows_by_key(s.table()), _alone(other, PROMPT, [2]))


def test_a_nested_generate_that_returned_keeps_its_example_when_the_outer_one_raises(caplog):
    """A guide model's generate() run from a logits processor returns a complete example; the outer
    generate() then raises: only the outer example goes (both went: the thread and the forward numbers
    said "extended since the outer generate() started" of both)."""
    model, guide = build("llama3", "qk_sniff"), build("qwen2", "qk_sniff")
    guided = {}

    def run_guide():
        guided["sequence"] = guide.generate(PROMPT + 7, max_new_tokens=3, do_sample=False, pad_token_id=0)

    def fail():
        raise RuntimeError("a logits processor failed")

    processors = tf.LogitsProcessorList([CallAt(2, run_guide), CallAt(4, fail)])
    with qk_attn.session(**SMALL) as s:
        with pytest.raises(RuntimeError, match="a logits processor failed"):
            model.generate(PROMPT, logits_processor=processors, **GENERATE)
    assert "example(s) [0] stopped between two forwards" in caplog.text and s.committed_ids() == {1}
    _same(rows_by_key(s.table()), _alone(guide, guided["sequence"][:, :-1], [1]))


def test_a_generate_two_levels_down_that_returned_keeps_its_example_when_the_levels_above_raise():
    """Three nested generate() calls: the innermost returns, the middle one raises (caught by the
    outer's logits processor), then the outer one raises. Only the innermost example is complete: it
    was lost with the others, as the middle one never returned to pass on what it had made."""
    outer, middle, inner = build("llama3", "qk_sniff"), build("qwen2", "qk_sniff"), build("qwen3", "qk_sniff")
    made = {}

    def fail():
        raise RuntimeError("a logits processor failed")

    def run_inner():
        made["sequence"] = inner.generate(PROMPT + 9, max_new_tokens=3, do_sample=False, pad_token_id=0)

    def run_middle():
        processors = tf.LogitsProcessorList([CallAt(2, run_inner), CallAt(3, fail)])
        with pytest.raises(RuntimeError):
            middle.generate(PROMPT + 7, logits_processor=processors, **GENERATE)

    processors = tf.LogitsProcessorList([CallAt(2, run_middle), CallAt(4, fail)])
    with qk_attn.session(**SMALL) as s:
        with pytest.raises(RuntimeError, match="a logits processor failed"):
            outer.generate(PROMPT, logits_processor=processors, **GENERATE)
    assert s.committed_ids() == {2}
    _same(rows_by_key(s.table()), _alone(inner, made["sequence"][:, :-1], [2]))


def test_a_generate_begun_with_capture_off_stays_off_when_a_session_opens_mid_way():
    """A worker's generate() starts with no session anywhere; the main thread then opens one and records
    another model. The worker's later steps record nothing (they were refused as continuing a cache no
    sequence was started on), and the main thread's example is exact."""
    model, other = build("llama3", "qk_sniff"), build("qwen2", "qk_sniff")
    pause, result = PauseAt(2), {}
    worker = _in_thread(model, pause, result)
    worker.start()
    assert pause.paused.wait(30)
    with qk_attn.session(**SMALL) as s:
        s.begin([3])
        other(input_ids=PROMPT)
        pause.go.set()
        worker.join(30)
    assert "error" not in result, result
    _same(rows_by_key(s.table()), _alone(other, PROMPT, [3]))


# ---- a forward after close() --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "folder"])
def test_a_forward_after_close_is_refused_before_any_layer_runs(tmp_path, where):
    """close() inside the with block: the next forward that would record into it is refused in one line
    before its first layer, in memory as with a folder (which raised from its closed sink at the end)."""
    model = build("llama3", "qk_sniff")
    ran = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda *_: ran.append(1))
    output = tmp_path / "out" if where == "folder" else None
    with pytest.raises(CaptureError, match="^qk_sniff: this forward would record into a session that was closed"):
        with qk_attn.session(output=output, **SMALL) as s:
            model(input_ids=PROMPT)
            s.close()
            ran.clear()
            model(input_ids=PROMPT)
    handle.remove()
    assert ran == []
    table = qk_attn.load(output) if output is not None else s.table()
    assert _positions(table) == {0: list(range(6))}


# ---- one model, two threads, two sessions -------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True])
def test_one_model_in_two_threads_with_two_sessions_refuses_the_second_forward(warm):
    """Each thread opened its own session. While thread A is inside a forward (held in layer 1), B's
    forward of the same model is refused as in one session, before it records anything (it failed with
    "layer 0 ran without transformers building its mask" when A's forward was the model's first); A's
    rows are exact."""
    model = build("llama3", "qk_sniff")
    if warm:
        with qk_attn.session(**SMALL):
            model(input_ids=PROMPT)
    ids = {"A": torch.arange(3, 11)[None], "B": torch.arange(20, 25).repeat(2, 1)}
    inside, b_done, results = threading.Event(), threading.Event(), {}

    def hold(module, args):
        if threading.current_thread().name == "A" and not b_done.is_set():
            inside.set()
            b_done.wait(30)

    def run(name):
        if name == "B":
            inside.wait(30)
        try:
            with qk_attn.session(example_ids=[7] * (name == "A") or [8, 9], **SMALL) as s:
                model(input_ids=ids[name])
            results[name] = rows_by_key(s.table())
        except CaptureError as error:
            results[name] = str(error)
        finally:
            if name == "B":
                b_done.set()

    _in_threads_a_and_b(model, hold, run)
    assert isinstance(results["B"], str) and results["B"].startswith(
        "qk_sniff: this model is in the middle of a forward in thread 'A'"
    ), results["B"]
    _same(results["A"], _alone(model, ids["A"], [7]))


def test_one_model_starting_forwards_in_two_threads_with_two_sessions_at_once():
    """The model's first forward in two threads at once, each recording into its own session: both build
    their masks before either reaches layer 1. One is refused, naming the other's thread (not "layer 0 ran
    without transformers building its mask": the check and the new forward's context are one step per
    model); the other is recorded exactly."""
    model = build("llama3", "qk_sniff")
    ids = {"A": torch.arange(3, 11)[None], "B": torch.arange(20, 25).repeat(2, 1)}
    example_ids = {"A": [7], "B": [8, 9]}
    both = threading.Barrier(2, timeout=30)
    results = {}

    def meet(module, args):
        try:
            both.wait()
        except threading.BrokenBarrierError:  # the other thread's forward was refused
            pass

    def run(name):
        try:
            with qk_attn.session(example_ids=example_ids[name], **SMALL) as s:
                model(input_ids=ids[name])
            results[name] = rows_by_key(s.table())
        except CaptureError as error:
            results[name] = str(error)
            both.abort()

    _in_threads_a_and_b(model, meet, run)
    refused = [name for name in "AB" if isinstance(results[name], str)]
    assert len(refused) == 1, results
    (loser,) = refused
    (winner,) = set("AB") - {loser}
    assert results[loser].startswith(f"qk_sniff: this model is in the middle of a forward in thread {winner!r}")
    _same(results[winner], _alone(model, ids[winner], example_ids[winner]))


PACKED = dict(
    cu_seq_lens_q=torch.tensor([0, 3, 6], dtype=torch.int32),
    cu_seq_lens_k=torch.tensor([0, 3, 6], dtype=torch.int32),
    max_length_q=3,
    max_length_k=3,
)


@pytest.mark.parametrize("commit_first", [False, True], ids=["uncommitted", "committed"])
@pytest.mark.parametrize("refusal", ["packed", "mask-length"])
@pytest.mark.parametrize("where", ["memory", "folder"])
def test_a_refused_forward_without_a_cache_takes_nothing_from_the_forward_before_it(
    tmp_path, where, refusal, commit_first, caplog
):
    """Forwards without a cache (use_cache=False) continue nothing: one refused (at its mask or its first
    attention call) discarded the model's earlier cacheless example with its own, committed or not, and the
    warning named that example."""
    model = build("llama3", "qk_sniff")
    ids = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    bad = PACKED if refusal == "packed" else dict(attention_mask=torch.ones(1, 7, dtype=torch.long))
    output = str(tmp_path / "out") if where == "folder" else None
    with qk_attn.session(sampler="all", capture="k", output=output) as s:
        s.begin([10])
        model(input_ids=ids, use_cache=False)
        if commit_first:
            s.commit()
        s.begin([11])
        with pytest.raises(CaptureError):
            model(input_ids=ids, use_cache=False, **bad)
        s.begin([12])
        model(input_ids=ids, use_cache=False)
    table = s.table() if output is None else qk_attn.load(output)
    assert sorted(set(table.column("example_id").to_pylist())) == [10, 12]
    assert table.num_rows == 2 * 6 * model.config.num_hidden_layers * model.config.num_key_value_heads
    assert "[10]" not in caplog.text


def test_first_forwards_of_two_models_started_together_in_two_threads_are_recorded():
    """Two copies of one model (what the refusal of one model in two threads advises) whose first forwards
    start at once: the one-time checks of source files they run then parsed concurrently, which CPython 3.11
    can fail with `SystemError: AST constructor recursion depth mismatch`. Repeated with those checks
    forgotten, since one try hit it about half the time."""
    import copy

    from qk_attn.capture import facts, modeling_checks

    model = build("llama3", "qk_sniff")
    twin = copy.deepcopy(model)
    ids = torch.randint(2, 90, (1, 16), generator=torch.Generator().manual_seed(0))
    errors = []
    for _ in range(8):
        facts.require.cache_clear()
        modeling_checks._refusals.clear()
        barrier = threading.Barrier(2)

        def first_forward(runs):
            barrier.wait()
            try:
                runs(input_ids=ids, use_cache=False)
            except Exception as error:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(error))

        with qk_attn.session(sampler="all", capture="k") as s:
            threads = [threading.Thread(target=first_forward, args=(m,)) for m in (model, twin)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert errors == []
        assert s.table().num_rows == 2 * 16 * model.config.num_hidden_layers * model.config.num_key_value_heads


def test_a_forward_another_thread_runs_while_the_session_closes_is_discarded_naming_the_close(caplog):
    """close() while another thread is inside a forward is refused and ends the session: that forward's rows
    are discarded. Its warning said it "stopped before its end (an exception inside the model)"."""
    model = build("llama3", "qk_sniff")
    inside, go_on, errors = threading.Event(), threading.Event(), []

    def pause(module, args, output):
        inside.set()
        go_on.wait(30)

    def forward():
        try:
            model(input_ids=PROMPT, use_cache=False)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    opened = qk_attn.session(example_ids=[8], **SMALL)
    s = opened.__enter__()
    handle = model.model.layers[1].register_forward_hook(pause)
    worker = threading.Thread(target=forward)
    worker.start()
    inside.wait(30)
    with pytest.raises(RuntimeError, match=r"close\(\) was called while a forward of this session is running"):
        opened.__exit__(None, None, None)
    go_on.set()
    worker.join()
    handle.remove()
    with qk_attn.session(**SMALL):
        model(input_ids=PROMPT, use_cache=False)  # the next session's forward ends nothing of the old one
    assert errors == [] and s.table() is None
    assert "[8] was running in thread" in caplog.text and "when the session closed" in caplog.text
    assert "stopped before its end" not in caplog.text


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler (a process started in the background, as CI's may be, ignores SIGINT)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("queued", [False, True])
def test_ctrl_c_in_commit_leaves_the_example_committed_once_or_recordable_again(tmp_path, queued, ctrl_c_raises):
    """Ctrl-C inside commit(), caught by the caller (a notebook cell). Before the sink queued the commit: the
    example is not listed committed (it is never written) and begin() records it again. A SIGINT right
    after: delivered once it is also listed committed, so begin() refuses it (no second copy of its rows)."""
    import signal

    model = build("llama3", "qk_sniff")
    ids = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "out"
    with torch.no_grad(), qk_attn.session(output=str(out), sampler="all") as s:
        s.begin([0])
        model(input_ids=ids)
        queue = s.sink._enqueue

        def interrupted(item):
            s.sink._enqueue = queue
            if not queued:
                raise KeyboardInterrupt
            queue(item)
            # What Python runs for a SIGINT arriving now (delivery itself is asynchronous in a threaded process)
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)

        s.sink._enqueue = interrupted
        with pytest.raises(KeyboardInterrupt):
            s.commit()
        assert s.committed_ids() == ({0} if queued else set())
        if queued:
            with pytest.raises(ValueError, match="already committed"):
                s.begin([0])
        else:
            s.begin([0])  # recorded again, and committed at close
            model(input_ids=ids)
    table = qk_attn.load(str(out), layer=0, head=0, kind="k")
    assert table.column("example_id").to_pylist() == [0] * 6


def test_a_generate_that_raises_while_another_thread_is_inside_a_forward_is_discarded_not_committed(tmp_path):
    """Thread B's generate() raises between two steps while thread A is inside a forward of the same model:
    B's part-way example is discarded (its drop does not wait for A's forward), A's is committed whole."""
    model = build("llama3", "qk_sniff")
    model.generation_config.pad_token_id = 0
    inside_a, b_failed, b_between = threading.Event(), threading.Event(), threading.Event()

    def fail():
        b_between.set()
        inside_a.wait(30)
        raise RuntimeError("B's logits processor")

    def hold(*_):
        inside_a.set()
        b_failed.wait(30)

    def run_a():
        b_between.wait(30)
        handle = model.model.layers[1].register_forward_hook(hold)
        try:
            model(input_ids=torch.arange(2, 9)[None])
        finally:
            handle.remove()

    def run_b():
        try:
            with pytest.raises(RuntimeError, match="B's logits processor"):
                model.generate(PROMPT, logits_processor=tf.LogitsProcessorList([CallAt(3, fail)]), **GENERATE)
        finally:
            b_failed.set()

    out = tmp_path / "out"
    with torch.no_grad(), qk_attn.session(output=str(out), sampler="all", capture="k"):
        threads = [threading.Thread(target=run_a, name="A"), threading.Thread(target=run_b, name="B")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    table = qk_attn.load(str(out), layer=0, head=0, kind="k")
    assert sorted(set(table.column("example_id").to_pylist())) == [1]  # B's example 0 is not committed
    assert table.num_rows == 7


def test_ctrl_c_as_the_session_closes_still_writes_what_was_committed(tmp_path):
    """Ctrl-C in close() before its final flush was queued (while it drains the last copies): the saver
    stopped without writing the committed examples. The final flush is queued before the stop."""
    model = build("llama3", "qk_sniff")
    ids = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), torch.no_grad(), qk_attn.session(output=str(out), sampler="all") as s:
        for example in range(3):
            s.begin([example])
            model(input_ids=ids)
        s.commit()

        def interrupted():
            raise KeyboardInterrupt

        s.sink._sender.drain = interrupted
    table = qk_attn.load(str(out), layer=0, head=0, kind="k")
    assert sorted(set(table.column("example_id").to_pylist())) == [0, 1, 2]


def test_a_closed_session_kept_for_its_table_does_not_keep_the_models_it_recorded():
    """The last forward of each model (its decoder stack, its cache) stayed in the session after close(), so
    a caller that keeps the session to read table() kept every model it had recorded alive."""
    import gc
    import weakref

    def record(s):
        model = build("llama3", "qk_sniff")
        model(input_ids=torch.arange(2, 8)[None])
        return weakref.ref(model.model)  # (the forward held its decoder stack)

    with torch.no_grad(), qk_attn.session(sampler="all") as s:
        gone = record(s)
    gc.collect()
    assert gone() is None
    assert s.table().num_rows > 0


@pytest.mark.parametrize("forwards", [1, 3])
def test_a_session_keeps_nothing_of_a_model_the_caller_dropped(forwards):
    """A sweep over models in one session: once the caller drops a model, its weights and config go,
    whether its last forward's end was reported by its decoder stack or (a model's first forward)
    found at its final norm. The next model records as if it were the first."""
    with qk_attn.session(**SMALL) as s:
        model = build("llama3", "qk_sniff")
        for example in range(forwards):
            s.begin([example])
            model(PROMPT)
            s.commit()
        weight, config = weakref.ref(model.model.layers[0].self_attn.q_proj.weight), weakref.ref(model.config)
        del model
        gc.collect()
        assert weight() is None, "the session keeps the dropped model's weights"
        assert config() is None, "the session keeps the dropped model's config"
        s.begin([9])
        build("llama3", "qk_sniff", seed=1)(PROMPT)
        s.commit()
        examples = s.table().column("example_id").to_pylist()
    assert sorted(set(examples)) == [*range(forwards), 9]
    assert examples.count(9) == PROMPT.shape[1]


def test_a_forward_begun_with_capture_off_ends_so_when_another_thread_opens_a_session():
    """A forward running with no session (capture off) whose thread met a session opened meanwhile by another
    thread raised at its next layer ("ran without transformers building its mask"): a caller that was not
    capturing got an error. It ends as it began, unrecorded and equal to sdpa; the session records its own."""
    model = build("llama3", "qk_sniff")
    reference = build("llama3", "sdpa")
    tokens = torch.randint(2, 90, (1, 7), generator=torch.Generator().manual_seed(3))
    with qk_attn.session(sampler="all"):
        model(input_ids=tokens)  # (the model's hooks are in place, as after any earlier session)
    inside, release, result = threading.Event(), threading.Event(), {}

    def pause(*_):
        inside.set()
        release.wait(30)

    hook = model.model.layers[0].mlp.register_forward_hook(pause)

    def run():
        try:
            result["logits"] = model(input_ids=tokens).logits
        except BaseException as error:  # noqa: BLE001 - reported below
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    assert inside.wait(30)
    with qk_attn.session(sampler="all") as s:
        release.set()
        thread.join(30)
        hook.remove()
        assert "error" not in result, result.get("error")
        assert s.table() is None
        s.begin([5])
        model(input_ids=tokens)
    assert torch.equal(result["logits"], reference(input_ids=tokens).logits)
    assert set(s.table()["example_id"].to_pylist()) == {5}


@pytest.mark.parametrize("other_length", [6, 9])
def test_a_capture_off_forward_in_another_thread_does_not_mix_into_the_sessions_forward(other_length):
    """A forward begun with capture off in thread `bg`, paused in layer 0, then run to its end while the
    session's forward of the same model waits before its layer 2. Its layers' attention calls were credited to
    the session's forward (same length: layer 2's rows were bg's vectors, committed, verify OK), its end ended
    the session's forward (so the real layer 2 was refused), and with another length bg itself raised while
    the session's example was dropped. bg ends unrecorded and equal to sdpa; the session's rows are exact."""
    from support.oracle import GroundTruth, all_heads, expected_rows

    model, reference = build("llama3", "qk_sniff"), build("llama3", "sdpa")
    other = torch.randint(2, 90, (1, other_length), generator=torch.Generator().manual_seed(1))
    document = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(2))
    with qk_attn.session(sampler="all"):
        model(input_ids=document)  # (the model's hooks are in place, as after any earlier session)
    bg_inside, release_bg, bg_done, result = threading.Event(), threading.Event(), threading.Event(), {}

    def pause_bg(*_):
        if threading.current_thread().name == "bg":
            bg_inside.set()
            release_bg.wait(30)

    def let_bg_finish(*_):
        if threading.current_thread() is threading.main_thread():
            release_bg.set()
            bg_done.wait(30)

    hooks = [
        model.model.layers[0].mlp.register_forward_hook(pause_bg),
        model.model.layers[2].register_forward_pre_hook(let_bg_finish),
    ]

    def background():
        try:
            result["logits"] = model(input_ids=other).logits
        except BaseException as error:  # noqa: BLE001 - reported below
            result["error"] = error
        bg_done.set()

    thread = threading.Thread(target=background, name="bg")
    thread.start()
    assert bg_inside.wait(30)
    with qk_attn.session(sampler="all") as s:
        s.begin([7])
        model(input_ids=document)
        thread.join(30)
    for hook in hooks:
        hook.remove()
    assert "error" not in result, result.get("error")
    assert torch.equal(result["logits"], reference(input_ids=other).logits)
    truth = GroundTruth(reference)
    reference(input_ids=document)
    truth.remove()
    batch = {"attention_mask": torch.ones_like(document), "position_ids": torch.arange(6)[None]}
    expected = expected_rows(truth.post, batch, [7], all_heads(reference))
    got = rows_by_key(s.table())
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[key], expected[key]) for key in expected)


def test_a_layer_run_in_a_worker_thread_inside_a_forward_is_refused_in_one_line():
    """A layer the forward hands to another thread: its rows could be told from no forward's, so it is
    refused there (and the forward with it), naming both threads."""
    model = build("llama3", "qk_sniff")
    layer = model.model.layers[2]
    in_thread = layer.forward

    def forward_in_a_worker(*args, **kwargs):
        with ThreadPoolExecutor(1, thread_name_prefix="worker") as pool:
            return pool.submit(in_thread, *args, **kwargs).result()

    layer.forward = forward_in_a_worker
    with qk_attn.session(sampler="all") as s:
        s.begin([7])
        with pytest.raises(
            CaptureError,
            match=r"^qk_sniff: layer 2 of this model ran in thread 'worker_0' while a "
            r"forward of it runs in thread 'MainThread'; [^\n]*not recorded$",
        ):
            model(input_ids=PROMPT)
        del layer.forward
        s.begin([8])
        model(input_ids=PROMPT)
    assert set(s.table()["example_id"].to_pylist()) == {8}


def test_a_model_dropped_after_one_forward_is_let_go_at_the_next_models_forward():
    """A model's first forward stays its current one until its next (only its last modules tell its end): a loop
    of load, one forward, `del model` kept every model's weights and cache until the session's commit."""
    weights = []
    with qk_attn.session(sampler="all", layers="0", heads="0", capture="q") as s:
        for seed in range(3):
            model = build("llama3", "qk_sniff", seed=seed)
            s.begin([seed])
            model(input_ids=PROMPT)
            weights.append(weakref.ref(model.model.layers[0].self_attn.q_proj.weight))
            del model
            gc.collect()
            assert [w() is None for w in weights[:-1]] == [True] * seed, "an earlier model is kept alive"
        s.commit()
    assert sorted(set(s.table()["example_id"].to_pylist())) == [0, 1, 2]
    assert s.table().num_rows == 3 * PROMPT.shape[1]


def test_a_capture_off_forward_given_a_prepared_mask_runs_on_beside_a_sessions_forward():
    """A forward given a 4-D mask builds none, so nothing marked it as begun with capture off: another thread's
    session forward of the same model made its next layer raise ("ran in thread 'bg' while a forward of it runs")."""
    model = build("llama3", "qk_sniff")
    ids = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(4))
    causal = torch.zeros(1, 1, 6, 6).masked_fill_(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    bg_inside, session_started, result = threading.Event(), threading.Event(), {}

    def gate(*_):
        if threading.current_thread().name == "bg" and not bg_inside.is_set():
            bg_inside.set()
            session_started.wait(30)
        elif threading.current_thread().name != "bg":
            session_started.set()
            time.sleep(0.3)  # bg runs its next layers while this forward is inside its own

    hook = model.model.layers[1].register_forward_pre_hook(gate)

    def background():
        try:
            result["logits"] = model(input_ids=ids, attention_mask=causal).logits
        except BaseException as error:  # noqa: BLE001 - reported below
            result["error"] = error

    thread = threading.Thread(target=background, name="bg")
    thread.start()
    assert bg_inside.wait(30)
    with qk_attn.session(sampler="all", layers="1", heads="0", capture="q") as s:
        s.begin([7])
        model(input_ids=ids)
        thread.join(30)
    hook.remove()
    assert "error" not in result, result.get("error")
    assert torch.equal(result["logits"], build("llama3", "sdpa")(input_ids=ids, attention_mask=causal).logits)
    assert s.table()["example_id"].to_pylist() == [7] * 6


def test_a_models_first_forward_keeps_its_end_when_another_threads_capture_off_forward_starts():
    """A model's first recorded forward ends by hooks on its last modules, which the stack's start removed in any
    thread: a capture-off generate() step of another thread took them, and the first forward was discarded
    as "stopped before its end (an exception inside the model)", though nothing raised."""
    model = build("llama3", "qk_sniff")
    ids = torch.randint(2, 90, (1, 6), generator=torch.Generator().manual_seed(5))
    first_inside, bg_stepped, may_step = threading.Event(), threading.Event(), threading.Event()

    class WaitBetweenSteps(tf.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            may_step.wait(30)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def gate(*_):
        if threading.current_thread().name == "bg":
            if may_step.is_set():
                bg_stepped.set()
        elif not first_inside.is_set():
            first_inside.set()
            may_step.set()
            bg_stepped.wait(30)  # bg's next step starts its stack while this first forward runs

    hook = model.model.layers[0].register_forward_pre_hook(gate)
    thread = threading.Thread(
        target=lambda: model.generate(
            input_ids=ids, max_new_tokens=3, do_sample=False, stopping_criteria=[WaitBetweenSteps()], pad_token_id=0
        ),
        name="bg",
    )
    thread.start()
    time.sleep(0.5)  # bg is past its prefill, waiting between steps, when the session opens
    with qk_attn.session(sampler="all", layers="0", heads="0", capture="q") as s:
        s.begin([10])
        model(input_ids=ids)
        thread.join(30)
        s.begin([11])
        model(input_ids=ids)
    hook.remove()
    assert sorted(set(s.table()["example_id"].to_pylist())) == [10, 11]
