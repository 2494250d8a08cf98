#!/usr/bin/env bash
# Build and push the workers' images with Cloud Build (cloudbuild.yaml), then wait for the
# build. `terraform apply` runs it (infra/terraform/modules/images) whenever the images'
# sources change; every value comes from the environment Terraform sets:
#
#   PROJECT REGION REPOSITORY OPERATIONS MODEL_SOURCE TAG HF_TOKEN_SECRET
#   BUILD_SERVICE_ACCOUNT STAGING_DIR
#
# The Hugging Face token: where the secret has no version yet, the first is stored from
# HF_TOKEN, else from the file at HF_TOKEN_PATH, else from the huggingface_hub login
# ($HF_HOME/token, ~/.cache/huggingface/token). It is never printed, passed as an argument
# or written anywhere but the secret. Later changes: `gcloud secrets versions add`.
#
# BUILD_POLL_SECONDS (default 30): how often the build's state is read.
set -euo pipefail

cd "$(dirname "$0")/.."

for name in PROJECT REGION REPOSITORY OPERATIONS MODEL_SOURCE TAG HF_TOKEN_SECRET \
    BUILD_SERVICE_ACCOUNT STAGING_DIR; do
  if [ -z "${!name:-}" ]; then
    echo "build_images.sh: $name is not set (terraform apply sets it)" >&2
    exit 2
  fi
done
poll="${BUILD_POLL_SECONDS:-30}"

# --- the token -------------------------------------------------------------------------------
enabled=$(gcloud secrets versions list "$HF_TOKEN_SECRET" --project "$PROJECT" \
  --filter "state:enabled" --limit 1 --format "value(name)")
if [ -z "$enabled" ]; then
  token="${HF_TOKEN:-}"
  file="${HF_TOKEN_PATH:-${HF_HOME:-$HOME/.cache/huggingface}/token}"
  if [ -z "$token" ] && [ -r "$file" ]; then
    token=$(tr -d '[:space:]' < "$file")
  fi
  if [ -z "$token" ]; then
    cat >&2 <<MESSAGE
imagen: no Hugging Face token to build the images with.
The build downloads the models with a token stored in the secret $HF_TOKEN_SECRET, which has
none yet. Give it one, then run terraform apply again:
  export HF_TOKEN=hf_...          (a read token of the account that accepted the models' terms)
or store it yourself:
  printf %s "\$HF_TOKEN" | gcloud secrets versions add $HF_TOKEN_SECRET --project $PROJECT --data-file=-
MESSAGE
    exit 1
  fi
  printf %s "$token" | gcloud secrets versions add "$HF_TOKEN_SECRET" --project "$PROJECT" \
    --data-file=- --quiet > /dev/null
  unset token
  echo "imagen: stored the Hugging Face token as the first version of $HF_TOKEN_SECRET"
fi

# --- the build -------------------------------------------------------------------------------
# _OPERATIONS holds commas, gcloud's separator between substitutions: ^;^ picks another one.
substitutions="^;^_REGION=$REGION;_REPOSITORY=$REPOSITORY;_OPERATIONS=$OPERATIONS"
substitutions+=";_HF_TOKEN_SECRET=$HF_TOKEN_SECRET;_MODEL_SOURCE=$MODEL_SOURCE;_TAG_SUFFIX="
substitutions+=";COMMIT_SHA=$TAG;SHORT_SHA=$TAG"

# --async and then polling rather than streaming the log: streaming needs the right to read
# the project's logs and ends (without the build) when the connection drops.
build=$(gcloud builds submit . --config cloudbuild.yaml --project "$PROJECT" --region "$REGION" \
  --service-account "$BUILD_SERVICE_ACCOUNT" --gcs-source-staging-dir "$STAGING_DIR" \
  --substitutions "$substitutions" --async --format "value(id)")
url=$(gcloud builds describe "$build" --project "$PROJECT" --region "$REGION" --format "value(logUrl)")
echo "imagen: building imagen-{${OPERATIONS}}:$TAG (Cloud Build $build, 20-60 minutes the first time)"
echo "imagen: its log: $url"

started=$SECONDS
unread=0
while true; do
  if ! status=$(gcloud builds describe "$build" --project "$PROJECT" --region "$REGION" --format "value(status)"); then
    unread=$((unread + 1))
    if [ "$unread" -ge 10 ]; then
      echo "imagen: cannot read the state of Cloud Build $build (it goes on without us): $url" >&2
      exit 1
    fi
    status=UNREAD
  else
    unread=0
  fi
  case "$status" in
    SUCCESS)
      echo "imagen: images built in $(( (SECONDS - started) / 60 )) min: $REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/imagen-<operation>:$TAG"
      exit 0
      ;;
    FAILURE | INTERNAL_ERROR | TIMEOUT | CANCELLED | EXPIRED)
      echo "imagen: Cloud Build $build ended $status; its log: $url" >&2
      echo "imagen: fix the cause and run terraform apply again (images already pushed are kept)" >&2
      exit 1
      ;;
  esac
  sleep "$poll"
done
