"""`imagen`: the command line. One module per subcommand group.

Settings are read from the environment once, here, and handed to each subcommand through
click's context (`ctx.obj`); each subcommand's options override them.
"""

from __future__ import annotations

import sys

import click

from handlers.errors import ConfigError
from handlers.settings import Settings
from image.errors import ImagenError


_SERVICES = ("serve", "worker", "dev")


class _Group(click.Group):
    """Turns imagen's own errors, a Google Cloud API's refusal (no such topic, subscription or
    bucket; no permission) and the file system's (no space, no permission), into one readable
    line and exit code 1, not a traceback."""

    def invoke(self, ctx):
        from google.api_core.exceptions import GoogleAPICallError

        try:
            return super().invoke(ctx)
        except ImagenError as error:
            click.echo(f"imagen: {type(error).__name__}: {error}", err=True)
            sys.exit(2 if isinstance(error, ConfigError) else 1)
        except GoogleAPICallError as error:
            click.echo(f"imagen: {type(error).__name__}: {error.message or error}", err=True)
            sys.exit(1)
        except OSError as error:  # a disk full, a folder it may not write: the system's own words
            if error.errno is None or ctx.invoked_subcommand in _SERVICES:
                raise  # a service's crash keeps its traceback
            click.echo(f"imagen: {error}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="imagen")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Run Hugging Face image models on Google Cloud Storage events."""
    ctx.obj = Settings.from_env()


def _register() -> None:
    from handlers.cli import backfill, dev, dlq, models, process, run, serve, submit, worker

    for module in (backfill, dev, dlq, models, process, run, serve, submit, worker):
        main.add_command(module.command)


_register()
