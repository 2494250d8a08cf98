"""infra/terraform: formatting, and the properties the deployment relies on, read from the
parsed HCL (python-hcl2). The Google provider cannot be downloaded here, so there is no
`terraform validate`; test_references_resolve stands in for its reference checks."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess

import pytest

from tests.infra.conftest import TERRAFORM_DIR, expr, one, operation_names, parse_terraform, strings_in

PRIMITIVE_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}
PUBLIC_MEMBERS = {"allUsers", "allAuthenticatedUsers"}
IAM_MEMBER_TYPES = re.compile(r"^google_.*_iam_member$")
AUTHORITATIVE_IAM = re.compile(r"^google_.*_iam_(binding|policy)$")

# Project-level grants are allowed only for roles that exist at no narrower level; each
# with the reason it is there (see the resource's comment).
PROJECT_ROLES = {
    "roles/eventarc.eventReceiver": "Eventarc requires it of trigger identities",
    "roles/pubsub.publisher": "Cloud Storage agent, for Eventarc's own (unnamed) topic",
    "roles/monitoring.viewer": "KEDA reads subscription backlogs; metric reads are project-wide",
    "roles/logging.logWriter": "the build writes its logs",
    "roles/eventarc.serviceAgent": "Eventarc's own agent, granted by the apply instead of minutes after the API",
    "roles/container.defaultNodeServiceAccount": "GKE nodes write the workers' logs and metrics",
}


def _members(body: dict) -> list[str]:
    member = body.get("member")
    return [member] if member else list(body.get("members", []))


def test_terraform_fmt():
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform is not installed")
    result = subprocess.run(
        [terraform, "fmt", "-check", "-diff", "-recursive", str(TERRAFORM_DIR)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, f"run `terraform fmt -recursive infra/terraform`:\n{result.stdout}"


def test_provider_is_google_6_or_7(terraform):
    google = one(terraform.terraform)["required_providers"][0]["google"]
    assert google["source"] == "hashicorp/google"
    assert google["version"] == ">= 6.41, < 8.0"


def test_operations_match_the_code(terraform):
    assert tuple(terraform.default("operations")) == operation_names()
    validation = expr(one(terraform.variables["operations"]["validation"])["condition"])
    for op in operation_names():
        assert f'"{op}"' in validation


def test_mode_and_delivery_choices(terraform):
    assert terraform.default("mode") == "cloudrun"
    assert terraform.default("delivery") == "push"

    def condition(variable):
        return expr(one(terraform.variables[variable]["validation"])["condition"])

    assert condition("mode") == 'contains(["cloudrun", "gke"], var.mode)'
    assert condition("delivery") == 'contains(["push", "eventarc"], var.delivery)'


# --- Cloud Run ----------------------------------------------------------------------------


def _service(terraform) -> dict:
    return terraform.resource("google_cloud_run_v2_service", "worker")


def test_cloud_run_has_a_gpu(terraform):
    template = one(_service(terraform)["template"])
    assert expr(one(template["node_selector"])["accelerator"]) == "var.gpu_type"
    assert terraform.default("gpu_type") == "nvidia-l4"
    assert "gpu_zonal_redundancy_disabled" in template
    container = one(template["containers"])
    resources = one(container["resources"])
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    # GPU services need CPU always allocated: no throttling between requests.
    assert resources["cpu_idle"] is False


def test_cloud_run_runs_one_job_per_instance_within_push_limits(terraform):
    template = one(_service(terraform)["template"])
    assert template["max_instance_request_concurrency"] == 1
    assert template["timeout"] == "600s"
    scaling = one(template["scaling"])
    assert expr(scaling["min_instance_count"]) == "var.min_instances"
    assert expr(scaling["max_instance_count"]) == "var.max_instances"
    assert terraform.default("min_instances") == 0


def test_cloud_run_startup_probe_waits_for_warm_models(terraform):
    container = one(one(_service(terraform)["template"])["containers"])
    probe = one(container["startup_probe"])
    assert one(probe["http_get"])["path"] == "/readyz"
    period = terraform.locals["startup_probe_period"]
    assert expr(probe["period_seconds"]) == "local.startup_probe_period"
    assert expr(probe["failure_threshold"]) == "ceil(var.startup_timeout_seconds / local.startup_probe_period)"
    window = -(-terraform.default("startup_timeout_seconds") // period) * period
    # Minutes, not the default 240 s: a cold start reads GBs of weights onto the GPU.
    assert 300 <= window <= 1800
    assert one(one(container["liveness_probe"])["http_get"])["path"] == "/healthz"


def test_cloud_run_environment_follows_design(terraform):
    common = terraform.locals["common_env"]
    text = json.dumps(common)
    for name in (
        "GOOGLE_CLOUD_PROJECT", "IMAGEN_DEVICE", "IMAGEN_INPUT_PREFIX", "IMAGEN_OUTPUT_BUCKET",
        "IMAGEN_OUTPUT_PREFIX", "IMAGEN_FAILED_PREFIX", "IMAGEN_ALLOWED_BUCKETS", "IMAGEN_RESULTS_TOPIC",
        "IMAGEN_COMPILE_CACHE",
    ):
        assert name in text, name
    container = one(one(_service(terraform)["template"])["containers"])
    env = expr(one(container["dynamic"])["env"]["for_each"])
    assert "IMAGEN_OPERATIONS = each.key" in env
    # PORT is Cloud Run's to set.
    assert "PORT" not in text and "PORT" not in env
    assert {"port": 8080} == {"port": one(container["ports"])["container_port"]}


def test_cloud_run_is_private(terraform):
    service = _service(terraform)
    assert expr(service["ingress"]) == "var.ingress"
    assert terraform.default("ingress") == "INGRESS_TRAFFIC_INTERNAL_ONLY"
    assert service["invoker_iam_disabled"] is False
    invokers = [
        body for type_, _, body in terraform.all_resources()
        if type_ == "google_cloud_run_v2_service_iam_member" and body["role"] == "roles/run.invoker"
    ]
    assert {expr(body["member"]) for body in invokers} == {
        "google_service_account.push[0].member", "google_service_account.eventarc[0].member",
    }


def test_cloud_run_runs_the_tag_terraform_holds(terraform):
    """One owner of what runs: the image is the tag of this apply's build (or image_tag), so
    an apply with new sources builds and then rolls the services out, and nothing else
    changes the image behind Terraform's back."""
    service = _service(terraform)
    container = one(one(service["template"])["containers"])
    assert container["image"] == "${local.image_repository}/imagen-${local.pool_names[each.key]}:${local.image_tag}"
    ignored = [expr(item) for item in one(service["lifecycle"])["ignore_changes"]]
    assert not [item for item in ignored if "image" in item]
    # The build has pushed a new tag before a revision names it.
    assert "module.images" in [expr(item) for item in service["depends_on"]]
    assert expr(terraform.locals["image_tag"]) == (
        'var.image_tag != "" ? var.image_tag : (var.build_images ? module.images.tag : "")'
    )
    assert expr(terraform.locals["services"]) == 'local.cloudrun && local.image_tag != "" ? local.pools : toset([])'


def test_chains_get_pools_of_their_own(terraform, tmp_path):
    """A chain listed in `chains` is a pool like an operation: its key is the chain as jobs
    spell it, its resource names the chain with hyphens, its service account id fits 30
    characters; the variable takes only chains the engine runs."""
    condition = expr(one(terraform.variables["chains"]["validation"])["condition"])
    samples = {
        "ok": ["remove-background,upscale", "comic,upscale"],
        "long": ["remove-background,upscale,enhance"],
        "single": ["upscale"],
        "repeat": ["upscale,upscale"],
        "unknown": ["remove-background,sharpen"],
        "spaced": ["remove-background, upscale"],
        "twice": ["comic,upscale", "comic,upscale"],
        "four": ["remove-background,upscale,enhance,comic"],
    }
    outputs = {f"valid_{name}": condition.replace("var.chains", json.dumps(chains)) for name, chains in samples.items()}
    outputs["accounts"] = _inline(terraform, "local.pool_accounts")
    outputs["names"] = _inline(terraform, "local.pool_names")
    values = _evaluate(tmp_path, {"operations": ["upscale", "comic"], "name_prefix": "imagen",
                                  "chains": ["remove-background,upscale", "comic,upscale", "remove-background,upscale,enhance"]},
                       outputs)
    assert {name for name in samples if values[f"valid_{name}"]} == {"ok", "long"}
    assert values["names"] == {
        "upscale": "upscale", "comic": "comic", "remove-background,upscale": "remove-background-upscale",
        "comic,upscale": "comic-upscale", "remove-background,upscale,enhance": "remove-background-upscale-enhance",
    }
    accounts = values["accounts"]
    assert accounts["upscale"] == "imagen-upscale" and accounts["comic,upscale"] == "imagen-comic-upscale"
    assert re.fullmatch(r"imagen-chain-[0-9a-f]{8}", accounts["remove-background,upscale"])
    assert len(set(accounts.values())) == len(accounts)
    assert all(re.fullmatch(r"[a-z][a-z0-9-]{4,28}[a-z0-9]", account) for account in accounts.values())
    # Every per-pool resource is keyed by the pool; a chain's service serves its operations.
    for type_, name in (("google_service_account", "worker"), ("google_pubsub_topic", "dead_letter")):
        assert "local.pools" in expr(terraform.resource(type_, name)["for_each"]), (type_, name)
    assert expr(terraform.resource("google_service_account", "worker")["account_id"]) == "local.pool_accounts[each.key]"
    assert expr(terraform.locals["services"]).startswith("local.cloudrun") and "local.pools" in expr(terraform.locals["services"])
    # Unfiltered, every pool would receive every chain's jobs: the plan stops.
    preconditions = [expr(item["condition"]) for item in
                     one(terraform.resource("google_storage_bucket", "input")["lifecycle"])["precondition"]]
    assert "length(var.chains) == 0 || local.filtered" in preconditions
    assert expr(terraform.modules["images"]["chains"]) == "var.chains"


def test_plans_that_would_leave_workers_without_an_image_warn(terraform):
    """A Cloud Run apply with no tag (build_images = false, image_tag forgotten) removes the
    services and their push subscriptions: a legitimate state mid-way, so a warning (a check
    block), not an error."""
    image = one(terraform.checks["cloud_run_has_an_image"]["assert"])
    assert expr(image["condition"]) == '!local.cloudrun || local.image_tag != ""'
    assert "Set image_tag in terraform.tfvars" in image["error_message"]


def test_workers_with_a_model_mirror_restore_it_themselves(terraform, tmp_path):
    # imagen serve and imagen worker restore from IMAGEN_MODEL_MIRROR (their lines JSON, a
    # failure a CRITICAL line): Cloud Run runs the image's own command, with no shell in front
    # of it, restoring into /tmp; GKE's config carries the mirror too (the model-mirror overlay
    # gives the pods a volume at /models), and both read it with their own accounts.
    service = terraform.resource("google_cloud_run_v2_service", "worker")
    container = one(one(service["template"])["containers"])
    assert "command" not in container and "args" not in container
    assert "local.mirror_env" in expr(one(container["dynamic"])["env"]["for_each"])
    assert "local.common_env" in expr(one(container["dynamic"])["env"]["for_each"])
    values = {}
    for name, mirror in (("none", ""), ("mirror", "gs://models-b/imagen")):
        (tmp_path / name).mkdir()
        values[name] = _evaluate(tmp_path / name, {"model_mirror": mirror},
                                 {"env": _inline(terraform, "local.mirror_env")})
    assert values["none"]["env"] == {}
    assert values["mirror"]["env"] == {"MODEL_CACHE_DIR": "/tmp/models"}
    assert 'var.model_mirror != "" ? {IMAGEN_MODEL_MIRROR = var.model_mirror} : {}' in expr(
        terraform.locals["common_env"])
    assert "local.common_env" in expr(terraform.outputs["k8s_config_env"]["value"])
    grant = terraform.resource("google_storage_bucket_iam_member", "worker_reads_model_mirror")
    assert expr(grant["for_each"]) == 'var.model_mirror != "" ? local.pools : toset([])'  # Cloud Run and GKE
    # A mirror where images are uploaded would let uploaders put code before every worker:
    # imagen refuses it at start, the plan before that.
    [condition] = [expr(item["condition"]) for item in one(grant["lifecycle"])["precondition"]
                   if "model_mirror_bucket" in expr(item["condition"])]
    condition = _inline(terraform, condition.replace("local.output_bucket", '"out-b"'))
    cases = {"none": "", "own": "gs://models-b/imagen", "input": "gs://in-b/models", "output": "gs://out-b/m",
             "allowed": "gs://partner-b/models"}
    for name, mirror in cases.items():
        (tmp_path / f"check-{name}").mkdir()
        values[name] = _evaluate(tmp_path / f"check-{name}", {"model_mirror": mirror, "input_bucket": "in-b",
                                                              "allowed_buckets": ["partner-b"]}, {"ok": condition})
    assert {name for name in cases if values[name]["ok"]} == {"none", "own"}


def test_cloud_run_images_built_without_models_need_a_mirror(terraform, tmp_path):
    # Else every instance stops at set-up and the apply waits 45 min for a revision never ready.
    service = terraform.resource("google_cloud_run_v2_service", "worker")
    [condition] = [expr(item["condition"]) for item in one(service["lifecycle"])["precondition"]
                   if "build_model_source" in expr(item["condition"])]
    cases = {"hub": ({}, True), "default": ({"build_model_source": ""}, True),
             "none": ({"build_model_source": "none"}, False),
             "none-mirror": ({"build_model_source": "none", "model_mirror": "gs://m-b/imagen"}, True),
             "none-own-tag": ({"build_model_source": "none", "image_tag": "v1"}, True),
             "none-no-build": ({"build_model_source": "none", "build_images": False}, True)}
    defaults = {name: terraform.default(name) for name in ("build_model_source", "model_mirror", "build_images",
                                                             "image_tag")}
    for name, (variables, ok) in cases.items():
        (tmp_path / name).mkdir()
        assert _evaluate(tmp_path / name, {**defaults, **variables}, {"ok": condition})["ok"] is ok, name


def test_images_are_built_by_the_apply_unless_a_tag_is_given(terraform):
    assert terraform.default("build_images") is True
    assert terraform.default("image_tag") == ""
    images = terraform.modules["images"]
    assert images["source"] == "./modules/images"
    assert expr(images["build"]) == 'var.build_images && var.image_tag == ""'
    assert expr(images["source_root"]) == 'abspath("${path.module}/../..")'
    # Models baked by default; none where the services restore them from a mirror.
    assert expr(images["model_source"]) == (
        'var.build_model_source != "" ? var.build_model_source : (var.model_mirror != "" ? "none" : "hub")'
    )
    # The build's service account may push, read the token and the sources, and log before
    # the build starts.
    assert {expr(item) for item in images["depends_on"]} == {
        "google_artifact_registry_repository_iam_member.build_pushes",
        "google_secret_manager_secret_iam_member.build_reads_token",
        "google_storage_bucket_iam_member.build_reads_sources",
        "google_project_iam_member.build_writes_logs",
    }
    # The id: `name` may be the full resource name, not a path segment of the image.
    assert expr(images["repository"]) == "google_artifact_registry_repository.images.repository_id"
    assert expr(images["hf_token_secret"]) == "google_secret_manager_secret.hf_token.secret_id"
    assert expr(images["build_service_account"]) == "google_service_account.build.id"


def test_the_images_module_is_called_with_what_it_declares(terraform):
    module = parse_terraform(TERRAFORM_DIR / "modules" / "images")
    given = set(terraform.modules["images"]) - {"source", "depends_on", "count", "for_each", "providers"}
    declared = set(module.variables)
    assert given == declared, f"given, not declared: {given - declared}; declared, not given: {declared - given}"
    for text in strings_in([terraform.resources, terraform.locals, terraform.outputs, terraform.modules]):
        for name in re.findall(r"module\.images\.(\w+)", text):
            assert name in module.outputs, f"module.images.{name} is not an output"
    # A module of Terraform's built-ins only: it needs no provider, so its test applies it.
    assert not any(block.get("required_providers") for block in module.terraform)
    assert set(module.resources) == {"terraform_data"}


# --- Pub/Sub ------------------------------------------------------------------------------


def test_subscriptions_filter_by_folder_and_operation_attribute(terraform):
    filters = expr(terraform.locals["subscription_filters"])
    assert 'hasPrefix(attributes.objectId, \\"${var.input_prefix}${op}/\\")' in filters
    assert 'attributes.operation = \\"${op}\\"' in filters
    sub = terraform.resource("google_pubsub_subscription", "jobs")
    assert expr(sub["filter"]) == "var.subscription_filter ? local.subscription_filters[each.key] : null"
    assert terraform.default("subscription_filter") is True
    # Filtered, a pool is told so: what it cannot serve reached no other pool, so it reports it
    # (handlers/settings.py reads "true"). Eventarc triggers are not filtered by folder.
    assert expr(terraform.locals["filtered"]) == "local.pubsub && var.subscription_filter"
    # Unfiltered, every pool receives every job: each is told the deployed operations, and the
    # first one's pool reports a job none serves.
    assert ('local.filtered ? {IMAGEN_FILTERED_SUBSCRIPTION = "true"} : '
            '{IMAGEN_DEPLOYED_OPERATIONS = join(",", var.operations)}') in expr(terraform.locals["common_env"])
    from handlers.settings import Settings
    assert Settings.from_env({"IMAGEN_FILTERED_SUBSCRIPTION": "true"}).filtered_subscription
    assert Settings.from_env({"IMAGEN_OPERATIONS": "comic", "IMAGEN_DEPLOYED_OPERATIONS": "upscale,comic"}
                             ).deployed_operations == ("upscale", "comic")


_FILTER_TOKEN = re.compile(
    r'\s*(?:(?P<prefix>hasPrefix\(attributes\.(?P<pkey>\w+),\s*"(?P<pvalue>[^"]*)"\))'
    r'|(?P<equals>attributes\.(?P<ekey>\w+)\s*=\s*"(?P<evalue>[^"]*)")'
    r'|(?P<has>attributes:(?P<hkey>\w+))|(?P<word>NOT|AND|OR)|(?P<paren>[()]))'
)


def _matches(pubsub_filter: str, attributes: dict[str, str]) -> bool:
    """Pub/Sub's filter language, the part these filters use, evaluated for one message."""
    tokens, position = [], 0
    while position < len(pubsub_filter.rstrip()):
        token = _FILTER_TOKEN.match(pubsub_filter, position)
        assert token, f"cannot read {pubsub_filter[position:]!r}"
        tokens.append(token)
        position = token.end()

    def atom(i):
        token = tokens[i]
        if token["word"] == "NOT":
            value, i = atom(i + 1)
            return not value, i
        if token["paren"] == "(":
            value, i = either(i + 1)
            assert tokens[i]["paren"] == ")"
            return value, i + 1
        if token["prefix"]:
            return attributes.get(token["pkey"], None) is not None and attributes[token["pkey"]].startswith(token["pvalue"]), i + 1
        if token["equals"]:
            return attributes.get(token["ekey"]) == token["evalue"], i + 1
        return token["hkey"] in attributes, i + 1

    def either(i):  # atoms joined by one of AND, OR: Pub/Sub needs parentheses to mix them
        value, i = atom(i)
        joiner = None
        while i < len(tokens) and tokens[i]["word"] in ("AND", "OR"):
            assert joiner in (None, tokens[i]["word"]), f"AND and OR mixed without parentheses: {pubsub_filter}"
            joiner = tokens[i]["word"]
            other, i = atom(i + 1)
            value = (value and other) if joiner == "AND" else (value or other)
        return value, i

    value, end = either(0)
    assert end == len(tokens)
    return value


def _evaluate(tmp_path, variables: dict, outputs: dict[str, str], text: str = "") -> dict:
    """Terraform's own value of each expression in `outputs`, with `variables` at the given
    defaults and `text` (more HCL), in a module of its own (no provider, so no network)."""
    binary = shutil.which("terraform")
    if binary is None:
        pytest.skip("terraform is not installed")
    text += "".join(f'variable "{name}" {{ default = {json.dumps(value)} }}\n' for name, value in variables.items())
    text += "".join(f'output "{name}" {{ value = {expression} }}\n' for name, expression in outputs.items())
    (tmp_path / "main.tf").write_text(text)
    for command in (["init", "-input=false"], ["apply", "-input=false", "-auto-approve"]):
        result = subprocess.run([binary, f"-chdir={tmp_path}", *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run([binary, f"-chdir={tmp_path}", "output", "-json"], capture_output=True, text=True, timeout=60)
    return {name: value["value"] for name, value in json.loads(result.stdout).items()}


def _inline(terraform, text: str) -> str:
    """`text` with every reference to a local value replaced by its expression, over and over,
    so that a module of variables alone (_evaluate) can compute it."""
    pattern = re.compile(r"local\.([a-z0-9_]+)")
    while match := pattern.search(text):
        text = text[: match.start()] + f"({expr(terraform.locals[match.group(1)])})" + text[match.end():]
    return text


@pytest.fixture(scope="module")
def rendered_filters(terraform, tmp_path_factory):
    """The subscription filters as Terraform writes them for the default variables and the
    given chains (cached per chains): (each pool's, the unrouted candidates')."""
    cache = {}

    def render(chains=()):
        if chains not in cache:
            values = _evaluate(
                tmp_path_factory.mktemp("filters"),
                {**{name: terraform.default(name) for name in ("operations", "input_prefix")}, "chains": list(chains)},
                {name: _inline(terraform, expr(terraform.locals[local]))
                 for name, local in (("per_pool", "subscription_filters"), ("unrouted", "unrouted_candidates"))},
            )
            cache[chains] = values["per_pool"], values["unrouted"]
        return cache[chains]

    return render


def test_the_default_unrouted_filters_are_as_before_chains(rendered_filters):
    """A Pub/Sub filter cannot change in place: a different string replaces the subscription
    and what it holds. Deployments without chains keep the exact filters they were made with."""
    _, unrouted = rendered_filters(())
    folders = ("upscale", "enhance", "comic", "remove-background")  # var.operations' order
    assert unrouted == {
        "unrouted": "NOT (" + " OR ".join(f'hasPrefix(attributes.objectId, "incoming/{op}/")' for op in folders)
                    + " OR attributes:operation)",
        "unrouted-jobs": "attributes:operation AND NOT ("
                         + " OR ".join(f'attributes.operation = "{op}"' for op in folders) + ")",
    }


def test_cpu_and_memory_outside_cloud_runs_gpu_shapes_stop_the_plan(terraform, tmp_path):
    """Cloud Run GPU services take 4, 6 or 8 vCPUs and 16 to 32 GiB, and more memory needs
    more CPU (over 16 GiB 6 vCPUs, over 24 GiB 8): the service's precondition says so at plan,
    in the forms Cloud Run takes, instead of the apply failing on the API."""
    shapes = {
        ("8", "32Gi"): True, ("8000m", "32768Mi"): True, ("4", "16Gi"): True, ("4000m", "16384Mi"): True,
        ("6", "24Gi"): True, ("6", "18G"): True, ("8", "17180M"): True,
        ("4", "32Gi"): False, ("6", "25Gi"): False, ("4", "17Gi"): False,  # too little CPU for the memory
        ("8", "48Gi"): False, ("16", "32Gi"): False, ("2", "8Gi"): False, ("5", "16Gi"): False,
        ("3999m", "16Gi"): False, ("8", "16383Mi"): False, ("8", "17G"): False, ("eight", "32Gi"): False,
        ("8", "lots"): False, ("8", "32"): False,
    }
    assert shapes[(terraform.default("cpu"), terraform.default("memory"))]
    # Every shape as a service of its own (service_shapes), and the default for the one not listed.
    pools = [f"pool-{i}" for i in range(len(shapes))] + ["default"]
    variables = {
        "operations": pools, "chains": [], "cpu": terraform.default("cpu"), "memory": terraform.default("memory"),
        "service_shapes": {f"pool-{i}": {"cpu": cpu, "memory": memory} for i, (cpu, memory) in enumerate(shapes)},
    }
    misfits = _evaluate(tmp_path, variables, {"misfits": _inline(terraform, "local.shape_misfits"),
                                              "limits": _inline(terraform, "local.shapes")})
    assert set(misfits["misfits"]) == {f"pool-{i}" for i, shape in enumerate(shapes) if not shapes[shape]}
    assert misfits["limits"]["default"] == {"cpu": "8", "memory": "32Gi"}
    assert misfits["limits"]["pool-2"] == {"cpu": "4", "memory": "16Gi"}
    service = _service(terraform)
    conditions = [expr(item["condition"]) for item in one(service["lifecycle"])["precondition"]]
    assert "length(local.shape_misfits) == 0" in conditions
    assert "length(setsubtract(keys(var.service_shapes), local.pool_list)) == 0" in conditions  # a typo'd pool
    limits = one(one(one(service["template"])["containers"])["resources"])["limits"]
    assert expr(limits["cpu"]) == "local.shapes[each.key].cpu"
    assert expr(limits["memory"]) == "local.shapes[each.key].memory"


def test_prefixes_are_checked_at_plan_as_at_start_up(terraform, tmp_path):
    """The variables' validation and the input bucket's precondition accept the prefixes
    handlers/settings.py accepts, so a bad one stops the plan, not every worker; Terraform
    also refuses characters a Pub/Sub filter would need escaped (or count as two bytes)."""
    from handlers.errors import ConfigError
    from handlers.settings import Settings

    samples = [("incoming/", "processed/", "failed/"), ("in/", "out/", "in-failed/"),
               ("a/b/", "processed/", "failed/"), ("incoming", "processed/", "failed/"),
               ("/incoming/", "processed/", "failed/"), ("in//x/", "processed/", "failed/"),
               ("incoming/", "incoming/done/", "failed/"), ("failed/", "processed/", "failed/"),
               ('in"x/', "processed/", "failed/"), ("entrée/", "processed/", "failed/"),
               ("in/./x/", "processed/", "failed/"), ("../in/", "processed/", "failed/"),
               ("in/", "out/../", "failed/"), (".in/", "out.v2/", "...failed../")]
    rule = expr(one(terraform.variables["input_prefix"]["validation"])["condition"])
    precondition = next(
        expr(item["condition"]) for item in one(terraform.resource("google_storage_bucket", "input")["lifecycle"])["precondition"]
        if "local.prefixes" in expr(item["condition"])
    )
    assert [expr(item) for item in terraform.locals["prefixes"]] == [
        "var.input_prefix", "var.output_prefix", "var.failed_prefix"]
    for name in ("output_prefix", "failed_prefix"):
        assert expr(one(terraform.variables[name]["validation"])["condition"]) == rule.replace("input_prefix", name)
    outputs = {}
    for i, (inp, out, failed) in enumerate(samples):
        bind = {"var.input_prefix": inp, "var.output_prefix": out, "var.failed_prefix": failed}
        checks = [rule.replace("var.input_prefix", json.dumps(value)) for value in bind.values()]
        overlap = precondition.replace("local.prefixes", json.dumps([inp, out, failed]))
        outputs[f"s{i}"] = f"alltrue([{', '.join(checks)}]) && ({overlap})"
    values = _evaluate(tmp_path, {}, outputs)
    for i, (inp, out, failed) in enumerate(samples):
        try:
            Settings(input_prefix=inp, output_prefix=out, failed_prefix=failed).validate()
            accepted = re.fullmatch(r"[A-Za-z0-9._/-]+", inp + out + failed) is not None
        except ConfigError:
            accepted = False
        assert values[f"s{i}"] is accepted, (inp, out, failed)


def test_unrouted_filters_follow_neither_the_chains_order_nor_duplicates(terraform, rendered_filters, tmp_path):
    """Filters cannot change in place: listing the same chains in another order, or an
    operation twice, must not rewrite (replace) them. A chain whose first operation is not
    deployed still has its names kept."""
    assert rendered_filters(TWO_HEADS) == rendered_filters(tuple(reversed(TWO_HEADS)))
    variables = {"input_prefix": "incoming/", "chains": list(CHAIN)}
    outputs = {"unrouted": _inline(terraform, expr(terraform.locals["unrouted_candidates"]))}
    (tmp_path / "twice").mkdir()
    twice = _evaluate(tmp_path / "twice", {**variables, "operations": [*terraform.default("operations"), "comic"]}, outputs)
    (tmp_path / "once").mkdir()
    once = _evaluate(tmp_path / "once", {**variables, "operations": terraform.default("operations")}, outputs)
    assert twice == once
    (tmp_path / "headless").mkdir()
    headless = _evaluate(tmp_path / "headless", {**variables, "operations": ["upscale"]}, outputs)["unrouted"]
    upload = {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-background/a.png"}
    assert [name for name, text in headless.items() if _matches(text, upload)] == ["unrouted-remove-background"]
    chain_upload = {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-background,upscale/a.png"}
    assert [name for name, text in headless.items() if _matches(text, chain_upload)] == []  # the chain's pool's


def test_two_chains_of_one_first_operation_overflow_its_unrouted_filter(rendered_filters):
    """The documented limit: the folders of an operation's pools must fit one filter beside
    it; two chains of remove-background do not, and that subscription is not created (the
    check warns)."""
    _, unrouted = rendered_filters(("remove-background,upscale", "remove-background,comic"))
    assert [name for name, text in unrouted.items() if len(text.encode()) > 256] == ["unrouted-remove-background"]


CHAIN = ("remove-background,upscale",)
TWO_HEADS = ("remove-background,upscale", "comic,upscale")


@pytest.mark.parametrize(
    "chains, attributes, taken_by",
    [
        ((), {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/upscale/a.png"}, {"upscale"}),
        ((), {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-background/a/b.png"}, {"remove-background"}),
        # A chain not deployed, a typo, the bare input folder: no pool serves them, the
        # unrouted subscription keeps them where Pub/Sub would have dropped them.
        ((), {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-background,upscale/a.png"}, {"unrouted"}),
        ((), {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/upscal/a.png"}, {"unrouted"}),
        ((), {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/a.png"}, {"unrouted"}),
        ((), {"operation": "enhance"}, {"enhance"}),  # a job message naming its operation
        ((), {}, {"unrouted"}),  # a job message without the attribute
        # Job messages whose attribute names no deployed operation: a chain, a typo. No
        # pool's filter takes them; the unrouted-jobs subscription keeps them.
        ((), {"operation": "remove-background,upscale"}, {"unrouted-jobs"}),
        ((), {"operation": "upscal"}, {"unrouted-jobs"}),
        ((), {"operation": ""}, {"unrouted-jobs"}),
        # A deployed chain has its own pool: its folder and attribute, and nothing else.
        (CHAIN, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-background,upscale/a.png"},
         {"remove-background,upscale"}),
        (CHAIN, {"operation": "remove-background,upscale"}, {"remove-background,upscale"}),
        (CHAIN, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-background/a.png"}, {"remove-background"}),
        (CHAIN, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/upscale/a.png"}, {"upscale"}),
        (CHAIN, {"operation": "comic,upscale"}, {"unrouted-jobs"}),
        (CHAIN, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/comic,upscale/a.png"}, {"unrouted"}),
        (CHAIN, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/a.png"}, {"unrouted"}),
        (CHAIN, {}, {"unrouted"}),
        # What starts with the chain's first operation, but is none of its pools' folders or
        # names, has subscriptions of its own (the four operations and a chain's folder would
        # not fit one 256-byte filter).
        (CHAIN, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-background,comic/a.png"},
         {"unrouted-remove-background"}),
        (CHAIN, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-backgroundd/a.png"},
         {"unrouted-remove-background"}),
        (CHAIN, {"operation": "remove-background,comic"}, {"unrouted-jobs-remove-background"}),
        (CHAIN, {"operation": "remove-backgroun"}, {"unrouted-jobs"}),
        (CHAIN, {"operation": ""}, {"unrouted-jobs"}),
        (CHAIN, {"operation": "enhance"}, {"enhance"}),
        (CHAIN, {"operation": "remove-background"}, {"remove-background"}),
        # Chains of two first operations.
        (TWO_HEADS, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/comic,upscale/a.png"}, {"comic,upscale"}),
        (TWO_HEADS, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/comic,enhance/a.png"}, {"unrouted-comic"}),
        (TWO_HEADS, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/comic/a.png"}, {"comic"}),
        (TWO_HEADS, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-background,upscale/a.png"},
         {"remove-background,upscale"}),
        (TWO_HEADS, {"operation": "comic,upscale"}, {"comic,upscale"}),
        (TWO_HEADS, {"operation": "comic,enhance"}, {"unrouted-jobs-comic"}),
        (TWO_HEADS, {"operation": "upscale,comic"}, {"unrouted-jobs"}),
        # Exactly the head's name, and a message with both attributes (the pool's name wins).
        (CHAIN, {"eventType": "OBJECT_FINALIZE", "objectId": "incoming/remove-background"}, {"unrouted-remove-background"}),
        (CHAIN, {"objectId": "incoming/remove-background,comic/a.png", "operation": "enhance"}, {"enhance"}),
    ],
)
def test_every_message_reaches_one_subscription(rendered_filters, chains, attributes, taken_by):
    per_pool, unrouted = rendered_filters(chains)
    assert all(len(text.encode()) <= 256 for text in unrouted.values()), "Pub/Sub filters hold 256 bytes"
    filters = {**per_pool, **unrouted}
    assert {name for name, text in filters.items() if _matches(text, attributes)} == taken_by


def test_unrouted_messages_are_kept_and_watched(terraform, tmp_path):
    sub = terraform.resource("google_pubsub_subscription", "unrouted")
    assert expr(sub["for_each"]) == "local.unrouted_filters"
    assert "var.name_prefix}-${each.key" in expr(sub["name"]) and expr(sub["filter"]) == "each.value"
    assert sub["message_retention_duration"] == "604800s" and "push_config" not in sub
    # Filtered deployments get every one whose filter fits (a check says when one does not:
    # a long input prefix, many chains of one first operation); unfiltered ones none.
    created = expr(terraform.locals["unrouted_filters"])
    candidates = json.dumps({"unrouted": "U", "unrouted-jobs": "J" * 257, "unrouted-comic": "C"})
    values = _evaluate(tmp_path, {}, {
        f"filtered_{filtered}": created.replace("local.filtered", filtered).replace("local.unrouted_candidates", candidates)
        for filtered in ("true", "false")})
    assert values == {"filtered_true": {"unrouted": "U", "unrouted-comic": "C"}, "filtered_false": {}}
    check = expr(one(terraform.checks["unrouted_filter_fits"]["assert"])["condition"])
    assert check == "!local.filtered || local.unrouted_filters_fit"
    assert expr(terraform.locals["unrouted_filters_fit"]) == (
        "alltrue([for text in values(local.unrouted_candidates) : length(text) <= 256])")
    # They were two resources with count: the moves keep what existing ones hold.
    for old, key in (("unrouted", "unrouted"), ("unrouted_jobs", "unrouted-jobs")):
        assert re.search(rf'moved \{{\s*from = google_pubsub_subscription\.{old}\[0\]\s*'
                         rf'to\s*= google_pubsub_subscription\.unrouted\["{key}"\]\s*\}}', terraform.text["pubsub.tf"])
    assert "google_pubsub_subscription.unrouted" in expr(terraform.locals["unrouted_subscriptions"])
    assert "local.unrouted_subscriptions" in expr(terraform.locals["watched_backlogs"])


def test_subscriptions_dead_letter_after_the_processors_attempts(terraform):
    from handlers.processor import MAX_ATTEMPTS

    sub = terraform.resource("google_pubsub_subscription", "jobs")
    policy = one(sub["dead_letter_policy"])
    assert expr(policy["max_delivery_attempts"]) == "local.max_delivery_attempts"
    # More than the processor's: deliveries turned away (429) do not use up a job's retries.
    assert terraform.locals["max_delivery_attempts"] == 20 > MAX_ATTEMPTS == 5
    assert expr(policy["dead_letter_topic"]) == "google_pubsub_topic.dead_letter[each.key].id"
    retry = one(sub["retry_policy"])
    assert retry["minimum_backoff"] and retry["maximum_backoff"]
    # Push requests have at most 600 s; the ack deadline may not be shorter than a job.
    assert expr(sub["ack_deadline_seconds"]) == "local.ack_deadline_seconds"
    assert terraform.locals["ack_deadline_seconds"] == 600
    assert one(sub["expiration_policy"])["ttl"] == ""


def test_dead_letter_topics_are_kept_and_watched(terraform, tmp_path):
    dl_sub = terraform.resource("google_pubsub_subscription", "dead_letter")
    assert expr(dl_sub["topic"]) == "google_pubsub_topic.dead_letter[each.key].id"
    publisher = terraform.resource("google_pubsub_topic_iam_member", "dead_letter_publisher")
    assert publisher["role"] == "roles/pubsub.publisher"
    assert expr(publisher["member"]) == "local.pubsub_service_agent"
    subscriber = terraform.resource("google_pubsub_subscription_iam_member", "dead_letter_subscriber")
    assert subscriber["role"] == "roles/pubsub.subscriber"
    assert expr(subscriber["member"]) == "local.pubsub_service_agent"
    assert expr(subscriber["subscription"]) == "google_pubsub_subscription.jobs[each.key].id"
    assert expr(terraform.locals["pubsub_service_agent"]) == (
        "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    )
    alert = terraform.resource("google_monitoring_alert_policy", "dead_letters")
    conditions = one(alert["dynamic"])["conditions"]
    assert expr(conditions["for_each"]) == "local.watched_backlogs"
    threshold = one(one(conditions["content"])["condition_threshold"])
    assert "pubsub.googleapis.com/subscription/num_undelivered_messages" in expr(threshold["filter"])
    # One condition may watch several subscriptions (both unrouted ones: a policy holds six).
    rendered = _evaluate(tmp_path, {}, {"filter": expr(threshold["filter"]).replace(
        "conditions.value", '["imagen-unrouted", "imagen-unrouted-jobs"]')})["filter"]
    assert rendered == ('resource.type = "pubsub_subscription" AND resource.labels.subscription_id = '
                        'one_of("imagen-unrouted", "imagen-unrouted-jobs") AND '
                        'metric.type = "pubsub.googleapis.com/subscription/num_undelivered_messages"')
    assert threshold["comparison"] == "COMPARISON_GT" and threshold["threshold_value"] == 0
    watched = expr(terraform.locals["watched_backlogs"])
    assert "local.dead_letter_conditions" in watched and "local.unrouted_subscriptions" in watched
    # One condition per pool's dead letters while they fit beside the unrouted one (six at
    # most), else one for all of them.
    per_pool = expr(terraform.locals["dead_letter_conditions"])
    pools = lambda n: json.dumps({f"p{i}": {"name": f"imagen-p{i}-dead-letter"} for i in range(n)})  # noqa: E731
    (tmp_path / "conditions").mkdir()
    values = _evaluate(tmp_path / "conditions", {}, {
        f"n{n}": per_pool.replace("google_pubsub_subscription.dead_letter", pools(n)) for n in (4, 5, 6)})
    assert values["n5"] == {f"p{i}: dead-letter backlog": [f"imagen-p{i}-dead-letter"] for i in range(5)}
    assert values["n6"] == {"dead-letter backlog": [f"imagen-p{i}-dead-letter" for i in range(6)]}
    assert len(values["n4"]) == 4


def test_grants_to_the_pubsub_service_agent_wait_for_the_apply_to_make_it(terraform):
    """Google makes the agent lazily: on a brand-new project a grant could run before it
    exists. Made by the apply (Eventarc's deliveries go through Pub/Sub push too: always),
    every grant waits for it; they keep naming it by the project number, known at plan time
    (the identity's email is not, before it exists: an upgrade would replace every grant)."""
    identity = terraform.resource("google_project_service_identity", "pubsub")
    assert identity["service"] == "pubsub.googleapis.com" and expr(identity["provider"]) == "google-beta"
    assert "count" not in identity
    grants = [(type_, name, body) for type_, name, body in terraform.all_resources()
              if expr(body.get("member", "")) == "local.pubsub_service_agent"]
    assert len(grants) == 4
    for type_, name, body in grants:
        assert [expr(item) for item in body.get("depends_on", [])] == ["google_project_service_identity.pubsub"], \
            (type_, name)


def test_push_carries_an_oidc_token_of_the_invoker(terraform):
    sub = terraform.resource("google_pubsub_subscription", "jobs")
    push = one(sub["dynamic"])["push_config"]["content"]
    oidc = one(one(push)["oidc_token"])
    assert expr(oidc["service_account_email"]) == "google_service_account.push[0].email"
    assert "google_cloud_run_v2_service.worker" in expr(oidc["audience"])
    invoker = terraform.resource("google_cloud_run_v2_service_iam_member", "push_invokes")
    assert invoker["role"] == "roles/run.invoker"
    assert expr(invoker["member"]) == "google_service_account.push[0].member"
    # The Pub/Sub agent mints tokens as that one account, not project-wide.
    signer = terraform.resource("google_service_account_iam_member", "pubsub_signs_as_push")
    assert signer["role"] == "roles/iam.serviceAccountTokenCreator"
    assert expr(signer["service_account_id"]) == "google_service_account.push[0].name"
    assert expr(signer["member"]) == "local.pubsub_service_agent"


def test_storage_notification_covers_the_input_folder_only(terraform):
    notification = terraform.resource("google_storage_notification", "incoming")
    assert notification["payload_format"] == "JSON_API_V1"
    assert notification["event_types"] == ["OBJECT_FINALIZE"]
    assert expr(notification["object_name_prefix"]) == "var.input_prefix"
    assert terraform.default("input_prefix") == "incoming/"
    assert "google_pubsub_topic_iam_member.gcs_publishes_jobs" in [expr(d) for d in notification["depends_on"]]
    grant = terraform.resource("google_pubsub_topic_iam_member", "gcs_publishes_jobs")
    assert grant["role"] == "roles/pubsub.publisher" and expr(grant["member"]) == "local.gcs_service_agent"


def test_eventarc_alternative(terraform):
    trigger = terraform.resource("google_eventarc_trigger", "worker")
    criteria = {c["attribute"]: expr(c["value"]) for c in trigger["matching_criteria"]}
    assert criteria == {
        "type": "google.cloud.storage.object.v1.finalized",
        "bucket": "google_storage_bucket.input.name",
    }
    destination = one(one(trigger["destination"])["cloud_run_service"])
    assert expr(destination["service"]) == "google_cloud_run_v2_service.worker[each.key].name"
    assert expr(trigger["service_account"]) == "google_service_account.eventarc[0].email"


def test_eventarc_triggers_wait_for_its_service_agent_made_and_granted_by_the_apply(terraform):
    """A fresh project's first apply failed creating the triggers: Google makes Eventarc's
    service agent lazily and grants its role minutes after the API is enabled."""
    identity = terraform.resource("google_project_service_identity", "eventarc")
    assert identity["service"] == "eventarc.googleapis.com" and expr(identity["provider"]) == "google-beta"
    assert expr(identity["count"]) == "local.eventarc ? 1 : 0"
    grant = terraform.resource("google_project_iam_member", "eventarc_agent")
    assert grant["role"] == "roles/eventarc.serviceAgent"
    assert expr(grant["member"]) == "serviceAccount:${google_project_service_identity.eventarc[0].email}"
    trigger = terraform.resource("google_eventarc_trigger", "worker")
    assert "google_project_iam_member.eventarc_agent" in [expr(item) for item in trigger["depends_on"]]
    providers = one(terraform.terraform)["required_providers"][0]
    assert providers["google-beta"] == {"source": "hashicorp/google-beta", "version": providers["google"]["version"]}


def test_push_subscriptions_wait_for_the_grants_their_requests_need(terraform):
    subscription = terraform.resource("google_pubsub_subscription", "jobs")
    assert {expr(item) for item in subscription["depends_on"]} >= {
        "google_cloud_run_v2_service_iam_member.push_invokes",
        "google_service_account_iam_member.pubsub_signs_as_push",
    }


def test_gke_nodes_may_write_the_workers_logs_and_pull_their_images(terraform):
    for type_, name, role in (("google_project_iam_member", "gke_nodes_default_role",
                               "roles/container.defaultNodeServiceAccount"),
                              ("google_artifact_registry_repository_iam_member", "gke_nodes_pull",
                               "roles/artifactregistry.reader")):
        grant = terraform.resource(type_, name)
        assert grant["role"] == role
        assert expr(grant["member"]) == "serviceAccount:${var.gke_node_service_account}"
        assert expr(grant["count"]) == 'local.gke && var.gke_node_service_account != "" ? 1 : 0'


def test_a_gpu_other_than_the_l4_stops_the_plan(terraform, tmp_path):
    """The shape check and the image know the L4 only: another GPU would fail the apply.
    On the Cloud Run services (a precondition): GKE mode does not use the variable."""
    assert "validation" not in terraform.variables["gpu_type"]
    rule = next(expr(item["condition"]) for item in one(_service(terraform)["lifecycle"])["precondition"]
                if "var.gpu_type" in expr(item["condition"]))
    values = _evaluate(tmp_path, {}, {name.replace("-", "_"): rule.replace("var.gpu_type", json.dumps(name))
                                      for name in ("nvidia-l4", "nvidia-rtx-pro-6000", "nvidia-t4")})
    assert values == {"nvidia_l4": True, "nvidia_rtx_pro_6000": False, "nvidia_t4": False}
    assert terraform.default("gpu_type") == "nvidia-l4"


def test_log_metrics_and_alerts_watch_the_workers(terraform, tmp_path):
    """What the workers log becomes metrics (their filters are checked against real lines in
    tests/integration/test_processor.py), errors and long waits alerts."""
    failures = terraform.resource("google_logging_metric", "job_failures")
    assert expr(failures["filter"]) == "local.job_failure_filter"
    assert failures["label_extractors"] == {
        "operation": 'REGEXP_EXTRACT(jsonPayload.operation, "${local.operation_pattern}")',
        "error_type": "EXTRACT(jsonPayload.error.type)",
    }
    errors = terraform.resource("google_logging_metric", "errors")
    for metric in (failures, errors):
        descriptor = one(metric["metric_descriptor"])
        assert (descriptor["metric_kind"], descriptor["value_type"]) == ("DELTA", "INT64")
        assert {label["key"] for label in descriptor["labels"]} == set(metric["label_extractors"])
    # A log-match alert (one reading the log-based metric would fail the first apply: the new
    # metric is not visible to Monitoring for minutes); such a policy needs a rate limit.
    alert = terraform.resource("google_monitoring_alert_policy", "errors")
    matched = one(one(alert["conditions"])["condition_matched_log"])
    assert expr(matched["filter"]) == expr(errors["filter"]) == "(${local.error_filter}) AND ${local.worker_scope}"
    # Each combination of label values is an incident and a notification of its own: not the
    # message's free text (one per failed job), its words before the first colon.
    assert matched["label_extractors"] == {
        "logger": "EXTRACT(jsonPayload.logger)", "message": 'REGEXP_EXTRACT(jsonPayload.message, "^([^:]{1,60})")'}
    scope = expr(terraform.locals["worker_scope"])  # the workers' own lines: their namespace, their services
    assert 'resource.type=\\"k8s_container\\" AND resource.labels.namespace_name=\\"${var.gke_namespace}\\"' in scope
    assert ('resource.type=\\"cloud_run_revision\\" AND resource.labels.service_name=~'
            '\\"^${var.name_prefix}-(${join("|", values(local.pool_names))})$\\"') in scope
    assert one(one(alert["alert_strategy"])["notification_rate_limit"])["period"] == "300s"
    waiting = terraform.resource("google_monitoring_alert_policy", "jobs_waiting")
    threshold = one(one(waiting["conditions"])["condition_threshold"])
    assert "pubsub.googleapis.com/subscription/oldest_unacked_message_age" in expr(threshold["filter"])
    assert "local.job_subscriptions" in expr(threshold["filter"])
    assert expr(threshold["threshold_value"]) == "local.job_wait_alert_seconds"
    # On GKE above the longest lease of a worker with its defaults (a message being worked on
    # counts as unacknowledged); on Cloud Run, where no push is held past 600 s, well before
    # the retries' ~2 h end in the dead-letter topic; a value given is taken in both.
    from handlers.cli.worker import lease_budget

    wait = _inline(terraform, expr(terraform.locals["job_wait_alert_seconds"]))
    waits = {}
    for mode, given in (("gke", None), ("cloudrun", None), ("cloudrun", 900)):
        folder = tmp_path / f"wait-{mode}-{given}"
        folder.mkdir()
        waits[mode, given] = _evaluate(folder, {"mode": mode, "job_wait_alert_seconds": given}, {"wait": wait})["wait"]
    assert waits["gke", None] > lease_budget(3600, 1, 1) == 7740
    from handlers.processor import MAX_RETRY_SECONDS

    # past a transient fault's retries (30 min after the event, then one backoff of up to 600 s)
    assert MAX_RETRY_SECONDS + 600 <= waits["cloudrun", None] <= 3600 and waits["cloudrun", 900] == 900
    assert terraform.default("job_wait_alert_seconds") is None
    # GKE: a container restarting on the same GPU (or OOM-killed, silently) is alerted on.
    restarts = terraform.resource("google_monitoring_alert_policy", "restarts")
    assert expr(restarts["count"]) == "local.gke ? 1 : 0"
    restart = one(one(restarts["conditions"])["condition_threshold"])
    assert 'metric.type = \\"kubernetes.io/container/restart_count\\"' in expr(restart["filter"])
    assert 'resource.labels.namespace_name = \\"${var.gke_namespace}\\"' in expr(restart["filter"])
    assert "cordon" in one(restarts["documentation"])["content"]
    for policy in (alert, waiting, restarts):
        assert expr(policy["notification_channels"]) == "var.alert_notification_channels"


def test_each_pool_may_move_what_it_cannot_settle_to_its_own_dead_letters(terraform):
    """IMAGEN_DEAD_LETTER_TOPIC (the push services; the GKE manifests set the same name) and
    the pool's account may publish there, only there."""
    topic = terraform.resource("google_pubsub_topic", "dead_letter")
    assert topic["name"] == "${var.name_prefix}-${local.pool_names[each.key]}-dead-letter"
    env = expr(one(one(_service(terraform)["template"])["containers"])["dynamic"][0]["env"]["for_each"])
    assert "local.push ? {IMAGEN_DEAD_LETTER_TOPIC = google_pubsub_topic.dead_letter[each.key].id} : {}" in env
    grant = terraform.resource("google_pubsub_topic_iam_member", "worker_dead_letters")
    assert expr(grant["for_each"]) == "local.pubsub ? local.pools : toset([])"
    assert expr(grant["topic"]) == "google_pubsub_topic.dead_letter[each.key].id"
    assert grant["role"] == "roles/pubsub.publisher"
    assert expr(grant["member"]) == "google_service_account.worker[each.key].member"


def test_eventarc_waits_for_a_job_as_long_as_the_request_may_take(terraform):
    """Eventarc's own subscription acks after 10 s unless told more: a longer job would be
    delivered again while it runs. Each trigger's subscription gets the request timeout."""
    raised = terraform.resource("terraform_data", "eventarc_ack_deadline")
    assert expr(raised["for_each"]) == "google_eventarc_trigger.worker"
    subscription = "each.value.transport[0].pubsub[0].subscription"
    assert expr(raised["triggers_replace"]) == subscription
    provisioner = one(raised["provisioner"])["local-exec"]
    assert provisioner["command"] == 'gcloud pubsub subscriptions update "$SUBSCRIPTION" --ack-deadline=600 --quiet'
    assert expr(provisioner["environment"]["SUBSCRIPTION"]) == subscription
    assert one(_service(terraform)["template"])["timeout"] == "600s"  # the service's request timeout


# --- storage ------------------------------------------------------------------------------


def test_buckets_are_uniform_and_never_public(terraform):
    buckets = terraform.resources["google_storage_bucket"]
    assert set(buckets) == {"input", "output", "build_sources", "compiled"}
    for name, bucket in buckets.items():
        assert bucket["uniform_bucket_level_access"] is True, name
        assert bucket["public_access_prevention"] == "enforced", name


def test_failure_reports_expire(terraform):
    rules = terraform.resource("google_storage_bucket", "input")["lifecycle_rule"]
    failed = [r for r in rules if "matches_prefix" in one(r["condition"])]
    assert len(failed) == 1
    condition = one(failed[0]["condition"])
    assert [expr(p) for p in condition["matches_prefix"]] == ["var.failed_prefix"]
    assert expr(condition["age"]) == "var.failed_retention_days"
    assert one(failed[0]["action"])["type"] == "Delete"
    assert terraform.default("failed_retention_days") == 30
    assert terraform.default("failed_prefix") == "failed/"


# --- IAM ----------------------------------------------------------------------------------


def test_nothing_is_public(terraform):
    for type_, name, body in terraform.all_resources():
        for member in _members(body):
            assert expr(member) not in PUBLIC_MEMBERS, f"{type_}.{name} grants {member}"
    # Anywhere in the configuration (comments aside; the job_publishers validation names
    # them only to refuse them).
    code = json.dumps([terraform.resources, terraform.data, terraform.locals, terraform.outputs])
    assert "allUsers" not in code and "allAuthenticatedUsers" not in code


def test_uploaders_may_create_under_the_input_folder_and_read_results_and_reports_by_name(terraform, tmp_path):
    """Whoever drops images needed a hand-made grant, in practice objectCreator on the whole
    bucket: a failure report or running marker planted beside an upload could stop its job."""
    variable = terraform.variables["uploaders"]
    assert one(variable["validation"])["condition"] and "allUsers" in expr(one(variable["validation"])["condition"])
    uploads = terraform.resource("google_storage_bucket_iam_member", "uploader_uploads")
    assert uploads["role"] == "roles/storage.objectCreator" and expr(uploads["for_each"]) == "toset(var.uploaders)"
    assert expr(one(uploads["condition"])["expression"]) == (
        'resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.input.name}/objects/'
        '${var.input_prefix}\")')
    reads = terraform.resource("google_storage_bucket_iam_member", "uploader_reads")
    assert reads["role"] == "roles/storage.objectViewer" and expr(reads["for_each"]) == "local.uploader_reads"
    assert "resource.name.startsWith(" in expr(one(reads["condition"])["expression"])  # no listing
    text = _inline(terraform, "local.uploader_reads").replace("google_storage_bucket.input.name", '"in-b"')
    text = text.replace("google_storage_bucket.output[0].name", '"out-b"')
    values = _evaluate(tmp_path, {"uploaders": ["user:ann@example.com", "group:team@example.com"],
                                  "input_bucket": "in-b", "output_bucket": "out-b", "output_prefix": "processed/",
                                  "failed_prefix": "failed/"}, {"reads": text})["reads"]
    assert values["user:ann@example.com results"] == {"member": "user:ann@example.com", "bucket": "out-b",
                                                      "prefix": "processed/", "folder": "results"}
    assert values["group:team@example.com reports"] == {"member": "group:team@example.com", "bucket": "in-b",
                                                        "prefix": "failed/", "folder": "reports"}
    assert len(values) == 4


def test_no_primitive_roles_and_no_authoritative_bindings(terraform):
    for type_, name, body in terraform.all_resources():
        assert not AUTHORITATIVE_IAM.match(type_), f"{type_}.{name} would replace others' grants"
        if "role" in body:
            assert body["role"] not in PRIMITIVE_ROLES, f"{type_}.{name}: {body['role']}"


def test_project_level_grants_are_the_unavoidable_few(terraform):
    grants = terraform.resources.get("google_project_iam_member", {})
    for name, body in grants.items():
        assert body["role"] in PROJECT_ROLES, f"google_project_iam_member.{name}: {body['role']} at project level"
        assert "google_service_account.worker" not in expr(body["member"]), name


def test_worker_accounts_hold_least_privilege(terraform):
    """The runtime accounts read inputs, write results and failure reports in their own
    folders, publish results and to their own dead-letter topic, pull their own subscription:
    nothing else, nowhere else."""
    allowed = {
        ("google_storage_bucket_iam_member", "roles/storage.objectViewer"),
        ("google_storage_bucket_iam_member", "roles/storage.objectUser"),
        ("google_storage_bucket_iam_member", "roles/storage.objectCreator"),
        ("google_pubsub_topic_iam_member", "roles/pubsub.publisher"),
        ("google_pubsub_subscription_iam_member", "roles/pubsub.subscriber"),
    }
    found = set()
    for type_, name, body in terraform.all_resources():
        if not IAM_MEMBER_TYPES.match(type_) or "google_service_account.worker[" not in expr(body.get("member", "")):
            continue
        found.add((type_, body["role"]))
        assert (type_, body["role"]) in allowed, f"{type_}.{name}: {body['role']}"
        if body["role"] == "roles/storage.objectUser":
            condition = one(body["condition"])
            assert "resource.name.startsWith(" in expr(condition["expression"]), name
        if type_ == "google_pubsub_topic_iam_member":
            assert expr(body["topic"]) in ("google_pubsub_topic.results[0].id",
                                            "google_pubsub_topic.dead_letter[each.key].id"), name
        if type_ == "google_pubsub_subscription_iam_member":
            assert expr(body["subscription"]) == "google_pubsub_subscription.jobs[each.key].id", name
    assert found == allowed
    writes = {
        name: expr(one(body["condition"])["expression"])
        for name, body in terraform.resources["google_storage_bucket_iam_member"].items()
        if body["role"] == "roles/storage.objectUser"
    }
    assert "${var.failed_prefix}" in writes["worker_writes_failures"]
    assert "${var.output_prefix}" in writes["worker_writes_results"]
    # Job messages' sources in other allowed buckets: read, and a failure report beside them.
    assert "${var.failed_prefix}" in writes["worker_reports_allowed"]
    grants = terraform.resources["google_storage_bucket_iam_member"]
    assert expr(grants["worker_reports_allowed"]["for_each"]) == expr(grants["worker_reads_allowed"]["for_each"])


def test_eventarc_without_an_output_bucket_stops_the_plan(terraform):
    """A precondition, not a `check` block: checks only warn, and the apply goes on."""
    bucket = terraform.resource("google_storage_bucket", "input")
    conditions = [expr(item["condition"]) for item in one(bucket["lifecycle"])["precondition"]]
    assert any("!local.eventarc || var.output_bucket != " in condition for condition in conditions)
    assert "eventarc_output_bucket" not in terraform.checks


def test_compile_cache_is_shared_per_operation_and_expires(terraform, tmp_path):
    """Compiled kernels are code the workers run: each worker reads and creates (never
    replaces) only its own operation's, and old ones go."""
    assert terraform.default("compile_cache") is True
    bucket = terraform.resource("google_storage_bucket", "compiled")
    assert expr(bucket["name"]) == "local.compile_cache_bucket" and bucket["force_destroy"] is True
    precondition = one(one(bucket["lifecycle"])["precondition"])
    assert expr(precondition["condition"]) == "length(local.compile_cache_bucket) <= 63"  # a name GCS takes
    rule = one(bucket["lifecycle_rule"])
    assert one(rule["condition"])["age"] == 30 and one(rule["action"])["type"] == "Delete"
    grants = terraform.resources["google_storage_bucket_iam_member"]
    assert grants["worker_loads_compiled"]["role"] == "roles/storage.objectViewer"
    assert grants["worker_stores_compiled"]["role"] == "roles/storage.objectCreator"
    for name in ("worker_loads_compiled", "worker_stores_compiled"):
        assert expr(grants[name]["bucket"]) == "google_storage_bucket.compiled[0].name"
    # Each operation's folder: a chain's pool, each of its operations'.
    conditions = {name: expr(one(grants[name]["condition"])["expression"]).replace(
        "google_storage_bucket.compiled[0].name", '"B"') for name in ("worker_loads_compiled", "worker_stores_compiled")}
    assert len(set(conditions.values())) == 1
    values = _evaluate(tmp_path, {}, {key.replace(",", "_"): conditions["worker_loads_compiled"].replace(
        "each.key", json.dumps(key)) for key in ("upscale", "remove-background,upscale")})
    assert values["upscale"] == 'resource.name.startsWith("projects/_/buckets/B/objects/upscale/")'
    assert values["remove-background_upscale"] == (
        'resource.name.startsWith("projects/_/buckets/B/objects/remove-background/") || '
        'resource.name.startsWith("projects/_/buckets/B/objects/upscale/")')
    assert "IMAGEN_COMPILE_CACHE" in json.dumps(terraform.locals["common_env"])


def test_gke_workload_identity_matches_the_manifests(terraform, rendered):
    binding = terraform.resource("google_service_account_iam_member", "worker_workload_identity")
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert expr(binding["member"]) == (
        "serviceAccount:${local.workload_pool}[${var.gke_namespace}/imagen-${local.pool_names[each.key]}]")
    assert expr(terraform.locals["workload_pool"]) == "${var.project_id}.svc.id.goog"
    namespace = terraform.default("gke_namespace")
    accounts = {
        (doc["metadata"]["namespace"], doc["metadata"]["name"])
        for doc in rendered["base"] if doc["kind"] == "ServiceAccount"
    }
    for op in operation_names():
        assert (namespace, f"imagen-{op}") in accounts
    keda = terraform.resource("google_project_iam_member", "keda_reads_metrics")
    assert keda["role"] == "roles/monitoring.viewer"


def test_build_account_can_push_read_the_token_and_nothing_else(terraform):
    roles = {
        (type_, body["role"])
        for type_, _, body in terraform.all_resources()
        if IAM_MEMBER_TYPES.match(type_) and expr(body.get("member", "")) == "google_service_account.build.member"
    }
    assert roles == {
        ("google_artifact_registry_repository_iam_member", "roles/artifactregistry.writer"),
        ("google_secret_manager_secret_iam_member", "roles/secretmanager.secretAccessor"),
        ("google_storage_bucket_iam_member", "roles/storage.objectViewer"),
        ("google_project_iam_member", "roles/logging.logWriter"),
    }


def test_the_image_cleanup_never_deletes_the_tags_in_use(terraform, tmp_path):
    # A CI that pushes every commit makes keep_image_versions newer versions in days: the tag
    # the services run (image_tag) and the ones listed (GKE's) are kept however old.
    repo = terraform.resource("google_artifact_registry_repository", "images")
    [keep] = [block["cleanup_policies"] for block in repo["dynamic"] if "cleanup_policies" in block]
    content = one(keep["content"])
    assert (content["action"], one(content["condition"])["tag_state"]) == ("KEEP", "TAGGED")
    assert expr(one(content["condition"])["tag_prefixes"]) == "cleanup_policies.value"
    outputs = {"for_each": _inline(terraform, expr(keep["for_each"]))}
    for name, variables, kept in (
        ("none", {"image_tag": "", "keep_image_tags": []}, []),
        ("deployed", {"image_tag": "abc123", "keep_image_tags": []}, [["abc123"]]),
        ("both", {"image_tag": "abc123", "keep_image_tags": ["v1", "abc123", ""]}, [["abc123", "v1"]]),
    ):
        (tmp_path / name).mkdir()
        assert _evaluate(tmp_path / name, variables, outputs)["for_each"] == kept, name
    assert terraform.default("keep_image_tags") == []


def test_jobs_waiting_watches_the_eventarc_triggers_subscriptions_too(terraform, tmp_path):
    # With Eventarc there was no jobs-waiting alert at all (it watched the push/pull
    # subscriptions only): a stuck service or no GPU capacity went unseen there.
    waiting = terraform.resource("google_monitoring_alert_policy", "jobs_waiting")
    assert expr(waiting["count"]) == \
        "length(google_pubsub_subscription.jobs) + length(google_eventarc_trigger.worker) > 0 ? 1 : 0"
    watched = expr(terraform.locals["job_subscriptions"])
    assert "[for sub in google_pubsub_subscription.jobs : sub.name]" in watched
    # The attribute the ack-deadline fix reads (a full name); the metric's label is the short one.
    attribute = "trigger.transport[0].pubsub[0].subscription"
    [name] = re.findall(r"\[for trigger in google_eventarc_trigger\.worker : (.*)\]", watched)
    assert attribute in name
    raised = terraform.resource("terraform_data", "eventarc_ack_deadline")
    assert expr(raised["triggers_replace"]) == attribute.replace("trigger.", "each.value.")
    full = "projects/p/subscriptions/eventarc-us-central1-imagen-upscale-000-sub-111"
    value = _evaluate(tmp_path, {"full": full}, {"name": name.replace(attribute, "var.full")})
    assert value["name"] == "eventarc-us-central1-imagen-upscale-000-sub-111"


def test_the_failure_metric_labels_operations_not_whatever_a_job_named(tmp_path):
    # A folder typo or a job message's free text is a failed job's `operation`: one label value
    # each would grow the metric's series without bound. Terraform evaluates the extractor as
    # written in monitoring.tf; Cloud Logging's REGEXP_EXTRACT takes RE2, which reads this
    # pattern as Python does.
    from image.params import OPERATION_NAMES

    text = (TERRAFORM_DIR / "monitoring.tf").read_text()
    locals_ = re.findall(r"^ *operation_(?:names|pattern) += .*$", text, re.M)
    [extractor] = re.findall(r"^ *operation += (.*)$", text, re.M)
    label_extractor = _evaluate(tmp_path, {}, {"x": extractor, "names": "local.operation_names"},
                                "locals {\n" + "\n".join(locals_) + "\n}\n")
    assert label_extractor["names"] == list(OPERATION_NAMES)
    match = re.fullmatch(r'REGEXP_EXTRACT\(jsonPayload\.operation, "(.*)"\)', label_extractor["x"])
    assert match, label_extractor
    pattern = re.compile(match.group(1))
    assert pattern.groups == 1  # REGEXP_EXTRACT takes the one capture group

    def label(operation: str) -> str:
        found = pattern.search(operation)
        return found.group(1) if found else ""

    for operation in (*OPERATION_NAMES, "remove-background,upscale", "comic,upscale,enhance"):
        assert label(operation) == operation
    assert label("upscale,upscale") == "upscale,upscale"  # refused by imagen, but bounded: four at most
    for typo in ("upscal", "Upscale", "upscale ", "upscale,", ",upscale", "upscale,x", "x" * 4000, "",
                 ",".join(["upscale"] * 5), ",".join(["comic"] * 1000)):
        assert label(typo) == "", typo


def test_token_secret_holds_no_value(terraform):
    assert "google_secret_manager_secret_version" not in terraform.resources
    repo = terraform.resource("google_artifact_registry_repository", "images")
    assert one(repo["docker_config"])["immutable_tags"] is True


# --- outputs and references ---------------------------------------------------------------


def test_useful_outputs(terraform):
    for name in (
        "input_bucket", "output_bucket", "compile_cache", "notification_topic", "subscriptions", "dead_letter_topics",
        "dead_letter_subscriptions", "results_topic", "service_urls", "image_repository",
        "build_service_account", "hf_token_secret", "k8s_config_env", "k8s_workload_identity_env",
        "client_env", "backfill_command", "image_tag", "unrouted_chain_subscriptions",
    ):
        assert name in terraform.outputs, name
        assert terraform.outputs[name].get("description"), name


def test_client_env_and_backfill_command_point_the_cli_at_the_deployment(terraform, tmp_path):
    """`eval "$(terraform output -raw client_env)"` gives `imagen submit` and `imagen backfill`
    the workers' buckets and folders (their outputs are judged there); backfill_command is
    the CLI's own command line, queuing only for the deployed operations."""
    from handlers.cli.backfill import command as backfill
    from handlers.routing import Layout
    from handlers.settings import Settings

    operations = terraform.default("operations")
    worker_env = {"GOOGLE_CLOUD_PROJECT": "proj", "IMAGEN_DEVICE": "cuda", "IMAGEN_INPUT_PREFIX": "drop/",
                  "IMAGEN_OUTPUT_BUCKET": "proj-results", "IMAGEN_OUTPUT_PREFIX": "done/",
                  "IMAGEN_FAILED_PREFIX": "errors/", "IMAGEN_ALLOWED_BUCKETS": "proj-in"}
    topic = "projects/proj/topics/imagen-events"

    def stand_ins(text: str, subscriptions: list[str]) -> str:
        for reference, value in (("google_storage_bucket.input.name", "var.bucket"), ("local.common_env", "var.env"),
                                 ("local.client_env_names", json.dumps(terraform.locals["client_env_names"])),
                                 ("google_pubsub_topic.jobs[0].id", json.dumps(topic)),
                                 ("local.subscriptions", json.dumps(subscriptions)),
                                 ("local.pool_list", json.dumps(list(dict.fromkeys(operations))))):
            text = text.replace(reference, value)
        return text

    client_env, command = (expr(terraform.outputs[name]["value"]) for name in ("client_env", "backfill_command"))
    values = _evaluate(tmp_path, {"bucket": "proj-in", "env": worker_env, "operations": operations + operations[:1]},
                       {"env": stand_ins(client_env, operations), "command": stand_ins(command, operations),
                        "no_subscriptions": stand_ins(command, [])})
    shell = subprocess.run(["bash", "-c", 'eval "$CLIENT_ENV" && env -0'], env={"CLIENT_ENV": values["env"]},
                           capture_output=True, text=True, check=True, timeout=30).stdout
    exported = dict(line.split("=", 1) for line in shell.split("\0") if line)
    assert exported["IMAGEN_BUCKET"] == "proj-in" and "IMAGEN_DEVICE" not in exported  # not the client's
    settings = Settings.from_env(exported)
    assert Layout.from_settings(settings) == Layout("drop/", "done/", "errors/", "proj-results")
    assert settings.project == "proj"

    args = shlex.split(values["command"])
    assert args[:2] == ["imagen", "backfill"]
    parsed = backfill.make_context("backfill", args[2:], obj=settings).params
    assert parsed["location"] == "gs://proj-in/drop/" and parsed["topic"] == topic
    assert parsed["only"] == tuple(operations)  # once each
    # Null (left out of the outputs) with Eventarc and before the services' apply: no pool
    # would receive what it queued.
    assert values.get("no_subscriptions") is None


_REFERENCE = re.compile(r"(?<![\w.\"])(var|local|data\.[a-z0-9_]+|google_[a-z0-9_]+)\.([a-z0-9_]+)")


# Runs a transform's function, as Pub/Sub would, on each message given on stdin.
_RUN_UDF = """
const fs = require("fs");
const transform = new Function(fs.readFileSync(process.argv[1], "utf8") + "\\nreturn " + process.argv[2] + ";")();
const messages = JSON.parse(fs.readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(messages.map((message) => transform(message, {message_id: "1"}))));
"""


def test_job_messages_without_the_operation_attribute_get_it_from_their_body(terraform):
    """The operations' subscriptions filter on attributes alone, and DESIGN.md's job message
    names its operation in its body: the jobs topic's transform copies it into the attribute
    (only where the subscriptions are filtered). Run here with Node.js, as Pub/Sub runs it."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    transform = one(terraform.resource("google_pubsub_topic", "jobs")["dynamic"])["message_transforms"]
    assert expr(transform["for_each"]) == 'local.filtered ? [file("${path.module}/job_operation_attribute.js")] : []'
    udf = one(one(transform["content"])["javascript_udf"])
    assert expr(udf["code"]) == "message_transforms.value"
    job = json.dumps({"source": "gs://b/a.png", "operation": "upscale", "params": {"steps": 20}})
    notification = {"data": json.dumps({"name": "incoming/comic/a.png", "bucket": "b"}),
                    "attributes": {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1",
                                   "objectId": "incoming/comic/a.png", "bucketId": "b"}}
    unchanged = [
        notification,
        {"data": "{}", "attributes": {"payloadFormat": "JSON_API_V1"}},
        {"data": job, "attributes": {"operation": "comic"}},  # the processor reports the disagreement
        {"data": "not json", "attributes": {}},
        {"data": "[1, 2]", "attributes": {}},
        {"data": "null", "attributes": {}},
        {"data": json.dumps({"source": "gs://b/a.png", "operation": 7}), "attributes": {}},
        {"data": json.dumps({"source": "gs://b/a.png", "operation": ""}), "attributes": {}},
        {"data": json.dumps({"source": "gs://b/a.png", "operation": "x" * 300}), "attributes": {}},
        {"data": "\ud800", "attributes": {}},
    ]
    routed = [
        ({"data": job, "attributes": {}}, {"operation": "upscale"}),
        ({"data": job, "attributes": {"sender": "catalog"}}, {"sender": "catalog", "operation": "upscale"}),
        ({"data": json.dumps({"source": "gs://b/a.png", "operation": "remove-background,upscale"})},
         {"operation": "remove-background,upscale"}),
    ]
    messages = unchanged + [message for message, _ in routed]
    script = str(TERRAFORM_DIR / "job_operation_attribute.js")
    run = subprocess.run([node, "-e", _RUN_UDF, script, udf["function_name"]],
                         input=json.dumps(messages), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert results[:len(unchanged)] == unchanged
    for (message, attributes), result in zip(routed, results[len(unchanged):], strict=True):
        assert result == {"data": message["data"], "attributes": attributes}


def test_references_resolve(terraform):
    """Every var., local., data. and resource reference names something declared."""
    declared = {
        "var": set(terraform.variables),
        "local": set(terraform.locals),
    }
    for type_, named in terraform.resources.items():
        declared[type_] = set(named)
    for type_, named in terraform.data.items():
        declared[f"data.{type_}"] = set(named)
    everything = [terraform.resources, terraform.data, terraform.locals, terraform.outputs, terraform.checks,
                  terraform.modules]
    unresolved = set()
    for text in strings_in(everything):
        for kind, name in _REFERENCE.findall(text):
            if kind.startswith("google_") and kind not in declared and "." not in kind:
                # a provider attribute path like google_project_service.enabled is declared;
                # anything else starting google_ must be too
                unresolved.add(f"{kind}.{name}")
            elif kind in declared and name not in declared[kind]:
                unresolved.add(f"{kind}.{name}")
    assert not unresolved, f"undeclared: {sorted(unresolved)}"
    sources = "\n".join(text for file, text in terraform.text.items() if file != "variables.tf")
    unused = {name for name in terraform.variables if f"var.{name}" not in sources}
    assert not unused, f"unused variables: {sorted(unused)}"
