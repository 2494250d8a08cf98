"""`imagen dlq list | replay`: the dead-letter subscription, by hand.

    imagen dlq list --subscription imagen-upscale-dead-letter
    imagen dlq replay --subscription imagen-upscale-dead-letter [--topic imagen-events]

`list` shows each message (what it asks for, or why it cannot be parsed; its attributes and
delivery attempts) and leaves it there. `replay` publishes each back to the topic of the
subscription it came from (or `--topic`) and then acks it from the dead-letter subscription.
"""

from __future__ import annotations

import json

import click


def _subscription_option(function):
    return click.option(
        "--subscription",
        required=True,
        help="The dead-letter subscription: name or projects/P/subscriptions/S.",
    )(function)


def _limit_option(function):
    function = click.option(
        "--wait",
        default=5.0,
        show_default=True,
        type=click.FloatRange(0.1),
        help="Seconds a pull waits for more messages before the subscription looks empty.",
    )(function)
    return click.option(
        "--limit", default=1000, show_default=True, type=click.IntRange(1), help="Messages at most."
    )(function)


def _echo(text: str) -> None:
    """`text` as it came, but for lone surrogates (a forged JSON escape in a message: no UTF-8
    exists for them), written as their escapes instead of failing the listing there."""
    click.echo(text.encode(errors="backslashreplace").decode())


@click.group("dlq")
def command() -> None:
    """Inspect and replay dead-lettered messages."""


@command.command("list")
@_subscription_option
@_limit_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@click.pass_obj
def list_(settings, subscription, limit, wait, as_json):
    """Show the messages in a dead-letter subscription; they stay there."""
    from handlers.clients import check_emulators, subscriber_client, subscription_path
    from handlers.dlq import list_dead_letters

    check_emulators(settings, "pubsub")
    path = subscription_path(settings, subscription)
    letters = list_dead_letters(subscriber_client(settings), path, limit=limit, wait_seconds=wait)
    if as_json:
        for letter in letters:
            line = json.dumps(letter.to_json(), ensure_ascii=False)
            try:
                line.encode()
            except UnicodeEncodeError:  # a lone surrogate: JSON escapes it
                line = json.dumps(letter.to_json())
            click.echo(line)
        if len(letters) >= limit:  # a copy of the subscription: say it may be cut
            click.echo(f"imagen: --limit {limit} reached: more may remain", err=True)
        return
    click.echo(f"{len(letters)} message(s) in {path} (left there)"
               + (f"; --limit {limit} reached: more may remain" if len(letters) >= limit else ""))
    for letter in letters:
        published = letter.publish_time.isoformat() if letter.publish_time else "?"
        attempts = letter.source_attempts if letter.source_attempts is not None else "?"
        origin = f" from {letter.source_subscription}" if letter.source_subscription else ""
        _echo(f"- {letter.message_id}  published {published}  attempts {attempts}{origin}")
        _echo(f"  {letter.describe()}")
        if letter.reason:
            _echo(f"  moved here by imagen (its worker or serve) at once: {letter.reason}")
        attributes = ", ".join(f"{k}={v}" for k, v in sorted(letter.replay_attributes.items()))
        _echo(f"  attributes: {attributes or '(none)'}")


@command.command("replay")
@_subscription_option
@_limit_option
@click.option("--topic", help="Publish here instead of the topic each message came from.")
@click.option("--message-id", "message_ids", multiple=True, help="Only these (repeatable).")
@click.option("--include-unparseable", is_flag=True,
              help="Replay messages this imagen cannot parse too (left by default: every reader of the topic would "
              "dead-letter them again); for workers of a newer imagen that can.")
@click.pass_obj
def replay_(settings, subscription, limit, wait, topic, message_ids, include_unparseable):
    """Publish dead letters back (publish first, then ack: at least once)."""
    from handlers.clients import check_emulators, publisher_client, subscriber_client, subscription_path, topic_path
    from handlers.cli.options import check_topic_exists
    from handlers.dlq import replay

    check_emulators(settings, "pubsub")
    path = subscription_path(settings, subscription)
    publisher = publisher_client(settings)
    topic = topic_path(settings, topic) if topic else None
    if topic:  # before any message is leased: each publish failed, one by one, on a typo
        check_topic_exists(publisher, topic, "--topic")
    report = replay(
        subscriber_client(settings),
        publisher,
        path,
        topic=topic,
        limit=limit,
        message_ids=frozenset(message_ids),
        wait_seconds=wait,
        unparseable=include_unparseable,
    )
    click.echo(f"replayed {len(report.replayed)} message(s) from {path}"
               + (f"; --limit {limit} reached: more may remain" if report.pulled >= limit else ""))
    for message_id, why in sorted(report.failed.items()):
        click.echo(f"not replayed {message_id}: {why}", err=True)
    if report.left:
        click.echo(f"left {report.left} unselected message(s) in place")
    if report.unparseable:
        click.echo(f"left {len(report.unparseable)} message(s) this imagen cannot parse in place: every reader of the "
                   f"topic would dead-letter them again (`imagen dlq list` shows why; --include-unparseable replays "
                   f"them for workers that can)", err=True)
    if report.returned:
        click.echo(f"{report.returned} replayed message(s) came back to {path}: the topic feeds it (nothing "
                   "else serves them yet); they are left there: drain it once they are done", err=True)
    if report.ack_error:
        click.echo(f"stopped: acknowledging {len(report.unacked)} replayed message(s) in {path} failed "
                   f"({report.ack_error}): they are published and still there, so another replay publishes them "
                   f"again (a worker skips a job whose output is written); what was not pulled yet is untouched",
                   err=True)
    missing = sorted(set(message_ids) - set(report.replayed) - set(report.failed) - set(report.unparseable))
    if missing:
        click.echo(f"not found in {path}: {', '.join(missing)}", err=True)
    if report.failed or missing or report.ack_error or set(message_ids) & set(report.unparseable):
        raise SystemExit(1)
