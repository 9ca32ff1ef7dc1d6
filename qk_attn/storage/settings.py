"""Which settings make a capture what it is: the resume check (same capture, same model) and
the public form of recorded values (no local paths published)."""

from __future__ import annotations

import os
from pathlib import Path

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


def check_same_capture(output: Path, manifest: dict, config, source: dict | None) -> None:
    """Refuse to mix two different captures in one folder; the message names every difference."""
    old = identity(manifest.get("config", {}), manifest.get("source") if source else None)
    new = identity(config.to_dict(), source if manifest.get("source") else None)
    diffs = [f"  {k}: {old.get(k)!r} in {output}, {new.get(k)!r} now" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise ValueError(
            f"{output} already holds a qk-sniff capture with different settings:\n" + "\n".join(diffs) + "\n"
            "Re-run with the same settings to resume it, choose another output directory, or pass overwrite=True "
            "(run config: output.overwrite: true) to delete the existing capture and start over."
        )


def check_same_model(output: Path, manifest: dict, model: dict, plan: dict) -> None:
    """Refuse rows of another model (or another shape) than OUT already holds."""
    old = manifest.get("model")
    if not old:
        return
    # A commit hash identifies the weights; without one on both sides, the name has to do.
    both = old.get("revision") and model["revision"]
    if (old["revision"] != model["revision"]) if both else (old.get("id") != model["id"]):
        raise ValueError(
            f"{output} holds captures of model {old.get('id')!r} (revision {old.get('revision')}); "
            f"this run uses {model['id']!r} (revision {model['revision']}). Use another output directory "
            "or overwrite=True to start over."
        )
    shape = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
    old_plan = manifest.get("plan") or {}
    if any(old_plan.get(k) != plan[k] for k in shape if k in old_plan):
        raise ValueError(
            f"{output} holds captures of a model shaped {[old_plan.get(k) for k in shape]} "
            f"({', '.join(shape)}); this model is {[plan[k] for k in shape]}"
        )
