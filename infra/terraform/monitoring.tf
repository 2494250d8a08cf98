# Messages waiting for a person, never for a worker:
# - a dead-letter subscription: 20 deliveries went without an answer (turned away while every
#   instance was busy, unparseable, refused, or a worker keeps crashing on it);
# - the unrouted subscriptions: no operation's filter takes them (a folder that names no
#   deployed operation, a chain, a job message without an `operation` attribute, or one
#   whose attribute names no deployed operation).
# docs/deploy.md, Troubleshooting, says what to do with each.
# And what the workers say (one JSON line each, handlers/logs.py), as log-based metrics:
# - <prefix>-job-failures: each job that ended in a failure report, by operation (empty for
#   text that is no operation or chain) and error type; mostly bad input, whose report is the
#   user's answer, so it is charted, not alerted;
# - <prefix>-errors: each ERROR or CRITICAL line of imagen's (and gunicorn's): a fault of an
#   instance (a model, the GPU, a report that could not be written, a crash, a bug), the
#   lines the "imagen: worker errors" alert watches (a log-match alert);
# and jobs that wait on their subscription (with Eventarc, their trigger's) longer than
# job_wait_alert_seconds (a stuck worker, no GPU capacity, scaling that does not happen), the
# "imagen: jobs waiting" alert.

locals {
  # variables.tf says why: a GKE worker holds a message for up to its lease budget; a push
  # never past 600 s.
  job_wait_alert_seconds = coalesce(var.job_wait_alert_seconds, local.gke ? 7800 : 2700)
  unrouted_subscriptions = [for sub in google_pubsub_subscription.unrouted : sub.name]
  # condition name -> the subscriptions it watches (one condition for both unrouted ones: a
  # policy holds at most 6 conditions; one per pool's dead letters while they fit, else one
  # for all of them, the incident naming the subscription)
  dead_letter_conditions = (
    length(google_pubsub_subscription.dead_letter) <= 5
    ? { for op, sub in google_pubsub_subscription.dead_letter : "${op}: dead-letter backlog" => [sub.name] }
    : { "dead-letter backlog" = [for sub in google_pubsub_subscription.dead_letter : sub.name] }
  )
  # The log lines behind the metrics (handlers/processor.py and handlers/logs.py write them;
  # tests/infra/test_terraform.py checks the filters against lines the code writes).
  # A native crash (a segfault in a CUDA library) writes no JSON line: faulthandler's text on
  # stderr, whose first line says it (and the severity stderr text gets differs by platform).
  # Nor does an instance Cloud Run stops for memory: its own line says so ("Memory limit of
  # 32768 MiB exceeded with 33012 MiB used. ...").
  job_failure_filter = "jsonPayload.logger=\"imagen.processor\" AND jsonPayload.message=~\"^job failed: \""
  error_filter       = "(severity>=ERROR AND jsonPayload.logger=~\"^(imagen|gunicorn)\") OR textPayload=~\"^Fatal Python error: \" OR textPayload=~\"^Memory limit of \""
  # The job-failures metric's operation label: an operation or a chain of up to four, else
  # empty. A failed job's `operation` is whatever its folder or message named (an
  # UnknownOperation report, a chain naming one twice): a label value per typo would grow the
  # metric's series without bound; bounded, at most 4 + 4^2 + 4^3 + 4^4 values.
  operation_names   = ["upscale", "enhance", "comic", "remove-background"]
  operation_pattern = "^((?:${join("|", local.operation_names)})(?:,(?:${join("|", local.operation_names)})){0,3})$"
  # The workers' lines, not another service's or namespace's (a crash's text names no logger).
  worker_scope = (local.gke
    ? "resource.type=\"k8s_container\" AND resource.labels.namespace_name=\"${var.gke_namespace}\""
    : "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=~\"^${var.name_prefix}-(${join("|", values(local.pool_names))})$\""
  )
  # Where jobs wait for a worker: each operation's subscription, or with Eventarc the
  # subscription each trigger made for itself (projects/<project>/subscriptions/<name>).
  job_subscriptions = concat(
    [for sub in google_pubsub_subscription.jobs : sub.name],
    [for trigger in google_eventarc_trigger.worker : element(split("/", trigger.transport[0].pubsub[0].subscription), 3)],
  )
  watched_backlogs = merge(
    local.dead_letter_conditions,
    length(local.unrouted_subscriptions) > 0 ? { "unrouted backlog" = local.unrouted_subscriptions } : {},
  )
}

resource "google_monitoring_alert_policy" "dead_letters" {
  count = local.pubsub ? 1 : 0

  display_name = "imagen: dead-lettered or unrouted jobs"
  combiner     = "OR"
  severity     = "WARNING"

  dynamic "conditions" {
    for_each = local.watched_backlogs
    content {
      display_name = conditions.key
      condition_threshold {
        filter = join(" AND ", [
          "resource.type = \"pubsub_subscription\"",
          format("resource.labels.subscription_id = one_of(%s)", join(", ", [for name in conditions.value : "\"${name}\""])),
          "metric.type = \"pubsub.googleapis.com/subscription/num_undelivered_messages\"",
        ])
        comparison      = "COMPARISON_GT"
        threshold_value = 0
        duration        = "60s"
        aggregations {
          alignment_period   = "60s"
          per_series_aligner = "ALIGN_MAX"
        }
        trigger {
          count = 1
        }
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = <<-EOT
      **Dead letters** (`${var.name_prefix}-<operation>-dead-letter`): messages no delivery
      can settle, moved there at once by the worker (unparseable, or job messages or
      notifications for a bucket outside allowed_buckets and the input bucket: `imagen dlq
      list` shows the reason), and messages that
      went ${local.max_delivery_attempts} deliveries without a result or a failure report
      (turned away while every instance was busy, HTTP 429: raise max_instances; a report
      that could not be written). `imagen dlq list` shows them; the worker logs say why. Replay them with
      `imagen dlq replay` once fixed; drain the subscription once done.

      **Unrouted** (`${var.name_prefix}-unrouted`, `${var.name_prefix}-unrouted-jobs`, and with
      chains `${var.name_prefix}-unrouted-<operation>` for what starts with a chain's first
      operation): messages
      no worker pool's subscription takes, so no output and no failure report. In
      `-unrouted`: an upload under a folder that names no deployed operation (a typo,
      `${var.input_prefix}` itself, a console folder placeholder, or a chain such as
      `remove-background,upscale` that is not in `chains`), or a job message naming no
      `operation` (attribute or body). In `-unrouted-jobs`: a job message whose `operation` attribute
      names no deployed operation or chain (a typo, one left out).
      `imagen dlq list --subscription <name>` shows them. Move the objects under an
      operation's folder (or fix the publisher), then drain the subscription
      (`gcloud pubsub subscriptions seek <name> --time=NOW`, NOW in RFC 3339); or, once a
      pool serves them, `imagen dlq replay --subscription <name> --topic
      ${var.name_prefix}-jobs` re-publishes them.
    EOT
  }

  notification_channels = var.alert_notification_channels

  alert_strategy {
    auto_close = "86400s"
  }

  depends_on = [google_project_service.enabled]
}


resource "google_logging_metric" "job_failures" {
  name        = "${var.name_prefix}-job-failures"
  description = "imagen jobs that ended in a failure report (failed/<operation>/...json), by operation and error type."
  filter      = local.job_failure_filter

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
    labels {
      key        = "operation"
      value_type = "STRING"
    }
    labels {
      key        = "error_type"
      value_type = "STRING"
    }
  }
  label_extractors = {
    operation  = "REGEXP_EXTRACT(jsonPayload.operation, \"${local.operation_pattern}\")"
    error_type = "EXTRACT(jsonPayload.error.type)"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_logging_metric" "errors" {
  name        = "${var.name_prefix}-errors"
  description = "ERROR and CRITICAL lines of the imagen workers: faults of an instance, not of a job's input."
  filter      = "(${local.error_filter}) AND ${local.worker_scope}"

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
    labels {
      key        = "logger"
      value_type = "STRING"
    }
  }
  label_extractors = {
    logger = "EXTRACT(jsonPayload.logger)"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "errors" {
  display_name = "imagen: worker errors"
  combiner     = "OR"
  severity     = "ERROR"

  # A log-match condition reads the lines themselves: an alert on the log-based metric would
  # fail the first apply (the new metric is not visible to Monitoring for minutes).
  conditions {
    display_name = "ERROR or CRITICAL log lines"
    condition_matched_log {
      filter = "(${local.error_filter}) AND ${local.worker_scope}"
      # Each combination of label values is its own incident and notification, rate limit
      # included: the message's words before its first colon ("job failed on this
      # instance", "imagen stopped"), not the whole free text (one per failed job).
      label_extractors = {
        logger  = "EXTRACT(jsonPayload.logger)"
        message = "REGEXP_EXTRACT(jsonPayload.message, \"^([^:]{1,60})\")"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = <<-EOT
      An imagen worker logged an ERROR or CRITICAL line: a fault of an instance, not of a
      job's input (bad input ends in a failure report, charted by the
      `${var.name_prefix}-job-failures` metric). In Logs Explorer:
      `(severity>=ERROR AND jsonPayload.logger=~"^(imagen|gunicorn)") OR textPayload=~"^Fatal Python error: "
      OR textPayload=~"^Memory limit of "`.
      Common ones:
      `job failed on this instance` (a model fault; the job is retried),
      `job failed:` (a fault that was not the input's and outlasted its retries, e.g. Cloud
      Storage refusing the output to the runtime account; the failure report says which),
      `the GPU failed and this process cannot use it again` (Cloud Run starts another instance;
      on GKE the container restarts in the same pod, on the same GPU: "imagen: GKE workers
      restarting" fires if that GPU keeps failing),
      `a job is stuck on the GPU` (the process exits; its messages are redelivered),
      `job failed, and its failure report could not be written` (the runtime service account's
      access to the failure prefix), `model set-up failed`, `imagen stopped` (why a worker
      exited), `the server's worker process died` (imagen serve's process crashed or was
      killed for memory: the instance stops for a new one), `could not publish the job result`,
      `could not move the message to the dead-letter topic` (the runtime account's access to
      those topics), `unexpected error` (a bug: its stack_trace), `Fatal Python error` (a
      native crash, as text: every thread's stack follows it), `Memory limit of ... exceeded`
      (Cloud Run stopped an instance for memory: raise `memory`). docs/deploy.md,
      Troubleshooting, has each.
    EOT
  }

  notification_channels = var.alert_notification_channels

  alert_strategy {
    notification_rate_limit {
      period = "300s" # at most one notification per five minutes
    }
    auto_close = "1800s"
  }

  depends_on = [google_project_service.enabled]
}

resource "google_monitoring_alert_policy" "jobs_waiting" {
  count = length(google_pubsub_subscription.jobs) + length(google_eventarc_trigger.worker) > 0 ? 1 : 0

  display_name = "imagen: jobs waiting"
  combiner     = "OR"
  severity     = "WARNING"

  conditions {
    display_name = "oldest job older than ${local.job_wait_alert_seconds} s"
    condition_threshold {
      filter = join(" AND ", [
        "resource.type = \"pubsub_subscription\"",
        format("resource.labels.subscription_id = one_of(%s)", join(", ", [for name in local.job_subscriptions : "\"${name}\""])),
        "metric.type = \"pubsub.googleapis.com/subscription/oldest_unacked_message_age\"",
      ])
      comparison      = "COMPARISON_GT"
      threshold_value = local.job_wait_alert_seconds
      duration        = "300s"
      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = <<-EOT
      A job has waited on `${var.name_prefix}-<operation>` (with Eventarc, on the subscription
      of an operation's trigger) for over ${local.job_wait_alert_seconds} s without being
      acknowledged: no instance takes it (every one busy at max_instances, or
      GKE's GPU node pool at its maximum or out of capacity, or scaling from zero does not
      happen), or a worker holds it without finishing (a job stuck on the GPU: the worker's
      lease on it runs up to (jobs in hand) x (max-job-seconds + 120 s) + 300 s). Look at the
      subscription's backlog, the instances or pods, and the workers' logs.
    EOT
  }

  notification_channels = var.alert_notification_channels

  alert_strategy {
    auto_close = "86400s"
  }

  depends_on = [google_project_service.enabled]
}

# GKE: a worker container that keeps restarting. Kubernetes restarts it in the same pod, on the
# same node and GPU: a GPU that fails at every start (an Xid error; `imagen worker` exits 1) or
# an OOM kill at the pod's memory limit (no log line at all) loops there for good, holding its
# node, while the errors alert sees at most a line per start.
resource "google_monitoring_alert_policy" "restarts" {
  count = local.gke ? 1 : 0

  display_name = "imagen: GKE workers restarting"
  combiner     = "OR"
  severity     = "ERROR"

  conditions {
    display_name = "a worker container restarted more than once in an hour"
    condition_threshold {
      filter = join(" AND ", [
        "resource.type = \"k8s_container\"",
        "resource.labels.namespace_name = \"${var.gke_namespace}\"",
        "metric.type = \"kubernetes.io/container/restart_count\"",
      ])
      comparison      = "COMPARISON_GT"
      threshold_value = 1
      duration        = "0s"
      aggregations {
        # Twice an hour: a crash loop, and a set-up that hangs until the startup probe (30
        # minutes) restarts it; a single GPU hiccup's restart is not an incident.
        alignment_period   = "3600s"
        per_series_aligner = "ALIGN_DELTA"
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = <<-EOT
      A worker container in the `${var.gke_namespace}` namespace keeps restarting. `kubectl -n
      ${var.gke_namespace} describe pod <pod>` shows its last state: `OOMKilled` (the pod's
      memory limit: raise it in infra/k8s, or lower `--prefetch`), or an exit code, with the
      reason in the worker's last lines (`kubectl -n ${var.gke_namespace} logs <pod> --previous`):
      `the GPU failed`, or `CUDA did not start` at set-up, is a failed GPU, and a restart
      lands on the same one: `kubectl cordon <node>`, then `kubectl -n ${var.gke_namespace}
      delete pod <pod>` so it is scheduled elsewhere (look for Xid errors in the node's logs).
      `model set-up failed` names its cause (docs/deploy.md, Troubleshooting).
    EOT
  }

  notification_channels = var.alert_notification_channels

  alert_strategy {
    auto_close = "3600s"
  }

  depends_on = [google_project_service.enabled]
}
