"""Progress bars of the commands that read a finished capture folder (verify, inspect, repair, push).

    bar(desc, unit, enabled, total)        one tqdm bar over one pass's natural unit (a shard, a
                                           (layer, head, kind) folder), on stderr, as `qk-sniff
                                           run`'s bar (qk_attn.run.runner): shown whenever enabled,
                                           a terminal or not; `enabled=False` (--quiet): nothing
    hub_bars(enabled)                      huggingface_hub's own transfer bars, off for the block
                                           when not enabled (restored after)

A pass's bar names the pass and its unit; what the command reports is printed by its caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def bar(desc: str, unit: str, enabled: bool, total: int | None = None, iterable=None):
    """A bar named `desc` counting `unit`s (tqdm writes the rate as `unit/s`), or a silent one;
    given `iterable`, it yields its items and closes when they run out."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True)


def hub_enabled(progress: bool) -> bool:
    """Whether a Hub transfer shows bars: asked for, and not switched off for huggingface_hub
    (`huggingface_hub.utils.disable_progress_bars()`, which `transformers`' and `qk-sniff run
    --quiet` use, or HF_HUB_DISABLE_PROGRESS_BARS=1)."""
    from huggingface_hub.utils import are_progress_bars_disabled

    return progress and not are_progress_bars_disabled()


@contextmanager
def hub_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's bars off inside the block unless `enabled`; as they were afterwards."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
