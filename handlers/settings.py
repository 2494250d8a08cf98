"""Settings: the only place that reads environment variables.

`Settings.from_env()` runs once at the entry point; everything else receives the object
(or the values it needs) as arguments. Command-line options override fields with
`settings.replace(...)`, and `validate()` turns misconfiguration into a `ConfigError` that
names the variable, before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

from handlers.errors import ConfigError, UnsafeObjectName
from handlers.routing import check_safe_name
from image.operations import OPERATION_NAMES

DEFAULT_MODEL_CACHE_DIR = Path.home() / ".cache" / "imagen" / "models"
# 8192 x 8192: full-frame cameras' and most phones' photos (24-61 MP) decode (about 1.4 GB of
# memory for a 48 MP remove-background); upscale refuses over 16.8 MP itself (ImageTooLarge).
DEFAULT_MAX_PIXELS = 67_108_864
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_PORT = 8080
DEVICES = ("auto", "cuda", "cpu")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass(frozen=True)
class Settings:
    model_cache_dir: Path = DEFAULT_MODEL_CACHE_DIR
    operations: tuple[str, ...] = OPERATION_NAMES
    input_prefix: str = "incoming/"
    output_bucket: str | None = None
    output_prefix: str = "processed/"
    failed_prefix: str = "failed/"
    results_topic: str | None = None
    # IMAGEN_DEAD_LETTER_TOPIC: where serve and worker move a message no delivery can settle
    # (unparseable, a refused job message) at once, instead of nacking it until the
    # subscription's dead-letter policy does (Terraform: the pool's dead-letter topic).
    dead_letter_topic: str | None = None
    subscription: str | None = None
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    allowed_buckets: frozenset[str] = frozenset()
    push_audience: str | None = None
    push_service_accounts: frozenset[str] = frozenset()
    project: str | None = None
    port: int = DEFAULT_PORT
    storage_emulator_host: str | None = None
    pubsub_emulator_host: str | None = None
    allow_model_download: bool = True
    tuning: tuple[str, ...] = ()  # NAME=VALUE speed-switch changes (IMAGEN_TUNING)
    compile_cache: str | None = None  # gs://BUCKET/PREFIX or a folder (IMAGEN_COMPILE_CACHE)
    # IMAGEN_MODEL_MIRROR: gs://BUCKET/PREFIX written by `imagen models mirror`; serve, worker
    # and `models compile` restore the served operations' models from it into
    # model_cache_dir before they load (images built without models).
    model_mirror: str | None = None
    # IMAGEN_FILTERED_SUBSCRIPTION: this process's subscription delivers only its operations'
    # folders and job messages naming them (Terraform's subscription_filter), so a job for
    # another operation reached no other pool: it fails with a report instead of being skipped.
    filtered_subscription: bool = False
    # IMAGEN_DEPLOYED_OPERATIONS: on an unfiltered deployment (Eventarc, or subscriptions
    # without filters), every pool receives every job; this lists the operations its pools
    # serve, one pool each (Terraform's), so a job none serves (a chain, an operation left
    # out) is reported by one of them, the pool serving the first listed, instead of being
    # skipped by all. Not for pools of several operations: they serve chains it cannot see.
    deployed_operations: tuple[str, ...] = ()
    log_level: str = "INFO"  # IMAGEN_LOG_LEVEL: imagen's own lines (libraries' stay at WARNING)
    bucket: str | None = None  # IMAGEN_BUCKET: `imagen submit`'s input bucket
    hf_token: str | None = dataclasses.field(default=None, repr=False)  # HF_TOKEN: `models pull` (never printed)
    # Variables whose text could not be read (field -> why): `validate` refuses them, unless a
    # command-line option replaced the field first.
    unreadable: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, validate: bool = True) -> Settings:
        """The settings the environment gives. `validate=False` (the command line) leaves the
        checks to `replace`, once the command's options have replaced what they override."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        values: dict = {}
        unreadable: dict[str, str] = {}
        for field, name, read in (
            ("model_cache_dir", "MODEL_CACHE_DIR", lambda text: Path(text).expanduser()),
            ("operations", "IMAGEN_OPERATIONS", split_list),
            ("input_prefix", "IMAGEN_INPUT_PREFIX", str),
            ("output_bucket", "IMAGEN_OUTPUT_BUCKET", str),
            ("output_prefix", "IMAGEN_OUTPUT_PREFIX", str),
            ("failed_prefix", "IMAGEN_FAILED_PREFIX", str),
            ("results_topic", "IMAGEN_RESULTS_TOPIC", str),
            ("dead_letter_topic", "IMAGEN_DEAD_LETTER_TOPIC", str),
            ("subscription", "IMAGEN_SUBSCRIPTION", str),
            ("push_audience", "IMAGEN_PUSH_AUDIENCE", str),
            ("device", "IMAGEN_DEVICE", str),
            ("compile_cache", "IMAGEN_COMPILE_CACHE", str),
            ("model_mirror", "IMAGEN_MODEL_MIRROR", str),
            ("project", "GOOGLE_CLOUD_PROJECT", str),
            ("bucket", "IMAGEN_BUCKET", str),
            ("hf_token", "HF_TOKEN", str),
            ("storage_emulator_host", "STORAGE_EMULATOR_HOST", str),
            ("pubsub_emulator_host", "PUBSUB_EMULATOR_HOST", str),
            ("max_pixels", "IMAGEN_MAX_PIXELS", _positive_int),
            ("max_bytes", "IMAGEN_MAX_BYTES", _positive_int),
            ("port", "PORT", _positive_int),
            ("allowed_buckets", "IMAGEN_ALLOWED_BUCKETS", lambda text: frozenset(split_list(text))),
            ("push_service_accounts", "IMAGEN_PUSH_SERVICE_ACCOUNTS", lambda text: frozenset(split_list(text))),
            ("filtered_subscription", "IMAGEN_FILTERED_SUBSCRIPTION", _flag),
            ("deployed_operations", "IMAGEN_DEPLOYED_OPERATIONS", split_list),
            ("log_level", "IMAGEN_LOG_LEVEL", str.upper),
            # Separated by ";" or spaces: a value may hold commas (upscale_tile=256,512).
            ("tuning", "IMAGEN_TUNING", lambda text: tuple(item for item in re.split(r"[;\s]+", text) if item)),
        ):
            if (text := get(name)) is not None:
                try:
                    values[field] = read(text)
                except ValueError as error:
                    unreadable[field] = f"{name}: {error}"
        # As huggingface_hub reads it: any case of 1, ON, YES or TRUE.
        values["allow_model_download"] = (get("HF_HUB_OFFLINE") or "").strip().upper() not in ("1", "ON", "YES", "TRUE")
        settings = cls(**values, unreadable=unreadable)
        return settings.validate() if validate else settings

    def replace(self, **overrides) -> Settings:
        """A copy with the given (non-None) fields replaced, validated again."""
        changes = {key: value for key, value in overrides.items() if value is not None}
        unreadable = {field: why for field, why in self.unreadable.items() if field not in changes}
        return dataclasses.replace(self, **changes, unreadable=unreadable).validate()

    def validate(self) -> Settings:
        for why in self.unreadable.values():
            raise ConfigError(why)
        unknown = [op for op in self.operations if op not in OPERATION_NAMES]
        if unknown or not self.operations:
            raise ConfigError(
                f"IMAGEN_OPERATIONS (or --operations): unknown operation(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(OPERATION_NAMES)}"
            )
        unknown = [op for op in self.deployed_operations if op not in OPERATION_NAMES]
        if unknown:
            raise ConfigError(f"IMAGEN_DEPLOYED_OPERATIONS: unknown operation(s) {', '.join(unknown)}; "
                              f"choose from {', '.join(OPERATION_NAMES)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"IMAGEN_LOG_LEVEL: {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"IMAGEN_DEVICE: {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.tuning:
            from image.operations.switches import Tuning, parse_changes  # torch-free

            try:
                parse_changes(Tuning(), self.tuning)
            except ValueError as error:
                raise ConfigError(f"IMAGEN_TUNING: {error}") from None
        if self.compile_cache and self.compile_cache.startswith("gs://"):
            bucket = _bucket_of(self.compile_cache)
            if not bucket:
                raise ConfigError(f"IMAGEN_COMPILE_CACHE: {self.compile_cache!r} names no bucket; "
                                  "expected gs://BUCKET/PREFIX or a folder")
            self._check_holds_no_images("IMAGEN_COMPILE_CACHE", bucket, "compiled artefacts are code the workers "
                                        "run: give them a bucket only the workers can write")
        elif self.compile_cache and "://" in self.compile_cache:
            raise ConfigError(f"IMAGEN_COMPILE_CACHE: {self.compile_cache!r}: only gs://BUCKET/PREFIX "
                              "or a folder are supported")
        if self.model_mirror:
            if not re.fullmatch(r"gs://[^/]+(/.*)?", self.model_mirror):
                raise ConfigError(f"IMAGEN_MODEL_MIRROR: {self.model_mirror!r}: expected gs://BUCKET/PREFIX "
                                  "(written by `imagen models mirror`)")
            self._check_holds_no_images("IMAGEN_MODEL_MIRROR", _bucket_of(self.model_mirror),
                                        "models carry code the workers run (RMBG's): give the mirror a bucket "
                                        "only its maintainers can write")
        from PIL import Image

        if Image.MAX_IMAGE_PIXELS and self.max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
            raise ConfigError(f"IMAGEN_MAX_PIXELS: {self.max_pixels} is more than Pillow opens "
                              f"({2 * Image.MAX_IMAGE_PIXELS}): larger images would fail as decompression bombs")
        if self.output_bucket:
            check_bucket_name("IMAGEN_OUTPUT_BUCKET", self.output_bucket)
        for bucket in sorted(self.allowed_buckets):
            check_bucket_name("IMAGEN_ALLOWED_BUCKETS", bucket)
        if bool(self.push_audience) != bool(self.push_service_accounts):
            raise ConfigError("IMAGEN_PUSH_AUDIENCE (the push subscription's OIDC audience: the service URL) and "
                              "IMAGEN_PUSH_SERVICE_ACCOUNTS (its service account) must be set together: any Google "
                              "account can get a token for any audience")
        prefixes = {
            "IMAGEN_INPUT_PREFIX": self.input_prefix,
            "IMAGEN_OUTPUT_PREFIX": self.output_prefix,
            "IMAGEN_FAILED_PREFIX": self.failed_prefix,
        }
        for name, prefix in prefixes.items():
            if not prefix.endswith("/") or prefix.startswith("/") or "//" in prefix:
                raise ConfigError(f"{name}: {prefix!r} must be a folder like 'incoming/'")
            try:  # as every object name under it is checked: else every job would fail on it
                check_safe_name(prefix + "x")
            except UnsafeObjectName as error:
                raise ConfigError(f"{name}: {prefix!r} is not a folder imagen can use: {error}") from None
        names = list(prefixes)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if prefixes[a].startswith(prefixes[b]) or prefixes[b].startswith(prefixes[a]):
                    raise ConfigError(
                        f"{a} ({prefixes[a]!r}) and {b} ({prefixes[b]!r}) overlap: imagen would "
                        "process its own results; give them separate folders"
                    )
        return self

    @property
    def code_buckets(self) -> frozenset[str]:
        """The buckets of code the workers run: IMAGEN_COMPILE_CACHE's and IMAGEN_MODEL_MIRROR's."""
        return frozenset(_bucket_of(location) for location in (self.compile_cache, self.model_mirror)
                         if location and location.startswith("gs://"))

    def _check_holds_no_images(self, name: str, bucket: str, why: str) -> None:
        """ConfigError when `bucket`, where `name` keeps code the workers run, is one images are
        uploaded to or written in: whoever can write there could put code in front of every worker."""
        if bucket in self.allowed_buckets or bucket == self.output_bucket:
            raise ConfigError(f"{name}: gs://{bucket} holds images (IMAGEN_ALLOWED_BUCKETS or IMAGEN_OUTPUT_BUCKET); "
                              f"{why}")


def _bucket_of(location: str) -> str:
    """The bucket of a gs://BUCKET/PREFIX location."""
    return location[len("gs://"):].split("/", 1)[0]


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


def check_bucket_name(name: str, bucket: str) -> None:
    """ConfigError naming `name` unless `bucket` is a Cloud Storage bucket name (a `gs://`
    before it, or a folder after it, would match no bucket: every job or write refused)."""
    if _BUCKET_NAME.fullmatch(bucket):
        return
    hint = "give the name alone, without gs://" if bucket.startswith("gs://") else \
        "a name alone is 3 to 63 lowercase letters, digits, dashes and underscores (up to 222 with dots)"
    raise ConfigError(f"{name}: {bucket!r} is not a bucket name: {hint}")


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment for a child process: this process's, with `extra` on top."""
    return {**os.environ, **extra}


def split_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if number <= 0:
        raise ValueError(f"must be positive, got {number}")
    return number


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"{value!r} is not true or false")
