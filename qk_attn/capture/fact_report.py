"""How the facts' verdict is told (qk_attn.capture.facts): the one error naming every broken fact, and the
warning for a transformers release outside the range the suite ran."""

from __future__ import annotations

from qk_attn.errors import TransformersMismatch
from qk_attn.version import TRANSFORMERS_TESTED, __version__, minor_release, tested_transformers


def untested_release(version: str) -> str | None:
    """One line for a transformers release outside the tested range (TRANSFORMERS_TESTED), else None. The
    facts hold (checked before), but what changed in its models was not run by the suite."""
    lowest, newest = TRANSFORMERS_TESTED
    if minor_release(lowest) <= minor_release(version) <= minor_release(newest):
        return None
    side = (
        f"newer than the newest release ({newest})"
        if minor_release(version) > minor_release(newest)
        else (f"older than the lowest release ({lowest})")
    )
    return (
        f"qk-attn: transformers {version} is {side} qk-attn {__version__} was tested with; every fact it relies "
        "on holds (checked), but models changed in that release have not been run by its suite (README: Tested "
        f"versions); to run a tested release: pip install '{tested_transformers()}'"
    )


def mismatch(findings: list) -> TransformersMismatch:
    """One error naming the transformers (and torch) version, every broken fact (facts.Finding) and a
    tested release to install."""
    import torch

    version, lowest = findings[0].transformers, TRANSFORMERS_TESTED[0]
    found = {f.found for f in findings}
    if len(findings) > 2 and len(found) == 1:  # one error behind every check: transformers' import, not its code
        cause = (
            f"every check of it failed with the same error ({_clipped(found.pop())}), which may be its environment's"
        )
    else:
        cause = "; ".join(f"{f.fact}: expected {f.expected}, found {_clipped(f.found)}" for f in findings)
    older = (
        f", older than {lowest}, the lowest release qk-attn supports,"
        if minor_release(version) < minor_release(lowest)
        else ""
    )
    return TransformersMismatch(
        f"qk_sniff: transformers {version}{older} (torch {torch.__version__}) breaks what qk-attn relies on: {cause}"
        f"; install a release qk-attn {__version__} was tested with: pip install '{tested_transformers()}'"
    )


def _clipped(found: str, limit: int = 300) -> str:
    """What a check found, cut to one readable clause (some quote whole tuples of locals)."""
    return found if len(found) <= limit else found[:limit] + " ..."
