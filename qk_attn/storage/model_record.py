"""What a capture's manifest records of its model: which model, weights and dtype its rows came from.

The sink records it at the first captured call (qk_attn.storage.sink.ParquetSink.bind_model); a
resumed capture is refused when the model differs from the one OUT holds
(qk_attn.storage.settings.check_same_model).
"""

from __future__ import annotations

from qk_attn.capture.plan import dtype_name
from qk_attn.storage.settings import local_fingerprint, public_value

UNNAMED = "(no name: a model built from a config in Python)"


def model_record(model_config, plan) -> dict:
    """The manifest's `model` for a model of config `model_config` recorded under head plan `plan`."""
    model = {
        "id": getattr(model_config, "_name_or_path", None) or None,
        "revision": getattr(model_config, "_commit_hash", None),
        # what attention ran in: `.half()` and `.to()` leave config.dtype as it was loaded
        "dtype": plan.shape.dtype or (dtype_name(model_config.dtype) if getattr(model_config, "dtype", None) else None),
        "model_type": getattr(model_config, "model_type", None),
    }
    # A model loaded from a local folder: its config and weight files, so a folder whose weights were
    # replaced (a checkpoint saved again under one path) is another model (settings.local_fingerprint).
    files = local_fingerprint(model["id"], "model")
    if files is not None:
        model["files"] = files
    return model


def model_name(model: dict) -> str:
    """How a card or `inspect` names the recorded model: its public id, or that it had none (`_name_or_path`
    is empty for a model built from a config, not loaded)."""
    return public_value(model.get("id")) or UNNAMED
