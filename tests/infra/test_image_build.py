"""infra/terraform/modules/images and scripts/build_images.sh: `terraform apply` tags the
images by what goes into them and runs the Cloud Build build when that changes.

The module needs no provider, so these tests apply it for real with the machine's terraform,
on a copy of the build's inputs. Cloud Build and Secret Manager cannot run here: `gcloud` on
PATH is a recorder that answers as they would (a secret's versions, a build's id and state)
and writes down every call, so the tests check what imagen asks of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.infra.conftest import ROOT, TERRAFORM_DIR

MODULE = TERRAFORM_DIR / "modules" / "images"

FAKE_GCLOUD = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, sys
    from pathlib import Path
    state = Path(os.environ["FAKE_GCLOUD_STATE"])
    args = sys.argv[1:]
    call = {{"args": args, "cwd": os.getcwd()}}
    if args[:3] == ["secrets", "versions", "add"]:
        call["stdin"] = sys.stdin.read()
        (state / "latest").write_text(call["stdin"])
        (state / "latest_state").write_text("ENABLED")
    with (state / "calls.jsonl").open("a") as calls:
        calls.write(json.dumps(call) + "\\n")

    def take(name, default):
        # The next line of a file of answers, one per call.
        path = state / name
        lines = path.read_text().split() if path.exists() else []
        path.write_text("\\n".join(lines[1:]))
        return lines[0] if lines else default

    if args[:4] == ["secrets", "versions", "describe", "latest"]:
        if not (state / "latest").exists():
            sys.exit("ERROR: (gcloud.secrets.versions.describe) NOT_FOUND: Secret Version [latest] not found")
        print((state / "latest_state").read_text() if (state / "latest_state").exists() else "ENABLED")
    elif args[:4] == ["secrets", "versions", "access", "latest"]:
        if (state / "access_denied").exists() or (state / "latest_state").exists() and (state / "latest_state").read_text() != "ENABLED":
            sys.exit("ERROR: (gcloud.secrets.versions.access) PERMISSION_DENIED")
        print((state / "latest").read_text(), end="")  # as gcloud: no newline added
    elif args[:2] == ["builds", "list"]:
        ongoing = state / "ongoing"
        print(ongoing.read_text() if ongoing.exists() else "", end="")
    elif args[:2] == ["builds", "submit"]:
        if take("submits", "OK") == "FAIL":
            sys.exit("ERROR: (gcloud.builds.submit) PERMISSION_DENIED: caller does not have permission to act as service account")
        number = len([line for line in (state / "calls.jsonl").read_text().splitlines() if '"submit"' in line])
        print(f"build-{{number}}\\thttps://console.cloud.google.com/cloud-build/builds/build-{{number}}")
    elif args[:2] == ["builds", "describe"]:
        status = take("statuses", "SUCCESS")
        if status == "UNREADABLE":
            sys.exit("ERROR: (gcloud.builds.describe) There was a problem refreshing your current auth tokens")
        print(status)
    """)


class Project:
    """The build's inputs (a copy of this repository's), the module, and a recording gcloud."""

    def __init__(self, tmp_path: Path):
        self.root = tmp_path / "repo"
        for name in ("Dockerfile", ".dockerignore", "cloudbuild.yaml", "pyproject.toml", "constraints.txt",
                     "README.md"):
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, self.root / name)
        for name in ("scripts/docker_steps.sh", "scripts/build_images.sh"):
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, self.root / name)
        self.write("handlers/app.py", "APP = 1\n")
        self.write("image/ops.py", "OPS = 1\n")
        self.write("image/models.lock.json", "{}\n")

        self.module = tmp_path / "module"
        shutil.copytree(MODULE, self.module)
        self.state = tmp_path / "gcloud"
        self.state.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        gcloud = bin_dir / "gcloud"
        gcloud.write_text(FAKE_GCLOUD)
        gcloud.chmod(0o755)
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(self.home),
            "FAKE_GCLOUD_STATE": str(self.state),
            "BUILD_POLL_SECONDS": "0",
            "BUILD_RETRY_SECONDS": "0",
            "CHECKPOINT_DISABLE": "1",  # no call home to HashiCorp
            "TF_IN_AUTOMATION": "1",
        }
        self.terraform("init", "-input=false", "-backend=false")

    def write(self, name: str, text: str) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def terraform(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [shutil.which("terraform"), f"-chdir={self.module}", *args],
            env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=300,
        )

    def apply(self, build: bool = True, model_source: str = "hub", operations=("upscale", "comic"),
              env: dict | None = None, revision: str = "", chains=(),
              build_region: str = "") -> subprocess.CompletedProcess:
        variables = {
            "build_region": build_region,
            "chains": json.dumps(list(chains)),
            "source_root": str(self.root), "build": str(build).lower(), "project_id": "proj", "revision": revision,
            "region": "us-central1", "repository": "imagen", "model_source": model_source,
            "operations": json.dumps(list(operations)), "hf_token_secret": "imagen-hf-token",
            "build_service_account": "projects/proj/serviceAccounts/imagen-build@proj.iam.gserviceaccount.com",
            "staging_dir": "gs://proj-imagen-build/source",
        }
        flags = [f"-var={name}={value}" for name, value in variables.items()]
        return self.terraform("apply", "-auto-approve", "-input=false", "-no-color", *flags, env=env)

    def tag(self) -> str:
        return json.loads(self.terraform("output", "-json", "tag").stdout)

    def calls(self, *prefix: str) -> list[dict]:
        path = self.state / "calls.jsonl"
        calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [call for call in calls if call["args"][: len(prefix)] == list(prefix)]


@pytest.fixture
def project(tmp_path) -> Project:
    if shutil.which("terraform") is None:
        pytest.skip("terraform is not installed")
    return Project(tmp_path)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _substitutions(call: dict) -> dict[str, str]:
    value = call["args"][call["args"].index("--substitutions") + 1]
    assert value.startswith("^;^")  # _OPERATIONS holds commas, gcloud's default separator
    return dict(item.split("=", 1) for item in value[3:].split(";"))


def test_an_apply_builds_when_the_images_sources_change_and_only_then(project):
    _ok(project.apply(env={"HF_TOKEN": "hf_token"}))
    first = project.tag()
    assert first.startswith("src-") and len(first) == len("src-") + 16
    # What makes a build: a new key here would rebuild every deployment made before it.
    state = json.loads(project.terraform("show", "-json").stdout)
    [build] = state["values"]["root_module"]["resources"]
    assert set(build["values"]["triggers_replace"]) == {"tag", "operations", "registry"}
    [submit] = project.calls("builds", "submit")
    assert submit["cwd"] == str(project.root)  # the build context is the repository root
    assert submit["args"][2:] == [
        ".", "--config", "cloudbuild.yaml", "--project", "proj", "--region", "us-central1",
        "--service-account", "projects/proj/serviceAccounts/imagen-build@proj.iam.gserviceaccount.com",
        "--gcs-source-staging-dir", "gs://proj-imagen-build/source",
        "--substitutions", submit["args"][submit["args"].index("--substitutions") + 1],
        "--async", "--format", "value(id,logUrl)",
    ]
    assert _substitutions(submit) == {
        "_REGION": "us-central1", "_REPOSITORY": "imagen", "_OPERATIONS": "upscale,comic", "_CHAINS": "",
        "_HF_TOKEN_SECRET": "imagen-hf-token", "_MODEL_SOURCE": "hub", "_TAG_SUFFIX": "",
        "COMMIT_SHA": first, "SHORT_SHA": first,
    }

    # Nothing changed, or only what the images do not depend on: no build, same tag.
    _ok(project.apply())
    project.write("README.md", "# edited\n")
    project.write("handlers/__pycache__/app.cpython-312.pyc", "bytecode")
    project.write("image/notes.pyc", "bytecode")
    project.write("docs/deploy.md", "elsewhere\n")
    _ok(project.apply())
    assert project.tag() == first
    assert len(project.calls("builds", "submit")) == 1

    # The code changed: a new tag, built.
    project.write("image/ops.py", "OPS = 2\n")
    _ok(project.apply())
    second = project.tag()
    assert second != first
    submits = project.calls("builds", "submit")
    assert len(submits) == 2 and _substitutions(submits[1])["COMMIT_SHA"] == second

    # Another operation: built (cloudbuild.yaml skips the images already pushed).
    _ok(project.apply(operations=("upscale", "comic", "enhance")))
    assert project.tag() == second
    assert _substitutions(project.calls("builds", "submit")[2])["_OPERATIONS"] == "upscale,comic,enhance"

    # A chain: built too (its image holds its operations' models), as one more image name.
    result = _ok(project.apply(operations=("upscale", "comic", "enhance"), chains=("remove-background,upscale",)))
    assert _substitutions(project.calls("builds", "submit")[3])["_CHAINS"] == "remove-background,upscale"
    assert "imagen-{upscale,comic,enhance,remove-background-upscale}:" in result.stdout
    assert len(project.calls("builds", "submit")) == 4
    _ok(project.apply(build=False, operations=("upscale", "comic", "enhance")))  # and back

    # Each of the other inputs makes a new tag too.
    for name in ("Dockerfile", "pyproject.toml", "constraints.txt", "cloudbuild.yaml", "scripts/docker_steps.sh",
                 "handlers/app.py", "image/models.lock.json", ".dockerignore"):
        before = project.tag()
        project.write(name, (project.root / name).read_text() + "\n# changed\n")
        _ok(project.apply(build=False, operations=("upscale", "comic", "enhance")))
        assert project.tag() != before, name
    assert len(project.calls("builds", "submit")) == 4  # build = false builds nothing

    # The same sources again, for the base image's new release.
    before = project.tag()
    _ok(project.apply(operations=("upscale", "comic", "enhance"), revision="2026-12-01"))
    assert project.tag() != before
    assert len(project.calls("builds", "submit")) == 5


def test_the_build_can_run_in_another_region_than_the_registry(project):
    # A new project may build only in some regions; the images still go to var.region's.
    _ok(project.apply(env={"HF_TOKEN": "hf_token"}, build_region="us-west2"))
    [submit] = project.calls("builds", "submit")
    assert submit["args"][submit["args"].index("--region") + 1] == "us-west2"
    assert _substitutions(submit)["_REGION"] == "us-central1"
    assert all(call["args"][call["args"].index("--region") + 1] == "us-west2"
               for call in project.calls("builds") if "--region" in call["args"])


def test_images_without_models_are_tagged_apart(project):
    _ok(project.apply(build=False))
    baked = project.tag()
    _ok(project.apply(build=False, model_source="none"))
    assert project.tag() == f"{baked}-slim"
    _ok(project.apply(build=False, model_source="tiny"))
    assert project.tag() == f"{baked}-tiny"
    _ok(project.apply(model_source="tiny", env={"HF_TOKEN": "hf_token"}))
    [submit] = project.calls("builds", "submit")
    assert _substitutions(submit)["_MODEL_SOURCE"] == "tiny"
    assert _substitutions(submit)["COMMIT_SHA"] == f"{baked}-tiny"


def test_the_first_build_stores_the_token_from_the_environment(project):
    _ok(project.apply(env={"HF_TOKEN": "hf_from_env"}))
    [add] = project.calls("secrets", "versions", "add")
    assert add["args"][3:] == ["imagen-hf-token", "--project", "proj", "--data-file=-", "--quiet"]
    assert add["stdin"] == "hf_from_env"  # on stdin, as is: never an argument
    assert "hf_from_env" not in json.dumps(project.calls("builds"))


def test_the_token_comes_from_the_hugging_face_login_without_hf_token(project):
    token = project.home / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_from_login\n")
    _ok(project.apply())
    [add] = project.calls("secrets", "versions", "add")
    assert add["stdin"] == "hf_from_login"


def test_a_secret_with_a_version_is_kept_or_replaced_by_a_new_hf_token(project):
    (project.state / "latest").write_text("hf_current")
    _ok(project.apply())  # no HF_TOKEN: the stored one is used
    _ok(project.apply(env={"HF_TOKEN": "hf_current\n"}, revision="again"))  # the same one: nothing to store
    assert project.calls("secrets", "versions", "add") == []
    result = _ok(project.apply(env={"HF_TOKEN": "hf_rotated"}, revision="rotated"))
    [add] = project.calls("secrets", "versions", "add")
    assert add["stdin"] == "hf_rotated"
    assert "stored HF_TOKEN as the new latest version of imagen-hf-token" in result.stdout
    assert "hf_rotated" not in result.stdout + result.stderr
    assert len(project.calls("builds", "submit")) == 3


def test_a_token_that_cannot_be_compared_is_stored(project):
    (project.state / "latest").write_text("hf_old")
    (project.state / "access_denied").write_text("")  # Secret Version Manager without Accessor
    result = _ok(project.apply(env={"HF_TOKEN": "hf_new"}))
    assert "the current one could not be read to compare" in result.stdout
    [add] = project.calls("secrets", "versions", "add")
    assert add["stdin"] == "hf_new"


def test_a_disabled_latest_version_counts_as_none(project):
    (project.state / "latest").write_text("hf_leaked")
    (project.state / "latest_state").write_text("DISABLED")
    result = project.apply()
    assert result.returncode != 0 and "has none enabled" in result.stdout + result.stderr
    assert project.calls("builds", "submit") == []
    _ok(project.apply(env={"HF_TOKEN": "hf_fresh"}))
    assert [add["stdin"] for add in project.calls("secrets", "versions", "add")] == ["hf_fresh"]


def test_no_token_stops_before_the_build_and_says_how_to_give_one(project):
    result = project.apply()
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "no Hugging Face token" in output and "export HF_TOKEN=" in output
    assert "gcloud secrets versions add imagen-hf-token --project proj --data-file=-" in output
    assert project.calls("builds", "submit") == []
    # Given one, the next apply builds.
    _ok(project.apply(env={"HF_TOKEN": "hf_token"}))
    assert len(project.calls("builds", "submit")) == 1


def test_a_failed_build_fails_the_apply_and_the_next_apply_builds_again(project):
    # A quick failure is submitted once more (a first apply's new permissions may not have
    # reached Cloud Build yet); a second one fails the apply with the log's address.
    (project.state / "statuses").write_text("QUEUED\nWORKING\nFAILURE\nFAILURE\n")
    result = project.apply(env={"HF_TOKEN": "hf_token"})
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Cloud Build build-1 ended FAILURE; its log: https://console.cloud.google.com/cloud-build/builds/build-1" in output
    assert "a new project's permissions can take minutes: trying once more in 0 s" in output
    assert "Cloud Build build-2 ended FAILURE" in output
    assert "fix the cause and run terraform apply again" in output
    assert len(project.calls("builds", "submit")) == 2
    assert len(project.calls("builds", "describe")) == 4
    _ok(project.apply())
    assert len(project.calls("builds", "submit")) == 3


def test_a_quick_failure_then_success_is_a_success(project):
    (project.state / "statuses").write_text("FAILURE\nWORKING\nSUCCESS\n")
    result = _ok(project.apply(env={"HF_TOKEN": "hf_token"}))
    assert "images built: us-central1-docker.pkg.dev/proj/imagen/imagen-{upscale,comic}:src-" in result.stdout
    assert len(project.calls("builds", "submit")) == 2


def test_a_refused_submit_is_tried_once_more(project):
    (project.state / "submits").write_text("FAIL\nOK\n")
    result = _ok(project.apply(env={"HF_TOKEN": "hf_token"}))
    assert "act as service account" in result.stderr + result.stdout
    assert "gcloud builds submit failed (above)" in result.stdout + result.stderr
    assert len(project.calls("builds", "submit")) == 2


def test_a_cancelled_build_is_not_submitted_again(project):
    (project.state / "statuses").write_text("CANCELLED\n")
    result = project.apply(env={"HF_TOKEN": "hf_token"})
    assert result.returncode != 0 and "Cloud Build build-1 was cancelled" in result.stdout + result.stderr
    assert len(project.calls("builds", "submit")) == 1


def test_a_build_of_the_tag_still_running_is_waited_for_not_raced(project):
    _ok(project.apply(build=False))
    tag = project.tag()
    (project.state / "ongoing").write_text(f"build-0\tsrc-someotherone\nbuild-7\t{tag}\n")
    (project.state / "statuses").write_text("WORKING\nSUCCESS\n")
    result = _ok(project.apply(env={"HF_TOKEN": "hf_token"}))
    assert f"Cloud Build build-7 is already building {tag}: waiting for it" in result.stdout
    [listed] = project.calls("builds", "list")
    assert listed["args"][2:] == ["--ongoing", "--project", "proj", "--region", "us-central1",
                                  "--format", "value(id,substitutions.COMMIT_SHA)"]
    assert [call["args"][2] for call in project.calls("builds", "describe")][:2] == ["build-7", "build-7"]
    # Then its own build, for what that one did not build (cloudbuild.yaml skips what it pushed).
    assert len(project.calls("builds", "submit")) == 1


def test_a_running_build_whose_state_cannot_be_read_is_not_raced(project):
    _ok(project.apply(build=False))
    (project.state / "ongoing").write_text(f"build-7\t{project.tag()}\n")
    (project.state / "statuses").write_text("UNREADABLE\n" * 10)
    result = project.apply(env={"HF_TOKEN": "hf_token"})
    assert result.returncode != 0
    assert "not starting another build" in result.stdout + result.stderr
    assert project.calls("builds", "submit") == []


def test_what_the_build_uploads_is_what_the_tag_is_a_hash_of(project):
    """.gcloudignore lets through the Docker build context (.dockerignore's allow-list) and the
    build's configuration: the files the tag hashes, and README.md (the package's long
    description, left out of the hash). A local .venv, tfvars or saved plan stays here."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        pytest.skip("gcloud is not installed")
    _ok(project.apply(build=False))
    hashed = set(json.loads(project.terraform("output", "-json", "files").stdout))
    for name in (".venv/lib/x.py", "infra/terraform/terraform.tfvars", "tfplan", "handlers/__pycache__/a.pyc",
                 "scripts/demo.py", "docs/deploy.md"):
        project.write(name, "local only\n")
    shutil.copy(ROOT / ".gcloudignore", project.root / ".gcloudignore")
    listed = subprocess.run(
        [gcloud, "meta", "list-files-for-upload", str(project.root)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "CLOUDSDK_CONFIG": str(project.home / "gcloud"), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
    )
    assert listed.returncode == 0, listed.stderr
    uploaded = set(listed.stdout.split())
    assert uploaded == hashed | {"README.md"}


def test_the_script_is_valid_bash_and_checks_its_environment(tmp_path):
    script = ROOT / "scripts" / "build_images.sh"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    if shellcheck:
        lint = subprocess.run([shellcheck, "--severity", "warning", str(script)],
                              capture_output=True, text=True, timeout=60)
        assert lint.returncode == 0, lint.stdout
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30,
                             env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert missing.returncode == 2
    assert "PROJECT is not set" in missing.stderr
