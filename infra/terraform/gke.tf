# mode = "gke": the Google side of the workers in infra/k8s. The cluster is assumed to
# exist, with Workload Identity, a GPU node pool (its GPU is the pool's and infra/k8s's node
# selector's, not var.gpu_type, which is Cloud Run's) and KEDA installed;
# docs/deploy.md has the commands. Here: each worker's Kubernetes service account
# (imagen-<operation> in var.gke_namespace) acts as its Google service account, which may
# pull from its own subscription; KEDA's may read backlogs from Cloud Monitoring.

locals {
  workload_pool = "${var.project_id}.svc.id.goog"
}

resource "google_service_account_iam_member" "worker_workload_identity" {
  for_each = local.gke ? local.pools : toset([])

  service_account_id = google_service_account.worker[each.key].name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[${var.gke_namespace}/imagen-${local.pool_names[each.key]}]"
}

# Pull, ack and extend leases on its own subscription; no other.
resource "google_pubsub_subscription_iam_member" "worker_pulls" {
  for_each = local.gke ? local.pools : toset([])

  subscription = google_pubsub_subscription.jobs[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = google_service_account.worker[each.key].member
}

# --- KEDA ---------------------------------------------------------------------------------

resource "google_service_account" "keda" {
  count = local.gke ? 1 : 0

  account_id   = "${var.name_prefix}-keda"
  display_name = "KEDA operator (imagen)"
  description  = "Reads Pub/Sub subscription backlogs from Cloud Monitoring to scale the imagen workers."

  depends_on = [google_project_service.enabled]
}

# The gcp-pubsub scaler reads num_undelivered_messages from Cloud Monitoring; metric reads
# can be granted only at project level. Read-only, no data access.
resource "google_project_iam_member" "keda_reads_metrics" {
  count = local.gke ? 1 : 0

  project = var.project_id
  role    = "roles/monitoring.viewer"
  member  = google_service_account.keda[0].member
}

resource "google_service_account_iam_member" "keda_workload_identity" {
  count = local.gke ? 1 : 0

  service_account_id = google_service_account.keda[0].name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[${var.keda_namespace}/${var.keda_service_account}]"
}

# The GPU nodes write the workers' logs and metrics (GKE's agents run as the node's account:
# without this role, in projects whose default compute account holds none, which is the
# default for organisations since May 2024, no worker line reaches Cloud Logging and the
# alerts never fire) and pull the worker images.
resource "google_project_iam_member" "gke_nodes_default_role" {
  count = local.gke && var.gke_node_service_account != "" ? 1 : 0

  project = var.project_id
  role    = "roles/container.defaultNodeServiceAccount"
  member  = "serviceAccount:${var.gke_node_service_account}"
}

resource "google_artifact_registry_repository_iam_member" "gke_nodes_pull" {
  count = local.gke && var.gke_node_service_account != "" ? 1 : 0

  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = "serviceAccount:${var.gke_node_service_account}"
}
