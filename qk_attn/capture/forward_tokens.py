"""A forward's new tokens (`TextTokens`: positions, validity, token ids, per-row columns), built from its
`ForwardContext`'s facts: in torch on the forward's device, or in Python on the host (the same values
and dtypes), each row's positions checked against where its sequence's previous forward ended.

`ForwardContext.tokens` (qk_attn.capture.forward) builds them once per forward and device through
`text_tokens`, and says which way (`builds_on_host`).
"""

from __future__ import annotations

import torch

from qk_attn.capture.tokens import POSITION_LIMIT, TextTokens, host_rows, host_text_tokens, misnumbered_rows
from qk_attn.errors import MisnumberedPositions


def text_tokens(forward, position_ids, device: torch.device, on_host: bool) -> TextTokens:
    """The tokens on `device`, their rows' positions checked (`misnumbered_rows`): on the host at
    once, on a device by the sink with the rows; and where the sequence's next forward continues."""
    expected = forward.continues_from
    unknown = -1 if expected is None else expected  # where a row has no tokens here
    if on_host:
        if isinstance(expected, torch.Tensor):  # made on a device (a forward split over devices)
            expected = expected.tolist()
        tokens, (counts, firsts, misnumbered) = host_tokens(forward, position_ids, expected)
        if True in misnumbered:
            _refuse_misnumbered(forward, tokens, expected)
        before = [-1] * forward.batch_size if expected is None else expected
        after = [first + count if count else at for count, first, at in zip(counts, firsts, before)]
    else:
        if expected is not None:
            expected = unknown = torch.as_tensor(expected).to(device, non_blocking=True)
        tokens = device_tokens(forward, position_ids, device, expected)
        after = torch.where(tokens.valid_count > 0, tokens.first_position + tokens.valid_count, unknown)
    if forward.sequence is not None:
        forward.sequence.next_position = after
    return tokens


def _refuse_misnumbered(forward, tokens: TextTokens, expected) -> None:
    """Raise MisnumberedPositions for host tokens, saying what the first such row holds."""
    rows = tokens.misnumbered.nonzero()[:, 0].tolist()
    row, example = rows[0], forward.example_ids[rows[0]]
    positions = tokens.positions[row][tokens.valid[row]].tolist()
    if positions[0] < 0 or positions[-1] >= POSITION_LIMIT:
        counts_up = positions == list(range(positions[0], positions[0] + len(positions)))
        if counts_up and len(rows) == 1 and (expected is None or expected[row] in (-1, positions[0])):
            raise MisnumberedPositions.out_of_range(example, positions[0], positions[-1])  # the range alone
        seen = f"example {example} is at positions {positions[0]} to {positions[-1]}"
    elif expected is not None and 0 <= expected[row] != positions[0]:
        seen = f"example {example} goes on at position {positions[0]} after its previous token at {expected[row] - 1}"
        if positions[0] == 0:  # the commonest cause: generate(input_ids=prompt, cache=cache) over the prompt's cache
            seen += "; a prompt fed again over a cache that already holds it starts at 0 too: feed only the new tokens"
    else:
        i = next(i for i, p in enumerate(positions) if p != positions[0] + i)
        seen = f"example {example} goes from position {positions[i - 1]} to {positions[i]}"
    raise MisnumberedPositions.of([forward.example_ids[i] for i in rows], seen)


def host_tokens(forward, position_ids, expected=None) -> tuple[TextTokens, tuple]:
    """`device_tokens` on the CPU, its per-row columns made in Python (`host_rows`, also returned): the
    same values and dtypes (tests/capture/test_forward_context.py). `expected`: a list, or None."""
    batch, num_new = forward.batch_size, forward.num_new
    if forward.attention_mask is None:
        valid = [[True] * num_new for _ in range(batch)]
    else:
        valid = forward.attention_mask[:, -num_new:].bool().tolist()
    if forward.alive is not None:
        valid = [row if alive else [False] * num_new for row, alive in zip(valid, forward.alive.bool().tolist())]
    if position_ids is None:
        positions = torch.arange(forward.past, forward.past + num_new)
    else:
        positions = position_ids[0] if position_ids.dim() == 3 else position_ids
    if positions.dtype is not torch.int64 or positions.device.type != "cpu":
        positions = positions.to(device="cpu", dtype=torch.int64)
    positions = positions.expand(batch, num_new)
    ids = forward.input_ids
    token_ids = None
    if ids is not None and ids.shape == (batch, num_new):
        token_ids = ids.to(device="cpu", dtype=torch.float32).reshape(batch, 1, num_new, 1)
    rows = host_rows(positions.tolist(), valid, expected)
    return host_text_tokens(positions, valid, token_ids, rows), rows


def device_tokens(forward, position_ids, device, expected=None) -> TextTokens:
    batch, num_new = forward.batch_size, forward.num_new
    # Validity: the 2-D mask's last T columns are the new tokens.
    if forward.attention_mask is None:
        valid = torch.ones(batch, num_new, dtype=torch.bool, device=device)
    else:
        valid = forward.attention_mask[:, -num_new:].to(device=device, dtype=torch.bool)
    if forward.alive is not None:  # rows of a batched generate() that finished before this step
        valid = valid & forward.alive.to(device=device, dtype=torch.bool)[:, None]
    # Positions RoPE used: the call's position_ids (text axis of mrope), else the cache
    # positions, which is what transformers uses when no position_ids are given.
    if position_ids is None:
        positions = torch.arange(forward.past, forward.past + num_new, device=device)
    else:
        positions = position_ids[0] if position_ids.dim() == 3 else position_ids
    positions = positions.to(device=device, dtype=torch.int64).expand(batch, num_new)
    # Token ids shaped like attention states (B, 1, T, 1) so that the same selection gathers
    # them; float32 is exact for vocabulary ids (far below 2**24).
    ids = forward.input_ids
    token_ids = None
    if ids is not None and ids.shape == (batch, num_new):
        token_ids = ids.to(device=device, dtype=torch.float32)[:, None, :, None]
    first = positions.masked_fill(~valid, torch.iinfo(torch.int64).max).amin(1)
    valid_count = valid.sum(1)
    # Checked on the host with the rows, so no sync here.
    misnumbered = misnumbered_rows(positions, valid, valid_count, first, expected)
    return TextTokens(positions, valid, valid_count, first, misnumbered, token_ids)
