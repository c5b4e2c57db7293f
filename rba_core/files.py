"""Writes that survive a crash, and the lock that keeps two processes off one folder.

A file is written to a temporary sibling, flushed and fsynced, then renamed over its target
(``os.replace`` is atomic within a folder) and the folder is fsynced so the rename itself is
durable: after a kill, or power loss, the target holds its old content or all of the new, never
a mix. A folder is built the same way: in a temporary sibling whose files are all fsynced before
it is renamed into place. Temporaries are named ``.NAME.<8 random characters>.tmp`` so a later
run can recognise (``is_temp_name``) and remove (``remove_stale_temps``) what a killed one left.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

_TEMP = re.compile(r"^\..+\.tmp$")


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary that an atomic write of this module (or a torn one)
    leaves behind: a leading dot and a ``.tmp`` ending."""
    return bool(_TEMP.match(name))


def _temp_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (a rename into it) durable. Platforms that cannot
    open or fsync a folder (Windows, some network file systems) skip it: their renames are
    still atomic, only not yet on disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_handle(handle: IO[Any]) -> None:
    """Push what was written through an open file to the disk (an append that must survive)."""
    handle.flush()
    os.fsync(handle.fileno())


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a temporary file beside ``path`` (it gets the temporary's path),
    then fsync it and rename it over ``path``. On any failure the temporary is removed and
    ``path`` keeps its old content."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temp_sibling(target)
    # O_EXCL reserves the name; 0o666 under the umask gives the permissions of a plain open(),
    # where mkstemp would make every atomically written file private (0600).
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(temporary)
        fsync_file(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda temporary: temporary.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8, atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2,
                      sort_keys: bool = False) -> None:
    """``data`` as indented UTF-8 JSON (non-ASCII kept readable) ending in a newline."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    write_text_atomic(path, text)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of folder ``path`` to fill. When the block ends without
    error, everything in it is fsynced and it is renamed into place, replacing an existing
    ``path``; when the block fails it is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_sibling(target)
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            # A non-empty folder cannot be renamed over: move the old one aside, then drop it.
            # A kill between the two renames leaves both under temporary names, never a mix.
            aside = _temp_sibling(target)
            os.replace(target, aside)
            os.replace(staging, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)


def remove_stale_temps(folder: str | os.PathLike, name: str | None = None) -> None:
    """Delete the temporaries killed writes left in ``folder``: all of them, or only those of
    the target ``name`` (when other writers may be busy on other targets in the folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    pattern = "*" if name is None else f".{name}.*"
    for entry in folder.glob(pattern):
        if not is_temp_name(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: bool = True) -> Iterator[None]:
    """Hold an advisory lock on the file ``path`` (created if missing) for the block. With
    ``wait`` False a lock held by another process raises BlockingIOError at once. The system
    drops the lock when its process dies, so a killed holder never leaves a stale one."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; atomic renames still protect readers
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
