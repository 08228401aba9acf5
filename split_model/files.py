"""Files written whole or not at all.

Every file the project writes for later reading (checkpoints, memory-cache entries, results,
reports, predictions) is written under a temporary name in the same directory and renamed
into place, so a reader sees either the previous file or the complete new one, never a
prefix: a killed writer leaves at most a hidden temporary behind, which no reader matches.
Temporary names carry the host name, the process id and a random token, so writers on
several hosts sharing a file system never collide.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator


def temporary_name(path: str | Path) -> Path:
    """A hidden sibling of `path` that no other writer, on any host, will pick."""
    path = Path(path)
    host = socket.gethostname().replace(os.sep, "_") or "host"
    return path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; on success it is flushed to disk and renamed to
    `path` (replacing any previous file); on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove(path: str | Path) -> None:
    """Remove a file or a directory tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
