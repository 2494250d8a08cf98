"""constraints.txt pins exactly what imagen needs at run time, and this environment has it.

The Dockerfile and the Makefile both install with it, so the image runs the releases CI
tests. A dependency added to pyproject.toml without `make lock` would be unpinned in the
image (and resolved anew by every build): these tests name it.
"""

from __future__ import annotations

import importlib.metadata
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.infra.conftest import ROOT

CONSTRAINTS = ROOT / "constraints.txt"


def _pins() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            [specifier] = requirement.specifier
            assert specifier.operator == "==", line
            pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def _runtime_requirements() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as handle:
        return [Requirement(r) for r in tomllib.load(handle)["project"]["dependencies"]]


def _closure() -> dict[str, Version]:
    """Every distribution the project's runtime requirements reach here, with its version."""
    found: dict[str, Version] = {}
    pending = _runtime_requirements()
    while pending:
        requirement = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = Version(importlib.metadata.version(name))
        pending += [Requirement(r) for r in importlib.metadata.requires(name) or []]
    return found


def test_every_runtime_requirement_is_pinned_within_its_range():
    pins = _pins()
    for requirement in _runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name} {pins[name]} outside pyproject.toml's {requirement}: run `make lock`"
        )


def test_the_pins_are_the_runtime_closure_and_installed_here():
    pins, closure = _pins(), _closure()
    assert sorted(set(closure) - set(pins)) == [], "needed but not pinned: run `make lock`"
    assert sorted(set(pins) - set(closure)) == [], "pinned but needed by nothing: run `make lock`"
    # The venv was installed with the constraints (Makefile), so CI tests the pinned releases;
    # torch is the CPU build here (2.13.0+cpu), the CUDA build in the image, of one release.
    differ = {name: (str(pins[name]), str(version)) for name, version in closure.items()
              if Version(version.public) != pins[name]}
    assert differ == {}, "installed releases differ from constraints.txt (pinned, installed): run `make venv`"
