"""A capture's process ends or forks: a forked child never touches its parent's capture, and the interpreter
exit of `QK_SNIFF_*` mode commits what ended while a daemon thread is still inside a forward.

Each case runs as a real script in its own interpreter (a fork, the exit handlers), and the folder is read
back with qk_attn.load_examples, qk_attn.load and verify_dataset.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qk_attn
from qk_attn.dataset.verify import verify_dataset

TESTS = Path(__file__).resolve().parent
LOCK = ".qk_sniff.lock"

PRELUDE = textwrap.dedent("""
    import os, subprocess, sys, threading, time
    import torch
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    import qk_attn
    from qk_attn.errors import CaptureError
    from support.models import build

    def tokens(n, seed):
        return torch.randint(2, 90, (1, n), generator=torch.Generator().manual_seed(seed))

    # A third process that tries to take the writer's lock of OUT while the parent still writes it.
    THIRD = "import sys; from pathlib import Path; from qk_attn.storage.lock import take_lock; take_lock(Path(sys.argv[1])); print('third: took the lock')"

    def third_process(out):
        done = subprocess.run([sys.executable, "-c", THIRD, out], capture_output=True, text=True)
        return "took the lock" if done.returncode == 0 else done.stderr.strip().splitlines()[-1].split(":")[0]
""")

# os.fork() inside `with session(output=...)`: the child tries a forward (refused), closes its copy of the
# session, opens a session of its own in another folder, then leaves the parent's with-block and exits.
FORK_IN_SESSION = PRELUDE + textwrap.dedent("""
    out, own = sys.argv[1], sys.argv[2]
    model = build("llama3", "qk_sniff")
    with qk_attn.session(output=out, sampler="all") as s:
        s.begin([0]); model(input_ids=tokens(7, 0)); s.commit(); s.flush()
        pid = os.fork()
        if pid == 0:
            try:
                try:
                    model(input_ids=tokens(5, 1))
                    print("child: recorded into the parent's session")
                except CaptureError as error:
                    print("child refused:", error)
                s.close()  # closing the copy explicitly: nothing is flushed, written or unlocked
                with qk_attn.session(output=own, sampler="all") as c:
                    c.begin([5]); model(input_ids=tokens(4, 5))
            except BaseException as error:
                print("child failed:", type(error).__name__, error)
        else:
            _, status = os.waitpid(pid, 0)
            print("parent: child exit status", os.waitstatus_to_exitcode(status))
            print("parent: lock file after child:", os.path.exists(os.path.join(out, ".qk_sniff.lock")))
            print("parent: third process:", third_process(out))
            s.begin([1]); model(input_ids=tokens(6, 2)); s.commit()
    if pid == 0:
        sys.stdout.flush()
        os._exit(0)
    print("parent: done")
""")


def _run(script: str, *args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _examples(out) -> list[int]:
    return sorted(qk_attn.load_examples(out).column("example_id").to_pylist())


def _positions(out, layer=0, head=0, kind="q") -> dict[int, list[int]]:
    """Positions of each example's rows in one (layer, head, kind) folder."""
    table = qk_attn.load(out, layer=layer, head=head, kind=kind)
    by_example: dict[int, list[int]] = {}
    for example, position in zip(table["example_id"].to_pylist(), table["position"].to_pylist(), strict=True):
        by_example.setdefault(example, []).append(position)
    return {example: sorted(positions) for example, positions in by_example.items()}


def test_a_child_forked_inside_a_session_leaves_the_parents_lock_and_files_alone(tmp_path):
    """The child's copy of the session is inert: leaving the with-block there releases no lock, writes no
    manifest or card, and a forward that would record into it is refused in one line. The parent keeps
    its lock (a third process is refused) and commits on; the child's own session records."""
    out, own = tmp_path / "out", tmp_path / "child_out"
    result = _run(FORK_IN_SESSION, out, own)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    refused = [line for line in lines if line.startswith("child refused:")]
    assert len(refused) == 1 and "was forked from the one that opened" in refused[0], result.stdout
    assert not any(line.startswith(("child failed", "child: recorded")) for line in lines), result.stdout
    assert "parent: child exit status 0" in lines
    assert "parent: lock file after child: True" in lines, result.stdout + result.stderr
    assert "parent: third process: qk_attn.errors.OutputLocked" in lines, result.stdout
    assert "parent: done" in lines
    assert "SaverError" not in result.stderr, result.stderr
    # told once: the forward's end hook raised the refusal again, which torch printed as a silenced warning
    assert "always_call" not in result.stderr and "was forked" not in result.stderr, result.stderr
    assert _examples(out) == [0, 1]
    assert _positions(out) == {0: list(range(7)), 1: list(range(6))}
    assert verify_dataset(out, log=lambda *_: None) == []
    assert not (out / LOCK).exists()  # the parent's close released it
    assert _examples(own) == [5] and _positions(own) == {5: list(range(4))}
    assert verify_dataset(own, log=lambda *_: None) == []


# QK_SNIFF_OUTPUT mode: a child forked after the default session was made exits normally (sys.exit runs
# the exit handlers, which close the default session in the process that made it); fork-started Pool and
# DataLoader workers (which leave by os._exit) go on working.
FORK_IN_ENV_MODE = PRELUDE + textwrap.dedent("""
    out = os.environ["QK_SNIFF_OUTPUT"]
    model = build("llama3", "qk_sniff")
    model(input_ids=tokens(7, 0)); qk_attn.flush()
    pid = os.fork()
    if pid == 0:
        try:
            model(input_ids=tokens(5, 1))
            print("child: recorded into the parent's default session")
        except CaptureError as error:
            print("child refused:", error)
        qk_attn.flush()  # the parent's default session is not this process's to commit
        sys.stdout.flush()
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    print("parent: child exit status", os.waitstatus_to_exitcode(status))
    import multiprocessing
    from torch.utils.data import DataLoader
    with multiprocessing.get_context("fork").Pool(2) as pool:
        print("parent: pool", pool.map(abs, [-1, -2]))
    print("parent: loader", len(list(DataLoader(list(range(8)), num_workers=2, multiprocessing_context="fork"))))
    print("parent: lock file after children:", os.path.exists(os.path.join(out, ".qk_sniff.lock")))
    print("parent: third process:", third_process(out))
    model(input_ids=tokens(6, 2))  # example 1: committed at the parent's exit
    print("parent: done")
""")


def test_a_child_forked_in_env_mode_exits_without_closing_the_parents_default_session(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, QK_SNIFF_OUTPUT=str(out), QK_SNIFF_SAMPLER="all")
    result = _run(FORK_IN_ENV_MODE, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    refused = [line for line in lines if line.startswith("child refused:")]
    assert len(refused) == 1 and f"default session of QK_SNIFF_OUTPUT={out}" in refused[0], result.stdout
    assert "parent: child exit status 0" in lines
    assert "parent: pool [1, 2]" in lines and "parent: loader 8" in lines
    assert "parent: lock file after children: True" in lines, result.stdout + result.stderr
    assert "parent: third process: qk_attn.errors.OutputLocked" in lines, result.stdout
    assert "Exception ignored" not in result.stderr and "SaverError" not in result.stderr, result.stderr
    assert _examples(out) == [0, 1]
    assert _positions(out) == {0: list(range(7)), 1: list(range(6))}
    assert verify_dataset(out, log=lambda *_: None) == []
    assert not (out / LOCK).exists()


# QK_SNIFF_OUTPUT mode: three forwards end in the main thread, then a daemon thread is inside a forward
# (held in layer 1) when the main thread returns and the interpreter exits.
DAEMON_AT_EXIT = PRELUDE + textwrap.dedent("""
    model = build("llama3", "qk_sniff")
    for i in range(3):
        model(input_ids=tokens(5 + i, 30 + i))
    inside = threading.Event()

    def hold(_module, _args):
        if threading.current_thread().name == "bg":
            inside.set()
            time.sleep(120)

    model.model.layers[1].register_forward_pre_hook(hold)
    threading.Thread(target=lambda: model(input_ids=tokens(9, 9)), name="bg", daemon=True).start()
    assert inside.wait(60)
    print("main thread returns")
""")


def test_the_exit_handler_commits_the_ended_forwards_while_a_daemon_thread_is_inside_one(tmp_path):
    """The three examples whose forwards ended are committed; the daemon's forward (example 3, which had
    recorded layer 0) is discarded with one warning, not committed."""
    out = tmp_path / "out"
    env = dict(os.environ, QK_SNIFF_OUTPUT=str(out), QK_SNIFF_SAMPLER="all")
    result = _run(DAEMON_AT_EXIT, env=env)
    assert result.returncode == 0, result.stderr
    assert "main thread returns" in result.stdout
    assert "Exception ignored" not in result.stderr and "never committed" not in result.stderr, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "when the interpreter exited" in line]
    assert len(warnings) == 1, result.stderr
    assert "example(s) [3] was still running in thread 'bg'" in warnings[0]
    assert _examples(out) == [0, 1, 2]
    for layer in (0, 1, 2):
        assert _positions(out, layer=layer, kind="k") == {i: list(range(5 + i)) for i in range(3)}
    assert verify_dataset(out, log=lambda *_: None) == []
    assert not (out / LOCK).exists()


# A daemon thread between two forwards of its sequence (chunked prefill over a live cache) at exit.
DAEMON_BETWEEN_FORWARDS = PRELUDE + textwrap.dedent("""
    from transformers import DynamicCache
    from support.models import cache_kw

    model = build("llama3", "qk_sniff")
    model(input_ids=tokens(7, 0))
    between = threading.Event()

    def chunks():
        cache, ids = DynamicCache(config=model.config), tokens(12, 1)
        model(input_ids=ids[:, :6], **cache_kw(cache))
        between.set()
        time.sleep(120)
        model(input_ids=ids[:, 6:], **cache_kw(cache))

    threading.Thread(target=chunks, name="bg", daemon=True).start()
    assert between.wait(60)
    print("main thread returns")
""")


def test_the_exit_handler_discards_a_sequence_a_live_thread_was_still_extending(tmp_path):
    """Example 1 had 6 of its 12 tokens when the interpreter exited: it was committed with valid length 6,
    and a resume skipped it for good. Now it is discarded (one warning); example 0 is committed."""
    out = tmp_path / "out"
    env = dict(os.environ, QK_SNIFF_OUTPUT=str(out), QK_SNIFF_SAMPLER="all")
    result = _run(DAEMON_BETWEEN_FORWARDS, env=env)
    assert result.returncode == 0 and "main thread returns" in result.stdout, result.stderr
    assert "example(s) [1] could still be continued" in result.stderr, result.stderr
    assert _examples(out) == [0]
    assert verify_dataset(out, log=lambda *_: None) == []


# A session entered by hand (as in a notebook), its context manager dropped, never exited.
ENTERED_BY_HAND = PRELUDE + textwrap.dedent("""
    model = build("llama3", "qk_sniff")
    s = qk_attn.session(output=sys.argv[1], sampler="all").__enter__()
    print("closed after enter:", s.closed)
    s.begin([1, 2])
    model(input_ids=torch.cat([tokens(6, 0), tokens(6, 1)]))
    s.commit()
    s.begin([3])
    model(input_ids=tokens(4, 2))  # complete, not committed by hand: committed at exit, as a block's end does
    if sys.argv[2] == "closed":
        s.close()
    print("main thread returns")
""")


@pytest.mark.parametrize("closed", ["open", "closed"])
def test_a_session_entered_by_hand_stays_open_and_commits_at_interpreter_exit(tmp_path, closed):
    """Its dropped context manager closed it at once (the garbage collector finalised its generator), so
    forwards recorded nothing, silently; kept, the generator's cleanup failed at interpreter teardown with a
    TypeError, leaving a folder of no committed example, a stale lock and no card (and closed by hand, the
    same TypeError at exit). It now stays open and closes at exit as the default session does."""
    out = tmp_path / "out"
    result = _run(ENTERED_BY_HAND, out, closed)
    assert result.returncode == 0, result.stderr
    assert "closed after enter: False" in result.stdout and "main thread returns" in result.stdout
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert _examples(out) == [1, 2, 3]
    assert _positions(out, kind="k") == {1: list(range(6)), 2: list(range(6)), 3: list(range(4))}
    assert verify_dataset(out, log=lambda *_: None) == []
    assert (out / "README.md").exists() and not (out / LOCK).exists()
