"""Session behaviour: filters, head plan, example ids, overflow, registration."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers as tf
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface

import qk_attn
from qk_attn.capture.batch import CaptureBatch
from qk_attn.capture.gather import SelectionSpec, gather_rows
from qk_attn.errors import CaptureOverflow
from qk_attn.sampler import Sampler
from support.models import VOCAB, build, padded_batch

torch.set_grad_enabled(False)


def _capture(model, batch=None, **settings):
    with qk_attn.session(**settings) as s:
        model(**(batch or padded_batch("left")))
    return s, s.table()


def _groups(table):
    data = table.to_pydict()
    return sorted({(l, k, h) for l, k, h in zip(data["layer"], data["kind"], data["head"])})


def test_registration_is_idempotent_and_pairs_attention_with_mask():
    qk_attn.register()
    qk_attn.register()
    assert AttentionInterface._global_mapping["qk_sniff"] is qk_attn.capture.attention.qk_sniff_attention
    assert AttentionMaskInterface._global_mapping["qk_sniff"] is qk_attn.capture.hooks.qk_sniff_mask


def test_from_pretrained_with_qk_sniff(tmp_path):
    build("qwen3").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="qk_sniff").eval()
    assert model.config._attn_implementation == "qk_sniff"
    _, table = _capture(model, sampler="all", layers="1")
    assert {g[0] for g in _groups(table)} == {1}


def test_layer_head_and_kind_filters_with_gqa_mapping():
    model = build("llama3", "qk_sniff")  # 4 query heads, 2 KV heads, 3 layers
    _, table = _capture(model, sampler="all", layers="0,2", heads="1,2")
    assert _groups(table) == [
        (0, "k", 0),
        (0, "k", 1),
        (0, "q", 1),
        (0, "q", 2),
        (2, "k", 0),
        (2, "k", 1),
        (2, "q", 1),
        (2, "q", 2),
    ]
    _, table = _capture(model, sampler="all", heads="3", key_heads="0", capture="k")
    assert _groups(table) == [(layer, "k", 0) for layer in range(3)]
    _, table = _capture(model, sampler="all", heads="0", capture="q")
    assert _groups(table) == [(layer, "q", 0) for layer in range(3)]


def test_head_sampling_is_seeded_and_reads_its_kv_heads():
    model = build("llama3", "qk_sniff")
    s, table = _capture(model, sampler="all", head_sample_count=5, head_sample_seed=4)
    groups = _groups(table)
    queries = [(l, h) for l, k, h in groups if k == "q"]
    keys = [(l, h) for l, k, h in groups if k == "k"]
    assert len(queries) == 5
    assert keys == sorted({(l, h // 2) for l, h in queries})
    assert s.plan.notes and "seed 4" in s.plan.notes[0]
    assert _groups(_capture(model, sampler="all", head_sample_count=5, head_sample_seed=4)[1]) == groups
    assert _groups(_capture(model, sampler="all", head_sample_count=5, head_sample_seed=5)[1]) != groups


def test_full_attention_only_and_sliding_window_column():
    model = build("gemma3", "qk_sniff")  # layers: sliding, full, sliding (window 4)
    _, table = _capture(model, sampler="all")
    windows = dict(zip(table["layer"].to_pylist(), table["sliding_window"].to_pylist()))
    assert windows == {0: 4, 1: None, 2: 4}
    s, table = _capture(model, sampler="all", full_attention_only=True)
    assert {g[0] for g in _groups(table)} == {1}
    assert s.plan.excluded_layers == {
        0: "sliding-window layer (full_attention_only)",
        2: "sliding-window layer (full_attention_only)",
    }


def test_full_attention_only_skips_chunked_attention_layers():
    """Llama 4's chunked-attention layers attend within chunks of attention_chunk_size tokens: not full."""
    torch.manual_seed(0)
    config = tf.Llama4TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        intermediate_size_mlp=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_chunk_size=4,
        num_local_experts=2,
        max_position_embeddings=256,
        pad_token_id=0,
        attn_implementation="qk_sniff",
    )
    model = tf.Llama4ForCausalLM(config).eval()
    assert config.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    s, table = _capture(model, sampler="all", full_attention_only=True)
    assert {g[0] for g in _groups(table)} == {3}
    assert s.plan.excluded_layers == {layer: "chunked-attention layer (full_attention_only)" for layer in range(3)}


def test_example_ids_counter_explicit_ids_and_decode_keeps_ids():
    model = build("qwen2", "qk_sniff")
    batch = padded_batch("left")
    with qk_attn.session(sampler="all", layers="0", capture="k") as s:
        model(**batch)  # auto ids 0, 1
        s.begin([100, 7])
        model(**batch)
        model(**batch)  # auto again, after the largest id used
        assert list(s._begun) == [0, 1, 100, 7, 101, 102]
    assert set(s.table()["example_id"].to_pylist()) == {0, 1, 7, 100, 101, 102}

    with qk_attn.session(sampler="all", layers="0", capture="k", example_ids=[5, 6]) as s:
        model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
        )
    assert set(s.table()["example_id"].to_pylist()) == {5, 6}

    with pytest.raises(ValueError, match="example_ids has 3 ids but the forward has batch size 2"):
        with qk_attn.session(sampler="all", example_ids=[1, 2, 3]):
            model(**batch)


def test_sparse_sampler_rows_are_the_sampler_selection():
    model = build("llama3", "qk_sniff")
    batch = padded_batch("right", lengths=(200, 120))
    sampler = Sampler("log_uniform", 4, 1.0, 11)
    _, table = _capture(model, batch, sampler="log_uniform", min_bucket_size=4, base_rate=1.0, seed=11)
    data = table.to_pydict()
    for example, length in ((0, 200), (1, 120)):
        for layer in range(3):
            for kind, head in (("q", 3), ("k", 1)):
                got = sorted(
                    p
                    for e, l, k, h, p in zip(
                        data["example_id"], data["layer"], data["kind"], data["head"], data["position"]
                    )
                    if (e, l, k, h) == (example, layer, kind, head)
                )
                assert got == sampler.selected_positions(example, layer, kind, length).tolist()
                assert got  # log-uniform keeps about one per bucket


def test_overflow_is_flagged_not_dropped():
    states = torch.randn(1, 2, 50, 8)
    positions = torch.arange(50)[None]
    count, row, position, bucket, vectors = gather_rows(
        SelectionSpec(
            states,
            0,
            torch.tensor([0, 1]),
            positions,
            torch.ones(1, 50, dtype=torch.bool),
            torch.tensor([3]),
            Sampler("all", 8, 1.0),
            0,
            "q",
            10,
            torch.float32,
        )
    )
    assert int(count) == 50 and row.shape == (10,)
    batch = CaptureBatch(0, "q", (0, 1), (3,), None, False, count, row, position, bucket, vectors, torch.tensor([50]))
    with pytest.raises(CaptureOverflow, match="50 tokens selected but the staging buffer holds 10"):
        batch.host_rows()


def test_a_sink_with_only_the_protocol_methods_works():
    """`Sink` asks for put/commit/close only; the session must not need more of a custom sink."""

    class Collect:
        def __init__(self):
            self.batches, self.committed_lists = [], []

        def put(self, batch):
            self.batches.append(batch.host_rows())

        def commit(self, example_ids):
            self.committed_lists.append(list(example_ids))

        def close(self):
            pass

    sink = Collect()
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sink=sink, sampler="all", layers="0", capture="k"):
        model(**padded_batch("left"))
    assert sink.committed_lists == [[0, 1]]
    assert [len(rows) for rows in sink.batches] == [9 + 6]  # one batch: every token of both rows
    assert sink.batches[0].heads == (0, 1)


def test_a_session_opened_in_one_thread_can_end_in_another():
    """A session entered in one thread and exited in another (a fixture or an ExitStack handed to a
    worker) ends there: it commits, and the opening thread no longer records into it."""
    import threading

    model = build("llama3", "qk_sniff")
    block = qk_attn.session(sampler="all", layers="0", heads="0", capture="q")
    s = block.__enter__()
    model(input_ids=torch.arange(2, 10)[None])
    errors = []

    def end():
        try:
            block.__exit__(None, None, None)
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=end)
    worker.start()
    worker.join()
    assert errors == []
    assert s.committed_ids() == {0}
    model(input_ids=torch.arange(2, 10)[None])  # no session is open: not recorded
    assert s.table()["example_id"].to_pylist() == [0] * 8


def test_a_parquet_session_refuses_table_and_a_closed_session_refuses_begin(tmp_path):
    """table() of a session that writes a folder is an error, not None (which reads as "no rows");
    begin() after close names no forward and is refused; flush() after close has nothing left to do."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(output=tmp_path / "out", sampler="all", layers="0", heads="0", capture="q") as s:
        model(input_ids=torch.arange(2, 10)[None])
        with pytest.raises(ValueError, match="table\\(\\) reads the rows of an in-memory session"):
            s.table()
    with pytest.raises(RuntimeError, match="begin\\(\\[5\\]\\) on a closed session"):
        s.begin([5])
    s.flush()
    assert qk_attn.load(tmp_path / "out", layer=0, head=0, kind="q")["example_id"].to_pylist() == [0] * 8


def test_a_model_running_a_forward_in_another_thread_refuses_a_second_one():
    """One model, one session, two threads: while thread A is inside a forward (held in layer 1),
    thread B's forward of the same model is refused before it records anything; A's rows are exactly
    those of A alone, and B's document, run after, is recorded as usual."""
    import threading

    from qk_attn.errors import CaptureError
    from support.oracle import rows_by_key

    model = build("llama3", "qk_sniff")
    ids = {
        name: torch.randint(2, VOCAB - 2, (1, 7), generator=torch.Generator().manual_seed(seed))
        for seed, name in enumerate("AB")
    }
    inside, b_done, refused = threading.Event(), threading.Event(), []

    def hold(module, args):
        if threading.current_thread().name == "A" and not b_done.is_set():
            inside.set()
            b_done.wait(10)

    def run_b():
        inside.wait(10)
        try:
            model(input_ids=ids["B"])
        except CaptureError as error:
            refused.append(str(error))
        finally:
            b_done.set()

    handle = model.model.layers[1].register_forward_pre_hook(hold)
    with torch.inference_mode(), qk_attn.session(sampler="all") as s:
        threads = [threading.Thread(target=lambda: model(input_ids=ids["A"]), name="A"), threading.Thread(target=run_b)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        handle.remove()
        s.begin([1])
        model(input_ids=ids["B"])
        got = rows_by_key(s.table())
    assert len(refused) == 1 and "in the middle of a forward in thread 'A'" in refused[0]
    want = {}
    for example, name in enumerate("AB"):
        with torch.inference_mode(), qk_attn.session(sampler="all", example_ids=[example]) as alone:
            model(input_ids=ids[name])
            want.update(rows_by_key(alone.table()))
    assert got.keys() == want.keys()
    for key, vector in want.items():
        assert torch.equal(torch.from_numpy(got[key]), torch.from_numpy(vector)), key


@pytest.fixture
def default_env(monkeypatch):
    """`default_env(output=..., sampler=...)` sets those QK_SNIFF_* variables and reloads them; after the
    test the environment is as it was and the default session it opened is closed."""

    def use(**variables):
        for name, value in variables.items():
            monkeypatch.setenv("QK_SNIFF_" + name.upper(), str(value))
        return qk_attn.reload_env()

    yield use
    monkeypatch.undo()
    qk_attn.reload_env()


def test_reload_env_with_a_bad_value_leaves_the_running_default_session(tmp_path, default_env):
    """A failed reload used to close the default session first: the next forward then opened a new
    one on the old folder, under the old settings, as if nothing had been asked."""
    from qk_attn.capture import active

    a, b = tmp_path / "a", tmp_path / "b"
    model = build("llama3", "qk_sniff")
    ids = torch.arange(2, 10)[None]
    default_env(output=a, sampler="all")
    model(input_ids=ids)
    running = active.default_session()
    with pytest.raises(qk_attn.ConfigError, match=r"^QK_SNIFF_SAMPLER='bogus' is invalid"):
        default_env(output=b, sampler="bogus")
    assert active.default_session() is running and (a / ".qk_sniff.lock").exists()
    model(input_ids=ids)  # still into the running session
    qk_attn.flush()
    assert sorted(qk_attn.load_examples(a)["example_id"].to_pylist()) == [0, 1]
    assert default_env(sampler="all").output == str(b)  # valid: the running session closes, b takes over
    assert not (a / ".qk_sniff.lock").exists()
    model(input_ids=ids)
    qk_attn.flush()
    assert qk_attn.load_examples(b)["example_id"].to_pylist() == [0]


def test_a_session_on_the_default_sessions_folder_is_told_this_process_holds_it(tmp_path, default_env):
    """session() without output= while the default session of QK_SNIFF_OUTPUT writes there was refused as if
    "another qk-sniff capture" held the folder: it is this process's own default session, and the message
    says so and how to go on (reload_env() closes the default session, which flush() does not)."""
    from qk_attn.errors import OutputLocked

    out = tmp_path / "out"
    model = build("llama3", "qk_sniff")
    ids = torch.arange(2, 10)[None]
    default_env(output=out, sampler="all")
    model(input_ids=ids)  # the default session takes the folder's lock
    qk_attn.flush()
    with pytest.raises(OutputLocked) as error:
        with qk_attn.session():
            pass
    message = str(error.value)
    assert message.startswith(
        f"this process (pid {os.getpid()}) is already writing to {out}: its capture of "
        f"QK_SNIFF_OUTPUT={str(out)!r} (the default session that the variable configures"
    ), message
    assert "another qk-sniff capture" not in message and "output=None records in memory" in message
    assert "qk_attn.reload_env() closes the default session (qk_attn.flush() only commits" in message
    with qk_attn.session(output=None) as s:  # in memory, as the message says
        model(input_ids=ids)
    assert s.table().num_rows
    qk_attn.reload_env()  # closes the default session: its folder is free for a session()
    with qk_attn.session(example_ids=[1]):
        model(input_ids=ids)
    assert sorted(qk_attn.load_examples(out)["example_id"].to_pylist()) == [0, 1]


# ---- session()'s own arguments: checked before anything is done, in memory too ------------------
def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_takes_a_bool_only_and_a_refused_value_leaves_the_capture(tmp_path):
    """`overwrite="no"` (any truthy non-bool) was read as True and deleted the capture it meant to keep."""
    out = tmp_path / "out"
    model = build("llama3", "qk_sniff")
    ids = torch.arange(2, 10)[None]
    settings = dict(sampler="all", layers="0", heads="0", capture="q")
    with qk_attn.session(output=out, **settings):
        model(input_ids=ids)
    before = _files(out)
    for value in ("no", "false", "yes", 0, 1, 2, None):
        for output in (out, None):  # an in-memory session is refused the same way
            with pytest.raises(qk_attn.ConfigError) as error:
                with qk_attn.session(output=output, overwrite=value, **settings):
                    model(input_ids=ids)
            assert str(error.value) == f"overwrite={value!r} is invalid: expected True or False"
        assert _files(out) == before
    with qk_attn.session(output=out, overwrite=False, **settings):
        model(input_ids=ids)
    assert sorted(qk_attn.load_examples(out)["example_id"].to_pylist()) == [0, 1]  # resumed
    with qk_attn.session(output=out, overwrite=True, **settings):
        model(input_ids=ids)
    assert qk_attn.load_examples(out)["example_id"].to_pylist() == [0]  # started over


class _NoClose:
    def put(self, batch):
        pass

    def commit(self, example_ids):
        pass


@pytest.mark.parametrize(
    "argument, value, says",
    [
        ("source", "str", "expected a dict of str keys to JSON values"),
        ("source", 5, "expected a dict of str keys to JSON values"),
        ("source", [("tokenizer", "x")], "expected a dict of str keys to JSON values"),
        ("source", {"tokenizer": b"x"}, "source['tokenizer'] is b'x'; expected"),
        ("source", {"rate": float("nan")}, "source['rate'] is nan; expected"),
        ("source", {1: "x"}, "source has the key 1, not a str; expected"),
        ("vocabulary", 5, "expected a list of token strings indexed by token id"),
        ("vocabulary", "abc", "a str would be one token per character"),
        ("vocabulary", {"a": 1}, "a dict (token -> id, as get_vocab() gives) is not by id"),
        ("vocabulary", ["a", 5], "item 1 is 5; expected a list of token strings"),
        ("vocabulary", ["a", "\ud800"], "item 1 is '\\ud800', not UTF-8 text (a lone surrogate)"),
        ("vocabulary", [], "expected a list of token strings"),
        ("sink", 5, "expected None, a qk_attn.capture.sinks.Sink, or an object with put(batch), commit(example_ids)"),
        ("sink", "x", "(it has no put, commit, close)"),
        ("sink", _NoClose(), "(it has no close)"),
    ],
)
def test_source_vocabulary_and_sink_are_checked_before_anything_is_done(tmp_path, argument, value, says):
    """They gave AttributeErrors or pyarrow's TypeError (at the folder's opening, or at the first
    commit and again at close), or were taken as they were ("abc" as three token strings); an
    in-memory session never looked at source or vocabulary."""
    for output in (None, tmp_path / "out"):
        with pytest.raises(qk_attn.ConfigError) as error:
            with qk_attn.session(output=output, sampler="all", **{argument: value}):
                pass
        message = str(error.value)
        assert message.startswith(f"{argument}=") and says in message and "\n" not in message
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, error",
    [
        ({"samplr": "all"}, TypeError),
        ({"layers": []}, qk_attn.ConfigError),
        ({"base_rate": -1}, qk_attn.ConfigError),
        ({"overwrite": "yes"}, qk_attn.ConfigError),
        ({"sink": 5}, qk_attn.ConfigError),
    ],
)
def test_session_checks_its_arguments_when_called_not_only_when_entered(tmp_path, arguments, error):
    """`session(samplr=...)` returned a block that raised only at `with` (or never, if not entered), where
    its docstring says every argument is checked before anything is done."""
    with pytest.raises(error):
        qk_attn.session(**arguments)
    with pytest.raises(TypeError, match=r"^qk_attn.session\(\) takes keyword arguments only"):
        qk_attn.session(str(tmp_path))
    # What depends on the process when it opens is checked then: a decorator's flash backend may be wrapped later.
    qk_attn.session(backend="flash_attention_2", head_sample_seed=3)


def test_a_source_is_recorded_as_json_reads_it_back_so_a_resumed_run_matches(tmp_path):
    """A tuple in `source` came back from the manifest as a list: the same run was then refused for
    "different settings" (source.layers: [0, 1] there, (0, 1) now)."""
    out = tmp_path / "out"
    model = build("llama3", "qk_sniff")
    source = {"dataset": "toy", "layers": (0, 1)}
    vocabulary = np.array([f"t{i}" for i in range(VOCAB)])  # a numpy array of strings is a list of them
    for _ in range(2):
        with qk_attn.session(output=out, sampler="all", layers="0", source=source, vocabulary=vocabulary):
            model(input_ids=torch.arange(2, 10)[None])
    assert sorted(qk_attn.load_examples(out)["example_id"].to_pylist()) == [0, 1]
    assert qk_attn.load(out, layer=0, head=0, kind="q")["token_str"].to_pylist()[:3] == ["t2", "t3", "t4"]


@pytest.mark.parametrize("where", ["/proc/no-such-folder", "file/sub"])
def test_an_output_that_cannot_be_written_is_one_line_naming_the_setting(tmp_path, where):
    """A raw FileNotFoundError / NotADirectoryError named no setting."""
    from qk_attn.errors import StorageError

    (tmp_path / "file").write_text("mine")
    output = where if where.startswith("/") else str(tmp_path / where)
    with pytest.raises(StorageError, match=rf"^output='{output}': cannot write a capture there \("):
        with qk_attn.session(output=output):
            pass
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize(
    "arguments, why",
    [
        (
            {"vocabulary": ["a", "b"]},
            r"^vocabulary= only applies to a session that writes a folder \(output=\.\.\.\); ",
        ),
        ({"overwrite": True, "source": {"a": 1}}, r"^overwrite=, source= only apply to a session that writes a folder"),
        ({"sink": "memory", "vocabulary": ["a"]}, r"^vocabulary= only applies .* this one has a sink of its own"),
        (
            {"sink": "memory", "output": "OUT"},
            r"^sink= and output='.*' are both given: a session's rows go to one place",
        ),
        ({"source": {"tokenizer": 5}}, r"^source\['tokenizer'\]=5 is invalid: expected a non-empty str"),
        ({"output": "a\0b"}, r"^output='a\\x00b' is invalid: expected a folder path without NUL characters"),
    ],
    ids=[
        "vocabulary-in-memory",
        "folder-arguments-in-memory",
        "folder-argument-with-sink",
        "sink-and-output",
        "tokenizer-not-a-str",
        "nul-in-output",
    ],
)
def test_arguments_that_would_do_nothing_are_refused_naming_them(tmp_path, arguments, why):
    """In memory, or with a sink, `vocabulary`, `overwrite` and `source` were accepted and did nothing, and
    `output=` next to `sink=` wrote no folder; a tokenizer recorded as an int failed only at load()."""
    from qk_attn.capture.sinks import MemorySink

    arguments = dict(arguments)
    if arguments.get("sink") == "memory":
        arguments["sink"] = MemorySink()
    if arguments.get("output") == "OUT":
        arguments["output"] = str(tmp_path / "out")
    with pytest.raises(qk_attn.ConfigError, match=why):
        with qk_attn.session(**arguments):
            pass
    assert not (tmp_path / "out").exists()


def test_a_session_block_entered_twice_says_a_session_is_used_once(tmp_path):
    block = qk_attn.session(output=str(tmp_path / "out"))
    with block:
        with pytest.raises(RuntimeError, match=r"entered already; a session is used once"):
            block.__enter__()
    with pytest.raises(RuntimeError, match=r"entered already"):
        with block:
            pass


def test_a_session_decorates_a_function_with_a_new_session_per_call():
    """contextlib's context managers are decorators: session() stays one (each call opens its own)."""
    from qk_attn.capture import active

    @qk_attn.session(sampler="all")
    def inside():
        return active.current_session()

    first, second = inside(), inside()
    assert first is not second and first.closed and second.closed


def test_a_relative_output_stays_where_the_session_opened_it_after_a_chdir(tmp_path, monkeypatch):
    """The saver thread writes after the capturing thread moved on: a relative output was resolved against the
    working directory then, so a chdir inside the session (a notebook cell) lost every example, blamed on a
    folder "removed or replaced"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    model = build("llama3", "qk_sniff")
    with qk_attn.session(output="out", sampler="all") as s:
        model(**padded_batch("left"))
        s.commit()
        os.chdir(tmp_path / "elsewhere")
        model(**padded_batch("left"))
        s.commit()
    assert sorted(qk_attn.load_examples(tmp_path / "out").column("example_id").to_pylist()) == [0, 1, 2, 3]
    assert not (tmp_path / "elsewhere" / "out").exists()
