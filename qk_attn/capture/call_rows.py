"""One attention call's rows of one kind as a CaptureBatch (`Session._capture` asks for each kind):
the sampler's selection, the gather (one kernel launch where the kernel serves), rope="pre"'s inverse
rotation and the token ids, on the call's device, in the forward's staging buffer when it has room."""

from __future__ import annotations

import torch

from qk_attn.capture.batch import CaptureBatch
from qk_attn.capture.gather import (
    DeviceTables,
    Selection,
    SelectionSpec,
    gather_selected,
    kernel_rows,
    select_tokens,
    selected_token_ids,
    uses_kernel,
)
from qk_attn.capture.rope import pre_rope_rows, uses_rope
from qk_attn.capture.staging import Staging, StagingBuffer, call_bytes, forward_bytes, shared_bytes
from qk_attn.config import SniffConfig
from qk_attn.sampler import Sampler


def staged_dtype(config: SniffConfig, pre_rope: bool) -> torch.dtype:
    """The dtype a call's vectors are gathered in: `vector_dtype`, or float32 for rows to un-rotate in
    float32 (rope="pre"; `pre_rope_rows` casts them to `vector_dtype` after)."""
    return torch.float32 if pre_rope else getattr(torch, config.vector_dtype)


class CallRows:
    """Builds call batches for one session: its config and sampler, and the example and head ids
    already copied to each device (DeviceTables)."""

    def __init__(self, config: SniffConfig, sampler: Sampler) -> None:
        self.config = config
        self.sampler = sampler
        self.device_tables = DeviceTables()  # example and head ids on the device, copied once

    def start_staging(self, forward, model, query: torch.Tensor, sink) -> Staging:
        """A forward's staging area, sized for every call it can make: a buffer on its device in buffer
        mode; streaming (`Staging.streams`) when its rows could exceed the sink's staging limit."""
        batch_size, device = forward.batch_size, query.device
        dtype = staged_dtype(self.config, self.config.rope == "pre")
        capacity = batch_size * self.sampler.capacity(forward.num_new)
        key = (capacity, batch_size, query.shape[-1], dtype.itemsize, forward.input_ids is not None)
        nbytes = model.staging_bytes.get(key)
        if nbytes is None:  # once per forward shape (a decode step repeats the last one)
            nbytes = model.staging_bytes[key] = forward_bytes(model.plan, *key)
        limit = sink.staging_limit
        buffer = None
        if device.type == "cuda" or uses_kernel(query, dtype):
            buffer = model.buffers.get(device)
            if buffer is None:
                buffer = model.buffers[device] = StagingBuffer(device)
        sink.prepare(device)
        return Staging(forward.example_ids, device, nbytes, buffer, limit is not None and nbytes > limit)

    def batch(
        self,
        module,
        forward,
        layer,
        kind,
        states,
        heads,
        offset,
        tokens,
        sliding_window,
        cross,
        rotary,
        keep,
        staging: Staging,
    ) -> tuple[CaptureBatch, bool]:
        """Select, gather and (rope="pre") un-rotate one kind of one call; stays on the device, in
        `staging`'s buffer when it has one. Also says whether the batch is staged: not when the
        forward streams or the call does not fit (then it goes to the sink by itself)."""
        device = states.device
        batch_size, num_tokens = tokens.positions.shape
        pre_rope = self.config.rope == "pre" and not cross and uses_rope(module, rotary)
        out_dtype = staged_dtype(self.config, pre_rope)
        capacity = batch_size * self.sampler.capacity(num_tokens)
        # A layer on another device than the forward's first (device_map) streams its call: one
        # staging buffer lives on one device.
        staged = not staging.streams and device == staging.device
        if staged and staging.bytes is not None:  # buffer mode: the call must fit what is left of it
            nbytes = call_bytes(
                capacity, len(heads), states.shape[-1], out_dtype.itemsize, tokens.token_ids is not None
            )
            staged = staging.fits(nbytes + shared_bytes(batch_size))
        buffer = staging if staged and staging.bytes is not None else None
        example_ids = self.device_tables.get("ids", forward.example_ids, device)
        head_ids = self.device_tables.get("heads", heads, device)
        spec = SelectionSpec(
            states,
            offset,
            head_ids,
            tokens.positions,
            tokens.valid,
            example_ids,
            self.sampler,
            layer,
            kind,
            capacity,
            out_dtype,
            keep,
        )
        kernel = uses_kernel(states, out_dtype)
        if kernel and not pre_rope:  # one launch, straight into the staging buffer
            columns = kernel_rows(spec, tokens.token_ids, buffer.empty if buffer is not None else None)
        elif pre_rope:
            columns = pre_rope_rows(
                module,
                spec,
                tokens,
                rotary,
                self.device_tables.get("heads", (0,), device),
                staged_dtype(self.config, False),
            )
        else:  # the torch path: one selection serves the vectors and the token ids
            selection, token_id = self._selection(forward, spec, tokens)
            every_head = len(heads) == states.shape[1] and tuple(heads) == tuple(range(len(heads)))
            vectors = gather_selected(states, selection, offset, None if every_head else head_ids, out_dtype)
            columns = (selection.count, selection.row, selection.position, selection.bucket, vectors, token_id)
        shared = (tokens.valid_count, None if cross and kind == "k" else tokens.first_position, tokens.misnumbered)
        if buffer is not None:  # in buffer mode every column is part of the staged bytes
            columns = tuple(map(buffer.copy_in, columns))
            shared = tuple(map(buffer.hold, shared))
        count, row, position, bucket, vectors, token_id = columns
        valid, first_position, misnumbered = shared
        batch = CaptureBatch(
            layer=layer,
            kind=kind,
            heads=tuple(heads),
            example_ids=forward.example_ids,
            sliding_window=sliding_window,
            cross_attention=cross,
            count=count,
            row=row,
            position=position,
            bucket=bucket,
            vectors=vectors,
            valid=valid,  # the forward's, also for a suffix of its queries
            token_id=token_id,
            first_position=first_position,
            misnumbered=misnumbered,
        )
        return batch, staged

    def _selection(self, forward, spec: SelectionSpec, tokens) -> tuple[Selection, torch.Tensor | None]:
        """The sampler's selection of one call, and the token id of each selected token. Under "all"
        it is every valid token for every layer and kind, so it is made once per forward (a dense
        decode step has 2 x layers calls)."""
        if self.sampler.strategy != "all":
            return selected_token_ids(
                select_tokens(spec.decide(), tokens.positions, self.sampler, spec.capacity), tokens
            )
        cached = forward.selections.get(id(tokens))
        if cached is None or cached[0] is not tokens:
            selection = select_tokens(tokens.valid, tokens.positions, self.sampler, spec.capacity)
            cached = forward.selections[id(tokens)] = (tokens, selected_token_ids(selection, tokens))
        return cached[1]
