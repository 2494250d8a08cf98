"""Shared fixtures for the offline infrastructure checks: parsed Terraform, the Dockerfile,
cloudbuild.yaml and the rendered kustomize output.

Nothing here reaches Google Cloud or a cluster; the tools these checks need (terraform,
kubectl's built-in kustomize) come with the machine, and each test skips with a reason
where one is missing.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = ROOT / "infra" / "terraform"
K8S_DIR = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CLOUDBUILD = ROOT / "cloudbuild.yaml"
DOCKER_STEPS = ROOT / "scripts" / "docker_steps.sh"

# What kubectl kustomize renders: the base, and each overlay.
KUSTOMIZATIONS = ("base", "overlays/pvc-models", "overlays/model-mirror")


# --- Terraform ----------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"^\$\{(.*)\}$", re.S)


def expr(value) -> str:
    """A parsed HCL value as the expression text it was written as: `${var.x}` -> `var.x`."""
    if isinstance(value, str):
        match = _INTERPOLATION.match(value)
        return match.group(1) if match else value
    return value


def one(blocks) -> dict:
    """A nested block that may appear once (python-hcl2 gives a list of one)."""
    assert isinstance(blocks, list) and len(blocks) == 1, f"expected one block, got {blocks!r}"
    return blocks[0]


@dataclasses.dataclass
class Terraform:
    """The root module, parsed: `resources[type][name]` is the body of that block."""

    resources: dict[str, dict[str, dict]]
    data: dict[str, dict[str, dict]]
    variables: dict[str, dict]
    locals: dict[str, object]
    outputs: dict[str, dict]
    checks: dict[str, dict]
    terraform: list[dict]
    text: dict[str, str]  # file name -> source
    modules: dict[str, dict] = dataclasses.field(default_factory=dict)  # module calls

    def resource(self, type_: str, name: str) -> dict:
        assert name in self.resources.get(type_, {}), f"no resource {type_}.{name}"
        return self.resources[type_][name]

    def all_resources(self):
        for type_, named in self.resources.items():
            for name, body in named.items():
                yield type_, name, body

    def default(self, variable: str):
        return self.variables[variable].get("default")


def _unquote(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


@pytest.fixture(scope="session")
def terraform() -> Terraform:
    return parse_terraform(TERRAFORM_DIR)


def parse_terraform(directory: Path) -> Terraform:
    """A Terraform module's .tf files (not its sub-modules'), parsed."""
    import hcl2
    from hcl2 import SerializationOptions

    options = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    model = Terraform({}, {}, {}, {}, {}, {}, [], {})
    for path in sorted(directory.glob("*.tf")):
        text = path.read_text()
        model.text[path.name] = text
        parsed = hcl2.loads(text, serialization_options=options)
        for block in parsed.get("resource", []):
            for type_, named in block.items():
                for name, body in named.items():
                    model.resources.setdefault(_unquote(type_), {})[_unquote(name)] = body
        for block in parsed.get("data", []):
            for type_, named in block.items():
                for name, body in named.items():
                    model.data.setdefault(_unquote(type_), {})[_unquote(name)] = body
        for block in parsed.get("variable", []):
            model.variables.update({_unquote(k): v for k, v in block.items()})
        for block in parsed.get("locals", []):
            model.locals.update(block)
        for block in parsed.get("output", []):
            model.outputs.update({_unquote(k): v for k, v in block.items()})
        for block in parsed.get("check", []):
            model.checks.update({_unquote(k): v for k, v in block.items()})
        for block in parsed.get("module", []):
            model.modules.update({_unquote(k): v for k, v in block.items()})
        model.terraform += parsed.get("terraform", [])
    return model


# --- Dockerfile ---------------------------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined
    line: int


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction]


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Instructions (comments dropped, `\\` continuations joined) and the stages they form."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, words[0], []))
        elif stages:
            stages[-1].instructions.append(instruction)
    return instructions, stages


def copy_sources(instruction: Instruction) -> tuple[list[str], str, dict[str, str]]:
    """A COPY's sources, destination and flags (`--from=x` -> {"from": "x"})."""
    words = shlex.split(instruction.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return words[:-1], words[-1], flags


@pytest.fixture(scope="session")
def dockerfile():
    return parse_dockerfile(DOCKERFILE.read_text())


# --- cloudbuild.yaml ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def cloudbuild() -> dict:
    return yaml.safe_load(CLOUDBUILD.read_text())


# --- kustomize ----------------------------------------------------------------------------


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """kustomization path (relative to infra/k8s) -> the documents it renders."""
    command = kustomize_command()
    if command is None:
        pytest.skip("needs kubectl (its built-in kustomize) or kustomize on PATH")
    out = {}
    for kustomization in KUSTOMIZATIONS:
        result = subprocess.run(
            [*command, str(K8S_DIR / kustomization)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"kustomize {kustomization} failed:\n{result.stderr}"
        out[kustomization] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def by_kind(documents: list[dict], kind: str) -> list[dict]:
    return [doc for doc in documents if doc.get("kind") == kind]


def strings_in(value):
    """Every string inside a parsed document (dicts, lists), keys included."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, str):
        yield value


def operation_names() -> tuple[str, ...]:
    from image.operations import OPERATION_NAMES

    return tuple(OPERATION_NAMES)
