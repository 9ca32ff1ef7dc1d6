"""What a session binds per model and per attention module (`qk_attn.capture.recorder.Session`): a model's
head plan, layer dtypes and staging buffers; a module's facts, and the model, plan and heads its calls
share across forwards."""

from __future__ import annotations

import weakref

import torch

from qk_attn.capture.attention import ModuleFacts
from qk_attn.capture.plan import HeadPlan
from qk_attn.capture.staging import StagingBuffer


class ModelBinding:
    """Per model in a session: its config (weakly: a sweep over many models in one session keeps none of
    them), head plan and staging buffers."""

    def __init__(self, config, plan: HeadPlan):
        self.config = weakref.ref(config)
        self.plan = plan
        # What each layer's attention ran in at its first call, and that forward's serial: a forward that
        # is discarded takes its entries with it (`Session._discard`), so its dtype binds nothing.
        self.layer_dtypes: dict[int, tuple[torch.dtype, int]] = {}
        self.staging_bytes: dict[tuple, int] = {}  # forward shape -> its staging bound
        # Per device, reused by this model's forwards. Not shared between models: a forward of one
        # may still hold its staged rows (not handed off yet) while the other's forward runs.
        self.buffers: dict[torch.device, StagingBuffer] = {}
        # The module that built its first recorded forward's mask: in a session holding one model's dataset, an
        # attention module outside it is another model's, even one built on the same config object.
        self.owner: weakref.ref | None = None

    def own(self, builder) -> None:
        """Set the owner; when it goes, its staging buffers go with it (device memory a session that
        outlives the model would otherwise keep; a forward still handing off holds its own views)."""
        self.owner = weakref.ref(builder)
        weakref.finalize(builder, self.buffers.clear)


class ModuleBinding:
    """Per attention module in a session: its facts, and what its calls share across forwards (its
    model, plan and heads), valid while `serial` is the session's `_bindings` and the call's dtype and
    config are the ones bound. A decode step reads them instead of checking them again."""

    __slots__ = ("facts", "module", "serial", "model", "plan", "config", "dtype", "heads", "excluded")

    def __init__(self, facts: ModuleFacts, module: weakref.ref):
        self.facts = facts
        self.module = module  # a weak reference: the binding goes with its module
        self.serial = -1  # not bound yet
        self.model = self.plan = self.config = self.dtype = None
        self.heads: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
        self.excluded = False
