"""The work folder of a block-wise run: activation and factor files, the progress record.

Each finished step writes its files (each under a temporary name, then renamed) and then
commits a progress record atomically, so a run killed at any moment and rerun with the
same arguments resumes after the last committed step. Also the scratch folders of runs
that need no resume (removed at the end, and by a later run if their process was killed)
and the process-memory helpers a long block-wise run uses (glibc's ``malloc_trim`` and
mmap threshold).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..calibration import distributed
from ..errors import CheckpointError
from ..io.atomic import atomic_path, write_bytes
from ..io.outputs import process_runs

logger = logging.getLogger(__name__)

WORK_SUFFIX = ".rankcut-work"  # the work folder is ``.<output name>.rankcut-work``
PROGRESS = "progress.json"
SCRATCH_OWNER = "rankcut-owner.json"  # in a scratch folder: the process that made it


class WorkFolder:
    """The work folder of one streamed run: activation files and an atomic progress record.

    ``.<output name>.rankcut-work<suffix>`` beside the output; each process of a
    distributed run has its own (suffix ``-<rank>-of-<size>``), and they resume only when
    all of them stopped at the same step (else all start over). A damaged progress record
    is logged and the run starts over.

    Attributes:
        path: the folder.
        progress: {step name: count done, ...}; also the finished module results.
    """

    def __init__(self, output: Path, fingerprint: str, suffix: str = "") -> None:
        self.path = output.parent / f".{output.name}{WORK_SUFFIX}{suffix}"
        progress = _read_progress(self.path / PROGRESS)
        steps = _steps(progress)
        if suffix and not distributed.agree(steps):
            logger.warning("the processes stopped at different steps; starting over")
            progress = {}
        if progress.get("fingerprint") != fingerprint:
            if progress:
                logger.warning("%s belongs to a run with other arguments; starting over",
                               self.path)
            shutil.rmtree(self.path, ignore_errors=True)
            progress = {"fingerprint": fingerprint}
        elif len(progress) > 1:
            logger.info("resuming from %s: %s", self.path,
                        {k: v for k, v in progress.items() if isinstance(v, int)})
        self.path.mkdir(parents=True, exist_ok=True)
        self.progress = progress

    def done(self, step: str) -> int:
        """How many units of ``step`` were committed."""
        return int(self.progress.get(step, 0))

    def steps(self) -> str:
        """The committed steps as canonical JSON (what the processes compare)."""
        return _steps(self.progress)

    def start_over(self) -> None:
        """Deletes every work file and the progress record: the run starts from scratch."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self.progress = {"fingerprint": self.progress["fingerprint"]}

    def commit(self, **updates) -> None:
        """Records ``updates`` in the progress file atomically (write, fsync, rename) and
        logs them with the process's peak RSS so far."""
        self.progress.update(updates)
        write_bytes(self.path / PROGRESS, json.dumps(self.progress).encode())
        trim_heap()
        steps = ", ".join(f"{k}={v}" for k, v in updates.items() if isinstance(v, int))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        logger.info("committed %s; peak RSS %.0f MiB", steps, peak)

    def file(self, kind: str, *parts: int | str) -> Path:
        """The path of one work file, e.g. ``file("acts", 3, 0)`` → acts/3/0.safetensors.
        Side effect: creates its folder."""
        path = self.where(kind, *parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def where(self, kind: str, *parts: int | str) -> Path:
        """The path of one work file, as :meth:`file` gives it, without creating anything."""
        return self.path.joinpath(kind, *map(str, parts[:-1])) / f"{parts[-1]}.safetensors"

    def move_files(self, source: str, kind: str, committed=lambda path: True) -> None:
        """Moves the work files of folder ``source`` for which ``committed(path)`` holds into
        ``kind`` (replacing same-named ones), then deletes ``source`` with the rest: how a
        step's files written aside replace the current ones once the step is committed."""
        for path in sorted((self.path / source).glob("*.safetensors")):
            if committed(path):
                os.replace(path, self.file(kind, path.stem))
        self.drop(source)

    def drop(self, kind: str, *parts: int | str) -> None:
        """Deletes a folder of work files that is no longer needed."""
        shutil.rmtree(self.path.joinpath(kind, *map(str, parts)), ignore_errors=True)


#: Progress entries that are not step counts.
_NOT_STEPS = ("fingerprint", "results", "stage_losses", "anchor_log", "refit_log",
              "refine_log")


def _steps(progress: dict) -> str:
    """The step counts (and fingerprint) of a progress record as canonical JSON."""
    return json.dumps({k: v for k, v in progress.items() if k != "results"}, sort_keys=True)


def _progress_problem(progress: object) -> str | None:
    """What makes a parsed progress record unlike any :meth:`WorkFolder.commit` writes,
    or None."""
    if not isinstance(progress, dict):
        return f"a JSON {type(progress).__name__}, not an object"
    if not isinstance(progress.get("fingerprint"), str):
        return "no fingerprint"
    bad = [k for k, v in progress.items() if k not in _NOT_STEPS
           and (not isinstance(v, int) or isinstance(v, bool) or v < 0)]
    if bad:
        return f"step {bad[0]!r} is not a count"
    losses = progress.get("stage_losses", [])
    if not isinstance(losses, list) or not all(isinstance(x, (int, float)) for x in losses):
        return "the stage losses are not a list of numbers"
    for key in ("results", "anchor_log", "refit_log", "refine_log"):
        entries = progress.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(r, dict) for r in entries):
            return f"the {key} entries are not a list of objects"
    return None


def _read_progress(record: Path) -> dict:
    """Returns a work folder's progress record: {} when there is none, and {} with a
    warning naming it when it is damaged (unreadable, not JSON, or not what
    :meth:`WorkFolder.commit` writes), so that the run starts over."""
    if not record.is_file():
        return {}
    try:
        progress = json.loads(record.read_bytes())
    except (OSError, ValueError) as err:  # ValueError: JSON and UTF-8 decoding errors
        problem: str | None = str(err)
    else:
        problem = _progress_problem(progress)
    if problem:
        logger.warning("the progress record %s is damaged (%s); starting over", record,
                       problem)
        return {}
    return progress


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes ``tensors`` to a safetensors file atomically (temporary name, then rename)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Reads every tensor of a work file (safetensors).

    Raises:
        CheckpointError: the file is missing or damaged; a rerun checks the work files
            before it resumes and recomputes the damaged steps.
    """
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"work file {path} is missing or damaged ({err}); run the same "
                              "command again to recompute it") from err


@contextlib.contextmanager
def scratch_folder(prefix: str, root: str | Path | None = None) -> Iterator[Path]:
    """A temporary folder for one run's work files (activations, factors: gigabytes for a
    real model), removed when the ``with`` block ends.

    A SIGKILL skips that cleanup, so the folder holds a marker naming its process and
    host, and entering this context first removes the ``prefix`` folders whose marked
    process no longer runs on this host. Folders without a valid marker (not written by
    this function) and folders of live processes or of other hosts are left alone.

    Args:
        prefix: the folder name's prefix, e.g. ``"rankcut-work-"``.
        root: where to make it (default: the system's temporary folder).

    Yields:
        The folder's path.
    """
    root = Path(root or tempfile.gettempdir())
    remove_orphaned_scratch(root, prefix)
    with tempfile.TemporaryDirectory(prefix=prefix, dir=root) as folder:
        marker = {"pid": os.getpid(), "host": socket.gethostname()}
        write_bytes(Path(folder) / SCRATCH_OWNER, json.dumps(marker).encode())
        yield Path(folder)


def remove_orphaned_scratch(root: Path, prefix: str) -> list[Path]:
    """Removes the scratch folders (``prefix*`` in ``root``, with a valid owner marker) of
    processes on this host that no longer run; returns them."""
    removed = []
    for folder in sorted(root.glob(f"{prefix}*")):
        try:
            owner = json.loads((folder / SCRATCH_OWNER).read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or not readable: leave it
        if host == socket.gethostname() and not process_runs(pid):
            logger.info("removing %s, left by process %d, which was killed", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


#: glibc's mallopt parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3


def _libc():
    """glibc, or None where the C library is another."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Returns the free pages of the C heap to the system (glibc's ``malloc_trim``; a
    no-op elsewhere). Freed small objects, e.g. the tokenizer's work on the calibration
    text, otherwise stay in the process's resident memory."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Makes glibc serve allocations above ``threshold`` bytes with their own mappings, so
    that a freed tensor goes back to the system instead of fragmenting the heap: without
    it a streamed run's peak RSS creeps up block after block.

    Side effect: changes this process's allocator setting (call it from the program that
    owns the process, as ``rankcut compress --stream`` does). Returns False (and changes
    nothing) where the C library is not glibc.
    """
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))

