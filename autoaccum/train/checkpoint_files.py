"""The checkpoint folder on disk: its file names, the ``latest`` pointer, atomic writes, and
which files belong to which run.

A run writes ``step-NNNNNNNN.pt`` files and a ``latest`` pointer, a small JSON file naming
the newest of them and the run's id; every checkpoint holds the run's id too. Files are
written atomically: to a temporary ``.NAME.tmp-RUNID-PID``, flushed to disk, then renamed;
a failed write removes its temporary, and ``latest`` is renamed into place only after its
checkpoint. A :class:`Folder` deletes only what its run wrote (``keep``), or, when a new run
was explicitly allowed to replace the folder's checkpoints (``overwrite=True``), the files of
exactly autoaccum's naming that were there. ``latest`` may name only a checkpoint of its own
folder: a path elsewhere (``../x``, an absolute path, a symbolic link leading out) is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from autoaccum.errors import ConfigError

__all__ = ["LATEST", "NAME", "Folder", "Pointer", "read_pointer", "run_of", "step_files"]

NAME = re.compile(r"^step-(\d{8,})\.pt$")  #: a checkpoint's file name
LATEST = "latest"
_TEMP = re.compile(r"^\.(?:step-\d{8,}\.pt|latest|write-check)\.tmp-([0-9a-f]{32})-\d+$")
_SHOWN = 4  #: file names listed in a message


@dataclass(frozen=True)
class Pointer:
    """What ``latest`` says: the newest checkpoint and its run (None: it could not be read,
    and ``damaged`` says why)."""

    checkpoint: Path | None
    run_id: str | None
    damaged: str | None = None


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
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return Pointer(None, None, f"{pointer} cannot be read ({type(exc).__name__}: {exc})")
    if not isinstance(run_id, str) or not isinstance(name, str):
        return Pointer(None, None, f"{pointer} cannot be read (not a name and a run id)")
    if NAME.match(name) is None or not _inside(folder, folder / name):
        raise ConfigError(
            f"{pointer} names {name!r}, which is not a checkpoint of {folder} (its own "
            "step-NNNNNNNN.pt files): a pointer to a file elsewhere is refused. Resume from a "
            "checkpoint file you trust, or remove the pointer"
        )
    return Pointer(folder / name, run_id)


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
        self._write(path, write, f"checkpoint {path}")
        self._ours[path.name] = True
        pointer = json.dumps({"checkpoint": path.name, "run_id": self.run_id}) + "\n"
        self._write(
            self.path / LATEST,
            lambda handle: handle.write(pointer.encode()),
            f"{self.path / LATEST} (pointing it at {path.name}, which was written)",
        )
        if self._replace:  # the first checkpoint of a run allowed to replace the others'
            for _, old in step_files(self.path, links=False):
                if not self._is_ours(old):
                    old.unlink(missing_ok=True)
        mine = [p for _, p in step_files(self.path, links=False) if self._is_ours(p)]
        for old in [p for p in mine if p != path][keep - 1 :]:  # the one just written stays
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

    def _write(self, path: Path, write: Callable[[IO[bytes]], object], what: str) -> None:
        temporary = self._temporary(path.name)
        try:
            with temporary.open("wb") as handle:
                write(handle)
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

    def _sweep(self, *, every_run: bool = False) -> None:
        """Remove the temporaries a crash of this run left (autoaccum's naming, this run's id;
        ``every_run``: any run's, when replacing the others)."""
        for path in self.path.iterdir():
            match = _TEMP.match(path.name)
            if match is not None and (every_run or match.group(1) == self.run_id):
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISREG(path.lstat().st_mode):
                        path.unlink()
