# A message in a dead-letter subscription went 20 deliveries without an answer: turned away
# while every instance was busy, unparseable, refused, or a worker keeps crashing on it.
# Either way a person should look (docs/deploy.md, Troubleshooting).

resource "google_monitoring_alert_policy" "dead_letters" {
  count = local.pubsub ? 1 : 0

  display_name = "imagen: dead-lettered jobs"
  combiner     = "OR"
  severity     = "WARNING"

  dynamic "conditions" {
    for_each = local.operations
    content {
      display_name = "${conditions.value}: dead-letter backlog"
      condition_threshold {
        filter = join(" AND ", [
          "resource.type = \"pubsub_subscription\"",
          "resource.labels.subscription_id = \"${google_pubsub_subscription.dead_letter[conditions.value].name}\"",
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
      Messages reached the dead-letter subscription `${var.name_prefix}-<operation>-dead-letter`
      after ${local.max_delivery_attempts} deliveries that imagen never answered with a result or
      a failure report: turned away while every instance was busy (HTTP 429: raise
      max_instances), unparseable, job messages for a bucket outside allowed_buckets, or a
      report that could not be written. `imagen dlq list` shows them; the worker logs say why.
      Replay them with `imagen dlq replay` once fixed; drain the subscription once done.
    EOT
  }

  notification_channels = var.alert_notification_channels

  alert_strategy {
    auto_close = "86400s"
  }

  depends_on = [google_project_service.enabled]
}

# An upload (or job message) that no operation's subscription takes: a folder that names no
# deployed operation, a chain, or a job message without an `operation` attribute.
resource "google_monitoring_alert_policy" "unrouted" {
  count = local.unrouted ? 1 : 0

  display_name = "imagen: uploads no worker serves"
  combiner     = "OR"
  severity     = "WARNING"

  conditions {
    display_name = "unrouted backlog"
    condition_threshold {
      filter = join(" AND ", [
        "resource.type = \"pubsub_subscription\"",
        "resource.labels.subscription_id = \"${google_pubsub_subscription.unrouted[0].name}\"",
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

  documentation {
    mime_type = "text/markdown"
    content   = <<-EOT
      Messages reached `${var.name_prefix}-unrouted`: no worker pool's subscription takes them,
      so they get no output and no failure report. Usually an upload under a folder that names
      no deployed operation (a typo, `${var.input_prefix}` itself, or a chain such as
      `remove-background,upscale`: chains need one worker serving all their operations), or a
      job message without an `operation` attribute naming one deployed operation.
      A folder placeholder made in the console outside an operation's folder lands here too.
      `imagen dlq list --subscription ${var.name_prefix}-unrouted` shows them. Move the objects
      under an operation's folder (or fix the publisher), then drain the subscription
      (`gcloud pubsub subscriptions seek ${var.name_prefix}-unrouted --time=NOW`, NOW in RFC 3339);
      or, once a pool serves them, `imagen dlq replay --subscription ${var.name_prefix}-unrouted
      --topic ${var.name_prefix}-jobs` re-publishes them.
    EOT
  }

  notification_channels = var.alert_notification_channels

  alert_strategy {
    auto_close = "86400s"
  }

  depends_on = [google_project_service.enabled]
}
