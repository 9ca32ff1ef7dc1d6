"""Forwards under a torch transform or tracer (torch.func, torch.jit.trace, torch.export, a backward pass): refused in
one line or recorded exactly, never a raw error from inside capture, never a release blamed for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qk_attn
from qk_attn.capture import facts
from qk_attn.errors import CaptureError
from support.models import build
from support.oracle import rows_by_key

IDS = torch.arange(3, 10)[None]


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids, use_cache=False).logits


def _transformed(model, how: str):
    params = {name: p.detach() for name, p in model.named_parameters()}
    if how == "grad":
        loss = lambda p: torch.func.functional_call(model, p, (IDS,), {"labels": IDS}).loss  # noqa: E731
        return torch.func.grad(loss)(params)
    if how == "vmap":
        return torch.vmap(lambda ids: model(ids[None], use_cache=False).logits[0])(IDS.expand(2, -1))
    if how == "trace":
        return torch.jit.trace(_Logits(model), (IDS,), check_trace=False)
    return torch.export.export(model, (IDS,), kwargs={"use_cache": False})


@pytest.mark.parametrize("how", ["grad", "vmap", "trace", "export"])
@pytest.mark.filterwarnings("ignore")  # (the tracers' own warnings)
def test_a_forward_under_a_transform_is_refused_in_one_line_and_the_session_goes_on(how):
    """They failed inside capture (numpy's "Tensor that doesn't have storage", a dynamo guard error, "told of key
    lengths [10] only"), as the first forward of a process with a TransformersMismatch for a tested release."""
    model = build("llama3", "qk_sniff")
    facts.require.cache_clear()  # the first recorded forward of the process checks the facts: here, the transformed
    with qk_attn.session(sampler="all", layers="0", heads="0", capture="q") as s:
        with pytest.raises(CaptureError, match=r"^qk_sniff: this forward runs under [^\n]*; not recorded: [^\n]*$"):
            _transformed(model, how)
        s.begin([1])
        model(IDS)
        with pytest.raises(CaptureError, match="this forward runs under"):  # after a plain one, which stays intact
            _transformed(model, how)
        s.begin([2])
        model(IDS)
    assert sorted(set(s.table()["example_id"].to_pylist())) == [1, 2]
    assert s.table().num_rows == 2 * IDS.shape[1]


def test_the_first_forward_of_a_process_inside_a_backward_pass_finds_the_facts_holding():
    """The facts check ran inside the caller's backward pass and found `backward_marker` broken (a tested
    release blamed): it runs in a thread of its own. Such a forward records nothing (as a checkpoint's
    recompute); the next plain forward is recorded."""
    model = build("llama3", "qk_sniff")
    facts.require.cache_clear()
    x = torch.ones(3, requires_grad=True)
    with torch.enable_grad():  # (other test modules switch it off for the process)
        y = x * 2

    def forward_in_backward(grad):
        with torch.no_grad():
            model(IDS)
        return grad

    y.register_hook(forward_in_backward)
    with qk_attn.session(sampler="all", layers="0", heads="0", capture="q") as s:
        with torch.enable_grad():
            y.sum().backward()
        s.begin([1])
        model(IDS)
    assert set(s.table()["example_id"].to_pylist()) == {1}


def test_forward_mode_ad_is_recorded_as_a_plain_forward():
    """torch.autograd.forward_ad runs the forward on dual tensors that are plain ones: recorded, equal to a plain
    forward (over eager attention: sdpa on CPU has no forward-mode AD). torch.func.jvp is refused, as above."""
    import torch.autograd.forward_ad as fwad

    model = build("llama3", "qk_sniff")
    embeds = model.get_input_embeddings()(IDS).detach()
    with qk_attn.session(sampler="all", layers="0", example_ids=[0], backend="eager") as plain:
        model(inputs_embeds=embeds)
    with qk_attn.session(sampler="all", layers="0", example_ids=[0], backend="eager") as dual, fwad.dual_level():
        model(inputs_embeds=fwad.make_dual(embeds, torch.ones_like(embeds)))
    with pytest.raises(CaptureError, match=r"this forward runs under a torch.func transform \(jvp\)"):
        with qk_attn.session(sampler="all", layers="0", backend="eager"):
            torch.func.jvp(lambda e: model(inputs_embeds=e).logits, (embeds,), (torch.ones_like(embeds),))
    expected, got = rows_by_key(plain.table()), rows_by_key(dual.table())
    assert got.keys() == expected.keys()
    assert all(np.array_equal(got[key], expected[key]) for key in expected)
