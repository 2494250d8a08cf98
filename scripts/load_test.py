"""Load and crash test: `python -m scripts.load_test [--n 300] [--seed 0]`.

Starts the emulators, builds the tiny models (`imagen models pull --tiny`) in a temporary
MODEL_CACHE_DIR, runs two `imagen worker` processes on one subscription (remove-background,
the fastest operation, on the CPU), uploads N pictures, and meanwhile SIGKILLs one of the
workers at random moments while it has a job in hand (every 3 to 10 s, until 90 % of the
outputs exist) and restarts it. It watches the output prefix the whole time,
recording each output's generation when first seen, and checks at the end:

- exactly N outputs, none missing ("lost"), none written twice ("duplicates": an output whose
  generation changed after it was first seen, one from another source generation, or more
  "job succeeded" log lines than outputs);
- no failure reports;

then prints those figures, the throughput, the kills and the redeliveries (jobs started more
than once, and redeliveries acked as duplicates without GPU work), and exits 1 if any check
failed. `tests/reliability/test_crash_and_load.py` runs it small (N=20, one kill).

Two things about the emulator shape the run (see `LEASE_SECONDS` and `Heartbeat`): it ignores
the workers' flow control, and it re-dispatches a killed worker's messages only when its topic
sees traffic. The workers therefore run with lease extensions bounded to LEASE_SECONDS, and a
heartbeat of ignored notifications keeps the topic busy.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from google.cloud import storage
from PIL import Image

from handlers.clients import publisher_client, storage_client, subscriber_client
from handlers.localstack import EVENTS_TOPIC, PROJECT, PubsubEmulator, StorageEmulator
from handlers.settings import Settings, child_environment

OPERATION = "remove-background"
ACK_DEADLINE_SECONDS = 10  # the subscription's; Pub/Sub's minimum


@dataclasses.dataclass
class LoadReport:
    n: int
    outputs: int
    duplicates: int
    lost: int
    failures: int
    seconds: float  # first upload to last output
    kills: int
    jobs_started: int
    duplicate_skips: int
    writes: int  # "job succeeded" log lines: outputs written (a killed worker may not log one)

    @property
    def throughput(self) -> float:
        return self.outputs / self.seconds if self.seconds else 0.0

    @property
    def redeliveries(self) -> int:
        """Deliveries beyond the first for a job: started again, or acked as a duplicate."""
        return max(self.jobs_started - self.outputs, 0) + self.duplicate_skips

    @property
    def ok(self) -> bool:
        return self.outputs == self.n and not (self.duplicates or self.lost or self.failures)

    def lines(self) -> list[str]:
        return [
            f"N            {self.n}",
            f"outputs      {self.outputs}",
            f"duplicates   {self.duplicates}",
            f"lost         {self.lost}",
            f"failures     {self.failures}",
            f"throughput   {self.throughput:.2f} jobs/s ({self.outputs} in {self.seconds:.1f} s)",
            f"kills        {self.kills} (SIGKILL, then restart)",
            (
                f"redeliveries {self.redeliveries} ({self.jobs_started} jobs started for "
                f"{self.outputs} outputs; {self.duplicate_skips} redeliveries acked as duplicates)"
            ),
        ]


IMAGEN = (sys.executable, "-m", "handlers.cli")
LEASE_SECONDS = 10
"""The workers' `--lease-extension-seconds`: what a killed worker held comes back after about
this long. With the client library's own extensions (its 99th percentile of ack latency, up
to 600 s) the emulator, which ignores flow control and hands one streaming pull hundreds of
messages, sees that latency grow with the backlog, and a kill can strand messages for ten
minutes; Pub/Sub itself holds a worker to its flow control."""


class Worker:
    """One `imagen worker` process; its log (JSON lines) is appended across restarts."""

    def __init__(self, name: str, subscription: str, env: dict, log_path: Path,
                 lease_seconds: int = LEASE_SECONDS):
        self.name, self.subscription, self.env, self.log_path = name, subscription, env, log_path
        self.lease_seconds = lease_seconds
        self.process: subprocess.Popen | None = None
        self._offset = 0

    def start(self) -> None:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *IMAGEN,
                    "worker",
                    "--lease-extension-seconds",
                    str(self.lease_seconds),
                    "--subscription",
                    self.subscription,
                    "--operations",
                    OPERATION,
                    "--metrics-port",
                    "0",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, killed as one
            )

    def wait_pulling(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self._tail()}")
            with open(self.log_path, "rb") as log:
                log.seek(self._offset)
                if b'"message": "pulling"' in log.read():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.name} did not start pulling:\n{self._tail()}")

    def busy(self) -> bool:
        """Whether this run of the process (since its last start) has started a job."""
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            return b'"message": "job started"' in log.read()

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def count(self, needle: bytes) -> int:
        return self.log_path.read_bytes().count(needle) if self.log_path.exists() else 0

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


class _Periodic:
    """Calls `tick()` every `interval` seconds on its own thread, from start() to stop()."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()


class Heartbeat(_Periodic):
    """Publishes a harmless notification (an OBJECT_DELETE, which workers ignore and ack) every
    `interval` seconds. The Pub/Sub emulator re-dispatches expired messages (those a killed
    worker held) to the remaining streaming pulls only when its topic sees traffic; without
    any, they come back a minute or more late. A production topic is rarely this quiet."""

    def __init__(self, publisher, topic: str, bucket: str, interval: float = 1.0):
        super().__init__(interval)
        self.topic, self.bucket = topic, bucket
        self._publisher = publisher

    def tick(self) -> None:
        self._publisher.publish(
            self.topic,
            b"",
            eventType="OBJECT_DELETE",
            payloadFormat="NONE",
            bucketId=self.bucket,
            objectId="heartbeat",
        ).result(timeout=30)


class OutputWatch(_Periodic):
    """Lists the output and failure prefixes every `interval` seconds; records each output's
    generation when first seen and every later change of it."""

    def __init__(self, bucket: storage.Bucket, interval: float = 0.5):
        super().__init__(interval)
        self.bucket = bucket
        self.first: dict[str, int] = {}
        self.changed: set[str] = set()
        self.failures: set[str] = set()
        self.last_new = time.monotonic()

    def stop(self) -> None:
        super().stop()
        self.tick()  # a last look

    def tick(self) -> None:
        for blob in self.bucket.list_blobs(prefix="processed/"):
            if blob.name not in self.first:
                self.first[blob.name] = blob.generation
                self.last_new = time.monotonic()
            elif blob.generation != self.first[blob.name]:
                self.changed.add(blob.name)
        self.failures.update(blob.name for blob in self.bucket.list_blobs(prefix="failed/"))


def picture(index: int) -> bytes:
    image = Image.new("RGB", (32, 24), ((index * 37) % 256, (index * 91) % 256, 128))
    image.paste((255, 255, 255), (8 + index % 8, 6, 20, 18))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def run_load(
    n: int,
    *,
    pubsub_host: str,
    storage_url: str,
    model_cache_dir: Path,
    work_dir: Path,
    kills: int | None = None,
    kill_every: tuple[float, float] = (3.0, 10.0),
    kill_until: float = 0.9,
    seed: int = 0,
    timeout: float = 900,
    settle: float = LEASE_SECONDS + 5,
    lease_seconds: int = LEASE_SECONDS,
    log=print,
) -> LoadReport:
    """Run the load on running emulators; see the module docstring.

    `kills`: how many times to SIGKILL worker A (None: every `kill_every` seconds, a random
    interval, until `kill_until` of the outputs exist: the tail drains without kills, which
    on the emulator would otherwise keep stranding the last messages). `settle`: seconds to
    keep watching after the last output, so that late redeliveries of killed jobs would show.
    `lease_seconds`: the workers' `--lease-extension-seconds`.
    """
    rng = random.Random(seed)
    stack = _stack_settings(pubsub_host, storage_url)
    bucket = storage_client(stack).create_bucket(f"load-{uuid.uuid4().hex[:12]}")
    subscriber = subscriber_client(stack)
    subscription = subscriber.subscription_path(PROJECT, f"load-{bucket.name}")
    subscriber.create_subscription(
        name=subscription,
        topic=subscriber.topic_path(PROJECT, EVENTS_TOPIC),
        ack_deadline_seconds=ACK_DEADLINE_SECONDS,
    )
    env = child_environment(
        {
            "PUBSUB_EMULATOR_HOST": pubsub_host,
            "STORAGE_EMULATOR_HOST": storage_url,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "MODEL_CACHE_DIR": str(model_cache_dir),
            "IMAGEN_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "IMAGEN_ALLOWED_BUCKETS": bucket.name,  # not the shell's (imagen dev's): its uploads' bucket
            "OMP_NUM_THREADS": "1",  # two workers on a small machine: one core each
            "PYTHONUNBUFFERED": "1",
        }
    )
    work_dir.mkdir(parents=True, exist_ok=True)
    victim = Worker("A", subscription, env, work_dir / "worker-A.log", lease_seconds)
    steady = Worker("B", subscription, env, work_dir / "worker-B.log", lease_seconds)
    workers = (victim, steady)
    watch = OutputWatch(bucket)
    heartbeat = Heartbeat(
        publisher_client(stack), subscriber.topic_path(PROJECT, EVENTS_TOPIC), bucket.name
    )
    kill_count = 0
    try:
        # With a fixed number of kills A must get jobs to be killed in: it pulls alone while
        # the pictures go up, and B joins after (with the tiny model a worker that pulls
        # from the start can take all twenty before A starts one).
        first = workers if kills is None else (victim,)
        for worker in first:
            worker.start()
        for worker in first:
            worker.wait_pulling()
        log(
            f"two workers pulling from {subscription}; uploading {n} pictures to gs://{bucket.name}"
        )
        watch.start()
        heartbeat.start()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: bucket.blob(
                        f"incoming/{OPERATION}/load/{i:05d}.png"
                    ).upload_from_string(picture(i), content_type="image/png"),
                    range(n),
                )
            )
        log(f"uploaded {n} in {time.monotonic() - started:.1f} s")
        if kills is not None:
            steady.start()

        deadline = started + timeout
        # Kill A at a random moment while it has a job in hand: after a random interval
        # (none for a fixed number of kills), once its log shows a job started since its start.
        due = time.monotonic() + (0.0 if kills is not None else rng.uniform(*kill_every))
        while len(watch.first) < n and time.monotonic() < deadline:
            if kills is None:
                more = len(watch.first) < kill_until * n
            else:
                more = kill_count < kills
            # Due, and A has a job in hand (or has had none for 5 s: kill it anyway).
            now = time.monotonic()
            if more and now >= due and (victim.busy() or now >= due + 5):
                time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the job
                victim.kill()
                kill_count += 1
                log(f"SIGKILL worker A ({len(watch.first)}/{n} outputs); restarting it")
                time.sleep(rng.uniform(0.0, 1.0))
                victim.start()
                victim.wait_pulling()
                due = time.monotonic() + rng.uniform(*kill_every)
            time.sleep(0.05)
        finished = watch.last_new
        time.sleep(settle)  # redeliveries of killed jobs would write (or skip) by now
    finally:
        heartbeat.stop()
        watch.stop()
        for worker in workers:
            worker.stop()
        subscriber.delete_subscription(subscription=subscription)

    expected = {f"processed/{OPERATION}/load/{i:05d}.png" for i in range(n)}
    stray = set(watch.first) - expected
    outputs = len(expected & set(watch.first))
    writes = sum(w.count(b'"message": "job succeeded') for w in workers)
    # Written twice: seen changing, beyond the names expected, from a stale source, or logged
    # as written more often than there are outputs (a rewrite between two listings).
    duplicates = max(
        len(watch.changed) + len(stray) + _wrong_source(bucket, expected & set(watch.first)),
        writes - outputs,
    )
    return LoadReport(
        n=n,
        outputs=outputs,
        duplicates=duplicates,
        lost=n - outputs,
        failures=len(watch.failures),
        seconds=max(finished - started, 1e-9),
        kills=kill_count,
        jobs_started=sum(w.count(b'"message": "job started"') for w in workers),
        duplicate_skips=sum(w.count(b'"message": "job skipped: duplicate') for w in workers),
        writes=writes,
    )


def _stack_settings(pubsub_host: str, storage_url: str | None) -> Settings:
    """Settings that point this process's clients at the emulators."""
    return Settings(
        pubsub_emulator_host=pubsub_host, storage_emulator_host=storage_url, project=PROJECT
    )


def _wrong_source(bucket: storage.Bucket, names: set[str]) -> int:
    """Outputs whose imagen-source-generation is not their source's (a stale overwrite)."""
    sources = {
        b.name: str(b.generation) for b in bucket.list_blobs(prefix=f"incoming/{OPERATION}/")
    }
    wrong = 0
    for blob in bucket.list_blobs(prefix=f"processed/{OPERATION}/"):
        if blob.name in names:
            source = "incoming/" + blob.name.removeprefix("processed/")
            if (blob.metadata or {}).get("imagen-source-generation") != sources.get(source):
                wrong += 1
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Crash-and-load test on the emulator stack.")
    parser.add_argument("--n", type=int, default=300, help="uploads (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kill-every",
        type=float,
        nargs=2,
        default=(3.0, 10.0),
        metavar=("MIN", "MAX"),
        help="seconds between kills of worker A, drawn uniformly (default 3 10)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for all outputs")
    parser.add_argument(
        "--lease-seconds",
        type=int,
        default=LEASE_SECONDS,
        help="each worker's --lease-extension-seconds; 0: the library's own (p99 of "
        f"ack latency, up to 600 s) (default {LEASE_SECONDS})",
    )
    parser.add_argument("--work-dir", type=Path, help="logs and models (default: a temporary dir)")
    args = parser.parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="imagen-load-"))
    models = work_dir / "models"
    print(f"work dir {work_dir}: building the tiny models")
    pull = ["models", "pull", "--tiny", "--operations", OPERATION, "--cache-dir", str(models)]
    subprocess.run([*IMAGEN, *pull], check=True, stdout=subprocess.DEVNULL)
    with (
        PubsubEmulator(log_dir=work_dir / "logs") as pubsub,
        StorageEmulator(log_dir=work_dir / "logs") as gcs,
    ):
        pubsub.start()
        publisher = publisher_client(_stack_settings(pubsub.host, None))
        publisher.create_topic(name=publisher.topic_path(PROJECT, EVENTS_TOPIC))
        gcs.start(pubsub_host=pubsub.host)
        report = run_load(
            args.n,
            pubsub_host=pubsub.host,
            storage_url=gcs.url,
            model_cache_dir=models,
            work_dir=work_dir,
            kill_every=tuple(args.kill_every),
            seed=args.seed,
            timeout=args.timeout,
            lease_seconds=args.lease_seconds,
        )
    print("\n".join(report.lines()))
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
