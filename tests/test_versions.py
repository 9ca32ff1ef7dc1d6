"""The versions pyproject.toml claims are the versions the suite runs with (constraints/)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNTESTED = {"torch", "flash-attn"}  # torch: pinned by the Makefile's TORCH; flash-attn: needs a GPU


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins(lock: str) -> dict[str, str]:
    lines = (REPO / "constraints" / lock).read_text().splitlines()
    return {_name(line): line.split("==")[1] for line in lines if "==" in line}


def _floors() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {_name(r): r.split(">=")[1] for r in requirements if ">=" in r and _name(r) not in UNTESTED}


def test_every_lower_bound_is_the_version_the_lowest_run_installs():
    lowest = _pins("lowest.txt")
    wrong = {name: (floor, lowest.get(name)) for name, floor in _floors().items() if lowest.get(name) != floor}
    assert not wrong, f"pyproject lower bound vs constraints/lowest.txt: {wrong}"


def test_the_lock_pins_every_dependency_within_the_supported_range():
    tested = _pins("tested.txt")
    floors = _floors()
    missing = sorted(set(floors) - set(tested))
    assert not missing, f"not pinned in constraints/tested.txt: {missing}"
    below = {n: (tested[n], f) for n, f in floors.items() if _version(tested[n]) < _version(f)}
    assert not below, f"constraints/tested.txt below pyproject's lower bound: {below}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_the_versions_qk_attn_names_as_tested_are_the_constraint_files():
    """qk-attn warns about a transformers release outside the range its suite ran (TRANSFORMERS_TESTED):
    that range is the lowest run's and the lock's."""
    from qk_attn.version import TRANSFORMERS_TESTED

    assert TRANSFORMERS_TESTED == (_pins("lowest.txt")["transformers"], _pins("tested.txt")["transformers"])


def test_a_transformers_release_outside_the_tested_range_is_named_at_the_first_forward(monkeypatch, caplog):
    """Its facts still decide (checked first); the warning says the models of that release were not run."""
    import torch

    import qk_attn
    from qk_attn.capture import facts
    from support.models import build

    model = build("llama3", "qk_sniff")
    for version, warned in (("5.25.1", False), ("5.99.0", True), ("4.57.6", True)):
        monkeypatch.setattr(facts, "transformers_version", lambda version=version: version)
        facts.require.cache_clear()
        caplog.clear()
        with qk_attn.session(sampler="all"), torch.no_grad():
            model(input_ids=torch.arange(3, 9)[None])
        assert (f"qk-attn: transformers {version} is " in caplog.text) is warned, version
    facts.require.cache_clear()
