"""Write a file or a folder so that readers see the old one or the whole new one, never half of it,
and let processes that would build the same folder take turns (:func:`exclusive_lock`).

Every write-to-a-temporary-then-rename in the project goes through :func:`atomic_file` or
:func:`atomic_directory`, so a crash mid-write leaves the previous version (or nothing) behind.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the ``with`` block.

    Processes that would build the same shared folder (simulated devices preparing one weight
    copy) check, build and rename under it one at a time, so none deletes a copy another has just
    put in place. Where ``fcntl`` is missing (Windows) it does not lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on the platforms we run
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``path`` in one rename.

    The temporary file (``<name>.part``) is removed when the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _private_name(directory: Path, role: str) -> Path:
    """``.<name>.<pid>.<role>.part``: a sibling only this process writes (see :func:`remove_partial`)."""
    return directory.with_name(f".{directory.name}.{os.getpid()}.{role}.part")


@contextmanager
def atomic_directory(directory: str | Path, *, private: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``directory`` by renames.

    The folder in place (if any) is renamed aside (``<name>.old``), the new one renamed in, and the
    old one removed: a crash between the two renames leaves ``<name>.old`` whole. ``private`` names
    both siblings after this process (``.<name>.<pid>.*.part``), for folders several processes may
    build at once; a builder killed mid-write leaves them for :func:`remove_partial`.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if private:
        tmp, old = _private_name(directory, "new"), _private_name(directory, "old")
    else:
        tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def remove_partial(directory: str | Path) -> int:
    """Remove what builders of ``directory`` killed mid-write left (private siblings); returns how many.

    Call it holding :func:`exclusive_lock` for the folder, so no live builder's folder goes.
    """
    directory = Path(directory)
    stale = list(directory.parent.glob(f".{directory.name}.*.part"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


__all__ = ["exclusive_lock", "atomic_file", "atomic_directory", "remove_partial"]
