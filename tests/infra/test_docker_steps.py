"""The Dockerfile's steps, run for real without Docker (CI has no engine).

test_dockerfile_steps_run reads the Dockerfile and does what a build would, stage by stage,
into a temporary root: COPY from the build context, ARG and ENV, and every RUN line as
written (paths like /src and /opt/imagen moved under the root). Two build arguments
differ: MODEL_SOURCE=tiny (random-weight models; no Hub, no token) and an empty
TORCH_INDEX_URL (torch from this machine's CPU wheel instead of the CUDA index). The new
virtual environment sees the packages already in this one (a .pth file), so `deps` finds
them installed rather than downloading gigabytes; `app` really builds and installs the
project, `models` really runs `imagen models pull --tiny` and `imagen models verify`, and
the runtime stage's `imagen models verify` runs offline against the result.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.infra.conftest import DOCKER_STEPS, DOCKERFILE, ROOT, copy_sources, operation_names, parse_dockerfile

BUILD_ARGS = {"MODEL_SOURCE": "tiny", "TORCH_INDEX_URL": ""}

# RUN lines not run here, each with why; any other RUN line is run.
SKIPPED_RUNS = {
    # and creates the image's runtime user, which would change this machine
    "apt-get ": "installs the image's system Python and C compiler; this machine has its own",
}

# Absolute paths of the image that the steps use, moved under the temporary root.
_IMAGE_PATHS = re.compile(r"(?<![\w./-])/(src|models|opt/imagen|usr/local/bin)(?=[/\s:'\"]|$)")
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand(value: str, env: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def _base_python() -> str:
    return getattr(sys, "_base_executable", sys.executable)


def _prepare_root(root: Path, shims: Path) -> None:
    # The image's python3.12 is this machine's interpreter here.
    shims.mkdir(parents=True)
    shim = shims / "python3.12"
    shim.write_text(f'#!/bin/sh\nexec "{_base_python()}" "$@"\n')
    shim.chmod(0o755)
    # The venv the `venv` step creates (again, for real) over this one, which already sees
    # this environment's packages after its own.
    venv = root / "opt" / "imagen"
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (venv / "lib" / version / "site-packages" / "zz_test_reuse_installed.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )


def _run(command: str, env: dict[str, str], cwd: Path, log: list[str]) -> None:
    log.append(f"$ {command}")
    result = subprocess.run(
        ["/bin/sh", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    log.append(result.stdout[-3000:] + result.stderr[-3000:])
    assert result.returncode == 0, "\n".join(log)


@pytest.mark.timeout(600)
def test_dockerfile_steps_run(tmp_path):
    root, shims = tmp_path / "root", tmp_path / "shims"
    _prepare_root(root, shims)
    lock_before = (ROOT / "image" / "models.lock.json").read_bytes()

    def here(text: str) -> str:
        return _IMAGE_PATHS.sub(lambda m: f"{root}/{m.group(1)}", text)

    host = {
        key: value for key, value in os.environ.items()
        if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "MODEL_CACHE_DIR", "IMAGEN_OPERATIONS")
        and not key.startswith(("HF_", "IMAGEN_"))
    }
    host["HF_HOME"] = str(tmp_path / "hf-home")
    base_path = f"{shims}:{os.environ['PATH']}"

    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    stage_env: dict[str, dict[str, str]] = {}
    ran, skipped, log = [], set(), []
    for stage in stages:
        env = dict(stage_env.get(stage.base, {"PATH": base_path}))
        args: dict[str, str] = {}
        for instruction in stage.instructions:
            keyword, text = instruction.keyword, instruction.args
            if keyword == "ARG":
                key, _, default = text.partition("=")
                args[key] = BUILD_ARGS.get(key, default)
            elif keyword == "ENV":
                for pair in shlex.split(text):
                    key, _, value = pair.partition("=")
                    env[key] = here(_expand(value, {**args, **env}))
            elif keyword == "COPY":
                sources, destination, flags = copy_sources(instruction)
                if "from" in flags:
                    # One root for every stage: what another stage made is already there.
                    for source in sources:
                        assert Path(here(source)).exists(), f"COPY --from={flags['from']} {source}: missing"
                    continue
                for source in sources:
                    target = Path(here(destination))
                    if destination.endswith("/"):  # into the folder, as Docker does
                        target = target / Path(source).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if (ROOT / source).is_dir():
                        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")  # .dockerignore
                        shutil.copytree(ROOT / source, target, ignore=ignore)
                    else:
                        shutil.copy2(ROOT / source, target)
            elif keyword == "RUN":
                command = re.sub(r"^(--\S+\s+)+", "", text)  # RUN --mount=... flags
                reason = next((why for prefix, why in SKIPPED_RUNS.items() if command.startswith(prefix)), None)
                if reason:
                    skipped.add(command.split()[0])
                    continue
                # WORKDIR is / in every stage: the root, here.
                _run(here(command), {**host, **args, **env}, root, log)
                ran.append((stage.name, command))
        stage_env[stage.name] = env

    assert skipped == {prefix.strip() for prefix in SKIPPED_RUNS}, "a skipped RUN line is gone: update SKIPPED_RUNS"
    assert [name for name, _ in ran] == ["deps", "app", "models", "runtime"]

    # What the image would hold: the project installed in its venv (not this checkout)...
    python = root / "opt" / "imagen" / "bin" / "python"
    where = subprocess.run(
        [str(python), "-c", "import image, handlers; print(image.__file__); print(handlers.__file__)"],
        capture_output=True, text=True, timeout=60, env={**host, "PATH": base_path}, cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(root)) for line in where.stdout.split()), where.stdout
    # ...and the models of every operation, complete.
    caches = sorted(p.name for p in (root / "models").iterdir())
    assert len(caches) == len(operation_names()), caches
    # The build wrote its lock into the image's copy, never into the checkout.
    assert (ROOT / "image" / "models.lock.json").read_bytes() == lock_before


def test_models_step_refuses_an_unknown_source(tmp_path):
    result = subprocess.run(
        [str(DOCKER_STEPS), "models"],
        env={**os.environ, "OPERATIONS": "upscale", "MODEL_SOURCE": "gs://b/p", "MODEL_CACHE_DIR": str(tmp_path),
             "IMAGEN_VENV": str(tmp_path / "venv")},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "MODEL_SOURCE must be hub, tiny or none" in result.stderr


def test_models_step_without_models(tmp_path):
    cache = tmp_path / "models"
    result = subprocess.run(
        [str(DOCKER_STEPS), "models"],
        env={**os.environ, "OPERATIONS": "upscale", "MODEL_SOURCE": "none", "MODEL_CACHE_DIR": str(cache),
             "IMAGEN_VENV": str(tmp_path / "venv")},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert cache.is_dir() and not any(cache.iterdir())
