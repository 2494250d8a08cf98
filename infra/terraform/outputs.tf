output "input_bucket" {
  description = "Drop images under gs://<this>/<input_prefix><operation>/."
  value       = google_storage_bucket.input.name
}

output "output_bucket" {
  description = "Results appear under gs://<this>/<output_prefix><operation>/."
  value       = local.output_bucket
}

output "compile_cache" {
  description = "IMAGEN_COMPILE_CACHE: where the workers share compiled GPU kernels (null with compile_cache = false)."
  value       = var.compile_cache ? "gs://${google_storage_bucket.compiled[0].name}/" : null
}

output "notification_topic" {
  description = "The topic of the Storage notifications; other services publish job messages here (their `operation` attribute is copied from the body where missing)."
  value       = local.pubsub ? google_pubsub_topic.jobs[0].id : null
}

output "subscriptions" {
  description = "Operation -> its job subscription."
  value       = { for op, sub in google_pubsub_subscription.jobs : op => sub.id }
}

output "dead_letter_topics" {
  description = "Operation -> its dead-letter topic."
  value       = { for op, topic in google_pubsub_topic.dead_letter : op => topic.id }
}

output "dead_letter_subscriptions" {
  description = "Operation -> the subscription that keeps its dead letters."
  value       = { for op, sub in google_pubsub_subscription.dead_letter : op => sub.id }
}

output "unrouted_subscription" {
  description = "Keeps the uploads no operation's subscription takes, and job messages naming no operation (null when not created)."
  value       = try(google_pubsub_subscription.unrouted["unrouted"].id, null)
}

output "unrouted_jobs_subscription" {
  description = "Keeps the job messages whose operation attribute names no deployed operation (null when not created)."
  value       = try(google_pubsub_subscription.unrouted["unrouted-jobs"].id, null)
}

output "unrouted_chain_subscriptions" {
  description = "With chains: the subscriptions that keep what starts with a chain's first operation but no pool takes (imagen-unrouted-<operation>, imagen-unrouted-jobs-<operation>)."
  value       = { for name, sub in google_pubsub_subscription.unrouted : name => sub.id if !contains(["unrouted", "unrouted-jobs"], name) }
}

output "client_env" {
  description = "Shell lines that point `imagen submit` and `imagen backfill` at this deployment's buckets and folders, as its workers have them: eval \"$(terraform output -raw client_env)\"."
  value = join("", concat(
    ["export IMAGEN_BUCKET='${google_storage_bucket.input.name}'\n"],
    [for name in local.client_env_names : "export ${name}='${local.common_env[name]}'\n"],
  ))
}

output "backfill_command" {
  description = "`imagen backfill` for this deployment's input folder: its topic, and --only per deployed operation and chain (so no job is queued that no worker serves). Run with client_env set; add --dry-run first. Null while there are no subscriptions (Cloud Run without an image yet) and with Eventarc (no topic)."
  value = length(local.subscriptions) > 0 ? join(" ", concat(
    ["imagen", "backfill", "gs://${google_storage_bucket.input.name}/${local.common_env["IMAGEN_INPUT_PREFIX"]}"],
    ["--topic", google_pubsub_topic.jobs[0].id],
    flatten([for pool in local.pool_list : ["--only", pool]]),
  )) : null
}

output "results_topic" {
  description = "The results topic (IMAGEN_RESULTS_TOPIC), when enabled."
  value       = var.results_topic ? google_pubsub_topic.results[0].id : null
}

output "service_urls" {
  description = "Operation -> Cloud Run service URL (private: callers need run.invoker)."
  value       = { for op, svc in google_cloud_run_v2_service.worker : op => svc.uri }
}

output "image_tag" {
  description = "The tag the workers run (imagen-<operation>:<tag>): built by this apply (build_images) or the image_tag given; null when there is none yet. GKE: the tag for infra/k8s/base/kustomization.yaml."
  value       = local.image_tag != "" ? local.image_tag : null
}

output "image_repository" {
  description = "Push images here as imagen-<operation>:<tag> (cloudbuild.yaml does)."
  value       = local.image_repository
}

output "worker_service_accounts" {
  description = "Operation -> the worker's service account."
  value       = { for op, sa in google_service_account.worker : op => sa.email }
}

output "build_service_account" {
  description = "Building by hand (build_images = false): pass to `gcloud builds submit --service-account`."
  value       = google_service_account.build.id
}

output "build_source_staging_dir" {
  description = "Building by hand (build_images = false): pass to `gcloud builds submit --gcs-source-staging-dir`."
  value       = "gs://${google_storage_bucket.build_sources.name}/source"
}

output "hf_token_secret" {
  description = "The secret holding the Hugging Face token the builds use (a new version replaces it)."
  value       = google_secret_manager_secret.hf_token.secret_id
}

output "keda_service_account" {
  description = "GKE mode: annotate the KEDA operator's Kubernetes service account with this (iam.gke.io/gcp-service-account)."
  value       = local.gke ? google_service_account.keda[0].email : null
}

output "k8s_config_env" {
  description = "GKE mode: the contents of infra/k8s/base/config.env."
  value = local.gke ? join("", [
    for name, value in local.common_env : "${name}=${value}\n"
  ]) : null
}

output "k8s_workload_identity_env" {
  description = "GKE mode: the contents of infra/k8s/base/workload-identity.env."
  value       = local.gke ? "SERVICE_ACCOUNT_DOMAIN=${var.project_id}.iam.gserviceaccount.com\n" : null
}
