"""`imagen submit` and `imagen backfill` against the emulator stack and a real worker."""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner
from google.api_core.exceptions import NotFound
from PIL import Image

from handlers.cli import main
from handlers.clients import storage_client
from handlers.events import JobRequest, Message, ObjectEvent, parse_message
from handlers.localstack import EVENTS_TOPIC
from handlers.processor import Processor
from handlers.routing import Layout, failure_location
from handlers.storage import Store
from handlers.submit import prepare
from scripts.fault_proxy import Rule

from .conftest import PROJECT, png_bytes, wait_for
from .test_processor import FakeEngine


def _cli_env(settings) -> dict:
    return {
        "STORAGE_EMULATOR_HOST": settings.storage_emulator_host,
        "PUBSUB_EMULATOR_HOST": settings.pubsub_emulator_host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
    }


def test_submit_waits_downloads_and_reports_failures(worker, tiny_settings, bucket, tmp_path):
    good, bad = tmp_path / "sunset.png", tmp_path / "notes.png"
    good.write_bytes(png_bytes((24, 20)))
    bad.write_bytes(b"shopping list, not a picture")
    out = tmp_path / "results"
    result = CliRunner().invoke(
        main,
        ["submit", str(good), str(bad), "--operation", "remove-background", "--param", "mask_only=true",
         "--out", str(out), "--timeout", "120"],
        env={**_cli_env(tiny_settings), "IMAGEN_BUCKET": bucket.name},  # as Terraform's client_env sets it
    )
    assert result.exit_code == 1, result.output  # one of the two failed
    assert f"gs://{bucket.name}/incoming/remove-background/sunset.png" in result.output
    assert "done     sunset.png" in result.output
    assert "failed   notes.png: ImageDecodeError" in result.output
    mask = Image.open(out / "sunset.png")
    assert mask.size == (24, 20) and mask.mode == "L"
    uploaded = bucket.get_blob("incoming/remove-background/sunset.png")
    assert json.loads(uploaded.metadata["imagen-params"]) == {"mask_only": True}


def test_submit_refuses_bad_parameters_before_uploading(tiny_settings, bucket, tmp_path):
    picture = tmp_path / "a.png"
    picture.write_bytes(png_bytes())
    result = CliRunner().invoke(
        main, ["submit", str(picture), "--operation", "upscale", "--param", "steps=-3", "--bucket", bucket.name],
        env=_cli_env(tiny_settings),
    )
    assert result.exit_code == 1 and "steps" in result.output
    assert list(bucket.list_blobs()) == []


def test_submit_names_a_bucket_that_does_not_exist_in_one_line(tiny_settings, tmp_path):
    picture = tmp_path / "a.png"
    picture.write_bytes(png_bytes())
    result = CliRunner().invoke(main, ["submit", str(picture), "--operation", "upscale", "--bucket", "no-such-bucket"],
                                env=_cli_env(tiny_settings))
    assert result.exit_code == 2 and "bucket no-such-bucket does not exist" in result.output, result.output


def test_submit_and_backfill_name_an_output_bucket_that_does_not_exist_before_any_work(tiny_settings, bucket,
                                                                                         tmp_path):
    """A mistyped IMAGEN_OUTPUT_BUCKET: submit --wait watched it to its timeout, backfill found
    no outputs there and queued every object again."""
    picture = tmp_path / "a.png"
    picture.write_bytes(png_bytes())
    env = {**_cli_env(tiny_settings), "IMAGEN_OUTPUT_BUCKET": f"{bucket.name}-typo"}
    says = f"IMAGEN_OUTPUT_BUCKET: bucket {bucket.name}-typo does not exist"
    submitted = CliRunner().invoke(main, ["submit", str(picture), "--operation", "upscale", "--bucket", bucket.name],
                                   env=env)
    assert submitted.exit_code == 2 and says in submitted.output, submitted.output
    assert list(bucket.list_blobs()) == []
    backfilled = CliRunner().invoke(main, ["backfill", f"gs://{bucket.name}/", "--topic", EVENTS_TOPIC, "--dry-run"],
                                    env=env)
    assert backfilled.exit_code == 2 and says in backfilled.output, backfilled.output


def test_submit_refuses_an_output_folder_it_cannot_make_before_uploading(tiny_settings, bucket, tmp_path):
    # Found after the jobs had run: "not downloaded: [Errno 20] Not a directory" for each.
    picture = tmp_path / "a.png"
    picture.write_bytes(png_bytes())
    result = CliRunner().invoke(main, ["submit", str(picture), "--operation", "upscale", "--bucket", bucket.name,
                                       "--out", f"{picture}/results"], env=_cli_env(tiny_settings))
    assert result.exit_code == 1 and "Not a directory" in result.output, result.output
    assert list(bucket.list_blobs()) == []


@pytest.mark.parametrize("names", [("a/photo.jpg", "b/photo.jpg"), ("photo.jpg", "photo.png")])
def test_submit_refuses_files_that_would_share_an_object_or_output(tiny_settings, bucket, tmp_path, names):
    paths = []
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png_bytes())
        paths.append(str(tmp_path / name))
    result = CliRunner().invoke(main, ["submit", *paths, "--operation", " upscale", "--bucket", bucket.name],
                                env=_cli_env(tiny_settings))
    assert result.exit_code == 1 and "would both go to gs://" in result.output and "rename one" in result.output
    assert list(bucket.list_blobs()) == []


def test_submit_uploads_under_the_operations_own_folder(tiny_settings, bucket, tmp_path):
    picture = tmp_path / "a.png"
    picture.write_bytes(png_bytes())
    result = CliRunner().invoke(main, ["submit", str(picture), "--operation", " upscale ", "--bucket", bucket.name],
                                env=_cli_env(tiny_settings))
    assert result.exit_code == 0, result.output
    assert [blob.name for blob in bucket.list_blobs()] == ["incoming/upscale/a.png"]
    [(_, job, plan)] = prepare([picture], bucket.name, " upscale ", {}, Layout())
    assert failure_location(job, Layout()) == (bucket.name, "failed/upscale/a.png.json")  # where submit looks


def test_backfill_queues_only_what_is_missing_and_can_rerun(tiny_settings, bucket, publisher, subscriber):
    processor = Processor(engine=FakeEngine(), store=Store(storage_client(tiny_settings)), settings=tiny_settings)

    def upload(name, data=None, metadata=None):
        blob = bucket.blob(name)
        blob.metadata = metadata
        blob.upload_from_string(data or png_bytes(), content_type="image/png")
        blob.reload()
        return blob

    done = upload("incoming/upscale/done.png")
    processor.handle(JobRequest(bucket.name, done.name, "upscale", {}, generation=str(done.generation)))
    stale = upload("incoming/comic/stale.png")
    processor.handle(JobRequest(bucket.name, stale.name, "comic", {}, generation=str(stale.generation)))
    stale = upload("incoming/comic/stale.png", png_bytes(seed=9))  # a newer generation since
    upload("incoming/comic/todo.png", metadata={"imagen-params": '{"steps": 3}'})
    upload("elsewhere/readme.png")

    topic = publisher.topic_path(PROJECT, f"jobs-{uuid.uuid4().hex[:8]}")
    publisher.create_topic(name=topic)
    sub = subscriber.subscription_path(PROJECT, f"jobs-sub-{uuid.uuid4().hex[:8]}")
    subscriber.create_subscription(name=sub, topic=topic)
    env = _cli_env(tiny_settings)
    args = ["backfill", f"gs://{bucket.name}/", "--topic", topic, "--rate", "50"]

    dry = CliRunner().invoke(main, args + ["--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "queued: 2" in dry.output and "already done: 1" in dry.output
    assert "outside the input prefix" in dry.output and "nothing published" in dry.output

    first = CliRunner().invoke(main, args, env=env)
    assert first.exit_code == 0 and "queued: 2" in first.output, first.output
    messages = []

    def pulled():
        response = subscriber.pull(subscription=sub, max_messages=10, timeout=5)
        messages.extend(response.received_messages)
        if response.received_messages:
            subscriber.acknowledge(subscription=sub, ack_ids=[m.ack_id for m in response.received_messages])
        return len(messages) >= 2

    wait_for(pulled, timeout=30, what="two job messages")
    jobs = {job.name: job for job in (parse_message(Message(m.message.data, dict(m.message.attributes)))
                                       for m in messages)}
    assert set(jobs) == {"incoming/comic/stale.png", "incoming/comic/todo.png"}
    # The attribute each operation's subscription filters on (infra/terraform/main.tf).
    assert [dict(m.message.attributes) for m in messages] == [{"operation": "comic"}] * 2
    assert jobs["incoming/comic/stale.png"].generation == str(stale.generation)
    assert jobs["incoming/comic/todo.png"].params == {"steps": 3}

    for job in jobs.values():  # the workers do their part...
        assert processor.handle(job).status == "succeeded"
    again = CliRunner().invoke(main, args, env=env)  # ...and a rerun queues nothing
    assert again.exit_code == 0 and "queued: 0" in again.output and "already done: 3" in again.output

    # Neither what would fail for want of an output name, nor what failed before, is queued.
    upload("incoming/upscale/done.jpg")  # done.png's output name: done.png's result holds it
    upload("incoming/upscale/b.jpg")
    upload("incoming/upscale/b.png")  # b.jpg's, listed just before: only b.jpg is queued
    broken = upload("incoming/upscale/broken.png", b"not a picture")
    assert processor.handle(JobRequest(bucket.name, broken.name, "upscale", {},
                                       generation=str(broken.generation))).status == "failed"
    dry = CliRunner().invoke(main, args + ["--dry-run", "-v"], env=env)
    assert dry.exit_code == 0, dry.output
    assert "queued: 1" in dry.output and f"queue  gs://{bucket.name}/incoming/upscale/b.jpg" in dry.output, dry.output
    assert "2 x would fail: OutputTaken" in dry.output
    assert "1 x failed before with these parameters" in dry.output
    retry = CliRunner().invoke(main, args + ["--dry-run", "--retry-failed"], env=env)
    assert "queued: 2" in retry.output, retry.output
    # What would fail says why with -v (the summary counts by the error's type alone).
    upload("incoming/upscale/steps.png", metadata={"imagen-params": '{"steps": 500}'})
    dry = CliRunner().invoke(main, args + ["--dry-run", "-v"], env=env)
    assert (f"skip  gs://{bucket.name}/incoming/upscale/steps.png  would fail: InvalidParameter (parameter 'steps': "
            "500 is out of range") in dry.output, dry.output
    assert "1 x would fail: InvalidParameter\n" in dry.output, dry.output

    # A job a filtered pool could not serve failed for where it was delivered, not for what it
    # is: backfill's job message names its operation, so it is queued, for that pool.
    moved = upload("incoming/upscale/moved.png", metadata={"imagen-operation": "comic"})
    upscale_pool = Processor(engine=FakeEngine(), store=Store(storage_client(tiny_settings)),
                             settings=tiny_settings.replace(operations=("upscale",), filtered_subscription=True))
    assert upscale_pool.handle(JobRequest(bucket.name, moved.name, "comic", {},
                                          generation=str(moved.generation))).error["type"] == "OperationNotServed"
    dry = CliRunner().invoke(main, args + ["--dry-run", "-v"], env=env)
    assert f"queue  gs://{bucket.name}/incoming/upscale/moved.png" in dry.output, dry.output

    # One that no pool of the deployment serves failed for what it asks: queued again it would
    # only be reported again, so backfill leaves it (as any other failure) to --retry-failed.
    # Its report holds the parameters as given ("20"): they are the same job as the plan's 20.
    left_out = upload("incoming/upscale/left-out.png",
                      metadata={"imagen-operation": "enhance", "imagen-params": '{"steps": "20"}'})
    unfiltered_pool = Processor(engine=FakeEngine(), store=Store(storage_client(tiny_settings)),
                                settings=tiny_settings.replace(operations=("upscale",),
                                                               deployed_operations=("upscale", "comic")))
    event = ObjectEvent("finalize", bucket.name, left_out.name, str(left_out.generation), dict(left_out.metadata),
                        left_out.size, left_out.content_type)
    assert unfiltered_pool.handle(event).error["type"] == "OperationNotDeployed"
    assert json.loads(bucket.blob("failed/enhance/left-out.png.json").download_as_bytes())["params"] == {"steps": "20"}
    dry = CliRunner().invoke(main, args + ["--dry-run", "-v"], env=env)
    assert f"queue  gs://{bucket.name}/incoming/upscale/left-out.png" not in dry.output, dry.output
    assert "2 x failed before with these parameters" in dry.output, dry.output

    # A chain spelled "a, b" in metadata: its report lies under the chain as imagen spells it,
    # where backfill looks, so the failure is not queued again at every run.
    spaced = upload("incoming/upscale/spaced.png", b"not a picture",
                    metadata={"imagen-operation": "remove-background, upscale"})
    event = ObjectEvent("finalize", bucket.name, spaced.name, str(spaced.generation), dict(spaced.metadata),
                        spaced.size, spaced.content_type)
    assert processor.handle(event).status == "failed"
    assert bucket.get_blob("failed/remove-background,upscale/spaced.png.json") is not None
    dry = CliRunner().invoke(main, args + ["--dry-run", "-v"], env=env)
    assert f"queue  gs://{bucket.name}/incoming/upscale/spaced.png" not in dry.output, dry.output
    assert "3 x failed before with these parameters" in dry.output, dry.output

    # --only: what the deployment serves; the rest (here upscale's jobs) is not queued, where a
    # filtered deployment would keep each in its unrouted subscription at every run.
    only = CliRunner().invoke(main, args + ["--dry-run", "-v", "--only", "comic", "--only", "remove-background , upscale"],
                              env=env)
    assert only.exit_code == 0, only.output
    assert f"skip  gs://{bucket.name}/incoming/upscale/b.jpg  not served: upscale (not among --only: comic; " \
           "remove-background,upscale)" in only.output, only.output
    assert f"queue  gs://{bucket.name}/incoming/upscale/moved.png" in only.output  # comic, by its metadata
    assert "queued: 1" in only.output, only.output
    wrong = CliRunner().invoke(main, args + ["--dry-run", "--only", "upscal"], env=env)
    assert wrong.exit_code == 2 and "unknown operation 'upscal'" in wrong.output, wrong.output


def test_backfill_queues_again_what_failed_for_the_situation_not_for_what_it_is(tiny_settings, bucket):
    """A report of no access, of an output name another source held, or of a fault that
    outlasted its retries says nothing of the image: the usual moment for a backfill is just
    after fixing such a thing. A broken image, or bad parameters, would only fail again."""
    from handlers.backfill import decide

    store = Store(storage_client(tiny_settings))
    cases = {"StoragePermanentError": "queue", "OutputTaken": "queue", "ModelError": "queue",
             "TransientError": "queue", "DeviceFailed": "queue", "OperationNotServed": "queue",
             "BadJobMessage": "queue", "SourceNotAllowed": "queue",  # the message's fault, not the object's
             "ImageDecodeError": "skip", "InvalidParameter": "skip", "JobTooLong": "skip",
             "OutOfDeviceMemory": "skip", "OperationNotDeployed": "skip", "InputError": "skip",
             "RuntimeError": "queue"}  # an unexpected error that outlasted its retries: a bug, fixed since
    for error, action in cases.items():
        blob = bucket.blob(f"incoming/upscale/{error}.png")
        blob.upload_from_string(png_bytes(), content_type="image/png")
        blob.reload()
        bucket.blob(f"failed/upscale/{error}.png.json").upload_from_string(json.dumps({
            "source": f"gs://{bucket.name}/{blob.name}", "generation": str(blob.generation), "operation": "upscale",
            "params": {}, "error": {"type": error, "message": "..."}, "attempt": 5, "time": "2026-11-27T00:00:00Z"}))
        decision = decide(blob, Layout(), store, None)
        assert decision.action == action, (error, decision)
        assert decide(blob, Layout(), store, None, retry_failed=True).action == "queue"


def test_a_backfill_stopped_by_an_error_says_what_it_did_and_where(tiny_settings, bucket, publisher, monkeypatch):
    # Hours into a large bucket, a refused publish ended it with one line and no summary.
    from handlers.cli import backfill as backfill_cli

    for name in ("incoming/upscale/a.png", "incoming/upscale/b.png"):
        bucket.blob(name).upload_from_string(png_bytes(), content_type="image/png")
    topic = publisher.topic_path(PROJECT, f"gone-{uuid.uuid4().hex[:8]}")
    publisher.create_topic(name=topic)
    check = backfill_cli._check_exist

    def deleted_after_the_check(*args):  # the topic goes while the run lists
        check(*args)
        publisher.delete_topic(topic=topic)

    monkeypatch.setattr(backfill_cli, "_check_exist", deleted_after_the_check)
    result = CliRunner().invoke(main, ["backfill", f"gs://{bucket.name}/", "--topic", topic],
                                env=_cli_env(tiny_settings))
    monkeypatch.setattr(backfill_cli, "_check_exist", check)
    assert result.exit_code == 1, result.output
    assert "queued: 0" in result.output and "already done: 0" in result.output
    assert (f"imagen: stopped at gs://{bucket.name}/incoming/upscale/a.png, 0 object(s) settled before it: "
            "NotFound: ") in result.output
    assert result.output.rstrip().endswith("go on with --start-at incoming/upscale/a.png")
    # Going on from there lists from that object on (a dry run says what it would queue).
    resumed = CliRunner().invoke(main, ["backfill", f"gs://{bucket.name}/", "--topic", EVENTS_TOPIC, "--dry-run",
                                        "--start-at", "incoming/upscale/b.png"], env=_cli_env(tiny_settings))
    assert resumed.exit_code == 0, resumed.output
    assert f"gs://{bucket.name}/incoming/upscale/b.png" in resumed.output
    assert f"gs://{bucket.name}/incoming/upscale/a.png" not in resumed.output


@pytest.mark.parametrize("location, topic, extra, says", [
    ("gs://{bucket}-gone/", EVENTS_TOPIC, [], "bucket {bucket}-gone does not exist"),
    ("gs://{bucket}/", "no-such-topic", [], "topics/no-such-topic does not exist"),
    ("gs://{bucket}/", EVENTS_TOPIC, ["--operation", "upscal"], "unknown operation"),
    ("gs://", EVENTS_TOPIC, [], "expected gs://BUCKET/PREFIX"),
])
def test_backfill_names_a_wrong_end_or_operation_before_listing(tiny_settings, bucket, location, topic, extra, says):
    # Each was found at the first publish or decision, maybe hours into a large bucket, or
    # never (a dry run); "run it again to go on" could not help.
    result = CliRunner().invoke(main, ["backfill", location.format(bucket=bucket.name), "--topic", topic,
                                       "--dry-run", *extra], env=_cli_env(tiny_settings))
    assert result.exit_code == 2, result.output
    assert says.format(bucket=bucket.name) in result.output and "queued" not in result.output


def test_a_backfill_whose_listing_outlives_its_retries_names_the_emulator(tiny_settings, bucket, proxy,
                                                                          short_storage_deadlines):
    # A RetryError and "run it again to go on", nothing about what was not answering. (An
    # emulator gone before the start is named at once: tests/unit/test_cli_errors.py.)
    bucket.blob("incoming/upscale/a.png").upload_from_string(png_bytes(), content_type="image/png")
    proxy.add(Rule(rf"^GET /storage/v1/b/{bucket.name}/o\?", status=503))
    env = {**_cli_env(tiny_settings), "STORAGE_EMULATOR_HOST": proxy.url}
    result = CliRunner().invoke(main, ["backfill", f"gs://{bucket.name}/", "--topic", EVENTS_TOPIC, "--dry-run"],
                                env=env)
    assert result.exit_code == 1, result.output
    assert "imagen: stopped while listing, 0 object(s) settled before it: RetryError" in result.output
    assert f"(is the emulator running? STORAGE_EMULATOR_HOST={proxy.url}, " in result.output


def test_backfill_keeps_publishes_in_flight_and_counts_each_once_answered(tiny_settings, bucket):
    # One publish at a time (waiting for each answer, 20-50 ms from a laptop) held --rate far
    # below what it asked. Several now await their answers at once; an object is counted when
    # its answer comes, in listing order, and a refused one is where the run stopped.
    import concurrent.futures
    import threading

    from handlers.backfill import Summary, backfill

    names = [f"incoming/upscale/{index}.png" for index in range(6)]
    for name in names:
        bucket.blob(name).upload_from_string(png_bytes(), content_type="image/png")
    published, all_sent = [], threading.Event()

    def publish(data, attributes):
        published.append(concurrent.futures.Future())
        if len(published) == len(names):
            all_sent.set()
        return published[-1]

    def answer():
        assert all_sent.wait(60)  # every publish was sent before the first was answered
        for index, future in enumerate(published):
            if index == 2:
                future.set_exception(RuntimeError("refused"))
            else:
                future.set_result(str(index))

    answering = threading.Thread(target=answer)
    answering.start()
    summary, heard = Summary(), []
    with pytest.raises(RuntimeError, match="refused"):
        backfill(storage_client(tiny_settings), bucket.name, "", Layout(), operation=None, publish=publish, rate=0,
                 summary=summary, on_decision=lambda decision: heard.append(decision.uri))
    answering.join(30)
    assert len(published) == len(names)
    assert summary.queued == 2 and heard == [f"gs://{bucket.name}/{name}" for name in names[:2]]
    assert summary.current == f"gs://{bucket.name}/{names[2]}"  # where --start-at goes on


def test_a_listing_that_fails_mid_way_names_the_next_object_to_go_on_from(tiny_settings, bucket, proxy):
    # Every object before the first one listed but not settled is settled: the run goes on there.
    from handlers.backfill import Summary, backfill

    names = [f"incoming/upscale/{index}.png" for index in range(5)]
    for name in names:
        bucket.blob(name).upload_from_string(png_bytes(), content_type="image/png")
    # The listing comes in pages of three (as Cloud Storage's of 1000); the second page's
    # request is answered 404 (the bucket deleted meanwhile).
    listing = rf"^GET /storage/v1/b/{bucket.name}/o\?"
    proxy.add(Rule(listing + ".*pageToken=", status=404))
    proxy.add(Rule(listing, status=None, query={"maxResults": "3"}))
    summary = Summary()
    with pytest.raises(NotFound):
        backfill(storage_client(tiny_settings.replace(storage_emulator_host=proxy.url)), bucket.name, "", Layout(),
                 operation=None, publish=None, rate=0, summary=summary, workers=1)
    assert proxy.count(listing) == 2 and proxy.count(listing + ".*pageToken=") == 1
    assert summary.looked_at == 2 and summary.current == f"gs://{bucket.name}/{names[2]}"


def test_a_backfill_stopped_with_ctrl_c_says_where_to_go_on(tiny_settings, bucket, monkeypatch):
    # "Safe to stop": Ctrl-C gave click's bare "Aborted!", no counts and no place to go on from.
    from handlers import backfill as backfill_module

    for name in ("incoming/upscale/a.png", "incoming/upscale/b.png"):
        bucket.blob(name).upload_from_string(png_bytes(), content_type="image/png")
    decide = backfill_module.decide

    def interrupted(blob, *args, **kwargs):
        if blob.name.endswith("b.png"):
            raise KeyboardInterrupt
        return decide(blob, *args, **kwargs)

    monkeypatch.setattr(backfill_module, "decide", interrupted)
    result = CliRunner().invoke(main, ["backfill", f"gs://{bucket.name}/", "--topic", EVENTS_TOPIC, "--dry-run"],
                                env=_cli_env(tiny_settings))
    assert result.exit_code == 130, result.output
    assert "queued: 1" in result.output
    assert result.output.rstrip().endswith(
        f"imagen: stopped at gs://{bucket.name}/incoming/upscale/b.png, 1 object(s) settled before it: "
        "interrupted; go on with --start-at incoming/upscale/b.png")


def test_a_stopped_backfill_drops_the_lookups_not_started(tiny_settings, bucket, monkeypatch):
    # Leaving the pool waited for every lookup queued ahead (2 x workers), each retried for
    # minutes where the network is what failed: Ctrl-C took that long to answer.
    import threading

    from handlers import backfill as backfill_module

    for i in range(8):
        bucket.blob(f"incoming/upscale/{i}.png").upload_from_string(png_bytes(), content_type="image/png")
    looked, release = [], threading.Event()

    def slow(blob, *args, **kwargs):
        looked.append(blob.name)
        if blob.name.endswith("0.png"):
            raise KeyboardInterrupt
        release.wait(2)  # a lookup stuck on the network
        return backfill_module.Decision(f"gs://{bucket.name}/{blob.name}", "skip", "test")

    monkeypatch.setattr(backfill_module, "decide", slow)
    with pytest.raises(KeyboardInterrupt):
        from handlers.backfill import backfill

        backfill(storage_client(tiny_settings), bucket.name, "", Layout(), operation=None, publish=None, rate=0,
                 workers=2)
    release.set()
    assert len(looked) <= 3, looked  # the two running (one of them the interrupted) and none of the queued


def test_submit_says_when_a_newer_upload_of_the_same_name_took_the_result(tiny_settings, bucket, tmp_path):
    # A script retried, a colleague uploaded the same name: the first submit waited its whole
    # timeout for a result that could never come.
    from handlers import submit

    client = storage_client(tiny_settings)
    picture = tmp_path / "cat.png"
    picture.write_bytes(png_bytes())
    [(path, job, plan)] = prepare([picture], bucket.name, "upscale", {}, Layout())
    first = submit.upload(client, path, job, plan, Layout())
    second = submit.upload(client, path, job, plan, Layout())
    processor = Processor(engine=FakeEngine(), store=Store(client), settings=tiny_settings)
    assert processor.handle(JobRequest(bucket.name, job.name, "upscale", {},
                                       generation=second.job.generation)).status == "succeeded"
    assert submit.poll(client, first) and first.status == "superseded"
    assert f"uploaded again (generation {second.job.generation})" in first.reason
    assert submit.poll(client, second) and second.status == "succeeded"
    # What it downloads is the output it checked, never a newer upload's that replaced it.
    assert submit.download(client, second, tmp_path / "out").read_bytes() == \
        bucket.get_blob(plan.output[1]).download_as_bytes()
    third = submit.upload(client, path, job, plan, Layout())
    assert processor.handle(JobRequest(bucket.name, job.name, "upscale", {"seed": 5},
                                       generation=third.job.generation)).status == "succeeded"
    with pytest.raises(NotFound):  # replaced (the bucket keeps no old generations): not someone else's
        submit.download(client, second, tmp_path / "again")


def test_submit_does_not_take_another_objects_report_at_the_same_place_for_its_own(tiny_settings, bucket, tmp_path):
    # A job message for another folder's p.png, asking for upscale, reports where the upload's
    # report would go: its newer generation said the upload was "uploaded again".
    from handlers import submit

    client = storage_client(tiny_settings)
    picture = tmp_path / "p.png"
    picture.write_bytes(png_bytes())
    [(path, job, plan)] = prepare([picture], bucket.name, "upscale", {}, Layout())
    mine = submit.upload(client, path, job, plan, Layout())
    other = bucket.blob("incoming/remove-background/p.png")
    other.upload_from_string(png_bytes(), content_type="image/png")
    processor = Processor(engine=FakeEngine(), store=Store(client),
                          settings=tiny_settings.replace(allowed_buckets=frozenset({bucket.name})))
    assert processor.handle(JobRequest(bucket.name, other.name, "upscale", {"steps": -1},
                                       generation=str(other.generation))).status == "failed"
    assert bucket.get_blob(mine.report[1]) is not None  # the same place
    assert not submit.poll(client, mine) and mine.status != "superseded"
    assert processor.handle(JobRequest(bucket.name, job.name, "upscale", {},
                                       generation=mine.job.generation)).status == "succeeded"
    assert submit.poll(client, mine) and mine.status == "succeeded"


def test_a_submission_that_times_out_says_where_to_look(tiny_settings, bucket, tmp_path):
    # A chain no worker served waited the whole timeout (900 s by default) and said only that.
    from handlers import submit
    from handlers.routing import Layout

    picture = tmp_path / "p.png"
    picture.write_bytes(png_bytes())
    client = storage_client(tiny_settings)
    [(path, job, plan)] = submit.prepare([picture], bucket.name, "upscale,comic", {}, Layout())
    submission = submit.upload(client, path, job, plan, Layout())
    submit.wait(client, [submission], timeout=0)
    assert submission.status == "timed out"
    assert "still queued or running, or no worker serves 'upscale,comic': on Terraform's filtered subscriptions it " \
           "waits in <prefix>-unrouted" in submission.reason and "'job skipped: ... is not this" in submission.reason
