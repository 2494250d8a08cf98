# A message in a dead-letter subscription is a job that failed five deliveries: its image
# has a failure report under failed/, or a worker keeps crashing on it. Either way a
# person should look (docs/deploy.md, Troubleshooting).

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
      Jobs reached the dead-letter subscription `${var.name_prefix}-<operation>-dead-letter`
      after ${local.max_delivery_attempts} failed deliveries. Look for the failure report under
      `gs://${var.input_bucket}/${var.failed_prefix}<operation>/`, then the worker logs. Replay
      a fixed job by re-uploading its image; drain the subscription once done.
    EOT
  }

  notification_channels = var.alert_notification_channels

  alert_strategy {
    auto_close = "86400s"
  }

  depends_on = [google_project_service.enabled]
}
