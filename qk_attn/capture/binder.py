"""How a session binds each attention module to its model (`ModuleBinder`, a base of
`qk_attn.capture.recorder.Session`): at a module's first call, and again after anything that could change
it, its model's head plan, the layer's dtype and the checks that the module belongs to the session's one
model where the session writes one model's dataset."""

from __future__ import annotations

import weakref

import torch

from qk_attn.capture.attention import module_facts
from qk_attn.capture.bindings import ModelBinding, ModuleBinding
from qk_attn.capture.frames import contains
from qk_attn.capture.plan import HeadPlan, ModelShape, dtype_name
from qk_attn.errors import CaptureError


class ModuleBinder:
    """The bindings of a session (`Session` sets `config`, `sink` and `_warn_once`): `_models` by id of the
    model's config, `_modules` by id of the attention module, and `_bindings`, bumped when a model, its plan
    or its layer dtypes change (every ModuleBinding is then stale: a decode step reads a binding instead of
    checking it again only while its `serial` is this)."""

    def _init_bindings(self) -> None:
        self._models: dict[int, ModelBinding] = {}
        self._modules: dict[int, ModuleBinding] = {}
        self._bindings = 0

    def _new_binding(self, module) -> ModuleBinding:
        """The module's binding, made at its first call in this session. Kept by id, not in a
        WeakKeyDictionary (whose lookup makes a weak reference per call); it goes with the module."""
        key, modules = id(module), self._modules

        def forget(ref, key=key) -> None:
            if (entry := modules.get(key)) is not None and entry.module is ref:
                del modules[key]

        binding = modules[key] = ModuleBinding(module_facts(module), weakref.ref(module, forget))
        return binding

    def _bind(self, binding: ModuleBinding, module, forward, query, key) -> None:
        """The module's model, plan and heads, checked (`_model`) at its first call, and again after any
        change that could alter them (`_bindings`) or in another dtype or config."""
        layer = binding.facts.layer
        model = self._model(module, forward, layer, query, key)
        binding.model, binding.plan, binding.config, binding.dtype = model, model.plan, module.config, query.dtype
        binding.heads = (model.plan.heads(layer, "q"), model.plan.heads(layer, "k"))
        binding.excluded = layer in model.plan.excluded_layers
        binding.serial = self._bindings

    def _model(self, module, forward, layer: int, query, key) -> ModelBinding:
        model = self._models.get(id(module.config))
        if model is None or model.config() is not module.config:
            if self._models and self.sink.one_model:
                self._refuse_second_model(module)
            plan = HeadPlan.build(self.config, ModelShape.from_module(module, query, key, forward.builder))
            model = self._models[id(module.config)] = ModelBinding(module.config, plan)
            if forward.builder is not None:
                model.own(forward.builder)
            self._bindings += 1
            self.sink.bind_model(module.config, plan)
            if query.dtype == torch.float64:
                self._warn_once(
                    "float64",
                    f"qk-attn: the model runs in float64; vectors are stored as {self.config.vector_dtype} "
                    "(vector_dtype), rounded",
                )
        elif self.sink.one_model and model.owner is not None:
            owner = model.owner()  # (gone: the module is another model's too)
            if owner is None or not contains(owner, module):
                self._refuse_second_model(module)  # another model built on the same config object
        elif model.owner is None and forward.builder is not None:  # bound by a forward whose mask no module built
            model.own(forward.builder)
        layers = getattr(module.config, "num_hidden_layers", None)
        if isinstance(layers, int) and layers != model.plan.shape.num_layers:
            raise CaptureError(
                f"qk_sniff: the model now has {layers} layers where its first recorded forward in this session had "
                f"{model.plan.shape.num_layers} (layers pruned or added in place): its rows could not share one head "
                "plan and layer numbering; open a new session for the changed model"
            )
        if not model.plan.shape.has_attention(layer):
            raise CaptureError(
                f"qk_sniff: layer {layer} ({type(module).__name__}) called attention, but qk-attn found no attention "
                "module in that layer when it planned the model's layers (of the first one's class, or calling "
                "transformers' attention interface), so its plan could be wrong; not recorded"
            )
        entry = model.layer_dtypes.get(layer)
        if entry is None:
            entry = model.layer_dtypes[layer] = (query.dtype, forward.serial)
        first = entry[0]
        if first != query.dtype and self.sink.one_model:  # (per layer: a model may upcast some layers)
            raise CaptureError(
                f"qk_sniff: layer {layer}'s attention runs in {dtype_name(query.dtype)} in this forward, "
                f"but in {dtype_name(first)} in the forwards recorded into {self.config.output}, which "
                "holds one model's dataset (its card states one dtype); keep the model's dtype for the whole capture, "
                "or give this dtype its own output"
            )
        return model

    def _refuse_second_model(self, module) -> None:
        raise CaptureError(
            f"qk_sniff: a second model ({type(module).__module__.rsplit('.', 1)[-1]}) in a session that writes "
            f"{self.config.output}, which holds one model's dataset (a model built on the first one's config "
            "object is another model too); give each model its own session and output"
        )
