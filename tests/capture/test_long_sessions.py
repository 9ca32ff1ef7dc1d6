"""A long session holds no more per example than it must: the capture's bookkeeping stays bounded over
many documents and generate() calls (each over a new cache)."""

from __future__ import annotations

import torch

import qk_attn
from support.models import VOCAB, build

torch.set_grad_enabled(False)


def test_sequences_of_gone_caches_are_forgotten():
    model = build("llama3", "qk_sniff")
    generator = torch.Generator().manual_seed(0)
    with qk_attn.session(sampler="log_uniform", min_bucket_size=4, base_rate=2) as s:
        for example in range(60):  # each forward builds (and drops) its own DynamicCache
            s.begin([example])
            model.model(input_ids=torch.randint(2, VOCAB - 2, (1, 5), generator=generator))
            s.commit()
        assert len(s._sequences) <= 20
        kept = s.table()
    assert sorted(set(kept.column("example_id").to_pylist())) == list(range(60))


def test_a_live_cache_is_continued_after_many_others():
    from transformers import DynamicCache

    from support.models import cache_kw

    model = build("llama3", "qk_sniff")
    tokens = torch.randint(2, VOCAB - 2, (1, 12), generator=torch.Generator().manual_seed(1))
    with qk_attn.session(sampler="all", min_bucket_size=4) as s:
        cache = DynamicCache(config=model.config)
        s.begin([1000])
        model.model(input_ids=tokens[:, :6], **cache_kw(cache))
        for example in range(40):  # enough new sequences to prune those of gone caches
            s.begin([example])
            model.model(input_ids=tokens[:, :3])
        model.model(input_ids=tokens[:, 6:], **cache_kw(cache))  # continues example 1000
        s.commit()
        table = s.table()
    positions = table.filter(table.column("example_id").to_numpy() == 1000).column("position").to_pylist()
    assert sorted(set(positions)) == list(range(12))
