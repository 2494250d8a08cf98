# Identities and least privilege. Every grant is on one resource (a bucket, a topic, a
# subscription, a service, a service account), never on the project, except the few roles
# that exist only at project level (noted where they are). No primitive roles, no allUsers.

# --- the workers --------------------------------------------------------------------------

# One identity per pool, an operation's or a chain's (the Cloud Run service's, or the GKE
# worker's through Workload Identity): a compromised worker reaches only what every worker must.
resource "google_service_account" "worker" {
  for_each = local.pools

  account_id   = local.pool_accounts[each.key]
  display_name = "imagen ${each.key} worker"
  description  = "Reads input images, writes results and failure reports."

  depends_on = [google_project_service.enabled]
}

# Read the images to process (and the object metadata that may carry parameters).
resource "google_storage_bucket_iam_member" "worker_reads_input" {
  for_each = local.pools

  bucket = google_storage_bucket.input.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.worker[each.key].member
}

# Write (and replace: a retry rewrites its report) failure reports, and the running markers
# a redelivered job keeps beside its report (deleted when it ends), in failed/ only.
resource "google_storage_bucket_iam_member" "worker_writes_failures" {
  for_each = local.pools

  bucket = google_storage_bucket.input.name
  role   = "roles/storage.objectUser"
  member = google_service_account.worker[each.key].member

  condition {
    title       = "failure-reports-only"
    description = "Objects under ${var.failed_prefix}"
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.input.name}/objects/${var.failed_prefix}\")"
  }
}

# Write, read back (the idempotency check reads the output's metadata) and replace results,
# under the output folder only.
resource "google_storage_bucket_iam_member" "worker_writes_results" {
  for_each = local.pools

  bucket = local.output_bucket
  role   = "roles/storage.objectUser"
  member = google_service_account.worker[each.key].member

  condition {
    title       = "results-only"
    description = "Objects under ${var.output_prefix}"
    expression  = "resource.name.startsWith(\"projects/_/buckets/${local.output_bucket}/objects/${var.output_prefix}\")"
  }
}

# Sources that job messages may name, in buckets managed elsewhere.
resource "google_storage_bucket_iam_member" "worker_reads_allowed" {
  for_each = local.allowed_sources

  bucket = each.value.bucket
  role   = "roles/storage.objectViewer"
  member = google_service_account.worker[each.value.operation].member
}

# A job message's failure report goes beside its source (failed/ of the source's bucket), as
# in the input bucket: without this grant the report's write is refused, and the job is
# retried (GPU work included) until it is dead-lettered with no report.
resource "google_storage_bucket_iam_member" "worker_reports_allowed" {
  for_each = local.allowed_sources

  bucket = each.value.bucket
  role   = "roles/storage.objectUser"
  member = google_service_account.worker[each.value.operation].member

  condition {
    title       = "failure-reports-only"
    description = "Objects under ${var.failed_prefix}"
    expression  = "resource.name.startsWith(\"projects/_/buckets/${each.value.bucket}/objects/${var.failed_prefix}\")"
  }
}

# A message no delivery can settle (unparseable, a job message for a bucket not allowed) is
# moved by the worker to its pool's dead-letter topic at once (IMAGEN_DEAD_LETTER_TOPIC).
resource "google_pubsub_topic_iam_member" "worker_dead_letters" {
  for_each = local.pubsub ? local.pools : toset([])

  topic  = google_pubsub_topic.dead_letter[each.key].id
  role   = "roles/pubsub.publisher"
  member = google_service_account.worker[each.key].member
}

resource "google_pubsub_topic_iam_member" "worker_publishes_results" {
  for_each = var.results_topic ? local.pools : toset([])

  topic  = google_pubsub_topic.results[0].id
  role   = "roles/pubsub.publisher"
  member = google_service_account.worker[each.key].member
}

# The compile cache: load the operation's compiled kernels and store them when missing (never
# replace: no delete permission), in the operation's own folder only (a chain's pool: each of
# its operations'). An artefact is code the workers run, so no worker can write one another
# operation loads.
resource "google_storage_bucket_iam_member" "worker_loads_compiled" {
  for_each = var.compile_cache ? local.pools : toset([])

  bucket = google_storage_bucket.compiled[0].name
  role   = "roles/storage.objectViewer"
  member = google_service_account.worker[each.key].member

  condition {
    title       = "own-operation-only"
    description = "Objects under ${join("/, ", split(",", each.key))}/"
    expression = join(" || ", [
      for op in split(",", each.key) :
      "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.compiled[0].name}/objects/${op}/\")"
    ])
  }
}

resource "google_storage_bucket_iam_member" "worker_stores_compiled" {
  for_each = var.compile_cache ? local.pools : toset([])

  bucket = google_storage_bucket.compiled[0].name
  role   = "roles/storage.objectCreator"
  member = google_service_account.worker[each.key].member

  condition {
    title       = "own-operation-only"
    description = "Objects under ${join("/, ", split(",", each.key))}/"
    expression = join(" || ", [
      for op in split(",", each.key) :
      "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.compiled[0].name}/objects/${op}/\")"
    ])
  }
}

# With a model mirror the workers (Cloud Run or GKE) restore their models from it at start.
resource "google_storage_bucket_iam_member" "worker_reads_model_mirror" {
  for_each = var.model_mirror != "" ? local.pools : toset([])

  bucket = local.model_mirror_bucket
  role   = "roles/storage.objectViewer"
  member = google_service_account.worker[each.key].member

  lifecycle {
    # imagen refuses to start on such a mirror (handlers/settings.py): say so at plan.
    precondition {
      condition     = !contains(concat([var.input_bucket, local.output_bucket], var.allowed_buckets), local.model_mirror_bucket)
      error_message = "model_mirror = \"${var.model_mirror}\" is in a bucket that holds images (the input or output bucket, or allowed_buckets): models carry code the workers run (RMBG's), so whoever can upload there could run code on every worker. Mirror them to a bucket only you can write."
    }
  }
}

# --- the people and services that drop images (var.uploaders) ---------------------------

# New objects under the input folder only: an upload may not replace or delete another, nor
# write where imagen writes (a planted failure report or running marker would stop a job).
resource "google_storage_bucket_iam_member" "uploader_uploads" {
  for_each = toset(var.uploaders)

  bucket = google_storage_bucket.input.name
  role   = "roles/storage.objectCreator"
  member = each.value

  condition {
    title       = "uploads-only"
    description = "New objects under ${var.input_prefix}"
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.input.name}/objects/${var.input_prefix}\")"
  }
}

# What comes of them, by name: results and failure reports (imagen submit --wait reads both).
# A list request names the bucket, not an object, so the conditions let no listing through.
resource "google_storage_bucket_iam_member" "uploader_reads" {
  for_each = local.uploader_reads

  bucket = each.value.bucket
  role   = "roles/storage.objectViewer"
  member = each.value.member

  condition {
    title       = "${each.value.folder}-only"
    description = "Objects under ${each.value.prefix}"
    expression  = "resource.name.startsWith(\"projects/_/buckets/${each.value.bucket}/objects/${each.value.prefix}\")"
  }
}

# --- Pub/Sub push -------------------------------------------------------------------------

# Signs the push requests' OIDC tokens; holds run.invoker on the services and nothing else.
resource "google_service_account" "push" {
  count = local.push ? 1 : 0

  account_id   = "${var.name_prefix}-push"
  display_name = "imagen Pub/Sub push"
  description  = "Identity of Pub/Sub push requests to the imagen services."

  depends_on = [google_project_service.enabled]
}

# The Pub/Sub service agent mints the OIDC tokens as the push account: token creator on
# that one account (not the project).
resource "google_service_account_iam_member" "pubsub_signs_as_push" {
  count = local.push ? 1 : 0

  service_account_id = google_service_account.push[0].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_service_agent

  depends_on = [google_project_service_identity.pubsub]
}

resource "google_cloud_run_v2_service_iam_member" "push_invokes" {
  for_each = local.push ? local.services : toset([])

  name     = google_cloud_run_v2_service.worker[each.key].name
  location = var.region
  role     = "roles/run.invoker"
  member   = google_service_account.push[0].member
}
