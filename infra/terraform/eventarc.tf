# delivery = "eventarc": the alternative to push. One trigger per operation sends every
# object-finalized CloudEvent of the input bucket to that operation's service, which skips
# (2xx) the objects outside its folder. Eventarc cannot filter Storage events by prefix and
# manages its own subscription, so there is no per-operation filter or dead-letter topic here
# (the jobs-waiting alert watches the triggers' subscriptions): prefer push unless you need
# CloudEvents end to end.

resource "google_service_account" "eventarc" {
  count = local.eventarc ? 1 : 0

  account_id   = "${var.name_prefix}-eventarc"
  display_name = "imagen Eventarc triggers"
  description  = "Identity of the Eventarc triggers that call the imagen services."

  depends_on = [google_project_service.enabled]
}

# Eventarc's own service agent acts for the triggers. Google makes it lazily and grants its role
# minutes after the API is enabled, so a fresh project's first apply failed creating the
# triggers ("Permission denied while using the Eventarc Service Agent"; a sleep does not help:
# the agent may not exist until something asks for it). Made and granted here instead.
resource "google_project_service_identity" "eventarc" {
  count    = local.eventarc ? 1 : 0
  provider = google-beta

  project = var.project_id
  service = "eventarc.googleapis.com"

  depends_on = [google_project_service.enabled]
}

resource "google_project_iam_member" "eventarc_agent" {
  # checkov:skip=CKV_GCP_49: Google's own Eventarc agent, given the role Google grants it itself, minutes later
  count = local.eventarc ? 1 : 0

  project = var.project_id
  role    = "roles/eventarc.serviceAgent"
  member  = "serviceAccount:${google_project_service_identity.eventarc[0].email}"
}

# Eventarc requires its trigger identities to hold eventReceiver; the role exists only at
# project level and grants receiving events, nothing else.
resource "google_project_iam_member" "eventarc_receiver" {
  count = local.eventarc ? 1 : 0

  project = var.project_id
  role    = "roles/eventarc.eventReceiver"
  member  = google_service_account.eventarc[0].member
}

# Eventarc delivers through Pub/Sub push: the Pub/Sub service agent signs the OIDC tokens
# as the trigger account (needed explicitly in projects created before April 2021).
resource "google_service_account_iam_member" "pubsub_signs_as_eventarc" {
  count = local.eventarc ? 1 : 0

  service_account_id = google_service_account.eventarc[0].name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = local.pubsub_service_agent

  depends_on = [google_project_service_identity.pubsub]
}

resource "google_cloud_run_v2_service_iam_member" "eventarc_invokes" {
  for_each = local.eventarc ? local.services : toset([])

  name     = google_cloud_run_v2_service.worker[each.key].name
  location = var.region
  role     = "roles/run.invoker"
  member   = google_service_account.eventarc[0].member
}

# Eventarc's Storage triggers publish through a topic Eventarc creates (its name is not
# known here): Google documents this grant to the Cloud Storage service agent at project
# level for them.
resource "google_project_iam_member" "gcs_publishes_for_eventarc" {
  count = local.eventarc ? 1 : 0

  project = var.project_id
  role    = "roles/pubsub.publisher"
  member  = local.gcs_service_agent
}

resource "google_eventarc_trigger" "worker" {
  for_each = local.eventarc ? local.services : toset([])

  name            = "${var.name_prefix}-${local.pool_names[each.key]}"
  location        = var.region
  service_account = google_service_account.eventarc[0].email

  matching_criteria {
    attribute = "type"
    value     = "google.cloud.storage.object.v1.finalized"
  }
  matching_criteria {
    attribute = "bucket"
    value     = google_storage_bucket.input.name
  }

  destination {
    cloud_run_service {
      service = google_cloud_run_v2_service.worker[each.key].name
      region  = var.region
      path    = "/"
    }
  }

  depends_on = [
    google_project_iam_member.eventarc_agent,
    google_project_iam_member.eventarc_receiver,
    google_project_iam_member.gcs_publishes_for_eventarc,
    google_service_account_iam_member.pubsub_signs_as_eventarc,
    google_cloud_run_v2_service_iam_member.eventarc_invokes,
  ]
}

# Eventarc makes each trigger's Pub/Sub subscription itself, with a 10 s acknowledgement
# deadline the provider cannot set (hashicorp/terraform-provider-google#17701). For a push
# subscription that deadline is how long Pub/Sub waits for the request's answer: at 10 s,
# every job longer than that (most of them, and every cold start) would be delivered again
# while it runs, to another instance. gcloud raises it to the service's request timeout
# (600 s, Pub/Sub's maximum) whenever the trigger's subscription is new. Like the image
# build, this needs gcloud where terraform runs.
resource "terraform_data" "eventarc_ack_deadline" {
  for_each = google_eventarc_trigger.worker

  triggers_replace = each.value.transport[0].pubsub[0].subscription

  provisioner "local-exec" {
    command = "gcloud pubsub subscriptions update \"$SUBSCRIPTION\" --ack-deadline=600 --quiet"
    environment = {
      SUBSCRIPTION = each.value.transport[0].pubsub[0].subscription
    }
  }
}
