"""The version of qk-attn, recorded in every manifest."""

__version__ = "0.1.0"

# The transformers releases the suite ran on: the lowest supported (constraints/lowest.txt) and the lock's
# (constraints/tested.txt); `make test-range` runs the releases between. tests/test_versions.py holds them
# equal to the constraint files, so `make lock` to a new release fails the suite until this is updated.
TRANSFORMERS_TESTED = ("5.17.0", "5.25.0")


def tested_transformers() -> str:
    """The pip requirement of the tested releases, for messages that say what to install (a patch release
    of the newest tested minor counts as tested, as in capture/facts)."""
    lowest, newest = TRANSFORMERS_TESTED
    major, minor = newest.split(".")[:2]
    return f"transformers>={lowest},<{major}.{int(minor) + 1}"
