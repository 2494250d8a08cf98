"""The model lock: which commit of each repository imagen runs, and its files' sizes.

`image/models.lock.json` is committed with the code. It maps a repo id to
`{"revision": "<40-hex commit>", "files": {"<path in repo>": <size in bytes>}}`. It starts
empty; the first real `imagen models pull` fills it and later pulls fetch exactly that
commit and those files, so every image built from one checkout carries the same weights
(and, for remote code, the same code).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from image.errors import ModelError
from image.files import write_atomically

COMMIT = re.compile(r"[0-9a-f]{40}")
"""A commit as the lock, the cache's refs and its snapshot folders name it."""


def _commit(value: object) -> str:
    """A revision as the lock holds it: a 40-hex commit (a path in the cache is built from it)."""
    if not isinstance(value, str) or not COMMIT.fullmatch(value):
        raise ValueError(value)
    return value


def packaged_lock_path() -> Path:
    """The lock file that ships with the code (`image/models.lock.json`)."""
    return Path(str(resources.files("image").joinpath("models.lock.json")))


@dataclasses.dataclass(frozen=True)
class LockEntry:
    revision: str
    files: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class Lock:
    """An immutable view of a lock file; `recorded()` returns an updated copy."""

    entries: Mapping[str, LockEntry] = dataclasses.field(default_factory=dict)
    #: The file it was read from (None: made in memory), for the fix a message names.
    path: Path | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def read(cls, path: Path) -> Lock:
        """The lock at `path`; a missing file is an empty lock."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return cls(path=Path(path))
        except (OSError, ValueError) as error:
            raise ModelError(f"model lock {path} is unreadable: {error}") from None
        try:
            entries = {
                repo: LockEntry(_commit(entry["revision"]), {str(k): int(v) for k, v in entry["files"].items()})
                for repo, entry in data.items()
            }
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ModelError(
                f"model lock {path} is malformed: expected "
                '{"org/repo": {"revision": "<commit>", "files": {"path": bytes}}}'
            ) from None
        return cls(entries, Path(path))

    @classmethod
    def packaged(cls) -> Lock:
        return cls.read(packaged_lock_path())

    def revision(self, repo_id: str) -> str | None:
        entry = self.entries.get(repo_id)
        return entry.revision if entry else None

    def files(self, repo_id: str) -> Mapping[str, int]:
        entry = self.entries.get(repo_id)
        return entry.files if entry else {}

    def recorded(self, repo_id: str, revision: str, files: Mapping[str, int]) -> Lock:
        return Lock({**self.entries, repo_id: LockEntry(revision, dict(files))}, self.path)

    def option(self) -> str:
        """` --lock <path>` for a command that must use this lock: "" for the packaged one."""
        if self.path is None or self.path == packaged_lock_path():
            return ""
        return f" --lock {shlex.quote(str(self.path))}"

    def to_json(self) -> str:
        data = {
            repo: {"revision": entry.revision, "files": dict(sorted(entry.files.items()))}
            for repo, entry in sorted(self.entries.items())
        }
        return json.dumps(data, indent=2) + "\n"

    def write(self, path: Path) -> None:
        """Replace the file at `path` atomically, so a failed pull never leaves half a lock."""
        write_atomically(Path(path), self.to_json().encode())
