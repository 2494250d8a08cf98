# Building the images (cloudbuild.yaml): the Artifact Registry repository, the Hugging Face
# token's secret, a bucket for the uploaded sources, the build's service account, and (with
# build_images) the build itself, run from this apply by modules/images.

module "images" {
  source = "./modules/images"

  source_root = abspath("${path.module}/../..")
  # image_tag set: those images are yours, nothing is built.
  build        = var.build_images && var.image_tag == ""
  project_id   = var.project_id
  region       = var.region
  build_region = var.build_region
  repository   = google_artifact_registry_repository.images.repository_id
  operations   = var.operations
  chains       = var.chains
  revision     = var.image_revision
  model_source = var.build_model_source != "" ? var.build_model_source : (var.model_mirror != "" ? "none" : "hub")
  # From the resources rather than the variables, so the build waits for them.
  hf_token_secret       = google_secret_manager_secret.hf_token.secret_id
  build_service_account = google_service_account.build.id
  staging_dir           = "gs://${google_storage_bucket.build_sources.name}/source"

  depends_on = [
    google_artifact_registry_repository_iam_member.build_pushes,
    google_secret_manager_secret_iam_member.build_reads_token,
    google_storage_bucket_iam_member.build_reads_sources,
    google_project_iam_member.build_writes_logs,
  ]
}

locals {
  pinned_image_tags = distinct(compact(concat([var.image_tag], var.keep_image_tags)))
}

resource "google_artifact_registry_repository" "images" {
  location      = var.region
  repository_id = var.artifact_repository
  description   = "imagen worker images (CUDA torch plus baked models)"
  format        = "DOCKER"

  # A tag is a commit: once pushed it never points anywhere else, so the manifests in
  # infra/k8s and the Cloud Run revisions can name tags instead of digests.
  docker_config {
    immutable_tags = true
  }

  # Each version is 6-13 GB: keep the most recent few, drop the rest.
  cleanup_policy_dry_run = false
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = var.keep_image_versions
    }
  }
  # The tag you pin the services to (image_tag) and keep_image_tags (the one GKE's manifests
  # name) are never deleted, however old and however many newer ones a CI pushes meanwhile: a
  # node or instance that starts later pulls it. (A tag this apply builds is the newest when
  # it deploys; it cannot be named here: the build depends on this repository.)
  dynamic "cleanup_policies" {
    for_each = length(local.pinned_image_tags) > 0 ? [local.pinned_image_tags] : []
    content {
      id     = "keep-deployed"
      action = "KEEP"
      condition {
        tag_state    = "TAGGED"
        tag_prefixes = cleanup_policies.value
      }
    }
  }
  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      tag_state  = "ANY"
      older_than = "2592000s" # 30 days; the keep-recent policy wins for the newest
    }
  }

  depends_on = [google_project_service.enabled]
}

# The secret only: its value (a version) is stored by scripts/build_images.sh or by hand,
# never through Terraform, so it is never in the state.
resource "google_secret_manager_secret" "hf_token" {
  secret_id = var.hf_token_secret

  replication {
    auto {}
  }

  depends_on = [google_project_service.enabled]
}

# `gcloud builds submit --gcs-source-staging-dir gs://<this>/source` uploads here.
resource "google_storage_bucket" "build_sources" {
  name     = "${var.project_id}-${var.name_prefix}-build"
  location = var.region

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true # only copies of the sources

  lifecycle_rule {
    condition {
      age = 7
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.enabled]
}

resource "google_service_account" "build" {
  account_id   = "${var.name_prefix}-build"
  display_name = "imagen Cloud Build"
  description  = "Builds and pushes the imagen images."

  depends_on = [google_project_service.enabled]
}

resource "google_artifact_registry_repository_iam_member" "build_pushes" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.build.member
}

resource "google_secret_manager_secret_iam_member" "build_reads_token" {
  secret_id = google_secret_manager_secret.hf_token.id
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.build.member
}

resource "google_storage_bucket_iam_member" "build_reads_sources" {
  bucket = google_storage_bucket.build_sources.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.build.member
}

# Build logs (options.logging CLOUD_LOGGING_ONLY); writing log entries is a project-level
# permission.
resource "google_project_iam_member" "build_writes_logs" {
  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = google_service_account.build.member
}
