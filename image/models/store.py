"""The local model store: a Hugging Face cache under `cache_dir` (MODEL_CACHE_DIR).

Layout, as `huggingface_hub` writes it: `cache_dir/models--org--name/` holds `blobs/`
(content-addressed files), `snapshots/<commit>/<path in repo>` (links into `blobs/`) and
`refs/<branch>` (the commit a branch resolved to). `pull` is the only function here that
touches the network; finding a snapshot never does.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from huggingface_hub import snapshot_download
from tqdm.auto import tqdm

from image.errors import ModelError, ModelMissing
from image.models.lock import COMMIT, Lock
from image.models.registry import DIFFUSERS, ModelSpec

logger = logging.getLogger("imagen.models")

TINY_MARKER = "imagen-tiny.json"
"""Marks a snapshot built by `build_tiny`; it holds the tiny files' sizes in bytes."""



def pull_options(cache_dir: Path | None = None, lock: Lock | None = None) -> str:
    """` --cache-dir D --lock L` for a fix that must fill `cache_dir` (where given) at `lock`'s
    pins (where it is not the packaged lock), not MODEL_CACHE_DIR at the packaged ones."""
    where = f" --cache-dir {shlex.quote(str(cache_dir))}" if cache_dir is not None else ""
    return where + (lock.option() if lock is not None else "")


def pull_command(specs: Iterable[ModelSpec], cache_dir: Path | None = None, lock: Lock | None = None, *,
                 tiny: bool = False) -> str:
    """The command that fetches these models (`pull_options`), for error messages; `tiny`:
    the one that builds them again (tiny random-weight models are repaired that way, offline)."""
    operations = ",".join(spec.operation for spec in specs)
    return f"imagen models pull{' --tiny' if tiny else ''} --operations {operations}{pull_options(cache_dir, lock)}"


def repo_dir(spec: ModelSpec, cache_dir: Path) -> Path:
    return Path(cache_dir) / spec.cache_name


def is_tiny(snapshot: Path) -> bool:
    return (snapshot / TINY_MARKER).is_file()


def find_snapshot(spec: ModelSpec, cache_dir: Path, lock: Lock) -> tuple[str | None, Path | None]:
    """The commit to run (locked, else what the spec's revision resolved to) and its snapshot.

    Either may be None: no commit when nothing is locked or pulled, no snapshot when the
    commit is known but its files are not here. Local only.
    """
    commit = lock.revision(spec.repo_id)
    if commit is None and COMMIT.fullmatch(spec.revision):
        commit = spec.revision
    if commit is None:
        ref = repo_dir(spec, cache_dir) / "refs" / spec.revision
        commit = ref.read_text().strip() if ref.is_file() else None
    if commit is None or not COMMIT.fullmatch(commit):  # an empty or damaged ref names no snapshot
        return None, None
    snapshot = repo_dir(spec, cache_dir) / "snapshots" / commit
    return commit, (snapshot if snapshot.is_dir() else None)


def resolve_snapshot(spec: ModelSpec, cache_dir: Path, *, lock: Lock) -> Path:
    """The snapshot folder to load `spec` from; ModelMissing (naming the fix) if absent."""
    commit, snapshot = find_snapshot(spec, cache_dir, lock)
    if snapshot is None:
        raise ModelMissing(missing_message(spec, cache_dir, commit, lock))
    return snapshot


def missing_message(spec: ModelSpec, cache_dir: Path, commit: str | None, lock: Lock | None = None) -> str:
    at = f"@{commit}" if commit else ""
    return (
        f"{spec.operation}: model {spec.repo_id}{at} is not in the model cache {cache_dir} "
        f"(MODEL_CACHE_DIR); run `{pull_command([spec], cache_dir, lock)}`"
    )


def snapshot_files(snapshot: Path) -> dict[str, int]:
    """Every file in a snapshot (links followed) and its size in bytes; -1 for a broken link."""
    files = {}
    for path in sorted(snapshot.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(snapshot).as_posix()
        files[relative] = path.stat().st_size if path.exists() else -1
    return files


def select_files(spec: ModelSpec, available: Iterable[str]) -> list[str]:
    """The repo files to fetch: each spec pattern, or its first fallback the repo has."""
    available = list(available)

    def present(pattern: str) -> list[str]:
        return fnmatch.filter(available, pattern)

    chosen: list[str] = []
    for pattern in spec.files:
        for candidate in (pattern, *spec.fallbacks.get(pattern, ())):
            if present(candidate):
                if candidate != pattern:
                    logger.warning("%s has no %s; fetching %s instead", spec.repo_id, pattern, candidate)
                chosen += present(candidate)
                break
    return sorted(set(chosen))


def fetch(
    spec: ModelSpec, cache_dir: Path, *, lock: Lock, token: str | None = None, progress: bool = True,
    checksums: bool = False,
) -> tuple[str, dict[str, int]]:
    """Download `spec` at its locked commit (else its revision); return the commit and file sizes.
    A file already here that is damaged is fetched again (`checksums`: every file read whole)."""
    revision = lock.revision(spec.repo_id) or spec.revision
    patterns = sorted({*spec.files, *(f for alts in spec.fallbacks.values() for f in alts)})
    try:
        # A dry run resolves the commit and lists the files without fetching any.
        plan = snapshot_download(
            spec.repo_id, revision=revision, cache_dir=cache_dir, token=token,
            allow_patterns=patterns, dry_run=True,
        )
        if not plan:
            raise ModelError(f"{spec.repo_id}@{revision} holds none of the files imagen needs")
        commit = plan[0].commit_hash
        wanted = select_files(spec, (info.filename for info in plan))
        total = sum(info.file_size or 0 for info in plan if info.filename in wanted)
        logger.info(
            "pulling %s@%s: %d files, %.2f GB into %s",
            spec.repo_id, commit, len(wanted), total / 1e9, cache_dir,
        )
        _drop_tiny(spec, cache_dir, commit)
        # What the Hub says each file weighs: what a file already here must weigh, and what the
        # lock records (a file cut before this pull would otherwise be pinned cut).
        hub_sizes = {info.filename: info.file_size for info in plan if info.filename in wanted and info.file_size}
        _drop_damaged(spec, repo_dir(spec, cache_dir) / "snapshots" / commit, hub_sizes, "the Hub",
                      checksums=checksums)
        # And the snapshot verify looked at, where it is another commit (the branch moved on):
        # its damaged blobs would otherwise be linked into the new one.
        checked, snapshot = find_snapshot(spec, cache_dir, lock)
        if snapshot is not None and checked != commit and not is_tiny(snapshot):
            _drop_damaged(spec, snapshot, *expected_sizes(spec, snapshot, lock), checksums=checksums)
        folder = snapshot_download(
            spec.repo_id, revision=commit, cache_dir=cache_dir, token=token,
            allow_patterns=wanted, tqdm_class=None if progress else _QuietTqdm,
        )
    except ModelError:
        raise
    except Exception as error:  # noqa: BLE001 - the Hub's, OS ones, and its HTTP client's (not OSErrors)
        raise ModelError(_pull_failure(spec, revision, error)) from error
    if revision != commit:
        write_ref(spec, cache_dir, revision, commit)
    sizes = snapshot_files(Path(folder))
    return commit, {name: hub_sizes.get(name, sizes[name]) for name in wanted if name in sizes}


def pull(
    specs: Iterable[ModelSpec],
    cache_dir: Path,
    *,
    lock_path: Path,
    token: str | None = None,
    progress: bool = True,
    checksums: bool = False,
    lock_required: bool = False,
) -> dict[str, str]:
    """Download each model and record its commit and file sizes in the lock at `lock_path`
    (`checksums`: files already here are read whole, and fetched again where damaged).

    Returns repo id -> commit. The lock is written after each model, so an interrupted
    pull keeps what it finished; only when it changes, and a lock that cannot be written (the
    one packaged in an image, pulled into a volume by a read-only container) is left as it
    is with a warning: an unpinned model is then found by the cache's `refs/<branch>`. Not
    `lock_required` (a lock the user named): ModelError then.
    """
    commits = {}
    for spec in specs:
        commit, files = fetch(spec, cache_dir, lock=Lock.read(lock_path), token=token, progress=progress,
                              checksums=checksums)
        lock = Lock.read(lock_path)  # again: another pull may have recorded its model meanwhile
        updated = lock.recorded(spec.repo_id, commit, files)
        if updated != lock:
            try:
                updated.write(lock_path)
            except OSError as error:
                if lock_required:
                    raise ModelError(f"{spec.repo_id}@{commit} is pulled but the model lock {lock_path} could not "
                                     f"be written: {error}") from None
                logger.warning("%s@%s is pulled but not recorded in the model lock %s (%s); the loader finds "
                               "it through the cache's refs/%s", spec.repo_id, commit, lock_path, error, spec.revision)
        commits[spec.repo_id] = commit
    return commits


def _drop_tiny(spec: ModelSpec, cache_dir: Path, commit: str) -> None:
    """Remove a tiny model sitting at the commit about to be pulled.

    `pull --tiny` uses the locked commit; the Hub would take its files for cached ones
    and keep the random weights under the real model's name.
    """
    snapshot = repo_dir(spec, cache_dir) / "snapshots" / commit
    if is_tiny(snapshot):
        logger.warning("replacing the tiny %s in %s with the real one", spec.repo_id, cache_dir)
        shutil.rmtree(snapshot)


def write_ref(spec: ModelSpec, cache_dir: Path, revision: str, commit: str) -> None:
    """Point `refs/<revision>` at `commit` (branches and tags only, as huggingface_hub does)."""
    if COMMIT.fullmatch(revision):
        return
    ref = repo_dir(spec, cache_dir) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def add_snapshot(spec: ModelSpec, cache_dir: Path, commit: str, source: Path) -> Path:
    """Move the files under `source` into the cache as snapshot `commit`, the way the hub does.

    Each file becomes a blob named by its sha256 and a relative link from the snapshot,
    so tools that read or copy a real cache (scan, mirror) see the same shape. A blob already
    there is replaced (so a rebuild repairs a damaged one), readable by every user: a
    container copies the cache in as root and runs as another user.
    """
    repo = repo_dir(spec, cache_dir)
    snapshot = repo / "snapshots" / commit
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if snapshot.exists():
        shutil.rmtree(snapshot)
    for path in sorted(source.rglob("*")):
        if path.is_dir():
            continue
        with path.open("rb") as handle:
            blob = blobs / hashlib.file_digest(handle, "sha256").hexdigest()
        os.chmod(path, 0o644)  # safetensors writes 0600
        os.replace(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    write_ref(spec, cache_dir, spec.revision, commit)
    return snapshot


def _pull_failure(spec: ModelSpec, revision: str, error: BaseException) -> str:
    """One line: the root cause (the Hub wraps it in generic errors), and a hint for auth."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 5:
        chain.append(chain[-1].__cause__)
    root = chain[-1]
    text = str(root).strip()
    reason = f"{type(root).__name__}: {text.splitlines()[0]}" if text else type(root).__name__
    everything = " ".join(str(e) for e in chain) + " ".join(type(e).__name__ for e in chain)
    hint = ""
    if any(mark in everything for mark in ("401", "403", "Gated", "gated")):
        hint = f"; accept its licence at https://huggingface.co/{spec.repo_id} and set HF_TOKEN"
    return f"pulling {spec.repo_id}@{revision} failed: {reason}{hint}"


class _QuietTqdm(tqdm):
    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def expected_sizes(spec: ModelSpec, snapshot: Path, lock: Lock) -> tuple[Mapping[str, int], str]:
    """The sizes in bytes the snapshot's files must have, and who says so.

    A tiny model's own marker, else the lock when it pins this very commit; nothing for
    an unlocked download (the Hub checked each file as it arrived).
    """
    if is_tiny(snapshot):
        try:
            files = json.loads((snapshot / TINY_MARKER).read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):  # cut short, or not the object it was
            files = None
        if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
            raise DamagedMarker(f"{TINY_MARKER} is damaged (not the JSON object build_tiny writes)")
        return files, TINY_MARKER
    if lock.revision(spec.repo_id) == snapshot.name:
        return lock.files(spec.repo_id), "the lock"
    return {}, "the lock"


class DamagedMarker(ValueError):
    """A tiny snapshot's marker that cannot be read: the snapshot is rebuilt, not trusted."""


def verify(specs: Iterable[ModelSpec], cache_dir: Path, lock: Lock, *, checksums: bool = False) -> list[str]:
    """Every problem that would stop a model from loading; an empty list means complete.
    `checksums`: also read every file whole against its blob's name (`checksum_problem`)."""
    return [problem for spec in specs for problem in spec_problems(spec, cache_dir, lock, checksums=checksums)]


def spec_problems(spec: ModelSpec, cache_dir: Path, lock: Lock, *, checksums: bool = False,
                  formats: bool = True) -> list[str]:
    """`verify` for one model; each problem starts with "<operation>: <repo>@<commit>: ".
    `formats=False` (a start-up's check, on the cold start's path): a file of the size recorded
    is not read (a damaged one then fails its load, whose error names `imagen models verify`)."""
    commit, snapshot = find_snapshot(spec, cache_dir, lock)
    if snapshot is None:
        return [missing_message(spec, cache_dir, commit, lock)]
    files = snapshot_files(snapshot)
    problems = _layout_problems(spec, snapshot, files)
    try:
        expected, source = expected_sizes(spec, snapshot, lock)
    except DamagedMarker as error:
        problems.append(str(error))
        expected, source = {}, TINY_MARKER
    problems += [f"{name} {why}" for name, why in
                 _file_problems(snapshot, files, expected, source, checksums=checksums, formats=formats).items()]
    problems += [f"{name} is missing" for name in expected if name not in files]
    prefix = f"{spec.operation}: {spec.repo_id}@{commit}: "
    return [prefix + problem for problem in dict.fromkeys(problems)]


_UNREADABLE = "cannot be read by this user"


def _file_problems(snapshot: Path, files: Mapping[str, int], expected: Mapping[str, int],
                   source: str, *, checksums: bool = False, formats: bool = True) -> dict[str, str]:
    """Each file of `snapshot` that would stop it loading, and why: its size against
    `expected` (by `source`), then what its own format says (a file of the right size can
    still be damaged: zeros left by a crash, a bad copy; `formats=False`: only a file of no
    recorded size), then, `checksums`, its content."""
    problems = {}
    for name, size in files.items():
        if size < 0:
            problems[name] = "is a broken link (its blob is gone)"
        elif size == 0:
            problems[name] = "is empty"
        elif not os.access(snapshot / name, os.R_OK):
            problems[name] = f"{_UNREADABLE} (uid {os.getuid()})"
        elif name in expected and size != expected[name]:
            problems[name] = f"is {size} bytes, {source} says {expected[name]}"
        elif not formats and name in expected:
            continue
        elif problem := content_problem(snapshot / name, size) or (checksums and checksum_problem(snapshot / name)):
            problems[name] = problem
    return problems


def checksum_problem(path: Path) -> str | None:
    """Whether a file's content is what its blob's name says: the Hub names a large (LFS) file's
    blob by its sha256 and a small one's by its git blob sha1 (imagen's tiny models: sha256);
    None for a blob named otherwise (nothing to check it by). Reads the whole file."""
    name = path.resolve().name
    if not _BLOB_DIGEST.fullmatch(name):
        return None
    try:
        with path.open("rb") as handle:
            if len(name) == 64:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            else:
                git = hashlib.sha1(f"blob {os.fstat(handle.fileno()).st_size}\0".encode(), usedforsecurity=False)
                digest = hashlib.file_digest(handle, lambda: git).hexdigest()
    except OSError as error:
        return f"cannot be read ({error})"
    return None if digest == name else "is damaged: its content does not match its checksum (the blob's name)"


_BLOB_DIGEST = re.compile("[0-9a-f]{64}|[0-9a-f]{40}")  # sha256, git's sha1


def _drop_damaged(spec: ModelSpec, snapshot: Path, expected: Mapping[str, int], source: str, *,
                  checksums: bool = False) -> None:
    """Remove the files of `snapshot` that verify would find damaged (cut, empty, a broken
    link, a header or JSON that does not parse; `expected` sizes by `source`; `checksums`:
    content unlike its blob's name), with their blobs: the Hub keeps a file whose link exists,
    and links a file to a blob it has, whatever their content, so pulling again repaired
    nothing and verify kept naming the pull as the fix."""
    if not snapshot.is_dir():
        return
    for name, why in _file_problems(snapshot, snapshot_files(snapshot), expected, source,
                                    checksums=checksums).items():
        if why.startswith(_UNREADABLE):
            continue  # whole, only not ours to read: the Hub would not fix that either
        logger.warning("%s: %s %s: fetching it again", spec.repo_id, name, why)
        path = snapshot / name
        blob = path.resolve() if path.is_symlink() else None
        path.unlink(missing_ok=True)
        if blob is not None and blob.parent.name == "blobs":
            blob.unlink(missing_ok=True)


def content_problem(path: Path, size: int) -> str | None:
    """What a file's own format says is wrong with it (a copy cut short where no lock pins its
    size: a mirror's restore, a volume's copy; a whole-size file of zeros): safetensors
    by their header, JSON and Python (the remote code) by parsing, a PyTorch zip checkpoint
    (.bin) by its central directory, which a cut copy loses. Other files: None."""
    suffix = path.suffix
    if suffix == ".safetensors":
        return safetensors_problem(path, size)
    try:
        if suffix == ".json":
            json.loads(path.read_bytes())
        elif suffix == ".py":
            with warnings.catch_warnings():  # its invalid escapes are the loader's to warn of, once
                warnings.simplefilter("ignore")
                compile(path.read_bytes(), str(path), "exec")
        elif suffix == ".bin":
            with path.open("rb") as handle:
                zipped = handle.read(4) == b"PK\x03\x04"  # else a legacy pickle: nothing to check it by
            if zipped and not zipfile.is_zipfile(path):
                return "is cut short or damaged (its zip directory is missing)"
    except (OSError, ValueError, SyntaxError, RecursionError, MemoryError) as error:
        return f"cannot be parsed ({type(error).__name__}): cut short or damaged"
    return None


def safetensors_problem(path: Path, size: int) -> str | None:
    """What is wrong with a safetensors file by its own header (an 8-byte length, a JSON
    table of tensors and their byte ranges), or None: a truncated download is caught where
    no lock pins the file's size."""
    unreadable = "is not a safetensors file (its header is cut or unreadable)"
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length > min(size - 8, _MAX_HEADER_BYTES):
                return unreadable
            header = json.loads(handle.read(length))
        expected = 8 + length + max((int(entry["data_offsets"][1]) for key, entry in header.items()
                                     if key != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return unreadable
    return None if expected == size else f"is {size} bytes, its header says {expected} (cut short or damaged)"


_MAX_HEADER_BYTES = 100_000_000  # what safetensors itself reads at most


def _layout_problems(spec: ModelSpec, snapshot: Path, files: Mapping[str, int]) -> list[str]:
    missing = [
        f"{name} is missing" for name in spec.files
        if not any(fnmatch.filter(files, pattern) for pattern in (name, *spec.fallbacks.get(name, ())))
    ]
    if spec.loader != DIFFUSERS:
        return missing
    try:
        index = json.loads((snapshot / "model_index.json").read_text())
    except FileNotFoundError:
        return ["model_index.json is missing"]
    except (OSError, ValueError):
        return ["model_index.json is unreadable"]
    problems = missing
    for name, entry in index.items():
        if name.startswith("_") or name in spec.disabled or not isinstance(entry, list):
            continue
        if len(entry) != 2 or None in entry:
            continue  # a component this pipeline does without, e.g. the refiner's text_encoder
        needed = _component_files(entry[1])
        for group in needed:
            if not any(fnmatch.filter(files, f"{name}/{pattern}") for pattern in group):
                problems.append(f"component {name} has no {' or '.join(group)}")
    return problems


def _component_files(class_name: str) -> list[tuple[str, ...]]:
    """What a component's folder must hold, as alternatives per requirement."""
    if "Scheduler" in class_name:
        return [("scheduler_config.json",)]
    if "Tokenizer" in class_name:
        return [("tokenizer.json", "vocab.json"), ("tokenizer.json", "merges.txt")]
    return [("config.json",), ("*.safetensors", "*.bin")]


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """One line of `imagen models list`; `bytes` is the snapshot's size on disk."""

    operation: str
    repo_id: str
    revision: str | None
    bytes: int
    complete: bool
    tiny: bool


def list_models(specs: Iterable[ModelSpec], cache_dir: Path, lock: Lock) -> list[ModelRow]:
    rows = []
    for spec in specs:
        commit, snapshot = find_snapshot(spec, cache_dir, lock)
        complete = not spec_problems(spec, cache_dir, lock)
        size = sum(max(s, 0) for s in snapshot_files(snapshot).values()) if snapshot else 0
        tiny = snapshot is not None and is_tiny(snapshot)
        rows.append(ModelRow(spec.operation, spec.repo_id, commit, size, complete, tiny))
    return rows
