"""The sampler's keep decisions of a CPU forward, made on the host for every (layer, kind) at once, so
that attention calls that keep nothing cost a lookup (qk_attn.capture.forward.ForwardContext.decisions).
A decode step slices its sequence's `DecisionWindow` instead of hashing its few tokens again."""

from __future__ import annotations

import numpy as np
import torch

DECODE_TOKENS = 8  # forwards of up to this many new tokens take their decisions from a DecisionWindow
DECISION_WINDOW = 64  # positions per row that a DecisionWindow decides at once


def keep_all_layers(sampler, forward, num_layers: int, positions: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """`sampler.keep_all_layers` of these (host) positions, as numpy; a decode step's from its
    sequence's `DecisionWindow`. `valid` (B, T) bool: padding, whose decisions the caller masks out,
    so its positions (arbitrary: a caller's position_ids may give pads any value) never place or
    move the window; it is decided at a position the window holds."""
    if forward.num_new > DECODE_TOKENS:
        example_ids = torch.tensor(forward.example_ids, dtype=torch.int64)
        return sampler.keep_all_layers(example_ids, num_layers, positions).numpy()
    host = positions.numpy()
    window = forward.sequence.decisions
    valid = valid.numpy()
    real = np.where(valid, host, np.iinfo(np.int64).max).min(1)  # each row's first real position
    anchor = np.where(valid.any(1), real, 0 if window is None else window.start[:, 0])
    host = np.where(valid, host, anchor[:, None])
    keep = None if window is None else window.get(num_layers, host)
    if keep is None:  # the sequence's first decode step, or past its window
        window = forward.sequence.decisions = DecisionWindow(sampler, num_layers, forward.example_ids, host.min(1))
        keep = window.get(num_layers, host)
    if keep is None:  # real positions spread wider than a window (misnumbered: refused after): decided directly
        example_ids = torch.tensor(forward.example_ids, dtype=torch.int64)
        keep = sampler.keep_all_layers(example_ids, num_layers, torch.from_numpy(host)).numpy()
    return keep


class DecisionWindow:
    """The sampler's keep mask of every (layer, kind) for the next DECISION_WINDOW positions of each
    row of a sequence, made at once. The decode steps that follow slice it (a few numpy ops) instead of
    each running the sampler's whole hash chain for its own few tokens: the decisions are the same (a
    pure function of example, layer, kind and position)."""

    def __init__(self, sampler, num_layers: int, example_ids: tuple[int, ...], start: np.ndarray):
        grid = torch.from_numpy(start[:, None] + np.arange(DECISION_WINDOW))  # (B, DECISION_WINDOW)
        example_ids = torch.tensor(example_ids, dtype=torch.int64)
        self.keep = sampler.keep_all_layers(example_ids, num_layers, grid).numpy()  # (L, 2, B, DECISION_WINDOW)
        self.num_layers = num_layers
        self.start = start[:, None]
        self.rows = np.arange(len(start))[:, None]

    def get(self, num_layers: int, positions: np.ndarray) -> np.ndarray | None:
        """The (L, 2, B, T) keep mask of (B, T) positions; None when some lie outside the window."""
        offset = positions - self.start
        if num_layers != self.num_layers or offset.min() < 0 or offset.max() >= DECISION_WINDOW:
            return None
        return self.keep[:, :, self.rows, offset]
