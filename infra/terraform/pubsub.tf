# The notification topic, one subscription per operation (push to Cloud Run, or pulled by
# the GKE workers), a dead-letter topic + subscription per operation, and the optional
# results topic.

resource "google_pubsub_topic" "jobs" {
  count = local.pubsub ? 1 : 0

  name = "${var.name_prefix}-jobs"
  # Long enough to replay a day of uploads after a bad release (seek to a time).
  message_retention_duration = "86400s"

  # Filtered subscriptions read attributes only: a job message published without the
  # `operation` attribute gets it from its body (job_operation_attribute.js).
  dynamic "message_transforms" {
    for_each = local.filtered ? [file("${path.module}/job_operation_attribute.js")] : []
    content {
      javascript_udf {
        function_name = "jobOperationAttribute"
        code          = message_transforms.value
      }
    }
  }

  depends_on = [google_project_service.enabled]
}

# The Pub/Sub service agent signs push and Eventarc tokens and forwards dead letters. Google
# makes it when the API is enabled, but lazily: on a brand-new project the grants to it could
# run before it exists ("Service account service-...@gcp-sa-pubsub... does not exist"). Made
# here (as Eventarc's agent, eventarc.tf), and each grant depends on it; the grants name it by
# the project number (local.pubsub_service_agent), known at plan time, so a deployment made
# before this resource keeps its grants instead of replacing them.
resource "google_project_service_identity" "pubsub" {
  provider = google-beta

  project = var.project_id
  service = "pubsub.googleapis.com"

  depends_on = [google_project_service.enabled]
}

# The Cloud Storage service agent publishes the bucket's notifications.
resource "google_pubsub_topic_iam_member" "gcs_publishes_jobs" {
  count = local.pubsub ? 1 : 0

  topic  = google_pubsub_topic.jobs[0].id
  role   = "roles/pubsub.publisher"
  member = local.gcs_service_agent
}

# Other services that submit job messages (DESIGN.md, "A job message from another service").
resource "google_pubsub_topic_iam_member" "job_publishers" {
  for_each = local.pubsub ? toset(var.job_publishers) : toset([])

  topic  = google_pubsub_topic.jobs[0].id
  role   = "roles/pubsub.publisher"
  member = each.value
}

resource "google_pubsub_subscription" "jobs" {
  for_each = local.subscriptions

  name   = "${var.name_prefix}-${local.pool_names[each.key]}"
  topic  = google_pubsub_topic.jobs[0].id
  filter = var.subscription_filter ? local.subscription_filters[each.key] : null

  ack_deadline_seconds       = local.ack_deadline_seconds
  message_retention_duration = "604800s" # 7 days: a long GPU outage loses nothing

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter[each.key].id
    max_delivery_attempts = local.max_delivery_attempts
  }

  # Never expire for inactivity: a pool scaled to zero for a month still gets its jobs.
  expiration_policy {
    ttl = ""
  }

  dynamic "push_config" {
    for_each = local.push ? [each.key] : []
    content {
      push_endpoint = "${google_cloud_run_v2_service.worker[push_config.value].uri}/"
      # Signed by the push service account, which alone holds run.invoker on the service.
      oidc_token {
        service_account_email = google_service_account.push[0].email
        audience              = google_cloud_run_v2_service.worker[push_config.value].uri
      }
    }
  }

  # The service agent must be able to move messages to the dead-letter topic before the
  # first one fails five times, and push requests carry a token the service accepts from the
  # first (else each early delivery is refused, 401/403, and waits out Pub/Sub's backoff).
  depends_on = [
    google_pubsub_topic_iam_member.dead_letter_publisher,
    google_cloud_run_v2_service_iam_member.push_invokes,
    google_service_account_iam_member.pubsub_signs_as_push,
  ]
}

# Messages no operation's subscription takes (main.tf, local.unrouted_filters): kept for a
# week with no consumer, so a typo'd folder, an unserved chain or a job message for an
# operation left out is seen (monitoring.tf alerts) instead of acknowledged by Pub/Sub for
# nobody. `imagen dlq list` reads them.
resource "google_pubsub_subscription" "unrouted" {
  for_each = local.unrouted_filters

  name                       = "${var.name_prefix}-${each.key}"
  topic                      = google_pubsub_topic.jobs[0].id
  filter                     = each.value
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"

  expiration_policy {
    ttl = ""
  }
}

# They were two resources with count before: keep what they hold.
moved {
  from = google_pubsub_subscription.unrouted[0]
  to   = google_pubsub_subscription.unrouted["unrouted"]
}

moved {
  from = google_pubsub_subscription.unrouted_jobs[0]
  to   = google_pubsub_subscription.unrouted["unrouted-jobs"]
}

# --- dead letters -------------------------------------------------------------------------

resource "google_pubsub_topic" "dead_letter" {
  for_each = local.pubsub ? local.pools : toset([])

  name                       = "${var.name_prefix}-${local.pool_names[each.key]}-dead-letter"
  message_retention_duration = "604800s"

  depends_on = [google_project_service.enabled]
}

# Keeps what was dead-lettered (a topic alone keeps nothing for a reader), for inspection
# and replay; the alert in monitoring.tf watches its backlog.
resource "google_pubsub_subscription" "dead_letter" {
  for_each = local.pubsub ? local.pools : toset([])

  name                       = "${var.name_prefix}-${local.pool_names[each.key]}-dead-letter"
  topic                      = google_pubsub_topic.dead_letter[each.key].id
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"

  expiration_policy {
    ttl = ""
  }
}

# The Pub/Sub service agent forwards undeliverable messages: publisher on the dead-letter
# topic, subscriber on the source subscription (to ack them there).
resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  for_each = local.pubsub ? local.pools : toset([])

  topic  = google_pubsub_topic.dead_letter[each.key].id
  role   = "roles/pubsub.publisher"
  member = local.pubsub_service_agent

  depends_on = [google_project_service_identity.pubsub]
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  for_each = local.subscriptions

  subscription = google_pubsub_subscription.jobs[each.key].id
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_service_agent

  depends_on = [google_project_service_identity.pubsub]
}

# --- results ------------------------------------------------------------------------------

resource "google_pubsub_topic" "results" {
  count = var.results_topic ? 1 : 0

  name                       = "${var.name_prefix}-results"
  message_retention_duration = "604800s"

  depends_on = [google_project_service.enabled]
}
