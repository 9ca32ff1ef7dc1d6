"""An example's positions count up by one, from forward to forward: rows are keyed by position and an
example holds [first_position, first_position + valid_length). Whatever breaks that (packed documents,
gaps, right padding in generate(), a row continued past the padding after its EOS) is refused in
the forward, with nothing of those examples recorded, and the next document is recorded as usual."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StoppingCriteriaList

import qk_attn
from qk_attn.dataset.verify import verify_dataset
from qk_attn.errors import CaptureError, MisnumberedPositions
from support.models import VOCAB, StopRow, build, cache_kw, padded_batch
from support.oracle import rows_by_key
from support.run import all_rows, assert_same_rows

torch.set_grad_enabled(False)


def _ids(length: int, batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randint(2, VOCAB - 2, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("into", ["memory", "parquet"])
@pytest.mark.parametrize(
    "positions, seen",
    [
        (torch.cat([torch.arange(8), torch.arange(8)]), "goes from position 7 to 0"),  # two documents in one row
        (torch.cat([torch.arange(8), torch.arange(10, 18)]), "goes from position 7 to 10"),  # a gap
        (torch.cat([torch.arange(8), torch.arange(7, 15)]), "goes from position 7 to 7"),  # a repeat
        (torch.cat([torch.arange(1, 16), torch.tensor([0])]), "goes from position 15 to 0"),  # out of order
        (torch.arange(-3, 13), "is at positions -3 to 12, below 0"),  # no bucket holds it
        (torch.arange(2**31 - 8, 2**31 + 8), "is at positions 2147483640 to 2147483655, beyond the int32"),
        (torch.arange(2**40, 2**40 + 16), "is at positions 1099511627776 to 1099511627791, beyond the int32"),
    ],
)
def test_positions_that_do_not_count_up_by_one_in_a_forward_are_refused_there(tmp_path, into, positions, seen):
    """Positions that count up by one but leave the int32 column are told of that range first, without the
    causes of misnumbering (packed documents, right padding), which they do not have."""
    model = build("llama3", "qk_sniff")
    out = tmp_path / "out"
    beyond = "is at positions" in seen
    with qk_attn.session(sampler="all", **({"output": out} if into == "parquet" else {})) as s:
        expected = rf"examples \[0\]: example 0 {seen}" if beyond else rf"examples \[0\]: .*\(example 0 {seen}\)"
        with pytest.raises(MisnumberedPositions, match=expected) as error:
            model(input_ids=_ids(16), position_ids=positions[None], use_cache=False)
        assert ("packed documents" in str(error.value)) is not beyond, error.value
        model(input_ids=_ids(5, seed=4), use_cache=False)  # the next document: recorded
        s.commit()
        if into == "memory":
            assert set(s.table()["example_id"].to_pylist()) == {1}
    if into == "parquet":
        assert qk_attn.load_examples(out)["example_id"].to_pylist() == [1]
        assert verify_dataset(out, log=lambda *_: None) == []


def test_a_decode_step_that_does_not_continue_its_prompt_is_refused():
    """A left-padded prompt given position_ids, then decode steps given none: transformers uses the
    cache positions, which count the padding, so the short row would skip positions."""
    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(7, 4))
    with qk_attn.session(sampler="all", example_ids=[0, 1]) as s:
        cache = DynamicCache(config=model.config)
        model(**batch, **cache_kw(cache))
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
        with pytest.raises(
            MisnumberedPositions,
            match=r"examples \[1\]: .*example 1 goes on at position 7 after its previous token at 3",
        ):
            model(input_ids=torch.tensor([[40], [50]]), attention_mask=mask, **cache_kw(cache))
        assert s.table().num_rows == 0  # the refused sequences are discarded, the prompt's rows with them


def test_a_right_padded_generate_is_refused_not_recorded_with_repeats(caplog):
    """generate() on right padding (transformers only warns) feeds the short row's new tokens at
    positions it already used. One warning says the examples are discarded (not a second one when
    the refused forward is retired as stopped part-way)."""
    model = build("llama3", "qk_sniff")
    batch = padded_batch("right", lengths=(7, 4))
    with qk_attn.session(sampler="all", example_ids=[0, 1]):
        with pytest.raises(MisnumberedPositions, match=r"examples \[1\]"):
            model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
            )
    discarded = [r.getMessage() for r in caplog.records if "their rows are discarded" in r.getMessage()]
    assert discarded == [
        "qk-attn: a forward of example(s) [0, 1] was refused; their rows are discarded and they are not committed"
    ]


@pytest.mark.parametrize("padding_masked", [True, False])
def test_a_row_ended_by_its_eos_and_continued_by_a_second_generate(tmp_path, padding_masked):
    """A batched generate() whose row 0 ends (its EOS) three steps early, then a second generate()
    over the returned cache with a new turn for both rows. Row 0's cache holds the padding fed after
    its EOS. With that padding masked, the new turn continues row 0's positions: both generate()s
    record what one uncached forward over the whole masked sequence records. Unmasked, the new turn
    would sit after a gap: refused."""
    model = build("llama3", "qk_sniff")
    out = tmp_path / "out"
    prompt = _ids(5, batch=2, seed=6)
    with qk_attn.session(output=out, sampler="all", example_ids=[0, 1]) as s:
        first = model.generate(
            input_ids=prompt,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([StopRow(0, 8)]),  # row 0 ends with its token at 7
            return_dict_in_generate=True,
        )
        sequences = torch.cat([first.sequences, torch.tensor([[20, 21, 22], [23, 24, 25]])], 1)
        mask = torch.ones_like(sequences)
        if padding_masked:
            mask[0, 8:11] = 0  # the padding generate() fed row 0 after its end
        second = dict(input_ids=sequences, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        if not padding_masked:
            with pytest.raises(
                MisnumberedPositions, match=r"example 0 goes on at position 10 after its previous token at 7"
            ):
                model.generate(past_key_values=first.past_key_values, **second)
            return
        final = model.generate(past_key_values=first.past_key_values, **second)
        s.commit()
    assert (first.sequences[0, 8:] == 0).all() and first.sequences.shape[1] == 11
    mask = torch.cat([mask, torch.ones(2, final.shape[1] - mask.shape[1], dtype=torch.long)], 1)
    with qk_attn.session(sampler="all", example_ids=[0, 1]) as once:
        model(
            input_ids=final[:, :-1], attention_mask=mask[:, :-1], position_ids=(mask[:, :-1].cumsum(1) - 1).clamp(min=0)
        )
    want = {key: vector for key, vector in rows_by_key(once.table()).items()}
    got = {key[:5]: vector for key, vector in all_rows(out).items()}  # (example, layer, head, kind, position)
    assert_same_rows(got, want, exact=False)
    lengths = qk_attn.load_examples(out).select(["example_id", "valid_length"]).to_pydict()
    assert lengths == {"example_id": [0, 1], "valid_length": [8 + 3 + 3, 14 + 3]}
    assert verify_dataset(out, log=lambda *_: None) == []


@pytest.mark.parametrize("into", ["memory", "parquet"])
def test_on_a_device_a_misnumbered_step_that_keeps_nothing_is_refused_by_the_sink(tmp_path, monkeypatch, into):
    """On a GPU positions are checked by the sink with the rows. A decode step that skips positions
    and of which the sampler keeps nothing has no rows: its empty calls carry the check (through the
    host copy of its positions, support/device_path.py)."""
    from qk_attn.capture import forward as forward_module

    monkeypatch.setattr(forward_module, "builds_on_host", lambda device: False)
    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(7, 4))
    settings = dict(sampler="log_uniform", min_bucket_size=4, base_rate=1e-9, example_ids=[0, 1])
    with pytest.raises(MisnumberedPositions, match=r"examples \[1\]: the positions RoPE used"):
        with qk_attn.session(**settings, **({"output": tmp_path / "out"} if into == "parquet" else {})) as s:
            cache = DynamicCache(config=model.config)
            model(**batch, **cache_kw(cache))
            mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            model(input_ids=torch.tensor([[40], [50]]), attention_mask=mask, **cache_kw(cache))
            s.table() if into == "memory" else s.flush()


@pytest.mark.parametrize("into", ["memory", "parquet"])
def test_on_a_device_positions_outside_int32_are_refused_by_the_sink(tmp_path, monkeypatch, into):
    from qk_attn.capture import forward as forward_module

    monkeypatch.setattr(forward_module, "builds_on_host", lambda device: False)
    model = build("llama3", "qk_sniff")
    with pytest.raises(MisnumberedPositions, match=r"examples \[0\]: the positions RoPE used"):
        with qk_attn.session(sampler="all", **({"output": tmp_path / "out"} if into == "parquet" else {})) as s:
            model(input_ids=_ids(8), position_ids=torch.arange(-4, 4)[None], use_cache=False)
            s.table() if into == "memory" else s.flush()


@pytest.mark.parametrize("sampler", ["log_uniform", "all"])
def test_padding_at_any_position_in_a_short_forward_records_what_padding_at_position_one_does(sampler):
    """A forward of a few tokens decides from its sequence's window of positions; padding's own
    position_ids (any value: they are masked) must neither place the window nor stop the decision.
    Chunks of 3 and 2 tokens over a cache, the second row's first chunk holding two pads and a token,
    with pads at 500 (once a TypeError inside the forward), record what pads at position 1 record."""
    model = build("llama3", "qk_sniff")
    batch = padded_batch("left", lengths=(5, 3))
    tables = {}
    for pad_position in (1, 500, -700):
        positions = batch["position_ids"].masked_fill(batch["attention_mask"] == 0, pad_position)
        with qk_attn.session(sampler=sampler, min_bucket_size=4, rope="pre", vector_dtype="float16") as s:
            s.begin([0, 1])
            cache = DynamicCache(config=model.config)
            for start, end in ((0, 3), (3, 5)):
                model(
                    input_ids=batch["input_ids"][:, start:end],
                    attention_mask=batch["attention_mask"][:, :end],
                    position_ids=positions[:, start:end],
                    **cache_kw(cache),
                )
        tables[pad_position] = rows_by_key(s.table())
    assert {key[4] for key in tables[1]} == set(range(5))
    for pad_position in (500, -700):
        assert tables[pad_position].keys() == tables[1].keys()
        assert all((tables[pad_position][key] == vector).all() for key, vector in tables[1].items())


# ---- a 2-D mask of another length than the cache's tokens plus the new ones ------------------------


@pytest.mark.parametrize(
    "case",
    [
        "longer, zeros after",
        "longer, a pad inside",
        "shorter prefill",
        "decode step not extended",
        "static, full length",
    ],
)
def test_a_mask_of_another_length_than_the_keys_is_refused_and_the_session_goes_on(case):
    """transformers reads the first columns it needs and pads a short mask with 0, so a mask of another
    length than cache + new tokens gave the new tokens' validity from the wrong columns: a committed
    example missing real tokens, a pad recorded as a token, a decode step's masked token recorded, or
    (shorter than the input) a bare numpy error. Refused in one line instead; the next forward is recorded."""
    model = build("llama3", "qk_sniff")
    ids = _ids(5)
    cache = DynamicCache()
    mask, prefill = None, ids
    if case == "longer, zeros after":
        mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    elif case == "longer, a pad inside":
        mask = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1]])
    elif case == "shorter prefill":
        mask = torch.tensor([[1, 1, 1]])
    elif case == "static, full length":
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=16)
        mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 11)], 1).long()  # allocated for the whole cache
    with qk_attn.session(sampler="all", capture="k", layers="0") as s:
        if case == "decode step not extended":  # a hand-written loop that passes the prompt's mask again
            s.begin([0])
            model(input_ids=ids, attention_mask=torch.ones(1, 5, dtype=torch.long), **cache_kw(cache))
            prefill, mask = _ids(1, seed=4), torch.ones(1, 5, dtype=torch.long)
        with pytest.raises(CaptureError, match=r"^qk_sniff: the 2-D attention_mask has \d+ columns, but"):
            model(input_ids=prefill, attention_mask=mask, **cache_kw(cache))
        s.begin([1])
        model(input_ids=ids, attention_mask=torch.ones(1, 5, dtype=torch.long))
    table = s.table().to_pydict()
    assert set(table["example_id"]) == {1} and sorted(set(table["position"])) == list(range(5))


@pytest.mark.parametrize(("batch", "mask_rows"), [(1, 2), (2, 1), (1, 3)])
def test_a_mask_with_another_number_of_rows_than_the_batch_is_refused_and_the_session_goes_on(batch, mask_rows):
    """sdpa broadcasts a 2-D mask of another number of rows (or reads its first); capture read per-row
    validity from it and failed with a bare reshape error. Refused in one line; the next forward is recorded."""
    model = build("llama3", "qk_sniff")
    ids = _ids(5, batch)
    with qk_attn.session(sampler="all", capture="k", layers="0") as s:
        with pytest.raises(CaptureError, match=rf"^qk_sniff: the 2-D attention_mask has {mask_rows} rows for a batch"):
            model(input_ids=ids, attention_mask=torch.ones(mask_rows, 5, dtype=torch.long))
        s.begin([1])
        model(input_ids=_ids(5), attention_mask=torch.ones(1, 5, dtype=torch.long))
    table = s.table().to_pydict()
    assert set(table["example_id"]) == {1} and sorted(set(table["position"])) == list(range(5))


def _bart_lm():
    from transformers import BartConfig, BartForCausalLM

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=VOCAB, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
        encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, max_position_embeddings=64,
        is_decoder=True, is_encoder_decoder=False, attn_implementation="qk_sniff",
    )  # fmt: skip
    return BartForCausalLM(config).eval()


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_model_that_ignores_the_position_ids_passed_to_it_is_refused_where_they_differ(side):
    """BART-style causal LMs take position_ids through **kwargs, hand them to their layers and number
    tokens themselves (0, 1, ... along the padded row). Rows were keyed by the position_ids passed:
    wrong ones under left padding. Right padding numbers the real tokens alike: recorded."""
    model = _bart_lm()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    if side == "right":
        mask = mask.flip(-1)
    ids = _ids(6, batch=2).masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with qk_attn.session(sampler="all") as s:
        if side == "left":
            with pytest.raises(CaptureError, match="got other position_ids than its forward numbered"):
                model(input_ids=ids, attention_mask=mask, position_ids=positions)
        else:
            model(input_ids=ids, attention_mask=mask, position_ids=positions)
        s.begin([7, 8])
        model(input_ids=ids, attention_mask=mask)  # without them: the positions the model used
    got = rows_by_key(s.table())
    used = {7: list(range(2, 6)) if side == "left" else list(range(4)), 8: list(range(6))}
    for example, want in used.items():
        assert sorted({key[4] for key in got if key[0] == example}) == want
    if side == "right":
        assert sorted({key[4] for key in got if key[0] == 0}) == list(range(4))


def test_position_ids_of_another_length_than_the_tokens_are_refused_in_one_line():
    """A BART-style model takes any position_ids through **kwargs (its own numbering runs regardless):
    one longer than the input raised a numpy broadcast error inside the forward."""
    model = _bart_lm()
    with qk_attn.session(sampler="all"):
        with pytest.raises(CaptureError, match="got position_ids for 8 tokens in a forward of 7 new tokens"):
            model(input_ids=_ids(7), position_ids=torch.arange(8)[None])


def _lm_renaming_position_ids(kind: str):
    """Decoders whose forward binds `position_ids` anew after it built its mask: BART-style ones to their
    position embeddings (a float tensor), BioGPT to the positions it numbers its tokens with."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "biogpt":
        config = tf.BioGptConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64)  # fmt: skip
        return tf.BioGptForCausalLM(config).eval()
    names = {"marian": "Marian", "mbart": "MBart", "blenderbot": "Blenderbot", "blenderbot_small": "BlenderbotSmall"}
    config = getattr(tf, f"{names[kind]}Config")(
        vocab_size=VOCAB, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
        encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, max_position_embeddings=64,
        is_decoder=True, is_encoder_decoder=False, pad_token_id=0,
    )  # fmt: skip
    return getattr(tf, f"{names[kind]}ForCausalLM")(config).eval()


@pytest.mark.parametrize("kind", ["marian", "mbart", "blenderbot", "blenderbot_small", "biogpt"])
def test_a_forward_that_binds_position_ids_anew_after_its_mask_is_recorded_at_the_positions_it_used(kind):
    """A forward's `position_ids` is read again at its first recorded call (a release that numbers tokens
    anew after the mask is followed). A name reused for position embeddings (BART-style decoders), or set
    to the positions the forward numbers its tokens with (BioGPT), was refused as renumbering: recorded,
    as the same call given those positions records them."""
    model = _lm_renaming_position_ids(kind)
    model.set_attn_implementation("qk_sniff")
    ids = _ids(7)
    with qk_attn.session(sampler="all") as own:
        model(input_ids=ids)
    with qk_attn.session(sampler="all") as given:
        model(input_ids=ids, position_ids=torch.arange(7)[None])
    table = own.table()
    assert table.num_rows == 2 * 8 * 7 and sorted(set(table.column("position").to_pylist())) == list(range(7))
    assert table.equals(given.table())


def test_positions_just_past_int32_lead_with_their_range():
    """position_ids starting at 2**31 - 3 count up by one: only the range refuses them. The message led with
    "do not count up by one ... or leave 0 to 2**31 - 1" and suggested packed documents and right padding."""
    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="all", example_ids=[42]):
        with pytest.raises(MisnumberedPositions) as error:
            model(input_ids=_ids(6), position_ids=torch.arange(2**31 - 3, 2**31 + 3)[None], use_cache=False)
    message = str(error.value)
    assert message.startswith(
        "qk_sniff: examples [42]: example 42 is at positions 2147483645 to 2147483650, beyond the int32 position "
        "column's 2**31 - 1; "
    ), message
    assert "count up by one" not in message and "packed" not in message and "padding" not in message
    assert "position_ids from 0 to 2**31 - 1" in message


def test_a_prompt_fed_again_over_its_own_cache_is_told_so():
    """generate(input_ids=prompt, cache=cache) over a cache that holds the prompt feeds it again from position 0:
    refused (rows would repeat positions), and the message names that cause, not only packing or padding."""
    model = build("llama3", "qk_sniff")
    prompt = _ids(9, batch=1, seed=2)
    with qk_attn.session(sampler="all"):
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, **cache_kw(cache))
        with pytest.raises(MisnumberedPositions, match=r"goes on at position 0 .*a prompt fed again over a cache"):
            model(input_ids=prompt, position_ids=torch.arange(9)[None], **cache_kw(cache))  # (as generate() does)
