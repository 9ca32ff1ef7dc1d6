"""The version of qk-attn, recorded in every manifest."""

import re

__version__ = "0.1.0"

# The transformers releases the suite ran on: the lowest supported (constraints/lowest.txt) and the lock's
# (constraints/tested.txt); `make test-range` runs the releases between. tests/test_versions.py holds them
# equal to the constraint files, so `make lock` to a new release fails the suite until this is updated.
TRANSFORMERS_TESTED = ("5.17.0", "5.25.0")


def minor_release(version: str) -> tuple[int, ...]:
    """(major, minor): a patch release of a tested minor counts as tested (test-range runs one patch per minor)."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def tested_transformers() -> str:
    """The pip requirement of the tested releases, for messages that say what to install."""
    lowest, newest = TRANSFORMERS_TESTED
    major, minor = minor_release(newest)
    return f"transformers>={lowest},<{major}.{minor + 1}"
