#!/usr/bin/env bash
# Build and push the workers' images with Cloud Build (cloudbuild.yaml), then wait for the
# build. `terraform apply` runs it (infra/terraform/modules/images) whenever the images'
# sources change; every value comes from the environment Terraform sets:
#
#   PROJECT REGION REPOSITORY OPERATIONS MODEL_SOURCE TAG HF_TOKEN_SECRET
#   BUILD_SERVICE_ACCOUNT STAGING_DIR, and CHAINS (space-separated, may be empty);
#   BUILD_REGION, where Cloud Build runs (REGION when empty: the registry's region either way)
#
# The Hugging Face token: HF_TOKEN, when set, becomes the secret's latest version unless it
# already is; without it, a secret with no enabled latest version gets the token of
# HF_TOKEN_PATH or of the huggingface_hub login ($HF_HOME/token, by default
# ~/.cache/huggingface/token). It goes to Secret Manager on stdin: never printed, passed as an
# argument or written anywhere else.
#
# BUILD_POLL_SECONDS (default 30): how often the build's state is read; BUILD_RETRY_SECONDS
# (default 60): the wait before the one resubmission of a build that failed at once.
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
build_region="${BUILD_REGION:-$REGION}"

# --- the token -------------------------------------------------------------------------------
store_token() {
  printf %s "$1" | gcloud secrets versions add "$HF_TOKEN_SECRET" --project "$PROJECT" \
    --data-file=- --quiet > /dev/null
}

# What every build reads is the latest version, which must be enabled (a disabled or
# destroyed latest, a leaked token switched off, counts as none).
latest=$(gcloud secrets versions describe latest --secret "$HF_TOKEN_SECRET" --project "$PROJECT" \
  --format "value(state)" 2> /dev/null) || latest=""
given=$(printf %s "${HF_TOKEN:-}" | tr -d '[:space:]')
if [ "$latest" = ENABLED ] && [ -n "$given" ]; then
  # The token given now is the one meant: stored unless it is the latest already.
  if ! current=$(gcloud secrets versions access latest --secret "$HF_TOKEN_SECRET" --project "$PROJECT" 2> /dev/null); then
    store_token "$given"
    echo "imagen: stored HF_TOKEN as the new latest version of $HF_TOKEN_SECRET (the current one could not be read to compare)"
  elif [ "$current" != "$given" ]; then
    store_token "$given"
    echo "imagen: stored HF_TOKEN as the new latest version of $HF_TOKEN_SECRET"
  fi
  unset current
elif [ "$latest" != ENABLED ]; then
  token=$given
  file="${HF_TOKEN_PATH:-${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/token}"
  if [ -z "$token" ] && [ -r "$file" ]; then
    token=$(tr -d '[:space:]' < "$file")
  fi
  if [ -z "$token" ]; then
    cat >&2 << MESSAGE
imagen: no Hugging Face token to build the images with.
Every build reads one from the latest version of the secret $HF_TOKEN_SECRET (to download the
models), which has none enabled. Give it one, then run terraform apply again:
  export HF_TOKEN=hf_...          (a read token of the account that accepted the models' terms)
or store it yourself:
  printf %s "\$HF_TOKEN" | gcloud secrets versions add $HF_TOKEN_SECRET --project $PROJECT --data-file=-
MESSAGE
    exit 1
  fi
  store_token "$token"
  unset token
  echo "imagen: stored the Hugging Face token as the latest version of $HF_TOKEN_SECRET"
fi
unset given

# --- the build -------------------------------------------------------------------------------
# _OPERATIONS holds commas, gcloud's separator between substitutions: ^;^ picks another one.
substitutions="^;^_REGION=$REGION;_REPOSITORY=$REPOSITORY;_OPERATIONS=$OPERATIONS"
substitutions+=";_CHAINS=${CHAINS:-};_HF_TOKEN_SECRET=$HF_TOKEN_SECRET;_MODEL_SOURCE=$MODEL_SOURCE;_TAG_SUFFIX="
substitutions+=";COMMIT_SHA=$TAG;SHORT_SHA=$TAG"

# The images' names after imagen-: the operations, then the chains with hyphens.
images=$OPERATIONS
for chain in ${CHAINS:-}; do
  images+=",${chain//,/-}"
done

# Waits for build $1 (log at $2): 0 it succeeded, 1 it failed, 2 it was cancelled, 3 its
# state could not be read (it may still be running).
wait_for() {
  local build=$1 url=$2 status unread=0
  while true; do
    if ! status=$(gcloud builds describe "$build" --project "$PROJECT" --region "$build_region" --format "value(status)"); then
      unread=$((unread + 1))
      if [ "$unread" -ge 10 ]; then
        echo "imagen: cannot read the state of Cloud Build $build (it goes on without us): $url" >&2
        return 3
      fi
      status=UNREAD
    else
      unread=0
    fi
    case "$status" in
      SUCCESS) return 0 ;;
      FAILURE | INTERNAL_ERROR | TIMEOUT | EXPIRED)
        echo "imagen: Cloud Build $build ended $status; its log: $url" >&2
        return 1
        ;;
      CANCELLED)
        echo "imagen: Cloud Build $build was cancelled; its log: $url" >&2
        return 2
        ;;
    esac
    sleep "$poll"
  done
}

# A build of this tag still running (an apply interrupted before it ended): wait for it
# rather than race it to push the same immutable tags, then build what it did not (another
# operation since); cloudbuild.yaml skips what it pushed.
ongoing=$(gcloud builds list --ongoing --project "$PROJECT" --region "$build_region" \
  --format "value(id,substitutions.COMMIT_SHA)" 2> /dev/null | awk -v tag="$TAG" '$2 == tag {print $1; exit}') || true
if [ -n "$ongoing" ]; then
  echo "imagen: Cloud Build $ongoing is already building $TAG: waiting for it"
  code=0
  wait_for "$ongoing" "https://console.cloud.google.com/cloud-build/builds;region=$build_region/$ongoing?project=$PROJECT" || code=$?
  if [ "$code" = 3 ]; then
    echo "imagen: not starting another build of $TAG beside it: apply again once it has ended" >&2
    exit 1
  fi
fi

# --async and then polling rather than streaming the log: streaming needs the right to read
# the project's logs and ends (without the build) when the connection drops. A build that
# fails within minutes of a first apply may have started before the build account's new
# permissions reached every service (IAM takes up to a few minutes): it is submitted once more.
for try in 1 2; do
  started=$SECONDS
  code=0
  if ! submitted=$(gcloud builds submit . --config cloudbuild.yaml --project "$PROJECT" \
      --region "$build_region" --service-account "$BUILD_SERVICE_ACCOUNT" \
      --gcs-source-staging-dir "$STAGING_DIR" --substitutions "$substitutions" \
      --async --format "value(id,logUrl)"); then
    echo "imagen: gcloud builds submit failed (above)" >&2
    code=1
  else
    IFS=$'\t' read -r build url <<< "$submitted" || true
    if [ -z "${build:-}" ]; then
      echo "imagen: gcloud builds submit started no build" >&2
      exit 1
    fi
    echo "imagen: building imagen-{$images}:$TAG (Cloud Build $build, 20-60 minutes the first time)"
    echo "imagen: its log: $url"
    wait_for "$build" "$url" || code=$?
    if [ "$code" = 0 ]; then
      echo "imagen: images built: $REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/imagen-{$images}:$TAG"
      exit 0
    fi
  fi
  if [ "$code" = 1 ] && [ "$try" = 1 ] && [ $((SECONDS - started)) -lt 300 ]; then
    retry="${BUILD_RETRY_SECONDS:-60}"
    echo "imagen: that failed within $((SECONDS - started)) s; a new project's permissions can take minutes: trying once more in $retry s" >&2
    sleep "$retry"
    continue
  fi
  break
done
echo "imagen: fix the cause and run terraform apply again (images already pushed are kept)" >&2
exit 1
