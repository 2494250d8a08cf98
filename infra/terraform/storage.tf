# Buckets: uniform access (IAM only, no object ACLs), no public access, versioning off
# (outputs are replaced on purpose, with generation preconditions; old versions would only
# cost money).

resource "google_storage_bucket" "input" {
  name     = var.input_bucket
  location = var.region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.storage_force_destroy

  # Failure reports are for a person to look at, then go.
  lifecycle_rule {
    condition {
      age            = var.failed_retention_days
      matches_prefix = [var.failed_prefix]
    }
    action {
      type = "Delete"
    }
  }

  # Half-finished resumable uploads of large images.
  lifecycle_rule {
    condition {
      age = 7
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  lifecycle {
    # An error, not a `check` (which only warns and applies anyway).
    precondition {
      # Each folder inside another would loop (results processed again) or mix results
      # with reports; handlers/settings.py refuses the same at start-up.
      condition = length(distinct(local.prefixes)) == 3 && alltrue([
        for pair in setproduct(local.prefixes, local.prefixes) :
        pair[0] == pair[1] || (!startswith(pair[0], pair[1]) && !startswith(pair[1], pair[0]))
      ])
      error_message = "input_prefix, output_prefix and failed_prefix must be three folders, none inside another."
    }
    precondition {
      condition     = length(var.chains) == 0 || local.filtered
      error_message = "chains need filtered subscriptions (delivery = push, or mode = gke, with subscription_filter = true): unfiltered, every pool would receive every chain's jobs."
    }
    precondition {
      condition     = !local.eventarc || var.output_bucket != ""
      error_message = "delivery = eventarc cannot filter by folder: with results in the input bucket every result wakes every service. Set output_bucket."
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_storage_bucket" "output" {
  count = var.output_bucket == "" ? 0 : 1

  name     = var.output_bucket
  location = var.region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = var.storage_force_destroy

  depends_on = [google_project_service.enabled]
}

# Compiled GPU kernels the instances share (IMAGEN_COMPILE_CACHE; handlers/compile_cache.py).
# Everything in it can be made again by compiling, so it is always destroyable, and an
# artefact goes after 30 days: old PyTorch, GPU and model versions do not pile up, and the
# next instance of an operation stores a fresh one.
resource "google_storage_bucket" "compiled" {
  count = var.compile_cache ? 1 : 0

  name     = local.compile_cache_bucket
  location = var.region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true

  lifecycle_rule {
    condition {
      age = 30
    }
    action {
      type = "Delete"
    }
  }

  lifecycle {
    precondition {
      condition     = length(local.compile_cache_bucket) <= 63
      error_message = "The compile cache bucket name \"${local.compile_cache_bucket}\" is over 63 characters: set compile_cache_bucket."
    }
  }

  depends_on = [google_project_service.enabled]
}

# New objects under the input folder only: results and failure reports never notify, so
# they cannot loop, and no other upload to the bucket costs a message.
resource "google_storage_notification" "incoming" {
  count = local.pubsub ? 1 : 0

  bucket             = google_storage_bucket.input.name
  topic              = google_pubsub_topic.jobs[0].id
  payload_format     = "JSON_API_V1"
  event_types        = ["OBJECT_FINALIZE"]
  object_name_prefix = var.input_prefix

  depends_on = [google_pubsub_topic_iam_member.gcs_publishes_jobs]
}
