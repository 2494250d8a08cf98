# imagen on Google Cloud: a bucket whose new images are processed on GPUs.
#
#   input bucket --(Storage notification, incoming/ only)--> notification topic
#     --(one filtered subscription per operation)--> Cloud Run GPU service (push, OIDC)
#                                                  or GKE worker pool (pull, KEDA)
#     --(20 unanswered deliveries)--> the operation's dead-letter topic and subscription
#     (what no operation's filter takes --> the unrouted subscriptions, kept and alerted on)
#
# One file per concern: storage.tf, pubsub.tf, cloudrun.tf, eventarc.tf, gke.tf, iam.tf,
# build.tf, monitoring.tf. docs/deploy.md walks through an apply.

data "google_project" "this" {
  project_id = var.project_id
}

data "google_storage_project_service_account" "gcs" {
  project = var.project_id
}

locals {
  # What the worker pools serve: an operation each, or a chain of them (var.chains), the key
  # of every per-pool resource, and its name in resource names ("remove-background,upscale"
  # -> "remove-background-upscale").
  # (chains sorted: the unrouted filters below do not change with their order)
  pool_list  = distinct(concat(var.operations, sort(var.chains)))
  pools      = toset(local.pool_list)
  pool_names = { for pool in local.pools : pool => replace(pool, ",", "-") }
  # Service account ids are at most 30 characters: a long chain's is a digest of it.
  pool_accounts = {
    for pool, name in local.pool_names : pool =>
    length("${var.name_prefix}-${name}") <= 30 ? "${var.name_prefix}-${name}" : "${var.name_prefix}-chain-${substr(sha256(pool), 0, 8)}"
  }

  cloudrun = var.mode == "cloudrun"
  gke      = var.mode == "gke"
  push     = local.cloudrun && var.delivery == "push"
  eventarc = local.cloudrun && var.delivery == "eventarc"

  # Our own topic and subscriptions carry the jobs unless Eventarc does (it makes its own).
  pubsub = local.push || local.gke

  # What the services run: the images built by this apply (build.tf), or the tag given.
  image_tag = var.image_tag != "" ? var.image_tag : (var.build_images ? module.images.tag : "")
  # A Cloud Run service needs an image: none without a tag.
  services = local.cloudrun && local.image_tag != "" ? local.pools : toset([])
  # Push subscriptions need a service URL to push to.
  subscriptions = local.gke ? local.pools : (local.push ? local.services : toset([]))

  # From delivery attempt 5 on (handlers/processor.py MAX_ATTEMPTS) a job that hits a
  # transient fault gets a failure report instead of another retry. Pub/Sub allows more
  # deliveries than that before the dead-letter topic, for the ones that never reach a job:
  # Cloud Run answering 429 while every instance is busy (a burst larger than
  # max_instances: 20 attempts are about two hours of backoff), a worker handing a waiting
  # job back on shutdown. So a job that ran and kept failing has its report, and a dead
  # letter is a message imagen never answered with one.
  max_delivery_attempts = 20
  # Push requests end after 600 s at most, so that is also the longest a push job can take;
  # the pull worker extends its lease beyond this for longer jobs.
  ack_deadline_seconds = 600

  input_bucket  = google_storage_bucket.input.name
  output_bucket = var.output_bucket == "" ? google_storage_bucket.input.name : google_storage_bucket.output[0].name

  pubsub_service_agent = "serviceAccount:service-${data.google_project.this.number}@gcp-sa-pubsub.iam.gserviceaccount.com"
  gcs_service_agent    = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"

  image_repository = "${var.region}-docker.pkg.dev/${var.project_id}/${var.artifact_repository}"

  # (operation, bucket) pairs for the buckets managed elsewhere that job messages may read:
  # each operation's worker reads sources there and writes failure reports beside them.
  allowed_sources = {
    for pair in setproduct(tolist(local.pools), distinct(var.allowed_buckets)) : "${pair[0]}/${pair[1]}" => {
      operation = pair[0]
      bucket    = pair[1]
    }
    if pair[1] != var.input_bucket
  }

  # Each uploader's reads (iam.tf): results in the output bucket, reports in the input bucket.
  uploader_reads = merge([
    for member in var.uploaders : {
      "${member} results" = { member = member, bucket = local.output_bucket, prefix = var.output_prefix, folder = "results" }
      "${member} reports" = { member = member, bucket = google_storage_bucket.input.name, prefix = var.failed_prefix, folder = "reports" }
    }
  ]...)

  compile_cache_bucket = var.compile_cache_bucket != "" ? var.compile_cache_bucket : "${var.input_bucket}-compiled"

  model_mirror_bucket = var.model_mirror == "" ? "" : split("/", trimprefix(var.model_mirror, "gs://"))[0]

  # Which messages an operation's subscription receives: Storage notifications for objects
  # in its folder, and job messages from other services, which carry no objectId and must
  # name the operation in an `operation` attribute (docs/deploy.md). A chain's pool
  # ("remove-background,upscale", var.chains) has its own folder and attribute value.
  subscription_filters = {
    for op in local.pools : op => join(" OR ", [
      "hasPrefix(attributes.objectId, \"${var.input_prefix}${op}/\")",
      "attributes.operation = \"${op}\"",
    ])
  }

  # Each operation's workers receive only their own folders and job messages (push or pull):
  # a job for another operation reached nobody else, so they report it (IMAGEN_FILTERED_SUBSCRIPTION).
  filtered = local.pubsub && var.subscription_filter

  # The three folders; none may lie inside another (storage.tf, as handlers/settings.py).
  prefixes = [var.input_prefix, var.output_prefix, var.failed_prefix]

  # What no pool's filter takes, which Pub/Sub would drop unseen, kept instead by
  # subscriptions (pubsub.tf) that monitoring.tf alerts on:
  # - <prefix>-unrouted: uploads outside every pool's folder (a typo, a chain not in
  #   var.chains, an object straight under the input prefix) and job messages without an
  #   `operation` attribute (the jobs topic's transform copies it from the body: pubsub.tf);
  # - <prefix>-unrouted-jobs: job messages whose `operation` attribute names no deployed
  #   operation or chain (a typo, one this deployment leaves out).
  # A filter holds at most 256 bytes: one filter for both would not fit four operations, and
  # the four operations with `incoming/` leave no room for a chain's folder. So the names that
  # start with an operation that begins a chain ("remove-background..." for
  # remove-background,upscale) are set apart as a whole in those two, and kept, less that
  # operation's pools, by two more: <prefix>-unrouted-<operation> and
  # <prefix>-unrouted-jobs-<operation>. Without chains the filters are as they always were.
  # A check says when one cannot be written (a long input prefix, many chains of one head).
  chain_heads = sort(distinct([for chain in var.chains : split(",", chain)[0]]))
  unrouted_filter = format("NOT (%s)", join(" OR ", concat(
    # var.operations as it is without chains: the filter deployments were made with.
    [for pool in length(var.chains) > 0 ? local.pool_list : var.operations : "hasPrefix(attributes.objectId, \"${var.input_prefix}${pool}/\")"
    if !contains(local.chain_heads, split(",", pool)[0])],
    [for head in local.chain_heads : "hasPrefix(attributes.objectId, \"${var.input_prefix}${head}\")"],
    ["attributes:operation"],
  )))
  unrouted_jobs_filter = format("attributes:operation AND NOT (%s)", join(" OR ", concat(
    [for pool in local.pool_list : "attributes.operation = \"${pool}\"" if !contains(local.chain_heads, split(",", pool)[0])],
    [for head in local.chain_heads : "hasPrefix(attributes.operation, \"${head}\")"],
  )))
  # subscription name (after the prefix) -> its filter, whether or not it fits
  unrouted_candidates = merge(
    { unrouted = local.unrouted_filter, "unrouted-jobs" = local.unrouted_jobs_filter },
    [for head in local.chain_heads : {
      "unrouted-${head}" = format("NOT attributes:operation AND hasPrefix(attributes.objectId, \"%s%s\") AND NOT (%s)",
        var.input_prefix, head, join(" OR ", [
          for pool in local.pool_list : "hasPrefix(attributes.objectId, \"${var.input_prefix}${pool}/\")" if split(",", pool)[0] == head
      ]))
      "unrouted-jobs-${head}" = format("hasPrefix(attributes.operation, \"%s\") AND NOT (%s)", head, join(" OR ", [
        for pool in local.pool_list : "attributes.operation = \"${pool}\"" if split(",", pool)[0] == head
      ]))
    }]...
  )
  unrouted_filters_fit = alltrue([for text in values(local.unrouted_candidates) : length(text) <= 256])
  # those created
  unrouted_filters = local.filtered ? { for name, text in local.unrouted_candidates : name => text if length(text) <= 256 } : {}

  # The environment every worker shares (DESIGN.md, Configuration); IMAGEN_OPERATIONS and
  # IMAGEN_SUBSCRIPTION are per operation.
  common_env = merge(
    {
      GOOGLE_CLOUD_PROJECT   = var.project_id
      IMAGEN_DEVICE          = "cuda" # fail loudly rather than run diffusion on a CPU
      IMAGEN_INPUT_PREFIX    = var.input_prefix
      IMAGEN_OUTPUT_BUCKET   = local.output_bucket
      IMAGEN_OUTPUT_PREFIX   = var.output_prefix
      IMAGEN_FAILED_PREFIX   = var.failed_prefix
      IMAGEN_ALLOWED_BUCKETS = join(",", distinct(concat([var.input_bucket], var.allowed_buckets)))
    },
    var.results_topic ? { IMAGEN_RESULTS_TOPIC = google_pubsub_topic.results[0].id } : {},
    var.compile_cache ? { IMAGEN_COMPILE_CACHE = "gs://${google_storage_bucket.compiled[0].name}/" } : {},
    # Images built without models restore them at start (Cloud Run: into /tmp, cloudrun.tf;
    # GKE: into the volume infra/k8s/overlays/model-mirror mounts at /models).
    var.model_mirror != "" ? { IMAGEN_MODEL_MIRROR = var.model_mirror } : {},
    # Filtered, a pool reports what it cannot serve (nobody else received it); unfiltered,
    # every pool receives every job, and the first operation's pool reports those none serves.
    local.filtered ? { IMAGEN_FILTERED_SUBSCRIPTION = "true" } : { IMAGEN_DEPLOYED_OPERATIONS = join(",", var.operations) },
    var.extra_env,
  )
  # What `imagen submit` and `imagen backfill` need, run elsewhere, to find the outputs and
  # reports as the workers write them (output client_env).
  client_env_names = ["GOOGLE_CLOUD_PROJECT", "IMAGEN_INPUT_PREFIX", "IMAGEN_OUTPUT_BUCKET", "IMAGEN_OUTPUT_PREFIX", "IMAGEN_FAILED_PREFIX"]
}

resource "google_project_service" "enabled" {
  for_each = toset(concat(
    [
      "artifactregistry.googleapis.com",
      "cloudbuild.googleapis.com",
      "iam.googleapis.com",
      "iamcredentials.googleapis.com",
      "logging.googleapis.com",
      "monitoring.googleapis.com",
      "pubsub.googleapis.com",
      "run.googleapis.com",
      "secretmanager.googleapis.com",
      "storage.googleapis.com",
    ],
    local.eventarc ? ["eventarc.googleapis.com"] : [],
    local.gke ? ["container.googleapis.com"] : [],
  ))

  project = var.project_id
  service = each.value
  # Other things in the project may use these APIs too.
  disable_on_destroy = false
}

check "unrouted_filter_fits" {
  assert {
    condition     = !local.filtered || local.unrouted_filters_fit
    error_message = "An unrouted subscription's filter would exceed Pub/Sub's 256 bytes (many operations and chains, or a long input_prefix): it is not created, so uploads outside every pool's folder, or job messages for an operation no pool serves, are dropped unseen. Shorten input_prefix or deploy fewer chains, or set subscription_filter = false (no chains then)."
  }
}

check "k8s_names" {
  assert {
    condition     = var.mode != "gke" || (var.name_prefix == "imagen" && var.gke_namespace == "imagen")
    error_message = "infra/k8s names its subscriptions, dead-letter topics and service accounts imagen-<operation>, in the namespace imagen: with another name_prefix or gke_namespace, rename them there too (the namespace of infra/k8s's kustomizations, base and overlays), or Workload Identity binds accounts no pod uses."
  }
}

check "cloud_run_has_an_image" {
  assert {
    condition     = !local.cloudrun || local.image_tag != ""
    error_message = "No image to run (build_images = false and no image_tag): there are no Cloud Run services, so no push subscriptions either; on a deployment that has them this plan removes them, with the jobs they hold. Set image_tag in terraform.tfvars, or build_images = true."
  }
}

