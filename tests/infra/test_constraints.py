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

from scripts.lock_deps import CUDA_PACKAGES, runtime_requirements, torch_metadata
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
    return [Requirement(r) for r in runtime_requirements()]


def _closure() -> dict[str, Version]:
    """Every distribution the project's runtime requirements reach here, with its version, but
    a CUDA build of torch's own CUDA libraries (not in the lock: each build pins its own)."""
    found: dict[str, Version] = {}
    followed: set[tuple[str, str]] = set()  # (distribution, extra) whose requirements are pending
    pending = [(requirement, "") for requirement in _runtime_requirements()]
    while pending:
        requirement, extra = pending.pop()  # `extra`: the one its requirer was asked for with
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if CUDA_PACKAGES.match(name):
            continue
        found.setdefault(name, Version(importlib.metadata.version(name)))
        for wanted in ("", *requirement.extras):  # google-api-core[grpc]: its grpc requirements too
            if (name, wanted) not in followed:
                followed.add((name, wanted))
                pending += [(Requirement(r), wanted) for r in importlib.metadata.requires(name) or []]
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


def test_the_lock_takes_torchs_requirements_less_its_cuda_libraries(monkeypatch):
    # `make lock` in a venv with a CUDA build of torch (PyPI's, say): its CUDA libraries and
    # Triton, with markers in quotes, must neither break the resolver's TOML nor enter the lock.
    requires = importlib.metadata.requires
    cuda = ['nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"', 'triton==3.7.0; platform_system == "Linux"',
            'cuda-bindings>=13; sys_platform == "linux"']
    monkeypatch.setattr(importlib.metadata, "requires",
                        lambda name: requires(name) + (cuda if name == "torch" else []))
    [entry] = tomllib.loads(torch_metadata(runtime_requirements()))["dependency-metadata"]
    assert entry["name"] == "torch" and entry["requires-dist"]
    assert not [r for r in entry["requires-dist"] if CUDA_PACKAGES.match(canonicalize_name(Requirement(r).name))]
    assert "sympy>=1.13.3" in entry["requires-dist"]
