"""What qk-attn checks in a model's own modeling file, once per file and process, at the model's
first "qk_sniff" forward (capture on or off): every branch on the attention implementation's name
is one qk_attn.capture.known_branches says how to handle, or has the same value for "qk_sniff" as
for the backends it wraps.

tests/capture/test_transformers_facts.py checks every file of the installed transformers; this
checks the file that runs, so that a release (or remote code) adding a path taken only under
"sdpa" is refused instead of making "qk_sniff" compute something else than its backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

from qk_attn.capture.known_branches import NAME_BRANCHES
from qk_attn.capture.name_branches import alike, file_branches, modeling_name, transformers_root
from qk_attn.errors import CaptureError

_unknown: dict[str, str | None] = {}  # modeling module -> why it is refused, or None


def refuse_unknown_branches(config) -> None:
    """CaptureError (one line) when the modeling file of `config`'s model branches on the name where
    qk-attn does not know how 'qk_sniff' fares. A dict lookup after the file's first forward."""
    modeling = modeling_name(type(config))
    if modeling not in _unknown:
        _unknown[modeling] = _first_unknown(modeling)
    if (why := _unknown[modeling]) is not None:
        raise CaptureError(why)


def _first_unknown(modeling: str) -> str | None:
    source = getattr(sys.modules.get(modeling), "__file__", None)
    if source is None or not source.endswith(".py"):
        return None
    path, root = Path(source), transformers_root()
    relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    for branch, lines in file_branches(path, relative).items():
        if branch not in NAME_BRANCHES and not alike(branch.condition):
            import transformers

            return (
                f"qk_sniff: {relative} line {lines[0]} branches on the attention implementation's name "
                f"({branch.condition}), a branch qk-attn does not know (transformers {transformers.__version__}), "
                "so under 'qk_sniff' the model could compute something else than its backend; load it with its "
                "backend's name to run it unrecorded, or install a transformers version qk-attn supports (see README)"
            )
    return None
