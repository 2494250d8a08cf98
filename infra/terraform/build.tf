# Building the images (cloudbuild.yaml): the Artifact Registry repository, the Hugging Face
# token's secret, a bucket for the uploaded sources, and the build's service account.

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

# The secret only: its value (a version) is added by hand, so it is never in the state.
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
  description  = "Builds and pushes the imagen images; with _DEPLOY, rolls the Cloud Run services."

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

# _DEPLOY=true: update each service (developer on that service only) and act as its
# runtime service account, which a new revision runs as.
resource "google_cloud_run_v2_service_iam_member" "build_deploys" {
  for_each = local.services

  name     = google_cloud_run_v2_service.worker[each.key].name
  location = var.region
  role     = "roles/run.developer"
  member   = google_service_account.build.member
}

resource "google_service_account_iam_member" "build_acts_as_worker" {
  for_each = local.cloudrun ? local.operations : toset([])

  service_account_id = google_service_account.worker[each.key].name
  role               = "roles/iam.serviceAccountUser"
  member             = google_service_account.build.member
}
