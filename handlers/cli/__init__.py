"""`imagen`: the command line. One module per subcommand group.

Settings are read from the environment once, here, and handed to each subcommand through
click's context (`ctx.obj`); each subcommand's options override them. They are checked only
once the command's options are parsed (`_checked`): an option replaces a variable it
overrides, a bad value in it included, and `--help` never depends on the environment.
"""

from __future__ import annotations

import functools
import sys

import click

from handlers.errors import ConfigError
from handlers.settings import Settings, split_list
from image.errors import ImagenError


_SERVICES = ("serve", "worker", "dev")
_LOGGED = ("serve", "worker")
"""Their output is Cloud Logging's: why they stop is a JSON line (CRITICAL) like the rest."""


class _Group(click.Group):
    """Turns imagen's own errors, a Google Cloud API's refusal (no such topic, subscription or
    bucket; no permission) and the file system's (no space, no permission), into one readable
    line and exit code 1, not a traceback. For `serve` and `worker` the line is a JSON log
    entry, and any other error is one too, its traceback inside."""

    def invoke(self, ctx):
        from google.api_core.exceptions import GoogleAPICallError, GoogleAPIError
        from google.auth.exceptions import GoogleAuthError

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except ImagenError as error:
            _stop(ctx, f"{type(error).__name__}: {error}", error, 2 if isinstance(error, ConfigError) else 1)
        except GoogleAPICallError as error:
            _stop(ctx, f"{type(error).__name__}: {error.message or error}", error, 1)
        except (GoogleAPIError, GoogleAuthError) as error:
            if ctx.invoked_subcommand in _LOGGED:  # a service's: its trace in the log line
                _stop(ctx, str(error), error, 1, trace=True)
            if isinstance(error, GoogleAuthError):
                first = str(error).splitlines()[0] if str(error) else ""
                _stop(ctx, f"{type(error).__name__}: {first}; on your machine, sign in with `gcloud auth "
                           f"application-default login` (or, for the local stack, paste the exports `imagen dev` "
                           f"prints); on Google Cloud, check the service account it runs as", error, 1)
            # Retries that ran out (RetryError): a service that never answered.
            _stop(ctx, f"{type(error).__name__}: {error}{_unreachable_hint(ctx.obj)}", error, 1)
        except Exception as error:
            if ctx.invoked_subcommand in _LOGGED:  # any other reason serve or worker stops
                _stop(ctx, str(error), error, 1, trace=True)
            # A disk full, a folder it may not write: the system's own words; elsewhere, and for
            # `imagen dev`, a crash keeps its traceback.
            if not isinstance(error, OSError) or error.errno is None or ctx.invoked_subcommand in _SERVICES:
                raise
            _stop(ctx, str(error), error, 1)


def _unreachable_hint(settings) -> str:
    """Where the settings name an emulator: say which, the likeliest cause."""
    named = (("STORAGE_EMULATOR_HOST", getattr(settings, "storage_emulator_host", None)),
             ("PUBSUB_EMULATOR_HOST", getattr(settings, "pubsub_emulator_host", None)))
    hosts = [f"{name}={value}" for name, value in named if value]
    return f" (is the emulator running? {', '.join(hosts)})" if hosts else ""


def _stop(ctx, text: str, error: Exception, code: int, *, trace: bool = False):
    if ctx.invoked_subcommand in _LOGGED:
        from handlers.logs import fatal

        fatal(error, trace=trace)
    else:
        click.echo(f"imagen: {text}", err=True)
    sys.exit(code)


@click.group(cls=_Group)
@click.version_option(package_name="imagen")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Run Hugging Face image models on Google Cloud Storage events."""
    ctx.obj = Settings.from_env(validate=False)


# A command's option -> the setting it overrides.
_OVERRIDES = {"device": "device", "port": "port", "operations": "operations",
              "model_cache_dir": "model_cache_dir", "cache_dir": "model_cache_dir"}


def _checked(command: click.Command) -> None:
    """Check the settings before `command` runs, with its options in place of the variables
    they override: the command's `settings` hold them (its other options it applies itself)."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _checked(sub)
        return
    callback = command.callback

    @functools.wraps(callback)
    def run(*args, **kwargs):
        ctx = click.get_current_context()
        overrides = {field: ctx.params[option] for option, field in _OVERRIDES.items()
                     if ctx.params.get(option) is not None}
        if "operations" in overrides:  # "a,b" as IMAGEN_OPERATIONS reads it
            overrides["operations"] = split_list(overrides["operations"])
        ctx.obj = ctx.obj.replace(**overrides)
        return callback(*args, **kwargs)

    command.callback = run


def _register() -> None:
    from handlers.cli import backfill, dev, dlq, models, process, run, serve, submit, worker

    for module in (backfill, dev, dlq, models, process, run, serve, submit, worker):
        _checked(module.command)
        main.add_command(module.command)


_register()
