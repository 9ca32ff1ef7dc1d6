"""Ground truth taken another way: hooks on q/k norms or projections, plus the model's own RoPE."""

from __future__ import annotations

import sys

import numpy as np
import torch


def attention_modules(model):
    """Text self-attention modules (those with a layer_idx and their own q/k projections)."""
    return [
        m
        for m in model.modules()
        if getattr(m, "layer_idx", None) is not None
        and hasattr(m, "q_proj")
        and "CrossAttention" not in type(m).__name__
    ]


class GroundTruth:
    """Records, per layer, pre-RoPE q/k (B, H, T, D) from hooks and post-RoPE via the model's RoPE."""

    def __init__(self, model):
        self.pre: dict[tuple[int, str], torch.Tensor] = {}
        self.post: dict[tuple[int, str], torch.Tensor] = {}
        self.tokens_first: dict[tuple[int, str], bool] = {}  # whether the hooked q/k is (B, T, H, D)
        self._handles = []
        for module in attention_modules(model):
            self._hook(module)

    def _hook(self, module):
        layer = module.layer_idx
        head_dim = module.head_dim
        for kind in ("q", "k"):
            source = getattr(module, f"{kind}_norm", None) or getattr(module, f"{kind}_proj")

            def keep(_mod, _args, out, kind=kind):
                out = out.detach()
                if out.dim() == 3:  # projection output (B, T, H*D)
                    out = out.view(*out.shape[:2], -1, head_dim)
                # the model's dtype, as the model rotates them: bit for bit in bf16/fp16 too
                self.pre[(layer, kind)] = out  # (B, T, H, D) or already (B, H, T, D): see rotate

            self._handles.append(source.register_forward_hook(keep))

        def rotate(mod, args, kwargs, _out):
            num_tokens = (args[0] if args else kwargs["hidden_states"]).shape[1]
            for kind in ("q", "k"):  # families differ in whether the norm runs before the transpose
                pre = self.pre[(layer, kind)]
                if pre.shape[1] != pre.shape[2]:  # else as many tokens as heads: the layout seen before
                    self.tokens_first[(layer, kind)] = pre.shape[1] == num_tokens
                tokens_first = self.tokens_first.get((layer, kind))
                assert tokens_first is not None, f"{num_tokens} tokens and as many heads: (B, T, H, D) or (B, H, T, D)?"
                if tokens_first:
                    self.pre[(layer, kind)] = pre.transpose(1, 2)
            q, k = self.pre[(layer, "q")], self.pre[(layer, "k")]
            modeling = sys.modules[type(mod).__module__]
            if getattr(mod, "use_rope", True):
                cos, sin = kwargs["position_embeddings"]
                q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
            scale_fn = getattr(modeling, "get_llama_4_attn_scale", None)
            if scale_fn is not None:
                params = mod.config.rope_parameters
                q = q * scale_fn(
                    kwargs["position_ids"], params["llama_4_scaling_beta"], params["original_max_position_embeddings"]
                ).to(q.dtype)
            self.post[(layer, "q")], self.post[(layer, "k")] = q, k

        self._handles.append(module.register_forward_hook(rotate, with_kwargs=True))

    def remove(self):
        for handle in self._handles:
            handle.remove()


def rows_by_key(table) -> dict[tuple, np.ndarray]:
    """{(example_id, layer, head, kind, position): vector} from a capture table; asserts uniqueness."""
    data = table.to_pydict()
    out = {}
    for i in range(table.num_rows):
        key = (data["example_id"][i], data["layer"][i], data["head"][i], data["kind"][i], data["position"][i])
        assert key not in out, f"duplicate row {key}"
        out[key] = np.asarray(data["vector"][i], dtype=np.float32)
    return out


def expected_rows(truth: dict, batch: dict, example_ids, layers_heads) -> dict[tuple, np.ndarray]:
    """The same keys built from ground-truth tensors for every valid token of `batch`.

    truth: {(layer, kind): (B, H, T, D)}; layers_heads: {(layer, kind): heads}.
    """
    mask, positions = batch["attention_mask"], batch["position_ids"]
    out = {}
    for (layer, kind), heads in layers_heads.items():
        states = truth[(layer, kind)]
        for b, example in enumerate(example_ids):
            for t in torch.nonzero(mask[b]).flatten().tolist():
                for h in heads:
                    out[(example, layer, h, kind, int(positions[b, t]))] = states[b, h, t].float().numpy()
    return out


def all_heads(model) -> dict[tuple[int, str], list[int]]:
    """{(layer, kind): heads} of a capture with no head filter: every query head, and the key
    heads they read by GQA."""
    modules = attention_modules(model)
    config = modules[0].config
    group = config.num_attention_heads // config.num_key_value_heads
    out = {}
    for module in modules:
        out[(module.layer_idx, "q")] = list(range(config.num_attention_heads))
        out[(module.layer_idx, "k")] = sorted({h // group for h in range(config.num_attention_heads)})
    return out


def captured_and_truth(
    model, call: dict, example_ids, stage: str = "post", expected_batch: dict | None = None, **settings
) -> tuple[dict, dict]:
    """(rows a sampler="all" session recorded for model(**call), the same keys from hooks on the
    projections/norms plus the model's RoPE). `expected_batch` gives the mask and positions the
    oracle should use (default: `call`)."""
    import qk_attn

    truth = GroundTruth(model)
    with qk_attn.session(sampler="all", example_ids=example_ids, rope=stage, **settings) as s:
        model(**call)
    truth.remove()
    states = truth.post if stage == "post" else truth.pre
    return rows_by_key(s.table()), expected_rows(states, expected_batch or call, example_ids, all_heads(model))
