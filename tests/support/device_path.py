"""The GPU path's decode decisions, run on CPU tensors (issue 20).

On a GPU a forward's tokens are device tensors, and a decode step's positions reach the host by a
copy that is not waited for (qk_attn.capture.tokens.HostMirror). `generate_counting_launches`
makes CPU forwards build their tokens as on a device and lets that copy land when a test says.
"""

from __future__ import annotations

import collections

import torch

import qk_attn
from qk_attn.capture import forward as forward_module
from qk_attn.capture import recorder
from qk_attn.capture.call_rows import CallRows
from qk_attn.capture.tokens import HostMirror

ARRIVES = ("at_once", "at_layer_2", "never")  # the copy lands at a step's first call, its third, or never


def arrived(arrives: str, queries: int) -> bool:
    """Whether the copy has landed at the `queries`-th call of a step (one query per call until it has)."""
    return {"at_once": True, "at_layer_2": queries >= 3, "never": False}[arrives]


def generate_counting_launches(
    model, prompt: dict, out, monkeypatch, arrives: str | None, steps: int, **generate_kwargs
) -> dict:
    """{(forward, layer): calls launched} of a greedy generate() into a log_uniform Parquet session at
    `out`; forward 1 is the prompt. `arrives` None: the CPU path; else the device path, its copy
    landing as ARRIVES says."""
    launched, forwards = collections.Counter(), [0]
    with monkeypatch.context() as patch:
        start_staging, batch_of = recorder.Session._start_staging, CallRows.batch

        def started(self, forward, *args):
            forwards[0] += 1  # at each forward's first recorded call
            return start_staging(self, forward, *args)

        def launch(self, module, forward, layer, *args):
            launched[(forwards[0], layer)] += 1
            return batch_of(self, module, forward, layer, *args)

        patch.setattr(recorder.Session, "_start_staging", started)
        patch.setattr(CallRows, "batch", launch)
        if arrives is not None:
            patch.setattr(forward_module, "builds_on_host", lambda device: False)

            def ready(mirror):
                mirror.queries = getattr(mirror, "queries", 0) + 1
                return arrived(arrives, mirror.queries)

            patch.setattr(HostMirror, "ready", ready)
        settings = dict(sampler="log_uniform", min_bucket_size=4, base_rate=3, example_ids=[0, 1])
        with torch.inference_mode(), qk_attn.session(output=out, **settings):
            model.generate(**prompt, max_new_tokens=steps, do_sample=False, pad_token_id=0, **generate_kwargs)
    return launched
