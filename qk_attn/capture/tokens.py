"""A forward's new tokens as every attention call records them: positions, validity and the per-row
columns (TextTokens), the check that an example's positions count up by one (`misnumbered_rows`),
and a GPU decode step's tokens copied to the host without a wait (`HostMirror`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from qk_attn.errors import CaptureError

POSITION_LIMIT = 2**31  # positions are stored as int32
_INT64_MAX = np.iinfo(np.int64).max


class TextTokens(NamedTuple):
    """The new tokens of one forward, as every attention call of it records them."""

    positions: torch.Tensor  # (B, T) int64, what RoPE used
    valid: torch.Tensor  # (B, T) bool, False for padding
    valid_count: torch.Tensor  # (B,) int64
    first_position: torch.Tensor  # (B,) int64, smallest real position (int64 max for an all-pad row)
    misnumbered: torch.Tensor  # (B,) bool, the row's positions do not count up by one (`misnumbered_rows`)
    token_ids: torch.Tensor | None  # (B, 1, T, 1) float32, None when the model got embeddings

    def suffix(self, length: int) -> TextTokens:
        """The last `length` tokens; `valid_count`, `first_position` and `misnumbered` stay the forward's."""
        token_ids = None if self.token_ids is None else self.token_ids[:, :, -length:]
        return self._replace(positions=self.positions[:, -length:], valid=self.valid[:, -length:], token_ids=token_ids)

    def unseen(self, length: int) -> list[tuple[int, int] | None]:
        """Per row, the [start, stop) positions of the real tokens before the last `length`: the queries
        a layer given only that suffix did not get (None where there are none). A host read: such layers
        (Gemma 4's KV-shared ones) get a suffix only in a prefill. A row whose positions do not count up
        by one is refused by its `misnumbered` flag, so a range is exact."""
        skipped = self.positions.shape[1] - length
        ranges = []
        for numbers, real in zip(self.positions[:, :skipped].tolist(), self.valid[:, :skipped].tolist()):
            kept = [number for number, is_real in zip(numbers, real) if is_real]
            ranges.append((min(kept), max(kept) + 1) if kept else None)
        return ranges


def host_rows(positions: list, valid: list, expected: list | None) -> tuple[list, list, list]:
    """(valid counts, first positions, misnumbered) of each row, as `misnumbered_rows` finds them, from
    (B, T) positions and validity as lists (`expected`: a list, or None). Python, not numpy or torch: an
    op that nothing else in a forward runs costs tens of microseconds cold (the layers evicted its code),
    where a decode step's few tokens cost a few Python steps."""
    counts, firsts, misnumbered = [], [], []
    for row, (numbers, real) in enumerate(zip(positions, valid)):
        kept = [number for number, is_real in zip(numbers, real) if is_real]
        count, first = len(kept), min(kept, default=_INT64_MAX)  # an all-padding row: int64 max
        misnumbered.append(
            count > 0
            and (
                kept != list(range(first, first + count))
                or not 0 <= first <= POSITION_LIMIT - count
                or (expected is not None and expected[row] >= 0 and first != expected[row])
            )
        )
        counts.append(count)
        firsts.append(first)
    return counts, firsts, misnumbered


def host_text_tokens(positions: torch.Tensor, valid: list, token_ids, rows: tuple[list, list, list]) -> TextTokens:
    """TextTokens from (B, T) int64 host positions, validity as lists, and their `host_rows`."""
    counts, firsts, misnumbered = rows
    valid = torch.tensor(valid, dtype=torch.bool)  # (B, T) from B lists of T
    return TextTokens(
        positions, valid, torch.tensor(counts), torch.tensor(firsts), torch.tensor(misnumbered), token_ids
    )


def misnumbered_rows(positions, valid, valid_count, first, expected):
    """(B,) bool, numpy or torch alike: rows whose real tokens are not at positions first, first + 1,
    ... in token order (packed documents restart, repeats, gaps), that lie outside [0, POSITION_LIMIT)
    (the position column's int32), or that do not start at `expected` ((B,) the position after the
    row's earlier tokens, -1 where it has none; None: a new sequence). Rows are keyed by position,
    and an example's positions are [first_position, + valid_length)."""
    counted = first[:, None] + valid.cumsum(1) - 1  # the k-th real token of a row at first + k
    misnumbered = ((positions != counted) & valid).any(1)
    misnumbered = misnumbered | ((valid_count > 0) & ((first < 0) | (first > POSITION_LIMIT - valid_count)))
    if expected is not None:
        misnumbered = misnumbered | ((valid_count > 0) & (expected >= 0) & (first != expected))
    return misnumbered


class HostMirror:
    """A GPU decode step's token positions and validity, copied to pinned host memory without a wait
    (one small copy and an event, issued at its first recorded call), so that the host can make the
    sampler's decisions and skip the calls that keep nothing. Until the copy has landed, `tokens()`
    is None and calls launch the kernel as usual: exact either way, and the host never waits."""

    def __init__(self, tokens: TextTokens) -> None:
        both = torch.cat(
            (tokens.positions, tokens.valid, tokens.misnumbered[:, None]), 1
        )  # (B, 2T + 1) int64: one copy
        self._host = torch.empty(both.shape, dtype=both.dtype, pin_memory=both.is_cuda)
        self._host.copy_(both, non_blocking=True)
        self._event = None
        if both.is_cuda:  # on the tokens' device's stream, which need not be the current device's
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(both.device))
        self._tokens: TextTokens | None = None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def tokens(self) -> TextTokens | None:
        """The host's TextTokens (no token ids: empty calls have no rows), or None while the copy runs."""
        if self._tokens is None and self.ready():
            num_new = self._host.shape[1] // 2
            positions, valid = self._host[:, :num_new], self._host[:, num_new:-1].bool().tolist()
            tokens = host_text_tokens(positions, valid, None, host_rows(positions.tolist(), valid, None))
            self._tokens = tokens._replace(misnumbered=self._host[:, -1].bool())  # the device's check
        return self._tokens


def departing_rows(given: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B,) bool: batch rows whose `given` positions ((B|1, T) or (T,)) differ from any of `rows` ((R, B|1, T))
    at a real token (`valid`, (B, T), None: all real); True everywhere when the shapes do not broadcast."""
    try:
        given, rows = torch.broadcast_tensors(given.to(rows.device)[None], rows)
    except RuntimeError:
        return torch.ones(1, dtype=torch.bool)
    differ = given.ne(rows).any(0)  # over the rows
    if valid is not None:
        differ = differ & valid.to(device=differ.device, dtype=torch.bool)
    return differ.reshape(differ.shape[0] if differ.dim() > 1 else 1, -1).any(1)


def check_position_source(
    config, given: torch.Tensor, own: torch.Tensor | None, valid, num_new: int, on_host: bool, numbered: bool = True
):
    """Refuse an attention call's positions (`given`) that are not the ones RoPE used: of another length
    than the forward's `num_new` tokens (`valid`: (B, T) real tokens, None: all); other than those its model forward numbered its tokens
    with (`own`: BART-style decoders take `position_ids` through **kwargs, hand them to their layers and
    number tokens themselves); or a text row that multimodal RoPE's rows ((3|4, B, T)) depart from at a
    real token (images given as embeddings, positions built by hand). Off the host the last is found on
    the device: (B,) flags for the sink's misnumbered check (no sync); else None. `numbered`: the forward
    that built the mask has a `position_ids` of its own; without one (a release that renamed it) the
    positions its layers got come from its caller, through **kwargs, and cannot be checked."""
    model = getattr(config, "model_type", "")
    if given.shape[-1] not in (1, num_new):
        raise CaptureError(
            f"qk_sniff: an attention call got position_ids for {given.shape[-1]} tokens in a forward of "
            f"{num_new} new tokens; not recorded"
        )
    if own is None and not numbered:
        raise CaptureError(
            f"qk_sniff: a {model} model's attention got position_ids, but the forward that built its mask has "
            "no position_ids of its own (its caller's reach the layers through **kwargs), so the positions its "
            "rows would be keyed by may not be those its RoPE used; not recorded: call the model without "
            "position_ids"
        )
    if own is None or own.shape[-1] != num_new:
        return None
    if own.dim() > 2:
        text = given[0] if given.dim() == 3 else given
        differ = departing_rows(text, own[-3:], valid)
        if not on_host:
            return differ
        if differ.any():
            raise CaptureError(
                f"qk_sniff: a {model} model's multimodal RoPE positions depart from its text positions (images "
                "given as embeddings, or position_ids built by hand), whose rows could not be keyed by one "
                "position; record text-only inputs with the positions the model makes itself"
            )
    elif given is not own and departing_rows(given, own[None], valid).any():
        raise CaptureError(  # (a host read on a GPU: only models that hand their layers other tensors)
            f"qk_sniff: a {model} model's attention got other position_ids than its forward numbered its "
            "tokens with (its attention layers are handed other positions than RoPE used, or a decoder takes "
            "position_ids through **kwargs and ignores them, as BART-style causal LMs do), so the positions its "
            "rows would be keyed by could be wrong; not recorded: if you passed position_ids, call the model "
            "without them (qk-sniff run passes them for padded batches: tokenizer.padding_side right, or "
            "inference.batch_size 1)"
        )
    return None
