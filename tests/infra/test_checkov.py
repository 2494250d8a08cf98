"""checkov over the Terraform, the rendered Kubernetes manifests and the Dockerfile, with
every failing check explained below.

checkov lives in its own virtual environment (~/.cache/imagen-test-tools/checkov-<version>,
made on first use: about a minute and 300 MB, then reused by every checkout on the machine)
rather than in the test extra: it pins `packaging` and other libraries below what the
project's dependencies use, and ships its own `hcl2` module (bc-python-hcl2), which would
overwrite python-hcl2's. A scan takes about 10 s.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.infra.conftest import DOCKERFILE, KUSTOMIZATIONS, TERRAFORM_DIR

CHECKOV_VERSION = "3.3.30"
_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
TOOL_DIR = _CACHE / "imagen-test-tools" / f"checkov-{CHECKOV_VERSION}"

# Every check that fails on purpose, and why. Any other failing check fails this test, and
# so does an entry here whose check no longer fails (remove it).
EXPLAINED = {
    # --- Terraform
    "CKV_GCP_62": "bucket access logs: Cloud Audit Logs (Data Access) record object access; a "
    "usage-log bucket per bucket adds cost and nothing the audit logs lack",
    "CKV_GCP_78": "bucket versioning: results are replaced on purpose (generation preconditions), "
    "failure reports expire after 30 days and build sources after 7; old versions would only cost",
    "CKV_GCP_83": "Pub/Sub CMEK: Google-managed keys encrypt at rest; customer keys (Cloud KMS) "
    "are an organisation decision this module leaves to its users",
    "CKV_GCP_84": "Artifact Registry CMEK: as for Pub/Sub, Google-managed encryption",
    # --- Kubernetes
    "CKV_K8S_8": "liveness probe: a pull worker busy for up to an hour must not be restarted "
    "mid-job (the job would only be redelivered); the readiness probe gates rollouts",
    "CKV_K8S_11": "CPU limits: a GPU pod has its node to itself; CFS throttling would only slow "
    "decoding and tiling. Memory and the GPU are limited",
    "CKV_K8S_15": "imagePullPolicy Always: tags are commits and immutable in Artifact Registry "
    "(immutable_tags); IfNotPresent saves pulling 6-13 GB images again on every start",
    "CKV_K8S_43": "image digests: immutable commit tags give the same guarantee and stay readable",
    # --- Dockerfile
    "CKV_DOCKER_2": "HEALTHCHECK: Cloud Run and GKE ignore it and use their own probes "
    "(/readyz startup probe, the worker's readiness probe); `imagen worker` serves no /healthz",
}


def _checkov() -> str:
    """checkov from its own virtual environment, installed there on first use."""
    binary, complete = TOOL_DIR / "bin" / "checkov", TOOL_DIR / ".complete"
    if complete.exists():
        return str(binary)
    TOOL_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(TOOL_DIR.parent / "checkov.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run may be installing it
        if not complete.exists():
            # A venv's scripts name its path, so it is built in place; the marker says done.
            shutil.rmtree(TOOL_DIR, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(TOOL_DIR)], check=True, timeout=120)
            install = subprocess.run(
                [str(TOOL_DIR / "bin" / "python"), "-m", "pip", "install", "--quiet", f"checkov=={CHECKOV_VERSION}"],
                capture_output=True, text=True, timeout=900,
            )
            if install.returncode != 0:
                pytest.fail(f"installing checkov failed:\n{install.stderr[-3000:]}")
            complete.touch()
    return str(binary)


@pytest.mark.timeout(1200)
def test_checkov_finds_nothing_unexplained(rendered, tmp_path):
    checkov = _checkov()
    # What is scanned: the Terraform module, the Dockerfile, and each kustomization as
    # kubectl would apply it.
    shutil.copytree(TERRAFORM_DIR, tmp_path / "terraform", ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    shutil.copy2(DOCKERFILE, tmp_path / "Dockerfile")
    (tmp_path / "k8s").mkdir()
    for kustomization in KUSTOMIZATIONS:
        name = kustomization.replace("/", "-") + ".yaml"
        (tmp_path / "k8s" / name).write_text(yaml.safe_dump_all(rendered[kustomization]))
    result = subprocess.run(
        [
            checkov, "--directory", str(tmp_path), "--framework", "terraform", "kubernetes", "dockerfile",
            "--output", "json", "--quiet", "--skip-download", "--compact",
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {report["check_type"] for report in reports} == {"terraform", "kubernetes", "dockerfile"}
    failed = defaultdict(set)
    for report in reports:
        assert report["summary"]["parsing_errors"] == 0, report["check_type"]
        assert report["summary"]["passed"] > 0, report["check_type"]
        for check in report["results"]["failed_checks"]:
            failed[check["check_id"]].add(f"{check['resource']} ({check['file_path']})")
    unexplained = {check: sorted(where) for check, where in failed.items() if check not in EXPLAINED}
    assert not unexplained, "fix these, or explain them in EXPLAINED:\n" + json.dumps(unexplained, indent=1)
    stale = set(EXPLAINED) - set(failed)
    assert not stale, f"these no longer fail: remove them from EXPLAINED: {sorted(stale)}"
