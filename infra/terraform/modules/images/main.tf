# The workers' images: their tag, from what goes into them, and (with `build`) the Cloud
# Build run that makes them, from `terraform apply` on the machine that runs it.
#
# The tag is a hash of the build's inputs as they are in the working tree (what the build
# uploads, .gcloudignore): an edit to the code, the Dockerfile or the model lock makes a new
# tag, a new build and, through the services that use the tag, a roll-out; an apply with
# nothing changed builds nothing. It needs no git (a tarball or a checkout with uncommitted
# edits gets its own tag, never a commit's). What it cannot see, the base image's newer
# release, a new `revision` picks up (the Python dependencies are constraints.txt's pins).
#
# No providers: only Terraform's built-in terraform_data. tests/infra/test_image_build.py
# applies this module for real, with a recording `gcloud` on PATH.

terraform {
  required_version = ">= 1.5"
}

variable "source_root" {
  description = "The repository root: the Docker build context and cloudbuild.yaml."
  type        = string
}

variable "build" {
  description = "Run the build when the tag changes (and on the first apply)."
  type        = bool
}

variable "project_id" {
  type = string
}

variable "region" {
  type = string
}

variable "build_region" {
  description = "Where Cloud Build runs; empty: var.region."
  type        = string
  default     = ""
}

variable "repository" {
  description = "The Artifact Registry repository (in var.region)."
  type        = string
}

variable "operations" {
  description = "One image per operation, imagen-<operation>."
  type        = list(string)
}

variable "chains" {
  description = "One image per chain (\"remove-background,upscale\") with its operations' models, imagen-<the chain with hyphens>."
  type        = list(string)
  default     = []
}

variable "revision" {
  description = "Anything: a new value is a new tag (a rebuild of the same sources). Empty adds nothing."
  type        = string
  default     = ""
}

variable "model_source" {
  description = "The Dockerfile's MODEL_SOURCE: hub (baked models), tiny (random weights) or none."
  type        = string
}

variable "hf_token_secret" {
  description = "The Secret Manager secret cloudbuild.yaml reads the Hugging Face token from."
  type        = string
}

variable "build_service_account" {
  description = "The build's service account (projects/P/serviceAccounts/E)."
  type        = string
}

variable "staging_dir" {
  description = "gs:// folder the sources are uploaded to."
  type        = string
}

locals {
  # What the images are made of: the Dockerfile's build context (the .dockerignore allow-list)
  # and the build's own configuration (with README.md, what .gcloudignore uploads). README.md goes into the build context only as the
  # package's long description: left out, so a documentation edit does not rebuild every image.
  patterns = [
    "Dockerfile", ".dockerignore", "cloudbuild.yaml",
    "pyproject.toml", "constraints.txt", "scripts/docker_steps.sh", "handlers/**", "image/**",
  ]
  # .dockerignore's "never" list: what a working tree has that the build context leaves out.
  ignored = "(^|/)(__pycache__|[^/]*\\.egg-info|\\.pytest_cache)(/|$)|\\.py[cod]$"

  files = sort(distinct([
    for file in flatten([for pattern in local.patterns : tolist(fileset(var.source_root, pattern))]) :
    file if length(regexall(local.ignored, file)) == 0
  ]))
  digest = sha256(join("\n", concat(
    var.revision == "" ? [] : ["revision ${var.revision}"],
    [for file in local.files : "${file} ${filesha256("${var.source_root}/${file}")}"],
  )))

  # Images of the same sources without models must not take the baked images' tag: tags are
  # immutable in the repository.
  suffix = lookup({ hub = "", tiny = "-tiny", none = "-slim" }, var.model_source)
  tag    = "src-${substr(local.digest, 0, 16)}${local.suffix}"
}

resource "terraform_data" "build" {
  count = var.build ? 1 : 0

  # A new tag, another operation or another registry: build. cloudbuild.yaml skips the images
  # already pushed, so adding an operation builds only its own.
  triggers_replace = merge(
    {
      tag        = local.tag
      operations = join(",", sort(var.operations))
      registry   = "${var.region}/${var.project_id}/${var.repository}"
    },
    # Only with chains: a new key would replace (rebuild) every deployment made before them.
    length(var.chains) > 0 ? { chains = join(" ", sort(var.chains)) } : {},
  )

  provisioner "local-exec" {
    command     = "bash scripts/build_images.sh"
    working_dir = var.source_root
    # HF_TOKEN (or a `hf auth login` token) comes from the environment terraform runs in.
    environment = {
      PROJECT               = var.project_id
      REGION                = var.region
      BUILD_REGION          = var.build_region
      REPOSITORY            = var.repository
      OPERATIONS            = join(",", var.operations)
      CHAINS                = join(" ", var.chains)
      MODEL_SOURCE          = var.model_source
      TAG                   = local.tag
      HF_TOKEN_SECRET       = var.hf_token_secret
      BUILD_SERVICE_ACCOUNT = var.build_service_account
      STAGING_DIR           = var.staging_dir
    }
  }
}

output "tag" {
  description = "The images' tag: imagen-<operation>:<tag>. Known at plan."
  value       = local.tag
}

output "files" {
  description = "The files the tag is a hash of."
  value       = local.files
}
