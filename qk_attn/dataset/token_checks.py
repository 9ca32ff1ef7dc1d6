"""The token ids of a capture folder, checked for `qk-sniff verify`: rows of one (example, position)
agree on their token, and the tokens match the source documents encoded again.

The dataset layer never loads documents: the caller hands in an `EncodeSource` (the run layer's
qk_attn.run.source.encode_source) or none, and then the second check is skipped with one info line.
Both checks take the (example ids, positions, token ids) that verify gathered per folder, each sorted
by example and position.
"""

from __future__ import annotations

from collections.abc import Callable

from qk_attn.dataset.reader import Dataset

# (manifest, manifest["source"]) -> {example_id: the token ids of its source document}. The run
# layer has one (qk_attn.run.source.encode_source); the dataset layer never loads documents.
EncodeSource = Callable[[dict, dict], dict[int, list[int]]]


def token_id_problems(token_rows: list) -> list[str]:
    """Every row of one (example, position) holds the same token, whatever its layer, head or kind
    (null, as -1, only where the model was given embeddings: then for all of them)."""
    import numpy as np

    if not token_rows:
        return []
    ids, pos, tok = (np.concatenate(parts) for parts in zip(*token_rows))
    order = np.lexsort((tok, pos, ids))
    ids, pos, tok = ids[order], pos[order], tok[order]
    clash = np.flatnonzero((ids[1:] == ids[:-1]) & (pos[1:] == pos[:-1]) & (tok[1:] != tok[:-1]))
    if not clash.size:
        return []
    i = clash[0]
    return [
        f"token_id: {clash.size} (example, position) pairs whose rows disagree on the token, e.g. example "
        f"{ids[i]} position {pos[i]}: {tok[i]} and {tok[i + 1]}"
    ]


def source_token_problems(data: Dataset, token_rows: list, log, encode_source: EncodeSource | None) -> list[str]:
    """`token_id` against the source documents encoded again with the recorded tokenizer and
    settings, where the caller gives `encode_source` and the source dataset and tokenizer are
    available here (else one info line)."""
    import numpy as np

    source = data.manifest.get("source") or {}
    if not token_rows or not source.get("dataset") or not source.get("tokenizer"):
        return []
    if encode_source is None:
        log("info: token ids not checked against the source dataset (no source encoder given)")
        return []
    try:
        encoded = encode_source(data.manifest, source)
    except Exception as error:  # noqa: BLE001 - the source is optional for verify
        log(
            f"info: token ids not checked against the source dataset ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        )
        return []
    starts = data.first_positions()
    checked, wrong, first = 0, 0, None
    for ids, pos, tok in token_rows:  # each sorted by example: compare one example's run at a time
        bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            tokens = encoded.get(int(ids[lo]))
            if tokens is None:
                continue
            index = pos[lo:hi] - starts.get(int(ids[lo]), 0)
            inside = (index >= 0) & (index < len(tokens))
            want = np.full(hi - lo, -2, np.int64)
            want[inside] = np.asarray(tokens, np.int64)[index[inside]]
            bad = np.flatnonzero(want != tok[lo:hi])
            checked += hi - lo
            wrong += bad.size
            if bad.size and first is None:
                i = lo + bad[0]
                first = (int(ids[i]), int(pos[i]), int(tok[i]), int(want[bad[0]]) if inside[bad[0]] else None)
    log(f"checked {checked:,} token ids against {len(encoded)} source documents")
    if not wrong:
        return []
    e, p, got, expected = first
    return [
        f"token_id: {wrong} rows differ from the source documents encoded again, e.g. example {e} position "
        f"{p}: {got}, the tokenizer gives {expected}"
    ]
