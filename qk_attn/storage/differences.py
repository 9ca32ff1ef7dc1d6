"""What differs between the capture an output folder holds and a run's settings, as data.

`check_same_capture` (qk_attn.storage.settings) refuses a resume that would mix two captures;
a caller that checks before opening the folder (qk_attn.run.preflight) asks for the same
differences here and words them in its own terms, without reading another module's message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qk_attn.storage.settings import identity


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
    return [SettingDifference(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
