# One Cloud Run GPU service per operation, running `imagen serve` from that operation's
# image. Private: no allUsers, ingress internal; Pub/Sub push (or Eventarc) calls it with
# an OIDC token of a service account that holds run.invoker on it.

locals {
  startup_probe_period = 10

  # Each service's cpu and memory (var.service_shapes, else var.cpu and var.memory), and as
  # numbers (vCPUs, GiB) in the forms Cloud Run takes; 0 for others.
  shapes = { for pool in local.pools : pool => lookup(var.service_shapes, pool, { cpu = var.cpu, memory = var.memory }) }
  shape_sizes = { for pool, shape in local.shapes : pool => {
    cpu = try(tonumber(shape.cpu), tonumber(trimsuffix(shape.cpu, "m")) / 1000, 0)
    memory = try(
      tonumber(regex("^([0-9]+)Gi$", shape.memory)[0]),
      tonumber(regex("^([0-9]+)Mi$", shape.memory)[0]) / 1024,
      tonumber(regex("^([0-9]+)G$", shape.memory)[0]) * 1000000000 / 1073741824,
      tonumber(regex("^([0-9]+)M$", shape.memory)[0]) * 1000000 / 1073741824,
      0,
    )
  } }
  # Cloud Run's instance shapes ("Configure memory limits", "Configure CPU limits", GPU
  # requirements): 4, 6 or 8 vCPUs and 16 to 32 GiB for a GPU service; more than 16 GiB needs
  # 6 vCPUs, more than 24 GiB 8 (the default 8 vCPU, 32 GiB is the largest shape). Checked at
  # plan (the service's precondition) rather than failing the apply.
  shape_misfits = sort([for pool, size in local.shape_sizes : pool if !(
    contains([4, 6, 8], size.cpu) && size.memory >= 16 && size.memory <= 32
    && (size.memory <= 16 || size.cpu >= 6) && (size.memory <= 24 || size.cpu >= 8)
  )])

  # With a model mirror the image carries no models (built with MODEL_SOURCE=none): imagen
  # serve restores them from the bucket (IMAGEN_MODEL_MIRROR, local.common_env) into the
  # instance's in-memory /tmp before loading them, its lines JSON like the rest. The startup
  # probe window covers the copy (same region: about a minute for the largest model).
  mirror_env = var.model_mirror == "" ? {} : { MODEL_CACHE_DIR = "/tmp/models" }
}

resource "google_cloud_run_v2_service" "worker" {
  for_each = local.services

  name                = "${var.name_prefix}-${local.pool_names[each.key]}"
  location            = var.region
  description         = "imagen ${each.key}: ${var.input_prefix}${each.key}/ -> ${var.output_prefix}${each.key}/"
  ingress             = var.ingress
  deletion_protection = var.deletion_protection
  # Every caller needs run.invoker (the push or Eventarc service account).
  invoker_iam_disabled = false

  # A revision is ready once its image (6-13 GB) is pulled and its models are loaded and warmed
  # up: up to startup_timeout_seconds (1800 s at most) after the pull, past the provider's 20 min.
  timeouts {
    create = "45m"
    update = "45m"
  }

  template {
    service_account = google_service_account.worker[each.key].email

    # One job per instance: a job owns the GPU; more requests scale out instead.
    max_instance_request_concurrency = 1
    # Push and Eventarc requests end at 600 s; longer jobs belong to the GKE pull workers.
    timeout = "600s"

    scaling {
      min_instance_count = var.min_instances
      max_instance_count = var.max_instances
    }

    node_selector {
      accelerator = var.gpu_type
    }
    gpu_zonal_redundancy_disabled = !var.gpu_zonal_redundancy

    containers {
      image = "${local.image_repository}/imagen-${local.pool_names[each.key]}:${local.image_tag}"

      ports {
        container_port = 8080
      }

      resources {
        limits = {
          cpu              = local.shapes[each.key].cpu
          memory           = local.shapes[each.key].memory
          "nvidia.com/gpu" = "1"
        }
        # GPU services need CPU always allocated (instance-based billing): no throttling
        # between requests, so the loaded models stay warm and usable.
        cpu_idle          = false
        startup_cpu_boost = true
      }

      dynamic "env" {
        for_each = merge(
          local.common_env,
          { IMAGEN_OPERATIONS = each.key },
          # What no delivery can settle goes there at once, not after 20 pushes.
          local.push ? { IMAGEN_DEAD_LETTER_TOPIC = google_pubsub_topic.dead_letter[each.key].id } : {},
          local.mirror_env,
        )
        content {
          name  = env.key
          value = env.value
        }
      }

      # No traffic until the models are loaded and warmed up: /readyz answers 503 until
      # then. Generous, since a cold start reads several GB of weights onto the GPU.
      startup_probe {
        initial_delay_seconds = 0
        period_seconds        = local.startup_probe_period
        timeout_seconds       = 5
        failure_threshold     = ceil(var.startup_timeout_seconds / local.startup_probe_period)
        http_get {
          path = "/readyz"
          port = 8080
        }
      }

      # Restart an instance whose server stopped answering (not one busy with a job: the
      # HTTP threads answer /healthz while the GPU works).
      liveness_probe {
        period_seconds    = 30
        timeout_seconds   = 5
        failure_threshold = 3
        http_get {
          path = "/healthz"
          port = 8080
        }
      }
    }
  }

  lifecycle {
    # Cloud Run's other GPU, nvidia-rtx-pro-6000 (Blackwell), needs 20+ vCPUs and 80+ GiB (the
    # shape check below knows the L4's shapes only) and a CUDA 13 image, which the Dockerfile
    # does not build by default. A precondition, not a validation: GKE mode does not use it.
    precondition {
      condition     = var.gpu_type == "nvidia-l4"
      error_message = "gpu_type: nvidia-l4 is the GPU this module deploys on Cloud Run. A Blackwell GPU (nvidia-rtx-pro-6000) needs an image built for CUDA 13 (the Dockerfile's comment says how) and its own instance shapes: not supported here yet."
    }
    precondition {
      condition     = length(local.shape_misfits) == 0
      error_message = "Not a Cloud Run GPU shape for ${join(", ", [for pool in local.shape_misfits : "${pool} (cpu = \"${local.shapes[pool].cpu}\", memory = \"${local.shapes[pool].memory}\")"])}: 4, 6 or 8 vCPUs, 16Gi to 32Gi, and above 16Gi at least 6 vCPUs, above 24Gi 8 (e.g. cpu = \"8\" with memory = \"32Gi\", or cpu = \"4\" with memory = \"16Gi\"); set cpu and memory, or service_shapes."
    }
    # Images built without models, and no mirror to restore them from: every instance would
    # stop at set-up and the apply wait out its timeout (45 min) for a revision never ready.
    precondition {
      condition     = var.build_model_source != "none" || var.model_mirror != "" || !(var.build_images && var.image_tag == "")
      error_message = "build_model_source = \"none\" builds images without models, and Cloud Run has no model volume: set model_mirror (a bucket `imagen models mirror` filled), or build_model_source = \"hub\"."
    }
    precondition {
      condition     = length(setsubtract(keys(var.service_shapes), local.pool_list)) == 0
      error_message = "service_shapes names ${join(", ", setsubtract(keys(var.service_shapes), local.pool_list))}, which is not an operation or chain this deployment serves (operations, chains)."
    }
    # Someone's `gcloud run services update` stamps these; they change nothing that runs.
    ignore_changes = [
      client,
      client_version,
    ]
  }

  depends_on = [
    # A new tag's images are pushed before a revision may name them.
    module.images,
    google_project_service.enabled,
    google_storage_bucket_iam_member.worker_reads_input,
    google_storage_bucket_iam_member.worker_writes_results,
    google_storage_bucket_iam_member.worker_writes_failures,
    google_storage_bucket_iam_member.worker_loads_compiled,
    google_storage_bucket_iam_member.worker_stores_compiled,
    google_storage_bucket_iam_member.worker_reads_allowed,
    google_storage_bucket_iam_member.worker_reports_allowed,
    google_storage_bucket_iam_member.worker_reads_model_mirror,
  ]
}
