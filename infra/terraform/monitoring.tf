# Messages waiting for a person, never for a worker:
# - a dead-letter subscription: 20 deliveries went without an answer (turned away while every
#   instance was busy, unparseable, refused, or a worker keeps crashing on it);
# - the unrouted subscriptions: no operation's filter takes them (a folder that names no
#   deployed operation, a chain, a job message without an `operation` attribute, or one
#   whose attribute names no deployed operation).
# docs/deploy.md, Troubleshooting, says what to do with each.

locals {
  unrouted_subscriptions = [for sub in google_pubsub_subscription.unrouted : sub.name]
  # condition name -> the subscriptions it watches (one condition for both unrouted ones: a
  # policy holds at most 6 conditions; one per pool's dead letters while they fit, else one
  # for all of them, the incident naming the subscription)
  dead_letter_conditions = (
    length(google_pubsub_subscription.dead_letter) <= 5
    ? { for op, sub in google_pubsub_subscription.dead_letter : "${op}: dead-letter backlog" => [sub.name] }
    : { "dead-letter backlog" = [for sub in google_pubsub_subscription.dead_letter : sub.name] }
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
      **Dead letters** (`${var.name_prefix}-<operation>-dead-letter`): messages that went
      ${local.max_delivery_attempts} deliveries without a result or a failure report: turned
      away while every instance was busy (HTTP 429: raise max_instances), unparseable, job
      messages for a bucket outside allowed_buckets, or a report that could not be written.
      `imagen dlq list` shows them; the worker logs say why. Replay them with
      `imagen dlq replay` once fixed; drain the subscription once done.

      **Unrouted** (`${var.name_prefix}-unrouted`, `${var.name_prefix}-unrouted-jobs`, and with
      chains `${var.name_prefix}-unrouted-<operation>` for what starts with a chain's first
      operation): messages
      no worker pool's subscription takes, so no output and no failure report. In
      `-unrouted`: an upload under a folder that names no deployed operation (a typo,
      `${var.input_prefix}` itself, a console folder placeholder, or a chain such as
      `remove-background,upscale` that is not in `chains`), or a job message without an
      `operation` attribute. In `-unrouted-jobs`: a job message whose `operation` attribute
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

