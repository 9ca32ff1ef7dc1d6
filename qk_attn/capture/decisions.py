"""The sampler's keep decisions of a forward whose positions the host knows, made for every (layer, kind)
at once, so that attention calls that keep nothing cost a lookup (qk_attn.capture.forward.ForwardContext
.decisions). A decode step reads its sequence's `DecisionWindow` instead of hashing its few tokens again,
in plain Python: a numpy or torch op that nothing else in a forward runs costs tens of microseconds cold
(the layers evicted its code), more than the whole lookup."""

from __future__ import annotations

import numpy as np
import torch

DECODE_TOKENS = 8  # forwards of up to this many new tokens take their decisions from a DecisionWindow
DECISION_WINDOW = 64  # positions per row that a DecisionWindow decides at once


class Decisions:
    """Which calls of a forward keep anything (bit 2 * layer + kind of `kept`, kinds q = 0, k = 1), and
    each call's (B, T) keep mask when asked for; `host` is the host tokens they were made for."""

    def __init__(self, host, kept: int, mask) -> None:
        self.host = host
        self.kept = kept
        self._mask = mask  # (layer, kind) -> (B, T) bool tensor, padding False

    def keeps(self, layer: int, kind: int) -> bool:
        return bool(self.kept >> (2 * layer + kind) & 1)

    def keeps_any(self, layer: int) -> bool:
        """Whether either kind of `layer` keeps anything."""
        return bool(self.kept >> (2 * layer) & 3)

    def mask(self, layer: int, kind: int) -> torch.Tensor:
        return self._mask(layer, kind)


def decide(sampler, forward, num_layers: int, host) -> Decisions:
    """`sampler.keep_all_layers` of the `host` tokens' (B, T) positions, padding never kept; a decode
    step's from its sequence's `DecisionWindow`. Padding positions (arbitrary: a caller's position_ids
    may give pads any value) never place or move the window."""
    positions, valid = host.positions, host.valid
    if forward.num_new <= DECODE_TOKENS:
        numbers, real = positions.tolist(), valid.tolist()
        token_bits = _window_bits(sampler, forward, num_layers, numbers, real)
        if token_bits is not None:
            kept = 0
            for row_bits, row_real in zip(token_bits, real):
                for bits, is_real in zip(row_bits, row_real):
                    kept |= bits if is_real else 0
            return Decisions(host, kept, lambda layer, kind: _mask_of(token_bits, real, 2 * layer + kind))
    example_ids = torch.tensor(forward.example_ids, dtype=torch.int64)
    keep = sampler.keep_all_layers(example_ids, num_layers, positions) & valid  # (L, 2, B, T)
    any_kept = keep.reshape(num_layers * 2, -1).any(-1).tolist()
    return Decisions(
        host, sum(1 << i for i, kept in enumerate(any_kept) if kept), lambda layer, kind: keep[layer, kind]
    )


def _window_bits(sampler, forward, num_layers: int, numbers: list, real: list) -> list | None:
    """Each token's bits (as `Decisions.kept`) from the sequence's window, made anew at its first decode
    step or past its end; None when the real positions spread wider than a window (misnumbered: refused
    after), which is then decided directly."""
    window = forward.sequence.decisions
    anchored = []
    for b, (row, row_real) in enumerate(zip(numbers, real)):
        kept = [n for n, is_real in zip(row, row_real) if is_real]
        anchor = min(kept) if kept else (0 if window is None else window.start[b])
        anchored.append([n if is_real else anchor for n, is_real in zip(row, row_real)])
    bits = None if window is None else window.get(num_layers, anchored)
    if bits is None:
        window = forward.sequence.decisions = DecisionWindow(
            sampler, num_layers, forward.example_ids, [min(row) for row in anchored]
        )
        bits = window.get(num_layers, anchored)
    return bits


def _mask_of(token_bits: list, real: list, bit: int) -> torch.Tensor:
    return torch.tensor(
        [
            [bool(bits >> bit & 1) and is_real for bits, is_real in zip(row, row_real)]
            for row, row_real in zip(token_bits, real)
        ]
    )


class DecisionWindow:
    """The sampler's decisions of every (layer, kind) for the next DECISION_WINDOW positions of each row
    of a sequence, made at once and kept as one int of bits per row and position. The decode steps that
    follow look them up instead of each running the sampler's whole hash chain for its own few tokens:
    the decisions are the same (a pure function of example, layer, kind and position)."""

    def __init__(self, sampler, num_layers: int, example_ids: tuple[int, ...], start: list[int]):
        grid = torch.tensor(start, dtype=torch.int64)[:, None] + torch.arange(DECISION_WINDOW)  # (B, W)
        keep = sampler.keep_all_layers(torch.tensor(example_ids, dtype=torch.int64), num_layers, grid).numpy()
        per_position = keep.reshape(num_layers * 2, *grid.shape).transpose(1, 2, 0)  # (B, W, 2L): bit 2l + kind
        packed = np.packbits(per_position, axis=-1, bitorder="little")
        self.bits = [[int.from_bytes(cell.tobytes(), "little") for cell in row] for row in packed]
        self.num_layers = num_layers
        self.start = start

    def get(self, num_layers: int, positions: list) -> list | None:
        """Each of the (B, T) positions' bits; None when some lie outside the window."""
        if num_layers != self.num_layers:
            return None
        out = []
        for row_bits, start, row in zip(self.bits, self.start, positions):
            offsets = [n - start for n in row]
            if min(offsets) < 0 or max(offsets) >= DECISION_WINDOW:
                return None
            out.append([row_bits[offset] for offset in offsets])
        return out
