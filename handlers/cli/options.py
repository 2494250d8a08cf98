"""Helpers shared by the CLI subcommands."""

from __future__ import annotations

import json

import click


def param_options(values: tuple[str, ...]) -> dict:
    """`--param k=v` options -> a params dict. Values are JSON when they parse as JSON
    (`steps=20` -> 20, `mask_only=true` -> True), else plain strings (`prompt=a red fox`)."""
    params: dict = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        params[key.strip()] = value
    return params
