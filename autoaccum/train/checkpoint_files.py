"""The checkpoint folder on disk: its file names, the ``latest`` pointer, atomic writes, and
which files belong to which run.

A run writes ``step-NNNNNNNN.pt`` files and a ``latest`` pointer, a small JSON file naming
the newest of them and the run's id; every checkpoint holds the run's id too. Files are
written atomically: to a temporary ``.NAME.tmp-RUNID-PID``, flushed to disk, then renamed;
a failed write removes its temporary, and ``latest`` is renamed into place only after its
checkpoint. ``latest`` also records the SHA-256 of every checkpoint the run keeps, so that a
file damaged on disk afterwards (a flipped bit, a truncation, a copy cut short) is found
before it is loaded (:func:`verify`), not trained on. A :class:`Folder` deletes only what its
run wrote (``keep``), or, when a new run was explicitly allowed to replace the folder's
checkpoints (``overwrite=True``), the files of exactly autoaccum's naming that were there.
``latest`` may name only a checkpoint of its own folder: a path elsewhere (``../x``, an
absolute path, a symbolic link leading out) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from autoaccum.errors import ConfigError

__all__ = [
    "LATEST",
    "NAME",
    "Folder",
    "Pointer",
    "read_pointer",
    "run_of",
    "step_files",
    "verify",
]

NAME = re.compile(r"^step-(\d{8,})\.pt$")  #: a checkpoint's file name
LATEST = "latest"
_TEMP = re.compile(r"^\.(?:step-\d{8,}\.pt|latest|write-check)\.tmp-([0-9a-f]{32})-\d+$")
_SHOWN = 4  #: file names listed in a message
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20  #: bytes read at a time to hash a file


@dataclass(frozen=True)
class Pointer:
    """What ``latest`` says: the newest checkpoint and its run (None: it could not be read,
    and ``damaged`` says why)."""

    checkpoint: Path | None
    run_id: str | None
    damaged: str | None = None
    #: the SHA-256 (hex) of each checkpoint file (by name) as its run wrote it
    digests: dict[str, str] = field(default_factory=dict)


def _inside(folder: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def read_pointer(folder: Path) -> Pointer | None:
    """``folder``'s ``latest`` pointer (None when there is none); a :class:`ConfigError` when
    it names anything but a checkpoint of ``folder`` itself."""
    pointer = folder / LATEST
    if not os.path.lexists(pointer):
        return None
    if pointer.is_symlink():
        raise ConfigError(
            f"{pointer} is a symbolic link; autoaccum writes it as a plain file and does not "
            "follow it. Remove it, or resume from a checkpoint file"
        )
    try:
        said = json.loads(pointer.read_text())
        name, run_id = said["checkpoint"], said["run_id"]
        digests = said.get("sha256", {})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        return Pointer(None, None, f"{pointer} cannot be read ({type(exc).__name__}: {exc})")
    if not isinstance(run_id, str) or not isinstance(name, str):
        return Pointer(None, None, f"{pointer} cannot be read (not a name and a run id)")
    if not isinstance(digests, dict) or not all(
        isinstance(k, str) and NAME.match(k) and isinstance(v, str) and _SHA256.match(v)
        for k, v in digests.items()
    ):
        return Pointer(None, None, f"{pointer} cannot be read (its sha256 entry is malformed)")
    if NAME.match(name) is None or not _inside(folder, folder / name):
        raise ConfigError(
            f"{pointer} names {name!r}, which is not a checkpoint of {folder} (its own "
            "step-NNNNNNNN.pt files): a pointer to a file elsewhere is refused. Resume from a "
            "checkpoint file you trust, or remove the pointer"
        )
    return Pointer(folder / name, run_id, digests=dict(digests))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path) -> str | None:
    """Why the checkpoint file at ``path`` is not the one its run wrote (None: it is, or its
    folder's ``latest`` recorded nothing for it: a file copied elsewhere, an older version's)."""
    try:
        pointer = read_pointer(path.parent)
    except ConfigError:
        return None  # a pointer not to be followed says nothing about this file
    expected = pointer.digests.get(path.name) if pointer is not None else None
    if expected is None:
        return None
    try:
        found = _sha256(path)
    except OSError as exc:
        return f"it cannot be read ({_reason(exc)})"
    if found == expected:
        return None
    return (
        f"its bytes are not those its run wrote (SHA-256 {found[:12]}…, where "
        f"{path.parent / LATEST} recorded {expected[:12]}…): it was damaged or changed on disk"
    )


class _Hashing:
    """A binary file that hashes what is written to it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.name = handle.name  #: the file's, as a file object has it
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def step_files(folder: Path, *, links: bool = True) -> list[tuple[int, Path]]:
    """``folder``'s checkpoint files (``step-NNNNNNNN.pt``), newest first; without ``links``,
    only regular files (those a run writes). A symbolic link leading out of ``folder`` is
    refused; directories and other files of such names are left out."""
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = NAME.match(path.name)
        if match is None:
            continue
        if path.is_symlink():
            if not links:
                continue
            if not _inside(folder, path):
                raise ConfigError(
                    f"{path} is a symbolic link to {path.resolve()}, outside {folder}: refused. "
                    "Resume from a checkpoint file you trust, or remove the link"
                )
        if path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def run_of(path: Path) -> str | None:
    """The run id a checkpoint file holds, read without loading its tensors (None when it is
    no readable checkpoint)."""
    try:
        head = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    run_id = head.get("run_id") if isinstance(head, dict) else None
    return run_id if isinstance(run_id, str) else None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory handles: the rename is what we have
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Folder:
    """A checkpoint folder as one run (``run_id``) writes it (rank 0 only)."""

    def __init__(self, directory: str | os.PathLike[str], run_id: str) -> None:
        self.path = Path(directory)
        self.run_id = run_id
        self.claimed = False
        self._replace = False  #: the next save replaces the checkpoints of other runs
        self._ours: dict[str, bool] = {}  #: file name → written by this run (peeked once)
        self._digests: dict[str, str] | None = None  #: this run's files' SHA-256, by name

    def _temporary(self, name: str) -> Path:
        return self.path / f".{name}.tmp-{self.run_id}-{os.getpid()}"

    def _is_ours(self, path: Path) -> bool:
        if path.name not in self._ours:
            self._ours[path.name] = run_of(path) == self.run_id
        return self._ours[path.name]

    def claim(self, *, overwrite: bool = False) -> None:
        """Check, before the first step, that this run can write here and that the folder
        holds no other run's checkpoints (with ``overwrite``: that they are to be replaced)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            check = self._temporary("write-check")
            os.close(os.open(check, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            check.unlink()
        except OSError as exc:
            reason = _reason(exc)
            if isinstance(exc, FileExistsError) and not self.path.is_dir():
                reason = "it exists and is not a folder"
            raise ConfigError(
                f"cannot write checkpoints to {self.path}: {reason}. Choose a folder this "
                "process can create and write to"
            ) from None
        others = self._others()
        if others and not overwrite:
            raise ConfigError(
                f"{self.path} already holds another run's checkpoints ({others}), and this is "
                "a new run. To continue that run, pass fit(..., resume='auto') (or resume= the "
                "folder); to keep both, give this run another folder; to start a new run here "
                "and replace them, pass Checkpoint(..., overwrite=True)"
            )
        self._replace = bool(others)
        self.claimed = True

    def _others(self) -> str:
        """What the folder holds of other runs, in words ('' when nothing). A folder whose
        ``latest`` is this run's is its own (files of other names are never touched)."""
        pointer = read_pointer(self.path)
        if pointer is not None and pointer.run_id == self.run_id:
            return ""
        theirs = [p.name for _, p in step_files(self.path) if not self._is_ours(p)]
        if pointer is not None:
            newest = pointer.checkpoint.name if pointer.checkpoint is not None else "unreadable"
            return f"latest: {newest}; files: {_listed(theirs) or 'none'}"
        return f"files: {_listed(theirs)}" if theirs else ""

    def save(self, write: Callable[[IO[bytes]], object], steps: int, keep: int) -> Path:
        """Write ``step-{steps}.pt`` with ``write(handle)``, point ``latest`` at it, keep this
        run's newest ``keep`` checkpoints, and remove what a crash of this run left behind."""
        if not self.claimed:
            self.claim()
        path = self.path / f"step-{steps:08d}.pt"
        if not self._replace:
            self._check_alone(path)
        if self._digests is None:  # a resumed run's earlier files keep theirs
            pointer = read_pointer(self.path)
            same = pointer is not None and pointer.run_id == self.run_id
            self._digests = dict(pointer.digests) if pointer is not None and same else {}
        self._digests[path.name] = self._write(path, write, f"checkpoint {path}")
        self._ours[path.name] = True
        mine = [p for _, p in step_files(self.path, links=False) if self._is_ours(p)]
        doomed = [p for p in mine if p != path][keep - 1 :]  # the one just written stays
        kept = {p.name for p in mine} - {p.name for p in doomed}
        self._digests = {n: d for n, d in self._digests.items() if n in kept}
        said = {"checkpoint": path.name, "run_id": self.run_id, "sha256": self._digests}
        pointer_text = json.dumps(said) + "\n"
        self._write(
            self.path / LATEST,
            lambda handle: handle.write(pointer_text.encode()),
            f"{self.path / LATEST} (pointing it at {path.name}, which was written)",
        )
        if self._replace:  # the first checkpoint of a run allowed to replace the others'
            for _, old in step_files(self.path, links=False):
                if not self._is_ours(old):
                    old.unlink(missing_ok=True)
        for old in doomed:
            old.unlink(missing_ok=True)
            self._ours.pop(old.name, None)
        self._sweep(every_run=self._replace)
        self._replace = False
        return path

    def _check_alone(self, path: Path) -> None:
        """A clear error, before writing, when ``latest`` is another run's now (one writes to
        this folder at the same time) or ``path`` is a file this run did not write."""
        pointer = read_pointer(self.path)
        if pointer is not None and pointer.run_id != self.run_id:
            raise ConfigError(
                f"another run writes checkpoints to {self.path} at the same time: its latest "
                f"now names run {pointer.run_id}, not this run ({self.run_id}). Nothing was "
                "overwritten; give each run its own folder"
            )
        if os.path.lexists(path) and not (path.is_file() and self._is_ours(path)):
            raise ConfigError(
                f"{path} is in the way: this run did not write it, so it is not overwritten. "
                "Move it out of the checkpoint folder"
            )

    def _write(self, path: Path, write: Callable[[IO[bytes]], object], what: str) -> str:
        """Write ``path`` atomically with ``write(handle)``; the SHA-256 of what was written."""
        temporary = self._temporary(path.name)
        try:
            with temporary.open("wb") as handle:
                hashing = _Hashing(handle)
                write(hashing)  # type: ignore[arg-type]  # write and flush: what torch.save uses
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            if not isinstance(exc, OSError):
                raise
            message = (
                f"writing {what} failed: {_reason(exc)}. Its partial file was removed; the "
                f"folder's previous checkpoint and its latest pointer are as they were"
            )
            raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from exc
        _fsync_directory(self.path)
        return hashing.digest.hexdigest()

    def _sweep(self, *, every_run: bool = False) -> None:
        """Remove the temporaries a crash of this run left (autoaccum's naming, this run's id;
        ``every_run``: any run's, when replacing the others)."""
        for path in self.path.iterdir():
            match = _TEMP.match(path.name)
            if match is not None and (every_run or match.group(1) == self.run_id):
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISREG(path.lstat().st_mode):
                        path.unlink()
