"""`imagen models pull | list | verify | mirror | compile`: the model cache (MODEL_CACHE_DIR)
and the compile cache (IMAGEN_COMPILE_CACHE) by hand.

Each subcommand works on the operations this process serves (IMAGEN_OPERATIONS, default
all) unless `--operations` names others, and on the cache dir from MODEL_CACHE_DIR unless
`--cache-dir` says otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from handlers.cli.options import check_bucket_exists, expand_home
from handlers.settings import DEVICES, split_list
from image.models.lock import Lock, packaged_lock_path
from image.models.registry import specs_for


def _operations_option(function):
    return click.option(
        "--operations",
        metavar="OP[,OP...]",
        help="Comma-separated operations; default: IMAGEN_OPERATIONS (all four).",
    )(function)


def _cache_dir_option(function):
    return click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        callback=expand_home,
        help="Model cache; default: MODEL_CACHE_DIR.",
    )(function)


def _lock_option(function):
    return click.option(
        "--lock",
        "lock_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        callback=expand_home,
        help="Lock file; default: the image/models.lock.json shipped with imagen.",
    )(function)


def _lock(lock_path: Path | None, *, created: bool = False) -> Lock:
    """The lock named by --lock (it must exist: a mistyped path read as an empty lock passed
    every check; `created`: a pull may start it, in a folder that exists), else the packaged."""
    if lock_path is None:
        return Lock.packaged()
    if not lock_path.exists() and not (created and lock_path.parent.is_dir()):
        raise click.BadParameter(f"{lock_path} does not exist", param_hint="--lock")
    return Lock.read(lock_path)


def _specs(settings, operations: str | None):
    return specs_for(split_list(operations) if operations else settings.operations)


def _checksums_option(function):
    return click.option(
        "--checksums", is_flag=True,
        help="Also read every file whole against its checksum (the blob's name): damage of any kind, "
        "at the cost of reading the whole cache.",
    )(function)


@click.group("models")
def command() -> None:
    """Pull, list, verify and mirror the models imagen runs."""


@command.command("pull")
@_operations_option
@_cache_dir_option
@_lock_option
@click.option("--tiny", is_flag=True, help="Build small random-weight models instead (offline).")
@click.option("--from", "source", metavar="gs://BUCKET/PREFIX", help="Restore from a mirror made by `models mirror`.")
@click.option("--token", help="Hugging Face token for gated models [default: HF_TOKEN].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_checksums_option
@click.pass_obj
def pull(settings, operations, cache_dir, lock_path, tiny, source, token, quiet, checksums):
    """Fetch models into the cache and pin their commits in the lock."""
    from image.models import store

    specs = _specs(settings, operations)
    given_dir, cache_dir = cache_dir, cache_dir or settings.model_cache_dir
    if tiny and source:
        raise click.UsageError("--tiny and --from exclude each other")
    given_lock = lock_path
    _lock(lock_path, created=not (tiny or source))
    lock_path = lock_path or packaged_lock_path()
    token = token or settings.hf_token
    if tiny:
        from image.models.tiny import build_tiny

        commits = build_tiny(specs, cache_dir, lock=Lock.read(lock_path))
        for repo, commit in commits.items():
            click.echo(f"built tiny {repo}@{commit} in {cache_dir}")
    elif source:
        from handlers.clients import check_emulators, storage_client
        from handlers.model_mirror import restore_cache

        check_emulators(settings, "storage")
        done = restore_cache(
            source, cache_dir, client=storage_client(settings), cache_names=[s.cache_name for s in specs]
        )
        click.echo(f"restored {done.files} files ({done.bytes / 1e9:.2f} GB, {done.skipped} already here) to {cache_dir}")
    else:
        commits = store.pull(specs, cache_dir, lock_path=lock_path, token=token, progress=not quiet,
                             checksums=checksums, lock_required=given_lock is not None)
        for repo, commit in commits.items():
            click.echo(f"pulled {repo}@{commit} into {cache_dir}")
        click.echo(f"lock: {lock_path}")
    lock = Lock.read(lock_path)
    _report_problems(store.verify(specs, cache_dir, lock, checksums=checksums), specs, cache_dir, given_dir, lock,
                     checksums=checksums)


@command.command("list")
@_operations_option
@_cache_dir_option
@_lock_option
@click.pass_obj
def list_(settings, operations, cache_dir, lock_path):
    """Show each model's revision, size on disk and state."""
    from image.models.store import list_models

    cache_dir = cache_dir or settings.model_cache_dir
    rows = list_models(_specs(settings, operations), cache_dir, _lock(lock_path))
    click.echo(f"model cache: {cache_dir}")
    table = [("OPERATION", "REPOSITORY", "REVISION", "SIZE", "STATUS")]
    for row in rows:
        status = "complete" if row.complete else ("missing" if row.revision is None or not row.bytes else "incomplete")
        table.append((
            row.operation,
            row.repo_id,
            (row.revision or "-")[:12],
            _size(row.bytes) if row.bytes else "-",
            status + (" (tiny)" if row.tiny else ""),
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _tiny(specs, cache_dir, lock) -> list[str]:
    """The operations of `specs` whose model in `cache_dir` is a tiny random-weight one."""
    from image.models import store

    return [spec.operation for spec in specs
            if (snapshot := store.find_snapshot(spec, cache_dir, lock)[1]) is not None and store.is_tiny(snapshot)]


@command.command("verify")
@_operations_option
@_cache_dir_option
@_lock_option
@_checksums_option
@click.pass_obj
def verify(settings, operations, cache_dir, lock_path, checksums):
    """Check every model is complete; exit 1 naming the fix."""
    from image.models.store import verify as verify_models

    specs = _specs(settings, operations)
    given, cache_dir = cache_dir, cache_dir or settings.model_cache_dir
    lock = _lock(lock_path)
    _report_problems(verify_models(specs, cache_dir, lock, checksums=checksums), specs, cache_dir, given, lock,
                     checksums=checksums)
    tiny = _tiny(specs, cache_dir, lock)
    click.echo(f"{len(specs)} model(s) complete in {cache_dir}"
               + (f"; tiny random-weight (noise, for trying the plumbing): {', '.join(tiny)}" if tiny else ""))


@command.command("mirror")
@click.argument("destination", metavar="gs://BUCKET/PREFIX")
@_operations_option
@_cache_dir_option
@click.option("--tiny", "allow_tiny", is_flag=True,
              help="Mirror tiny random-weight models too (a smoke test of a deployment's plumbing).")
@click.pass_obj
def mirror(settings, destination, operations, cache_dir, allow_tiny):
    """Copy the model cache to gs://BUCKET/PREFIX (see pull --from)."""
    from handlers.clients import check_emulators, storage_client
    from handlers.model_mirror import mirror_cache, parse_mirror_uri
    from image.errors import ModelError
    from image.models import store

    try:
        bucket, _ = parse_mirror_uri(destination)
    except ModelError as error:
        raise click.BadParameter(str(error), param_hint="gs://BUCKET/PREFIX") from None
    specs = _specs(settings, operations)
    given_dir, cache_dir = cache_dir, cache_dir or settings.model_cache_dir
    # A mirror is restored as it is, by every instance: never one of an incomplete cache, nor
    # (unless asked) one of random weights, whose every output would be noise.
    _report_problems(store.verify(specs, cache_dir, Lock.packaged()), specs, cache_dir, given_dir)
    if (tiny := _tiny(specs, cache_dir, Lock.packaged())) and not allow_tiny:
        raise click.UsageError(f"{cache_dir} holds tiny random-weight models ({', '.join(tiny)}): every instance "
                               f"restoring the mirror would serve noise. Pull the real ones (imagen models pull), "
                               f"or pass --tiny for a smoke test")
    check_emulators(settings, "storage")
    client = storage_client(settings)
    check_bucket_exists(client, bucket, "gs://BUCKET/PREFIX")  # a raw 404 from the first listing otherwise
    done = mirror_cache(
        cache_dir, destination, client=client, cache_names=[s.cache_name for s in specs],
        commits={s.cache_name: store.find_snapshot(s, cache_dir, Lock.packaged())[0] for s in specs},
    )
    click.echo(f"mirrored {done.files} files ({done.bytes / 1e9:.2f} GB, {done.skipped} already there) to {destination}")


@command.command("compile")
@_operations_option
@_cache_dir_option
@click.option("--to", "location", metavar="gs://BUCKET/PREFIX|DIR",
              help="Compile cache to fill; default: IMAGEN_COMPILE_CACHE.")
@click.option("--device", type=click.Choice(DEVICES), help="[env IMAGEN_DEVICE]")
@click.pass_obj
def compile_(settings, operations, cache_dir, location, device):
    """Compile the models here and store the artefacts the instances load.

    Run it on the kind of GPU the service runs on, from the service's image (the artefacts
    are per GPU model, PyTorch version and model revision): then no instance generates kernels.
    Without it the first instance after each release does the same, in the background.
    Compiles what the switches compile (on CUDA: comic, enhance and upscale; IMAGEN_TUNING=compile=on
    for the others). Exits 1 when an operation ends with no artefact stored.
    """
    from handlers.logs import configure_logging
    from handlers.service import build_engine, restore_models

    configure_logging()
    settings = settings.replace(compile_cache=location)  # --device, --cache-dir: in it already
    if not settings.compile_cache:
        raise click.UsageError("where to? give --to gs://BUCKET/PREFIX (or a folder) or set IMAGEN_COMPILE_CACHE")
    names = [spec.operation for spec in _specs(settings, operations)]
    restore_models(settings, names)  # an image built without models, with IMAGEN_MODEL_MIRROR
    engine = build_engine(settings, names)
    engine.setup()
    artefacts = engine.compiled_artefacts()
    for name in names:
        if name not in artefacts:
            click.echo(f"{name}: not compiled (compile is off for it here; IMAGEN_TUNING=compile=on turns it on)",
                       err=True)
    engine.wait_background()  # on CUDA the compile runs after ready, as in the service
    missing = []
    for name, artefact in artefacts.items():
        if not engine.compile_cache.has(artefact):
            missing.append(name)
            click.echo(f"{name}: no artefact stored; the log above says why", err=True)
        else:
            click.echo(f"{name}: {engine.compile_cache}{'' if str(engine.compile_cache).endswith('/') else '/'}{artefact}")
    if missing or not artefacts:
        sys.exit(1)


def _report_problems(problems: list[str], specs, cache_dir: Path, given_dir: Path | None, lock: Lock | None = None,
                     *, checksums: bool = False) -> None:
    """Print each problem and the command that fixes them, then exit 1; nothing if none.
    `given_dir`: the --cache-dir given, and `lock` the lock in use, which the fix must name too
    (`pull_options`); `checksums`: found reading files whole, which the pull must do too."""
    if not problems:
        return
    from image.models.store import find_snapshot, is_tiny, pull_command

    for problem in problems:
        click.echo(problem, err=True)
    broken = [spec for spec in specs if any(p.startswith(f"{spec.operation}: ") for p in problems)] or list(specs)
    # Tiny random-weight models are rebuilt (a real model is never replaced by one); where
    # nothing is there yet, either.
    snapshots = [find_snapshot(spec, cache_dir, lock or Lock.packaged())[1] for spec in broken]
    real = pull_command(broken, given_dir, lock) + (" --checksums" if checksums else "")
    tiny = pull_command(broken, given_dir, lock, tiny=True)
    if all(snapshot is None for snapshot in snapshots):
        fix = f"`{real}` (or `{tiny}` for test models)"
    elif all(snapshot is None or is_tiny(snapshot) for snapshot in snapshots):
        fix = f"`{tiny}` (the tiny random-weight models, built again)"
    else:
        fix = f"`{real}`"
    click.echo(f"fix: run {fix}", err=True)
    sys.exit(1)


def _size(count: int) -> str:
    """Bytes in B, KB, MB or GB (powers of 1000, as the Hub shows sizes)."""
    value = float(count)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
