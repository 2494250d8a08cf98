"""cloudbuild.yaml, offline: Cloud Build's substitution rules, the token's path (Secret
Manager -> secretEnv -> BuildKit secret, never a build argument), the tags, and the step
scripts themselves (bash -n and shellcheck after substitution)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.conftest import operation_names, strings_in

# Cloud Build's own substitutions (https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values).
BUILT_INS = {
    "PROJECT_ID", "PROJECT_NUMBER", "BUILD_ID", "LOCATION", "COMMIT_SHA", "SHORT_SHA", "REVISION_ID",
    "BRANCH_NAME", "TAG_NAME", "REF_NAME", "REPO_NAME", "REPO_FULL_NAME", "TRIGGER_NAME",
    "TRIGGER_BUILD_CONFIG_PATH", "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT",
}
SAMPLE = {
    "PROJECT_ID": "my-project", "COMMIT_SHA": "0123456789abcdef0123456789abcdef01234567", "SHORT_SHA": "0123456",
}
_REFERENCE = re.compile(r"\$\$|\$\{(\w+)\}|\$(\w+)")


def _substitute(text: str, values: dict[str, str]) -> str:
    """What Cloud Build does to a field: `$$` -> `$`, `$X`/`${X}` -> its value."""

    def one(match):
        if match.group(0) == "$$":
            return "$"
        return values[match.group(1) or match.group(2)]

    return _REFERENCE.sub(one, text)


def _values(cloudbuild) -> dict[str, str]:
    return {**{name: SAMPLE.get(name, name.lower()) for name in BUILT_INS}, **cloudbuild["substitutions"]}


def test_every_substitution_is_defined_or_escaped(cloudbuild):
    """Cloud Build rejects a build that names an undefined substitution; shell variables
    must be written $$name."""
    defined = set(cloudbuild["substitutions"]) | BUILT_INS
    for field in strings_in({k: v for k, v in cloudbuild.items() if k != "substitutions"}):
        for match in _REFERENCE.finditer(field):
            name = match.group(1) or match.group(2)
            if name:
                assert name in defined, f"${name} is neither a substitution nor escaped as $${name}"
    for name in cloudbuild["substitutions"]:
        assert name.startswith("_"), name


def test_operations_match_the_code(cloudbuild):
    assert tuple(cloudbuild["substitutions"]["_OPERATIONS"].split(",")) == operation_names()


def test_builds_with_buildkit_and_the_token_as_a_secret(cloudbuild):
    assert "DOCKER_BUILDKIT=1" in cloudbuild["options"]["env"]
    secrets = cloudbuild["availableSecrets"]["secretManager"]
    assert secrets == [{
        "versionName": "projects/$PROJECT_ID/secrets/${_HF_TOKEN_SECRET}/versions/latest", "env": "HF_TOKEN",
    }]
    build = next(step for step in cloudbuild["steps"] if step["id"] == "build-and-push")
    assert build["secretEnv"] == ["HF_TOKEN"]
    script = build["args"][-1]
    assert "--secret id=hf_token,env=HF_TOKEN" in script
    # The token reaches no build argument, label, tag or log line.
    for line in script.splitlines():
        if "HF_TOKEN" in line:
            assert "--secret id=hf_token,env=HF_TOKEN" in line, line
    for step in cloudbuild["steps"]:
        if step["id"] != "build-and-push":
            assert "secretEnv" not in step
            assert "HF_TOKEN" not in " ".join(step["args"])


def test_images_are_tagged_with_the_commit_and_pushed_to_artifact_registry(cloudbuild):
    script = next(step for step in cloudbuild["steps"] if step["id"] == "build-and-push")["args"][-1]
    assert 'repo="${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}"' in script
    assert '''image="$${repo}/imagen-$(echo "$${pool}" | tr ',' '-')"''' in script
    assert 'commit="$COMMIT_SHA"' in script and 'short="$SHORT_SHA"' in script
    assert 'tag="$${commit}${_TAG_SUFFIX}"' in script
    assert '--tag "$${image}:$${tag}"' in script
    assert '--tag "$${image}:$${short}${_TAG_SUFFIX}"' in script
    assert '--build-arg OPERATIONS="$${pool}"' in script
    assert 'docker push --all-tags "$${image}"' in script


def test_one_image_per_operation_and_per_chain(cloudbuild, tmp_path):
    """The build step itself, run with a docker that records its calls (no Docker engine
    here): imagen-<operation> with that operation's models, then imagen-<chain with hyphens>
    with all of the chain's; an image already pushed is skipped."""
    script = next(step for step in cloudbuild["steps"] if step["id"] == "build-and-push")["args"][-1]
    values = {**_values(cloudbuild), "_OPERATIONS": "upscale,comic", "_CHAINS": "remove-background,upscale comic,upscale"}
    path = tmp_path / "build.sh"
    path.write_text(_substitute(script, values))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text('#!/bin/sh\necho "$*" >> "$DOCKER_CALLS"\n'
                      '[ "$1 $2" = "manifest inspect" ] && case "$3" in\n'
                      '  *imagen-comic:*) exit 0;;\n'
                      '  *"$UNREADABLE"*) echo "unauthorized: authentication failed" >&2; exit 1;;\n'
                      '  *) echo "no such manifest: $3" >&2; exit 1;;\n'
                      'esac\nexit 0\n')
    docker.chmod(0o755)
    calls = tmp_path / "calls"

    def run(unreadable="-none-"):
        return subprocess.run(["bash", str(path)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", "DOCKER_CALLS": str(calls),
                                   "UNREADABLE": unreadable})

    # The registry refusing to say (credentials): stop there, building nothing.
    refused = run(unreadable="imagen-upscale:")
    assert refused.returncode == 1 and "cannot tell whether" in refused.stderr and "unauthorized" in refused.stderr
    assert not [line for line in calls.read_text().splitlines() if line.startswith("build ")]
    calls.unlink()
    result = run()
    assert result.returncode == 0, result.stderr
    builds = [line.split() for line in calls.read_text().splitlines() if line.startswith("build ")]
    built = {
        next(arg.split("=", 1)[1] for arg in args if arg.startswith("OPERATIONS=")):  # the models
        args[args.index("--tag") + 1].split("/")[-1]  # the image
        for args in builds
    }
    repo = "us-central1-docker.pkg.dev/my-project/imagen"
    assert built == {
        "upscale": f"imagen-upscale:{SAMPLE['COMMIT_SHA']}",
        "remove-background,upscale": f"imagen-remove-background-upscale:{SAMPLE['COMMIT_SHA']}",
        "comic,upscale": f"imagen-comic-upscale:{SAMPLE['COMMIT_SHA']}",
    }  # imagen-comic was pushed already
    assert "=== " + f"{repo}/imagen-comic:{SAMPLE['COMMIT_SHA']} exists, skipped" in result.stdout


def test_the_build_deploys_nothing(cloudbuild):
    """Terraform owns what the services run (image_tag, or the tag of its own build): a
    build that rolled them out would be undone by the next apply."""
    assert [step["id"] for step in cloudbuild["steps"]] == ["build-and-push"]
    assert "gcloud run" not in "\n".join(strings_in(cloudbuild))


def _shellcheck() -> str | None:
    path = Path(sys.executable).parent / "shellcheck"
    return str(path) if path.exists() else shutil.which("shellcheck")


@pytest.mark.parametrize("step_id", ["build-and-push"])
def test_step_scripts_are_valid_bash(cloudbuild, step_id, tmp_path):
    step = next(step for step in cloudbuild["steps"] if step["id"] == step_id)
    assert step["entrypoint"] == "bash" and step["args"][0] == "-c"
    script = tmp_path / f"{step_id}.sh"
    script.write_text("#!/usr/bin/env bash\n" + _substitute(step["args"][-1], _values(cloudbuild)))
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    lint = subprocess.run(
        [shellcheck, "--severity", "warning", str(script)], capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout
