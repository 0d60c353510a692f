"""Distributed calibration on ``torch.distributed`` (torchrun; gloo on the CPU, NCCL on GPUs).

Every rank holds the whole model and all calibration ids. The calibration batches are dealt
out round-robin (``my_batches``), statistics kept as sums and counts are summed over ranks
(``sum_tensors``, ``sum_numbers``, ``sum_moments``), and the factorizations are spread:
each module is decomposed by one rank (``mine``) and its factors are broadcast to all
(``share``), so every rank ends with the same compressed model.

Every helper is the identity or a no-op when ``torch.distributed`` is not initialized or
the world has one process, so one process computes exactly what it computes without this
module. The others are collectives: every rank calls them in the same order with matching
arguments. With NCCL the collectives run on the current CUDA device (``torch.cuda.set_device``).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from ..core.linalg import SecondMoment
from ..errors import ConfigError

if TYPE_CHECKING:
    from .data import Calibration

T = TypeVar("T")

#: How long a rank waits in a collective, e.g. while rank 0 evaluates or saves the model.
TIMEOUT = timedelta(hours=1)


def world() -> tuple[int, int]:
    """Returns (this process's rank, the number of processes); (0, 1) without a group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_batches(ids: torch.Tensor | Calibration, batch_size: int) -> list:
    """Returns this rank's share of the calibration batches: ``ids`` (token ids [N, L] or a
    ``data.Calibration``) split into batches of ``batch_size`` samples, of which this rank
    takes numbers rank, rank + W, rank + 2W, ... (global batch j·W + rank at step j).

    Raises:
        ConfigError: there are fewer batches than processes.
    """
    rank, size = world()
    batches = list(ids.split(batch_size))
    if len(batches) < size:
        raise ConfigError(f"{ids.shape[0]} calibration samples in batches of {batch_size} "
                          f"give {len(batches)} batch(es) for {size} processes; use more "
                          "samples or a smaller batch size")
    return batches[rank::size]


def idle_steps(batches: int) -> int:
    """Returns how many steps of a lockstep loop over ``my_batches`` this rank has no batch
    at, of ``batches`` global batches (0 or 1: the last step when they do not divide
    evenly)."""
    rank, size = world()
    return math.ceil(batches / size) - len(range(rank, batches, size))


def mine(names: Sequence[str]) -> list[str]:
    """Returns the names this rank owns: module i belongs to rank i mod W."""
    rank, size = world()
    return list(names)[rank::size]


def _device() -> torch.device:
    """Where collectives run: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Replaces each tensor by its sum over ranks, in place (collective; no-op alone)."""
    if world()[1] == 1:
        return
    device = _device()
    for tensor in tensors:
        buffer = tensor.to(device)
        dist.all_reduce(buffer)
        if buffer is not tensor:
            tensor.copy_(buffer)


def sum_numbers(*values: int | float) -> tuple:
    """Returns each number summed over ranks (in float64; ints come back as ints)."""
    if world()[1] == 1:
        return values
    buffer = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(buffer)
    return tuple(round(s) if isinstance(v, int) else s
                 for v, s in zip(values, buffer.tolist(), strict=True))


def sum_moments(stats: dict[str, SecondMoment]) -> None:
    """Sums every accumulator of ``stats`` over ranks, in place. Layers that share one
    accumulator (one input) are summed once; every rank must hold the same sharing."""
    unique = list({id(s): s for s in stats.values()}.values())
    sum_tensors(t for s in unique for t in s.tensors())
    for moment, count in zip(unique, sum_numbers(*(s.count for s in unique)), strict=True):
        moment.count = count


def lockstep(item: torch.Tensor | None, apply: Callable[[torch.Tensor], T]) -> T | None:
    """One step of a loop that must see every rank's item in global batch order.

    All-gathers each rank's ``item`` (None: no batch at this step), calls ``apply`` on the
    items in rank order, which is global batch order under ``my_batches``, and returns what
    it gave for this rank's item (None for none). Alone: ``apply(item)``.
    """
    rank, size = world()
    if size == 1:
        return None if item is None else apply(item)
    items: list = [None] * size
    dist.all_gather_object(items, None if item is None else item.cpu())
    results = [None if x is None else apply(x) for x in items]
    return results[rank]


def share(held: dict[str, list[torch.Tensor]],
          shapes: dict[str, list[tuple[int, ...]]]) -> dict[str, list[torch.Tensor]]:
    """Gives every rank the tensors of every entry of ``shapes``, each broadcast (in
    float64) from the rank that holds it in ``held``.

    Returns:
        {name: its tensors} in the order of ``shapes``; a rank's own entries are the held
        tensors themselves, the others are on the collective device.

    Raises:
        RuntimeError: an entry is held by no rank, or held with other shapes.
    """
    if world()[1] == 1:
        return {name: held[name] for name in shapes}
    holders: list = [None] * world()[1]
    dist.all_gather_object(holders, list(held))
    source = {name: r for r, names in enumerate(holders) for name in names}
    device, out = _device(), {}
    for name, sizes in shapes.items():
        if name not in source:
            raise RuntimeError(f"no rank holds {name}")
        numels = [math.prod(s) for s in sizes]
        if name in held:
            flat = torch.cat([t.reshape(-1).to(device, torch.float64) for t in held[name]])
            if flat.numel() != sum(numels):
                raise RuntimeError(f"{name}: held tensors do not have the shapes {sizes}")
        else:
            flat = torch.empty(sum(numels), dtype=torch.float64, device=device)
        dist.broadcast(flat, source[name])
        out[name] = held[name] if name in held else [
            part.view(size) for part, size in zip(flat.split(numels), sizes, strict=True)]
    return out


def agree(text: str) -> bool:
    """Whether every rank passed the same ``text`` (True alone)."""
    if world()[1] == 1:
        return True
    texts: list = [None] * world()[1]
    dist.all_gather_object(texts, text)
    return all(t == text for t in texts)


def barrier() -> None:
    """Waits for every rank (no-op alone)."""
    if world()[1] > 1:
        dist.barrier()


@contextlib.contextmanager
def launched(device: str) -> Iterator[str]:
    """Joins the process group a launcher such as torchrun describes, for the duration.

    torchrun's contract is the environment: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT. With WORLD_SIZE above 1 (and no group yet) this initializes the group,
    NCCL for a CUDA ``device`` (each process takes ``cuda:LOCAL_RANK``) and gloo otherwise,
    and destroys it on exit. Otherwise it does nothing.

    Yields:
        The device this process computes on.

    Raises:
        ConfigError: a CUDA run with more processes on this node than GPUs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"process {local} of this node has no GPU of its own "
                              f"({torch.cuda.device_count()} visible); start at most that "
                              "many processes per node")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    try:
        yield device
    finally:
        dist.destroy_process_group()
