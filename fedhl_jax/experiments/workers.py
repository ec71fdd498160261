"""Independent suite runs in worker processes, each pinned to its own CPU cores.

On a few CPU cores one run does not keep every core busy: XLA's CPU thread pool scales imperfectly, and
the host work between rounds (the schedule, the update statistics) runs on one thread. Two runs side by
side, one per core, finish more runs per hour than one run on both (``docs/performance.md``). A suite
whose runs are independent (the evidence suite's tuning passes, seeds and settings) can therefore run
several at once.

This module imports nothing heavy at the top level: a worker process pins itself (``os.sched_setaffinity``)
and applies the parent's JAX options (the persistent compilation cache) in its initializer, before its
first JAX computation creates XLA's CPU client, whose thread pool is sized by the cores it may use.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

#: JAX options a worker takes from its parent (read when the pool starts).
JAX_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
               "jax_persistent_cache_min_entry_size_bytes", "jax_enable_x64")


def core_groups(workers: int, cores: list[int]) -> list[list[int]] | None:
    """Splits ``cores`` into ``workers`` disjoint groups of (nearly) equal size, in order.

    Args:
      workers: the number of worker processes (≥ 1).
      cores: the CPU ids the parent may use (``os.sched_getaffinity(0)``).

    Returns:
      ``workers`` lists of CPU ids, or None when there are fewer cores than workers (then no worker is
      pinned: the operating system shares the cores).

    Raises:
      ValueError: ``workers`` < 1, naming it.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")
    cores = sorted(cores)
    if len(cores) < workers:
        return None
    q, r = divmod(len(cores), workers)
    out, i = [], 0
    for w in range(workers):
        n = q + (1 if w < r else 0)
        out.append(cores[i:i + n])
        i += n
    return out


def _exit_with_parent() -> None:
    """Asks Linux to end this process when its parent dies (``PR_SET_PDEATHSIG``), so a suite killed
    without a chance to shut its pool down leaves no worker training on; elsewhere nothing is done."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
            pass


def _init(groups, options: dict) -> None:
    """A worker's initializer: takes a core group from the queue (None: no pinning) and the parent's
    JAX options."""
    _exit_with_parent()
    group = groups.get()
    if group is not None:
        os.sched_setaffinity(0, group)
    if options:
        import jax

        for k, v in options.items():
            jax.config.update(k, v)


def pool(workers: int, *, pin: bool = True) -> ProcessPoolExecutor:
    """A process pool of ``workers`` fresh (spawned) interpreters, each pinned to its own core group.

    Args:
      workers: the number of processes (≥ 1).
      pin: pin each worker to ``core_groups(workers, <the parent's cores>)`` (when there are enough cores).

    Returns:
      A ``ProcessPoolExecutor``; its workers apply the parent's ``JAX_OPTIONS`` (read now).
    """
    groups = core_groups(workers, list(os.sched_getaffinity(0))) if pin else None
    ctx = multiprocessing.get_context("spawn")  # a fork of a process that ran XLA is not safe
    queue = ctx.Queue()
    for g in groups or [None] * workers:
        queue.put(g)
    import jax

    options = {k: getattr(jax.config, k) for k in JAX_OPTIONS}
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(queue, options))
