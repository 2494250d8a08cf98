# --- where --------------------------------------------------------------------------------

variable "project_id" {
  description = "The Google Cloud project everything is created in."
  type        = string
}

variable "region" {
  description = "Region of the buckets, Cloud Run services, Artifact Registry repository and Eventarc triggers. It must offer the GPU type on Cloud Run (e.g. us-central1, europe-west1, europe-west4, asia-southeast1)."
  type        = string
  default     = "us-central1"
}

variable "name_prefix" {
  description = "Prefix of every resource name (topics, subscriptions, services, service accounts: <prefix>-<operation>), but for artifact_repository's and hf_token_secret's defaults: a second deployment in the same project sets those two as well. infra/k8s assumes the default, imagen."
  type        = string
  default     = "imagen"

  validation {
    # Service account ids are 6-30 characters: <prefix>-remove-background must fit.
    condition     = can(regex("^[a-z][a-z0-9-]{1,11}$", var.name_prefix))
    error_message = "name_prefix: 2-12 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "labels" {
  description = "Labels added to every resource that takes labels."
  type        = map(string)
  default     = {}
}

# --- buckets and folders ------------------------------------------------------------------

variable "input_bucket" {
  description = "Name of the bucket users drop images into (created here), under <input_prefix><operation>/."
  type        = string
}

variable "output_bucket" {
  description = "Name of the bucket results are written to (created here); empty: the input bucket. A separate bucket is required with delivery = \"eventarc\" (see docs/deploy.md)."
  type        = string
  default     = ""
}

variable "input_prefix" {
  description = "Folder watched for new images (IMAGEN_INPUT_PREFIX)."
  type        = string
  default     = "incoming/"

  validation {
    # As handlers/settings.py checks IMAGEN_INPUT_PREFIX at start-up, so a bad value stops the plan
    # rather than every worker; stricter in its characters, as the prefix is written into
    # Pub/Sub filters (quoted, and measured in bytes).
    condition     = can(regex("^(([A-Za-z0-9_-]|\\.[A-Za-z0-9_-]|\\.\\.[A-Za-z0-9._-])[A-Za-z0-9._-]*/)+$", var.input_prefix))
    error_message = "input_prefix: a folder like \"incoming/\" (letters, digits, . _ - and /; ends with /, no leading /, empty, . or .. segment)."
  }
}

variable "output_prefix" {
  description = "Folder results are written under (IMAGEN_OUTPUT_PREFIX)."
  type        = string
  default     = "processed/"

  validation {
    # As handlers/settings.py checks IMAGEN_OUTPUT_PREFIX at start-up, so a bad value stops the plan
    # rather than every worker.
    condition     = can(regex("^(([A-Za-z0-9_-]|\\.[A-Za-z0-9_-]|\\.\\.[A-Za-z0-9._-])[A-Za-z0-9._-]*/)+$", var.output_prefix))
    error_message = "output_prefix: a folder like \"processed/\" (letters, digits, . _ - and /; ends with /, no leading /, empty, . or .. segment)."
  }
}

variable "failed_prefix" {
  description = "Folder failure reports are written under, in the input bucket (IMAGEN_FAILED_PREFIX)."
  type        = string
  default     = "failed/"

  validation {
    # As handlers/settings.py checks IMAGEN_FAILED_PREFIX at start-up, so a bad value stops the plan
    # rather than every worker.
    condition     = can(regex("^(([A-Za-z0-9_-]|\\.[A-Za-z0-9_-]|\\.\\.[A-Za-z0-9._-])[A-Za-z0-9._-]*/)+$", var.failed_prefix))
    error_message = "failed_prefix: a folder like \"failed/\" (letters, digits, . _ - and /; ends with /, no leading /, empty, . or .. segment)."
  }
}

variable "failed_retention_days" {
  description = "Failure reports are deleted this many days after they are written."
  type        = number
  default     = 30
}

variable "allowed_buckets" {
  description = "Other buckets that job messages may name as a source (IMAGEN_ALLOWED_BUCKETS); the workers get read access to them, and may write failure reports under the failed prefix there (an IAM condition: the bucket needs uniform bucket-level access). The input bucket is always allowed."
  type        = list(string)
  default     = []
}

variable "uploaders" {
  description = "IAM members (user:, group:, serviceAccount:) who drop images in: they may create objects under the input folder and read results under the output folder and failure reports under the failed folder, by name (no listing, replacing or deleting). Enough for gcloud storage cp and imagen submit --wait; leave empty to grant access yourself."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.uploaders : !contains(["allUsers", "allAuthenticatedUsers"], m)])
    error_message = "uploaders: allUsers and allAuthenticatedUsers are not allowed."
  }
}

variable "job_publishers" {
  description = "IAM members (e.g. serviceAccount:svc@p.iam.gserviceaccount.com) allowed to publish job messages to the notification topic. The message attribute `operation` routes a job; where a message has none, the topic copies it from the JSON body (filtered subscriptions)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.job_publishers : !contains(["allUsers", "allAuthenticatedUsers"], m)])
    error_message = "job_publishers: allUsers and allAuthenticatedUsers are not allowed."
  }
}

variable "storage_force_destroy" {
  description = "Let `terraform destroy` delete buckets that still hold objects."
  type        = bool
  default     = false
}

# --- what runs where ----------------------------------------------------------------------

variable "operations" {
  description = "Operations to deploy; each gets its own image, worker, subscription and dead-letter topic."
  type        = list(string)
  default     = ["upscale", "enhance", "comic", "remove-background"]

  validation {
    condition     = length(var.operations) > 0 && alltrue([for op in var.operations : contains(["upscale", "enhance", "comic", "remove-background"], op)])
    error_message = "operations: a non-empty subset of upscale, enhance, comic, remove-background."
  }
}

variable "chains" {
  description = "Chains to deploy, each run in order on one GPU by a pool of its own (\"remove-background,upscale\": a cut-out, then upscaled), fed from the folder <input_prefix><chain>/ and job messages whose operation names the chain. Each gets an image with its operations' models, imagen-<the chain with hyphens>, a worker, a subscription and a dead-letter topic, as an operation does. Needs filtered subscriptions (push or GKE, subscription_filter = true)."
  type        = list(string)
  default     = []

  validation {
    condition = alltrue([
      for chain in var.chains : length(split(",", chain)) >= 2
      && length(distinct(split(",", chain))) == length(split(",", chain))
      && alltrue([for op in split(",", chain) : contains(["upscale", "enhance", "comic", "remove-background"], op)])
      && length(replace(chain, ",", "-")) <= 36
    ]) && length(distinct(var.chains)) == length(var.chains)
    error_message = "chains: distinct chains of two or more different operations from upscale, enhance, comic, remove-background, comma-separated without spaces (\"remove-background,upscale\"), at most 36 characters."
  }
}

variable "mode" {
  description = "cloudrun: Cloud Run GPU services fed by Pub/Sub push (or Eventarc). gke: Pub/Sub pull subscriptions and Workload Identity for the workers in infra/k8s on an existing GKE cluster."
  type        = string
  default     = "cloudrun"

  validation {
    condition     = contains(["cloudrun", "gke"], var.mode)
    error_message = "mode: cloudrun or gke."
  }
}

variable "delivery" {
  description = "Cloud Run mode only. push: Storage notification -> topic -> filtered push subscription per operation, with retries and a dead-letter topic. eventarc: an Eventarc trigger per operation (no prefix filter, no dead-letter topic)."
  type        = string
  default     = "push"

  validation {
    condition     = contains(["push", "eventarc"], var.delivery)
    error_message = "delivery: push or eventarc."
  }
}

variable "subscription_filter" {
  description = "Filter each operation's subscription to its own folder (and job messages whose `operation` attribute names it). Filtered, the workers are told so (IMAGEN_FILTERED_SUBSCRIPTION) and report an upload whose `imagen-operation` metadata names another pool's operation (OperationNotServed). Turn off only for objects routed by that metadata alone (they must still be under the input prefix, which the bucket notification covers): every worker then receives every message and acks the ones it does not serve; a job no deployed operation serves (a chain, one left out) is reported once, by the first operation's workers (IMAGEN_DEPLOYED_OPERATIONS)."
  type        = bool
  default     = true
}

variable "results_topic" {
  description = "Create the results topic (IMAGEN_RESULTS_TOPIC): one message per finished job."
  type        = bool
  default     = false
}

# --- Cloud Run ----------------------------------------------------------------------------

variable "image_tag" {
  description = "The images' tag (imagen-<operation>:<tag>) when you build them yourself (cloudbuild.yaml tags them with COMMIT_SHA). Empty: with build_images, the tag of the build this apply runs; without, no Cloud Run services yet. The services run this tag: changing it rolls them out."
  type        = string
  default     = ""
}

variable "gpu_type" {
  description = "GPU of each Cloud Run instance (node_selector accelerator): nvidia-l4, the one this module's shapes and CUDA 12.6 image fit. Cloud Run only: GKE's is the node pool's and infra/k8s's node selector."
  type        = string
  default     = "nvidia-l4"
}

variable "gpu_zonal_redundancy" {
  description = "Reserve GPU capacity in other zones for failover (dearer, its own quota). Off: best-effort failover, the cheaper GPU price."
  type        = bool
  default     = false
}

variable "min_instances" {
  description = "Instances kept warm per operation. 0 scales to zero (a cold start loads the models); each warm GPU instance is billed all the time."
  type        = number
  default     = 0
}

variable "max_instances" {
  description = "Instance ceiling per operation; bounded by the project's Cloud Run GPU quota in the region."
  type        = number
  default     = 2

  validation {
    condition     = var.max_instances >= 1
    error_message = "max_instances: at least 1."
  }
}

variable "cpu" {
  description = "vCPUs per Cloud Run instance: 4, 6 or 8 (\"8\" or \"8000m\"); with memory, one of Cloud Run's GPU shapes (checked at plan, cloudrun.tf)."
  type        = string
  default     = "8"
  nullable    = false
}

variable "memory" {
  description = "Memory per Cloud Run instance: 16Gi to 32Gi (\"32Gi\", \"16384Mi\", \"20G\"); above 16Gi needs 6 vCPUs, above 24Gi 8. The SDXL refiner wants 32Gi."
  type        = string
  default     = "32Gi"
  nullable    = false
}

variable "service_shapes" {
  description = "Cloud Run only: cpu and memory for some services instead of cpu and memory above, keyed by operation or chain, e.g. { upscale = { cpu = \"4\", memory = \"16Gi\" } }. The smallest shape (4 vCPU, 16Gi) costs about a quarter less per instance-second than the default (8, 32Gi), GPU included, and takes half the CPU and memory quota; the SDXL refiner (enhance) wants 32Gi. Checked at plan like cpu and memory."
  type = map(object({
    cpu    = string
    memory = string
  }))
  default  = {}
  nullable = false
}

variable "startup_timeout_seconds" {
  description = "How long a new instance may take to load and warm its models before Cloud Run gives up on it (the /readyz startup probe window)."
  type        = number
  default     = 600

  validation {
    # Cloud Run caps failure_threshold x period_seconds (1800 s for GPU services).
    condition     = var.startup_timeout_seconds >= 60 && var.startup_timeout_seconds <= 1800
    error_message = "startup_timeout_seconds: 60 to 1800."
  }
}

variable "ingress" {
  description = "Cloud Run ingress. INGRESS_TRAFFIC_INTERNAL_ONLY still admits Pub/Sub push and Eventarc from this project; nothing is reachable without an identity holding run.invoker either way."
  type        = string
  default     = "INGRESS_TRAFFIC_INTERNAL_ONLY"

  validation {
    condition     = contains(["INGRESS_TRAFFIC_INTERNAL_ONLY", "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER", "INGRESS_TRAFFIC_ALL"], var.ingress)
    error_message = "ingress: one of INGRESS_TRAFFIC_INTERNAL_ONLY, INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER, INGRESS_TRAFFIC_ALL."
  }
}

variable "model_mirror" {
  description = "gs://BUCKET/PREFIX written by `imagen models mirror` (a bucket of its own: models carry code). Set: the workers restore their models from it at start instead of carrying them (build_images then builds them without models, tagged <tag>-slim; IMAGEN_MODEL_MIRROR); on GKE, apply infra/k8s/overlays/model-mirror, which gives each worker a volume to restore into. Empty: models are baked into the images."
  type        = string
  default     = ""

  validation {
    condition     = var.model_mirror == "" || can(regex("^gs://[a-z0-9][a-z0-9._-]+(/.*)?$", var.model_mirror))
    error_message = "model_mirror: empty or gs://BUCKET/PREFIX."
  }
}

variable "compile_cache" {
  description = "Share compiled GPU kernels between instances (IMAGEN_COMPILE_CACHE, a bucket created here): the first instance of an operation on a GPU type compiles after it is ready (a minute or more) and stores them; later instances load them instead of generating kernels again. false: every instance compiles on its own."
  type        = bool
  default     = true
}

variable "compile_cache_bucket" {
  description = "Name of the compile cache bucket (created here). Empty: \"<input_bucket>-compiled\"."
  type        = string
  default     = ""
}

variable "build_region" {
  description = "Where Cloud Build builds the images (they are pushed to var.region's repository either way). Empty: var.region. A new project may only build in some regions (us-central1, us-west2, europe-west1, asia-east1, australia-southeast1, southamerica-east1): where `gcloud builds submit` says FAILED_PRECONDITION ... cannot run builds in this region, set one of those."
  type        = string
  default     = ""
}

variable "extra_env" {
  description = "More environment variables for every worker, e.g. IMAGEN_MAX_PIXELS."
  type        = map(string)
  default     = {}
}

variable "deletion_protection" {
  description = "Refuse to destroy the Cloud Run services."
  type        = bool
  default     = true
}

# --- GKE ----------------------------------------------------------------------------------

variable "gke_namespace" {
  description = "GKE mode: the namespace of infra/k8s (its Kubernetes service accounts are imagen-<operation>)."
  type        = string
  default     = "imagen"
}

variable "gke_node_service_account" {
  description = "GKE mode: email of the GPU node pool's service account, given roles/container.defaultNodeServiceAccount (logs, metrics) and read access to the image repository. Empty: grant them yourself."
  type        = string
  default     = ""
}

variable "keda_namespace" {
  description = "GKE mode: namespace of the KEDA operator."
  type        = string
  default     = "keda"
}

variable "keda_service_account" {
  description = "GKE mode: Kubernetes service account of the KEDA operator, which reads subscription backlogs from Cloud Monitoring."
  type        = string
  default     = "keda-operator"
}

# --- build and operations -----------------------------------------------------------------

variable "build_images" {
  description = "Build the images from this checkout with Cloud Build during `terraform apply` (gcloud must be logged in where terraform runs), whenever what goes into them changes, and run the services on them. Ignored while image_tag is set. An apply that builds stores HF_TOKEN as hf_token_secret's latest version unless it already is (without HF_TOKEN, an empty secret gets your `hf auth login` token)."
  type        = bool
  default     = true
}

variable "image_revision" {
  description = "build_images: change it (a date, say) to build new images of unchanged sources, which picks up the base image's newer release (security fixes) and rolls the services out; Python dependencies move with `make lock` (constraints.txt, part of the sources). Part of the tag's hash; empty adds nothing."
  type        = string
  default     = ""
}

variable "build_model_source" {
  description = "What build_images bakes into the images (the Dockerfile's MODEL_SOURCE): hub (the models), tiny (random weights: a smoke test of the deployment's plumbing, no good results), none (no models: for model_mirror or the GKE PVC). Empty: none with model_mirror, hub otherwise. Every build needs the token in hf_token_secret, whatever the source (cloudbuild.yaml reads it)."
  type        = string
  default     = ""

  validation {
    condition     = contains(["", "hub", "tiny", "none"], var.build_model_source)
    error_message = "build_model_source: empty, hub, tiny or none."
  }
}

variable "artifact_repository" {
  description = "Artifact Registry repository the images are pushed to (cloudbuild.yaml's _REPOSITORY). Not from name_prefix: a second deployment in the project needs its own (the apply fails with 409 otherwise)."
  type        = string
  default     = "imagen"
}

variable "keep_image_versions" {
  description = "Image versions kept per operation whatever their age; older ones are deleted once 30 days old (each is 6-13 GB), except image_tag's and keep_image_tags'."
  type        = number
  default     = 10
}

variable "keep_image_tags" {
  description = "Tag prefixes never deleted by the repository's cleanup, whatever their age (image_tag is kept without being listed): the tag infra/k8s runs on GKE, a release you may roll back to. Prefixes: \"v1\" keeps v1, v10 and v1.2 too."
  type        = list(string)
  default     = []
}

variable "job_wait_alert_seconds" {
  description = "Alert (\"imagen: jobs waiting\") when a job has waited this long on its operation's subscription: a stuck worker, no instance starting (GPU quota, a failing start-up), or no GPU capacity for the load. Null (the default): 7800 s on GKE, above the longest a worker with its defaults holds a message it is working on ((concurrency + prefetch) x (max-job-seconds + 120 s) + 300 s = 7740 s, a held message counting as waiting); 2700 s on Cloud Run, where no push is held past the request's 600 s: past a transient fault's retries (they end 30 min after the event, and Pub/Sub's backoff reaches 600 s), well before those of a message no instance takes end in the dead-letter topic (~2 h)."
  type        = number
  default     = null

  validation {
    condition     = var.job_wait_alert_seconds == null || try(var.job_wait_alert_seconds >= 60, false)
    error_message = "job_wait_alert_seconds must be at least 60 (or null for the mode's default)."
  }
}

variable "hf_token_secret" {
  description = "Secret Manager secret holding the Hugging Face token (cloudbuild.yaml's _HF_TOKEN_SECRET). Created empty; an apply that builds (build_images) stores HF_TOKEN from its environment, or add versions yourself. Either way the token never sits in Terraform state. Not from name_prefix: a second deployment in the project needs its own (the apply fails with 409 otherwise)."
  type        = string
  default     = "imagen-hf-token"
}

variable "alert_notification_channels" {
  description = "Cloud Monitoring notification channel ids told when a dead-letter subscription, or an unrouted one, holds messages, a worker logs an error, or jobs wait too long."
  type        = list(string)
  default     = []
}
