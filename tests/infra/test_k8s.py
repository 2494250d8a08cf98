"""infra/k8s: what kustomize renders (base and the overlays), validated against
the Kubernetes schemas shipped in kubernetes-validate (strict: unknown fields fail) and, for
KEDA's custom resources, tests/infra/crd_schemas.py; then the properties the GPU workers
rely on."""

from __future__ import annotations

import re

import jsonschema
import pytest

from handlers.cli.worker import TRANSFER_SECONDS
from tests.infra import crd_schemas
from tests.infra.conftest import K8S_DIR, KUSTOMIZATIONS, ROOT, by_kind, operation_names

# The oldest and a recent Kubernetes minor that GKE runs.
KUBERNETES_VERSIONS = ("1.32", "1.35")


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _container(deployment: dict, name: str = "worker") -> dict:
    return next(c for c in _pod(deployment)["containers"] if c["name"] == name)


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def _workers(documents) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in by_kind(documents, "Deployment")}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_schemas(rendered, kustomization, version):
    import kubernetes_validate

    for document in rendered[kustomization]:
        kind = (document["apiVersion"], document["kind"])
        if kind[0].startswith(("keda.sh/", "monitoring.googleapis.com/")):
            assert kind in crd_schemas.SCHEMAS, f"no schema for {kind}: add it to tests/infra/crd_schemas.py"
            jsonschema.validate(document, crd_schemas.SCHEMAS[kind])
        else:
            kubernetes_validate.validate(document, version, strict=True)


def test_crd_schemas_catch_mistakes(rendered):
    scaled = by_kind(rendered["base"], "ScaledObject")[0]
    broken = {**scaled, "spec": {**scaled["spec"], "minReplicas": 0}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, crd_schemas.SCALED_OBJECT)
    trigger = {**scaled["spec"]["triggers"][0], "metadata": {"subscription": "x"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**scaled, "spec": {**scaled["spec"], "triggers": [trigger]}}, crd_schemas.SCALED_OBJECT)


def test_namespace_enforces_restricted_pod_security(rendered):
    namespace = by_kind(rendered["base"], "Namespace")[0]
    assert namespace["metadata"]["name"] == "imagen"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for document in rendered["base"]:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "imagen", document["metadata"]["name"]


@pytest.mark.parametrize("operation", operation_names())
def test_each_operation_has_a_gpu_worker(rendered, terraform, operation):
    name = f"imagen-{operation}"
    deployment = _workers(rendered["base"])[name]
    pod, container = _pod(deployment), _container(deployment)
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert container["command"] == ["imagen", "worker"]
    assert container["args"][:2] == ["--subscription", "$(IMAGEN_SUBSCRIPTION)"]
    env = _env(container)
    assert env["IMAGEN_SUBSCRIPTION"] == name  # terraform: <name_prefix>-<operation>
    assert terraform.default("name_prefix") == "imagen"
    assert env["IMAGEN_OPERATIONS"] == operation
    # terraform's google_pubsub_topic.dead_letter, which the pool's account may publish to
    assert env["IMAGEN_DEAD_LETTER_TOPIC"] == f"{name}-dead-letter"
    assert re.fullmatch(rf".+/imagen-{operation}:[A-Za-z0-9_.-]+", container["image"]), container["image"]
    # One GPU, on a GPU node of the type terraform (and Cloud Run) use.
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == terraform.default("gpu_type")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # SIGTERM lets the job in hand finish: the grace period outlasts the longest job.
    max_job = int(container["args"][container["args"].index("--max-job-seconds") + 1])
    assert pod["terminationGracePeriodSeconds"] >= max_job + TRANSFER_SECONDS and max_job >= 3600
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    # A set-up that hangs (before the watchdog starts) is restarted, within 30 minutes.
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert 20 * 60 <= startup["periodSeconds"] * startup["failureThreshold"] <= 30 * 60
    assert startup["terminationGracePeriodSeconds"] <= 60  # not the pod's hour: a stuck set-up runs no handler
    assert "livenessProbe" not in container  # a restart mid-job would only redeliver it
    assert {"name": "metrics", "containerPort": 9090} in container["ports"]
    assert pod["serviceAccountName"] == name
    assert pod["automountServiceAccountToken"] is False
    # A rollout waits for a new GPU node, the image and the models: more than the default 600 s.
    assert deployment["spec"]["progressDeadlineSeconds"] >= 1800


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_everything_rendered_is_labelled_as_imagens(rendered, kustomization):
    # `kubectl get all,pvc,jobs -l app.kubernetes.io/part-of=imagen` finds what an overlay adds too.
    for document in rendered[kustomization]:
        labels = document["metadata"].get("labels") or {}
        assert labels.get("app.kubernetes.io/part-of") == "imagen", (document["kind"], document["metadata"]["name"])
        assert labels.get("app.kubernetes.io/managed-by") == "kustomize", document["metadata"]["name"]


@pytest.mark.parametrize("operation", operation_names())
def test_workers_run_as_the_images_non_root_user(rendered, operation):
    deployment = _workers(rendered["base"])[f"imagen-{operation}"]
    pod_security = _pod(deployment)["securityContext"]
    uid = int(re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1))
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == uid
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    security = _container(deployment)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for m in _container(deployment)["volumeMounts"]}
    assert {"/tmp", "/home/imagen"} <= mounts  # the only writable places


@pytest.mark.parametrize("operation", operation_names())
def test_workload_identity(rendered, operation):
    name = f"imagen-{operation}"
    account = next(doc for doc in by_kind(rendered["base"], "ServiceAccount") if doc["metadata"]["name"] == name)
    annotation = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    domain = (K8S_DIR / "base" / "workload-identity.env").read_text().strip().partition("=")[2]
    assert annotation == f"{name}@{domain}"
    assert domain.endswith(".iam.gserviceaccount.com")
    # The replacement's source is local-config: never applied to the cluster.
    assert not [doc for doc in by_kind(rendered["base"], "ConfigMap") if "workload-identity" in doc["metadata"]["name"]]


@pytest.mark.parametrize("operation", operation_names())
def test_keda_scales_each_worker_on_its_subscription(rendered, operation):
    name = f"imagen-{operation}"
    scaled = next(doc for doc in by_kind(rendered["base"], "ScaledObject") if doc["metadata"]["name"] == name)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == name
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "gcp-pubsub"
    assert trigger["metadata"]["subscriptionName"] == name
    # One pod per the messages a worker holds (defaults: one on the GPU, one prefetched): no
    # pod started for a message another pod already holds.
    from handlers.cli.worker import command as worker

    defaults = {p.name: p.default for p in worker.params}
    container = next(c for c in _pod(next(d for d in by_kind(rendered["base"], "Deployment")
                                          if d["metadata"]["name"] == name))["containers"])
    assert not {"--concurrency", "--prefetch"} & set(container.get("args", []))
    assert int(trigger["metadata"]["value"]) == defaults["concurrency"] + defaults["prefetch"]
    auths = {doc["metadata"]["name"]: doc for doc in by_kind(rendered["base"], "TriggerAuthentication")}
    assert auths[trigger["authenticationRef"]["name"]]["spec"]["podIdentity"] == {"provider": "gcp"}


@pytest.mark.parametrize("operation", operation_names())
def test_disruption_budget_covers_exactly_its_workers(rendered, operation):
    name = f"imagen-{operation}"
    budgets = [
        doc for doc in by_kind(rendered["base"], "PodDisruptionBudget") if doc["metadata"]["name"] == name
    ]
    assert len(budgets) == 1
    selector = budgets[0]["spec"]["selector"]["matchLabels"]
    for worker, deployment in _workers(rendered["base"]).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert (selector.items() <= labels.items()) == (worker == name)
    assert budgets[0]["spec"]["maxUnavailable"] == 1


def test_only_the_metrics_port_accepts_connections(rendered):
    policies = by_kind(rendered["base"], "NetworkPolicy")
    default_deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert default_deny and default_deny[0]["spec"]["policyTypes"] == ["Ingress"]
    ports = [port for p in policies for rule in p["spec"].get("ingress", []) for port in rule["ports"]]
    assert ports == [{"protocol": "TCP", "port": 9090}]


def test_every_workers_metrics_are_collected(rendered):
    # The workers served Prometheus metrics that nothing scraped on GKE.
    [monitoring] = by_kind(rendered["base"], "PodMonitoring")
    assert monitoring["metadata"]["namespace"] == "imagen"
    selector = monitoring["spec"]["selector"]["matchLabels"]
    [endpoint] = monitoring["spec"]["endpoints"]
    workers = by_kind(rendered["base"], "Deployment")
    assert len(workers) == len(operation_names())
    for worker in workers:  # each worker's pods, on the port its readiness probe reads
        assert selector.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
        container = _container(worker)
        assert {"name": endpoint["port"], "containerPort": 9090} in container["ports"]
        assert container["readinessProbe"]["httpGet"]["path"] == endpoint["path"] == "/metrics"


def test_worker_environment_follows_design(rendered, terraform):
    from handlers import settings

    (config,) = [d for d in by_kind(rendered["base"], "ConfigMap") if d["metadata"]["name"].startswith("imagen-config")]
    source = settings.__file__
    read = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', open(source).read()))
    for key in config["data"]:
        assert key in read, f"{key} is not read by handlers/settings.py"
        assert key in str(terraform.locals["common_env"]), f"{key}: terraform output k8s_config_env lacks it"
    for deployment in by_kind(rendered["base"], "Deployment"):
        refs = [ref["configMapRef"]["name"] for ref in _container(deployment)["envFrom"]]
        assert refs == [config["metadata"]["name"]]


# --- overlays/pvc-models ------------------------------------------------------------------


def test_pvc_overlay_shares_one_model_volume(rendered):
    documents = rendered["overlays/pvc-models"]
    (claim,) = by_kind(documents, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["spec"]["accessModes"] in (["ReadWriteOnce"], ["ReadOnlyMany"], ["ReadWriteMany"])
    claim_name = claim["metadata"]["name"]
    workers = _workers(documents)
    assert set(workers) == {f"imagen-{op}" for op in operation_names()}
    for name, deployment in workers.items():
        volumes = {v["name"]: v for v in _pod(deployment)["volumes"]}
        mounts = {m["mountPath"]: m for m in _container(deployment)["volumeMounts"]}
        assert mounts["/models"]["readOnly"] is True, name
        volume = volumes[mounts["/models"]["name"]]
        assert volume["persistentVolumeClaim"] == {"claimName": claim_name, "readOnly": True}, name


def test_pvc_overlay_job_pulls_every_model_into_it(rendered):
    documents = rendered["overlays/pvc-models"]
    (job,) = by_kind(documents, "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["imagen", "models", "pull"]
    operations = container["args"][container["args"].index("--operations") + 1]
    assert tuple(operations.split(",")) == operation_names()
    env = _env(container)
    assert env["HF_HUB_OFFLINE"] == "0" and env["MODEL_CACHE_DIR"] == "/models"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts["/models"].get("readOnly")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == "imagen-models"
    # The token is a file from an optional Secret, not an environment variable.
    assert env["HF_TOKEN_PATH"].startswith(mounts["/var/run/secrets/huggingface"]["mountPath"])
    assert "HF_TOKEN" not in env
    assert volumes["hf-token"]["secret"]["optional"] is True
    images = {_container(d)["image"] for d in by_kind(documents, "Deployment")}
    assert container["image"] in images
    assert pod["securityContext"]["runAsNonRoot"] is True
    # The volume binds in its first pod's zone: the Job goes where the workers go.
    for name, deployment in {d["metadata"]["name"]: d for d in by_kind(documents, "Deployment")}.items():
        assert pod["nodeSelector"] == _pod(deployment)["nodeSelector"], name
        assert pod["tolerations"] == _pod(deployment)["tolerations"], name


# --- overlays/model-mirror ----------------------------------------------------------------


def test_mirror_overlay_gives_each_worker_a_volume_to_restore_into(rendered):
    # imagen worker restores IMAGEN_MODEL_MIRROR into MODEL_CACHE_DIR (/models in the image)
    # before loading: a writable volume of the pod's own there, on a read-only root file
    # system, with room for the largest operation's models.
    from handlers.settings import Settings

    assert "model_mirror" in Settings.__dataclass_fields__  # the variable the overlay relies on
    base = _workers(rendered["base"])
    workers = _workers(rendered["overlays/model-mirror"])
    assert set(workers) == set(base)
    for name, deployment in workers.items():
        container = _container(deployment)
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert not mounts["/models"].get("readOnly"), name
        volume = {v["name"]: v for v in _pod(deployment)["volumes"]}[mounts["/models"]["name"]]
        assert volume == {"name": "models", "emptyDir": {"sizeLimit": "16Gi"}}, name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        resources = container["resources"]
        assert resources["limits"]["ephemeral-storage"] == "24Gi"  # the volume's 16Gi and the base's 8Gi
        # Nothing else changes: the same worker as base's.
        assert {k: v for k, v in container.items() if k not in ("volumeMounts", "resources")} == \
            {k: v for k, v in _container(base[name]).items() if k not in ("volumeMounts", "resources")}
