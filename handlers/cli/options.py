"""Helpers shared by the CLI subcommands."""

from __future__ import annotations

import click


def bucket_name(ctx, param, value: str | None) -> str | None:
    """A click callback: `value` if it is a bucket name (else a usage error saying why)."""
    from handlers.errors import ConfigError
    from handlers.settings import check_bucket_name

    if value is not None:
        try:
            check_bucket_name(param.opts[0], value)
        except ConfigError as error:
            raise click.BadParameter(str(error).removeprefix(f"{param.opts[0]}: ")) from None
    return value


def expand_home(ctx, param, value):
    """A path option's `~` expanded, as in MODEL_CACHE_DIR (`--cache-dir=~/models` reaches us
    unexpanded)."""
    return value.expanduser() if value is not None else None


def param_options(values: tuple[str, ...]) -> dict:
    """`--param k=v` options -> a params dict of the values as written: the parameters'
    checks read text as what each takes (`steps=20` -> 20, `mask_only=true` -> True), so a
    text parameter keeps what looks like a number (`prompt=1984`: read as JSON, it became an
    int and was refused)."""
    params: dict = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        if key.strip() in params:  # steps=3 and steps=4: which one was meant?
            raise click.BadParameter(f"{key.strip()!r} is given twice", param_hint="--param")
        params[key.strip()] = raw
    return params


def check_bucket_exists(client, bucket: str, param_hint: str) -> None:
    """A usage error where `bucket` does not exist, before any work (a listing, an upload);
    an account that may list or write objects but not read the bucket's own settings goes on."""
    from google.api_core.exceptions import Forbidden

    try:
        exists = client.bucket(bucket).exists()
    except Forbidden:
        return
    if not exists:
        raise click.BadParameter(f"bucket {bucket} does not exist (or this account cannot see it)",
                                 param_hint=param_hint)


def check_topic_exists(publisher, topic: str, param_hint: str) -> None:
    """A usage error where `topic` (a full path) does not exist, before any work; an account
    that may publish but not read the topic's settings goes on (its publish tells)."""
    from google.api_core.exceptions import NotFound, PermissionDenied

    try:
        publisher.get_topic(request={"topic": topic})
    except NotFound:
        raise click.BadParameter(f"{topic} does not exist", param_hint=param_hint) from None
    except PermissionDenied:
        pass
