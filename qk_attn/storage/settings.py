"""Which settings make a capture what it is: the resume check (same capture, same model) and
the public form of recorded values (no local paths published).

`setting_differences` gives the differences as data; `check_same_capture` words them for the
folder's writers, and a caller that checks before opening the folder (qk_attn.run.output_checks)
words the same differences in its own terms, without reading this module's message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Settings that do not change which rows are recorded or their values: a resumed run may differ in them.
NOT_IDENTITY = ("output", "backend", "pinned_mb")


SOURCE_NOT_IDENTITY = ("batch_size", "padding_side", "max_samples")


def identity(config: dict, source: dict | None) -> dict:
    out = {k: public_value(v) for k, v in config.items() if k not in NOT_IDENTITY}
    if source:  # a pushed (then pulled) manifest names local files by their last part
        out.update({f"source.{k}": public_value(v) for k, v in source.items() if k not in SOURCE_NOT_IDENTITY})
    return out


def public_value(value):
    """A value fit for publishing: an absolute local path becomes its last part, marked local."""
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return f"{Path(value).name} (local)"
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [public_value(v) for v in value]
    return value


def public_manifest(manifest: dict) -> dict:
    """The manifest as pushed: no absolute local paths (the dataset, model or tokenizer a capture
    was made from locally are named by their last part)."""
    out = dict(manifest)
    for field in ("config", "source", "model", "plan"):
        if out.get(field) is not None:
            out[field] = public_value(out[field])
    return out


@dataclass(frozen=True)
class SettingDifference:
    """One identity setting whose value differs: recorded in the folder (`there`) vs this run (`now`)."""

    setting: str  # a SniffConfig field, or `source.<key>` for the dataset a run reads
    there: Any
    now: Any


def setting_differences(manifest: dict, config, source: dict | None) -> list[SettingDifference]:
    """Every identity setting (see `identity`) that differs between `manifest` and a run of
    `config` (a SniffConfig) over `source`, sorted by name; empty when the run may resume.
    The source is compared only when both sides name one."""
    old = identity(manifest.get("config", {}), manifest.get("source") if source else None)
    new = identity(config.to_dict(), source if manifest.get("source") else None)
    return [
        SettingDifference(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)
    ]


def check_same_capture(output: Path, manifest: dict, config, source: dict | None) -> None:
    """Refuse to mix two different captures in one folder; the message names every difference."""
    differences = setting_differences(manifest, config, source)
    diffs = [f"  {d.setting}: {d.there!r} in {output}, {d.now!r} now" for d in differences]
    if diffs:
        raise ValueError(
            f"{output} already holds a qk-sniff capture with different settings:\n" + "\n".join(diffs) + "\n"
            "Re-run with the same settings to resume it, choose another output directory, or pass overwrite=True "
            "(run config: output.overwrite: true) to delete the existing capture and start over."
        )


MODEL_SHAPE = ("num_layers", "num_heads", "num_kv_heads", "head_dim")


def other_model(manifest: dict, model: dict) -> dict | None:
    """The model `manifest` records when it is not `model` ({id, revision}); None when it is the
    same or none is recorded. A commit hash identifies the weights; without one on both sides,
    the name has to do."""
    old = manifest.get("model")
    if not old:
        return None
    both = old.get("revision") and model.get("revision")
    differs = (old.get("revision") != model.get("revision")) if both else (old.get("id") != model.get("id"))
    return old if differs else None


def shape_differences(manifest: dict, plan: dict) -> list[SettingDifference]:
    """Each of MODEL_SHAPE that `manifest`'s plan records with another value than `plan` has."""
    old_plan = manifest.get("plan") or {}
    return [SettingDifference(k, old_plan[k], plan[k]) for k in MODEL_SHAPE if k in old_plan and old_plan[k] != plan[k]]


def check_same_model(output: Path, manifest: dict, model: dict, plan: dict) -> None:
    """Refuse rows of another model (or another shape) than OUT already holds."""
    old = other_model(manifest, model)
    if old is not None:
        raise ValueError(
            f"{output} holds captures of model {old.get('id')!r} (revision {old.get('revision')}); "
            f"this run uses {model['id']!r} (revision {model['revision']}). Use another output directory "
            "or overwrite=True to start over."
        )
    shape = MODEL_SHAPE
    old_plan = manifest.get("plan") or {}
    if shape_differences(manifest, plan):
        raise ValueError(
            f"{output} holds captures of a model shaped {[old_plan.get(k) for k in shape]} "
            f"({', '.join(shape)}); this model is {[plan[k] for k in shape]}"
        )
