"""Where rankcut writes: folders it may replace, one run per output, atomic replacement.

The user's files are never replaced by something rankcut did not write:

- every folder rankcut writes carries :data:`OUTPUT_MARKER` (a small JSON naming its kind),
  written before the folder is renamed into place; checkpoints of older rankcut versions are
  recognised by their ``quantization_config`` and old reports by holding only
  ``index.html`` and PNGs;
- :func:`claim_output` checks an ``--output`` before any work: an existing file, a folder
  rankcut did not write, the input model folder (or a folder holding it) are refused; a
  previous rankcut output is replaced only with ``overwrite``; it then takes a lock so that
  two runs cannot write the same output (or share its streamed work folder);
- :func:`write_dir_atomically` builds the folder under a hidden temporary name and renames it
  into place, and removes the leftovers of a killed earlier write of the same target.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

#: Written into every folder rankcut writes: ``{"kind": "checkpoint" | "dense" | "report"}``.
OUTPUT_MARKER = ".rankcut-output"
#: Hidden siblings of a target that a write in progress (or a killed one) leaves behind.
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)$")


def leftover_target(path: Path) -> str | None:
    """Returns the target name when ``path`` is the hidden leftover of an unfinished write."""
    match = LEFTOVER.match(Path(path).name)
    return match["name"] if match else None


def is_rankcut_output(folder: Path) -> bool:
    """Whether ``folder`` is one rankcut wrote: it holds the marker, or it is a checkpoint of
    an older rankcut (a rankcut ``quantization_config``), or an older report (only
    ``index.html`` and PNG files)."""
    if (folder / OUTPUT_MARKER).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if (config.get("quantization_config") or {}).get("quant_method") == "rankcut":
            return True
    except (OSError, ValueError, AttributeError):
        pass
    names = [p.name for p in folder.iterdir()]
    return "index.html" in names and all(n == "index.html" or n.lower().endswith(".png")
                                         for n in names)


def check_output(target: str | Path, inputs: Iterable[str | Path] = (),
                 overwrite: bool = False, flag: str = "--output") -> Path:
    """Checks that rankcut may write the folder ``target``, before any work starts.

    Args:
        target: the output folder.
        inputs: folders or files the run reads (the model); the output may be none of them
            nor a folder holding one (symlinks resolved).
        overwrite: whether a previous rankcut output at ``target`` may be replaced.
        flag: the option's name, for the messages.

    Returns:
        ``target`` resolved.

    Raises:
        ConfigError: ``target`` is an existing file, a folder rankcut did not write, a
            previous rankcut output without ``overwrite``, an input (or holds one), or its
            parent cannot be written.
    """
    path = Path(target).expanduser().resolve()
    for source in inputs:
        source_path = Path(source).expanduser().resolve()
        if path == source_path or path in source_path.parents:
            raise ConfigError(f"{flag} {target} is the input model {source} or holds it; "
                              "choose another output folder")
    if leftover_target(path):
        raise ConfigError(f"{flag} {target} has the name of rankcut's temporary folders; "
                          "choose another name")
    if path.exists() or path.is_symlink():
        _check_existing(path, target, overwrite, flag)
    _check_writable_parent(path, target, flag)
    return path


def _check_existing(path: Path, target, overwrite: bool, flag: str) -> None:
    if not path.is_dir():
        raise ConfigError(f"{flag} {target} exists and is not a folder; rankcut writes a "
                          "folder there and will not replace it")
    contents = sorted(p.name for p in path.iterdir())
    if not contents:
        return
    if not is_rankcut_output(path):
        shown = ", ".join(contents[:3]) + (", ..." if len(contents) > 3 else "")
        raise ConfigError(f"{flag} {target} is a folder rankcut did not write (it holds "
                          f"{shown}); refusing to replace it: choose a new or empty folder")
    if not overwrite:
        raise ConfigError(f"{flag} {target} holds a previous rankcut output; pass "
                          "--overwrite to replace it")


def _check_writable_parent(path: Path, target, flag: str) -> None:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {flag} {target}: {parent} is not a writable folder")


def check_file_output(path: str | Path, flag: str = "--json") -> None:
    """Checks, before any work, that the file ``path`` can be written (its folder exists or
    can be created, and it is not a folder).

    Raises:
        ConfigError: ``path`` is a folder, or no writable folder would hold it.
    """
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    if resolved.exists() and not os.access(resolved, os.W_OK):
        raise ConfigError(f"cannot write {flag} {path}: the file is not writable")
    _check_writable_parent(resolved, path, flag)


@contextlib.contextmanager
def output_lock(target: str | Path) -> Iterator[Path]:
    """Holds an exclusive lock on ``target`` for the duration of the ``with`` block.

    The lock is ``flock`` on the hidden file ``.<name>.rankcut-lock`` beside the target, so
    the operating system releases it when the process dies (no stale lock to delete).
    Side effects: creates the target's parent folder and the lock file, and removes the lock
    file on exit.

    Raises:
        ConfigError: another process holds the lock.
    """
    path = Path(target).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.rankcut-lock"
    handle = lock.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another rankcut run is writing {target} (lock {lock}); wait "
                          "for it to finish or choose another output") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield path
    finally:
        lock.unlink(missing_ok=True)  # still ours: removed before the lock is released
        handle.close()


def write_dir_atomically(target: str | Path, write: Callable[[Path], object],
                         kind: str = "checkpoint") -> Path:
    """Calls ``write(tmp)`` on a fresh temporary sibling folder, then renames it to ``target``.

    The folder gets :data:`OUTPUT_MARKER` (``kind``) before the rename. An existing
    ``target`` is replaced only after ``write`` returned, and only if rankcut wrote it (or it
    is empty); if ``write`` raises, the temporary folder is removed and ``target`` is left as
    it was. Leftovers of a killed earlier write of the same target (hidden ``.partial-PID`` /
    ``.old-PID`` siblings whose process is gone) are removed first.

    Returns:
        ``target`` as a Path.

    Raises:
        CheckpointError: ``target`` exists and is not a folder rankcut wrote.
    """
    target = Path(target)
    check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s", target)
    return target


def check_replaceable(target: str | Path) -> None:
    """Raises CheckpointError unless ``target`` is absent, an empty folder, or a folder
    rankcut wrote: what :func:`write_dir_atomically` may replace."""
    target = Path(target)
    if (target.exists() or target.is_symlink()) and not (
            target.is_dir() and (not any(target.iterdir()) or is_rankcut_output(target))):
        raise CheckpointError(f"{target} exists and rankcut did not write it; refusing to "
                              "replace it")


def remove_leftovers(target: Path) -> list[Path]:
    """Removes the hidden ``.partial-PID`` / ``.old-PID`` siblings of ``target`` whose process
    no longer runs (a killed write). Returns what was removed; logs each."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for sibling in target.parent.iterdir():
        match = LEFTOVER.match(sibling.name)
        if match and match["name"] == target.name and sibling.is_dir() \
                and not _alive(int(match["pid"])):
            logger.warning("removing %s, left by an interrupted write of %s", sibling, target)
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def _alive(pid: int) -> bool:
    # our own pid: a leftover of an earlier, failed write of this process
    return pid != os.getpid() and process_runs(pid)


def process_runs(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
