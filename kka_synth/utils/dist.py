"""Process awareness for a run started with ``accelerate launch`` (several GPUs, several nodes).

``accelerate launch --num_processes N ... -m kka_synth.cli run ...`` starts N copies of the command (through
``torchrun``, or ``mpirun`` for multi-CPU runs); each learns its rank from the environment the launcher sets.
These helpers wrap accelerate's ``PartialState`` for the loop's few needs:

- :func:`world` says who this process is: ``(rank, size, is_main)``.
- :func:`shard` is this process's part of a list (``split_between_processes``: contiguous, in order).
- :func:`together` ends a block every process runs with a barrier that also carries failures: when one
  process fails, the others raise too instead of waiting for it forever.
- :func:`on_main` runs a function on the main process while the others wait; :func:`broadcast` hands the
  main process's value to the others.

With one process (a plain ``kka-synth run``) every helper is a pass-through: accelerate is not imported and
no process group is started.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

from kka_synth.runs import RunError

T = TypeVar("T")

logger = logging.getLogger(__name__)

WAIT = timedelta(hours=6)
"""How long a process waits for the others at a barrier: the main process alone proposes, scores hardness
and curates meanwhile, which can take long on a real dataset."""

_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""Where torchrun and the MPI launchers put the number of processes."""


class World(NamedTuple):
    rank: int
    size: int
    is_main: bool


def launched() -> bool:
    """True when a launcher started this process as one of several (read from the environment only)."""
    return any(int(os.environ.get(name, "1") or "1") > 1 for name in _SIZE_VARIABLES)


def _state() -> Any:
    """accelerate's ``PartialState``, started on first use (it joins the process group)."""
    import torch
    from accelerate import PartialState

    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    # without cuda, PartialState(cpu=False) would not see a multi-process launch at all; with cpu=True it
    # joins the group over gloo (or MPI)
    state = PartialState(cpu=use_cpu or not torch.cuda.is_available(), timeout=WAIT)
    global _LEAVE_REGISTERED
    if not _LEAVE_REGISTERED:
        atexit.register(_leave)
        _LEAVE_REGISTERED = True
    return state


_LEAVE_REGISTERED = False


def _leave() -> None:
    """At exit: wait for the others (briefly) and take the process group down.

    A process that exits with the group still up can abort in the communication library's threads
    ("terminate called without an active exception") while a peer still talks to it.
    """
    import torch.distributed

    if not torch.distributed.is_initialized():
        return
    try:
        if torch.distributed.get_backend() == "gloo":
            torch.distributed.monitored_barrier(timeout=timedelta(seconds=120))
        torch.distributed.destroy_process_group()
    except Exception:  # a peer that already failed: the launcher reports it, nothing more to do here
        logger.debug("leaving the process group failed", exc_info=True)


def world() -> World:
    """``(rank, size, is_main)`` of this process; ``(0, 1, True)`` when it runs alone."""
    if not launched():
        return World(0, 1, True)
    state = _state()
    return World(state.process_index, state.num_processes, state.is_main_process)


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for when alone)."""
    if launched():
        _state().wait_for_everyone()


def shard(items: Sequence[T]) -> list[T]:
    """This process's contiguous share of ``items``, in their order (all of them when alone).

    Shares differ in length by at most one, and together they hold every item exactly once.
    """
    if not launched():
        return list(items)
    with _state().split_between_processes(list(items)) as part:
        return list(part)


def broadcast(value: T) -> T:
    """The main process's ``value`` in every process (any picklable value)."""
    if not launched():
        return value
    import torch.distributed

    _state()
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Run a block in every process, then wait for all of them; if any failed, every process raises.

    The process that failed raises its own error; the others raise a one-line :class:`RunError` naming it.
    Interrupts (``KeyboardInterrupt``) pass straight through: the launcher stops the other processes. The
    block must not run collectives of its own (DDP training, say): a process that failed before reaching
    them would leave the others waiting in them rather than here.
    """
    if not launched():
        yield
        return
    import torch.distributed

    error: Exception | None = None
    try:
        yield
    except Exception as caught:
        error = caught
    own = None if error is None else (str(error).splitlines() or [type(error).__name__])[0]
    reports: list[Any] = [None] * world().size
    torch.distributed.all_gather_object(reports, own)
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(reports) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RunError(f"stopped because process {rank} failed: {message}")


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)`` on the main process while the others wait; its result there, None elsewhere."""
    result = None
    with together():
        if world().is_main:
            result = fn(*args, **kwargs)
    return result


__all__ = ["WAIT", "World", "barrier", "broadcast", "launched", "on_main", "shard", "together", "world"]
