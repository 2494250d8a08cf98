terraform {
  # `check` blocks.
  required_version = ">= 1.5"

  required_providers {
    google = {
      source = "hashicorp/google"
      # What this module uses is in 6.x from mid-2025 (Cloud Run v2 GPU fields:
      # node_selector, gpu_zonal_redundancy_disabled; a topic's message_transforms) and in 7.x.
      version = ">= 6.41, < 8.0"
    }
    # google_project_service_identity alone (the Pub/Sub and Eventarc service agents, pubsub.tf
    # and eventarc.tf): in no GA release of the google provider yet.
    google-beta = {
      source  = "hashicorp/google-beta"
      version = ">= 6.41, < 8.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region

  default_labels = merge({ app = "imagen" }, var.labels)
}

provider "google-beta" {
  project = var.project_id
  region  = var.region
}
