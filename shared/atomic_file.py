"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    """Make a rename/creation in `directory` durable (POSIX: the entry lives in the directory, not the file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    # The pid in the name lets a later opener tell a dead writer's leftovers from a live writer's file.
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def temp_writer_pid(tmp: Path) -> int | None:
    """The pid a `temp_path` name carries, or None when the name is not one."""
    try:
        return int(tmp.name.removesuffix(TMP_SUFFIX).rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return None


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], durable: bool = True) -> None:
    """Write via a temp file in the same directory, fsync it, rename over `path`, fsync the directory.

    `durable=False` skips both fsyncs, for caches: a crash still never leaves a torn file under `path`, but a power
    cut may lose the latest writes."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
