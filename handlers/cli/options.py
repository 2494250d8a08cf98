"""Helpers shared by the CLI subcommands."""

from __future__ import annotations

import click


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
        params[key.strip()] = raw
    return params
