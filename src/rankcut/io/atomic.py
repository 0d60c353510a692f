"""Atomic file writes: every file rankcut writes appears whole under its name or not at all.

A file is written under a hidden temporary name in its own folder, flushed to disk and then
renamed over its final name (``os.replace``, atomic on POSIX); a failure or an interruption
leaves no file under the final name and removes the temporary one. Folders are written the
same way by ``io.outputs.write_dir_atomically`` (outputs) and ``offline.assets.build_folder``
(the asset cache).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; on a clean exit, flushes it to disk
    and renames it to ``path`` (replacing any file there), else removes it.

    Side effects: creates ``path``'s folder when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: object) -> None:
    """Writes ``value`` as indented JSON (one trailing newline) to ``path`` atomically."""
    write_text(path, json.dumps(value, indent=2) + "\n")
