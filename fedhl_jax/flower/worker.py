"""A long-lived node worker: a node's rounds without a cold start per message.

Flower 1.42's SuperNode starts one ``flwr-clientapp`` process per message, so without help every
round of a node starts Python, imports JAX, loads the model and its data and compiles (or reads
from the compilation cache) its local step. A node worker is one process, started once beside
the SuperNode, that keeps its ``NodeTrainer``s (model and data loaded, local step compiled) and
trains on request over a local Unix socket::

    python -m fedhl_jax.flower.worker --socket /run/fedhl/node.sock      # once, beside the SuperNode
    flower-supernode ... --node-config "rank=4 data='/data/mine.jsonl' worker='/run/fedhl/node.sock'"

With ``worker=`` in its node config, the ``ClientApp`` process forwards each ``train`` message
(``TrainRequest``: the run config, client id, rank, data file, the nodes' ranks, the round and the
factors as NumPy arrays) and returns the worker's ``TrainReply``; it imports Flower and NumPy
only, never JAX or the model, so a message costs a Python start and Flower's import.

Trainers are kept per (run config, client id, rank, data file, ranks), as in the ``ClientApp``
process (``client_app.trainer_for``): a new run config or rank loads a new one, and the least
recently used beyond ``--max-trainers`` is dropped; a data file changed on disk is read again only
by a new trainer (a new worker). Requests are served each on its own thread,
one at a time per trainer (a lock), and the reply is the in-process ``NodeTrainer.train``'s, the
same numbers.

The socket is the worker's own (mode 0600, in a folder the worker creates if missing) and every
connection is authenticated with the key in ``<socket>.key`` (random, mode 0600, written at the
worker's start): only the worker's user can ask it to train. A socket that does not exist,
refuses, or a worker that dies mid-request fails the request with ``WorkerError`` naming the
socket (the round then treats the node as any node that failed); a request the worker cannot
serve (a bad config, a bad file) fails with the worker's error in the message.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import NamedTuple

import numpy as np


class WorkerError(RuntimeError):
    """A node worker cannot be reached, died, or could not serve the request (the message names
    its socket)."""


class TrainRequest(NamedTuple):
    """One round of one node, as the ``ClientApp`` forwards it.

    Attributes:
      run_config: the Flower run config (``config``, ``overrides``, ...; the trainer's key).
      partition_id: the node's client id.
      rank: its LoRA rank ``r``.
      data: its own JSONL file (absolute), or None for the simulation's partition.
      ranks: ``[fed.num_clients]`` the ranks the server sent, or None.
      round: the global round ``t`` (0-based).
      arrays: the message's arrays: ``pack`` of the starting factors (``B/<m>`` ``[d_out, r]``,
        ``A/<m>`` ``[r, d_in]``) and ``base_delta/<m>`` ``[d_out, d_in]`` when the algorithm sends it.
      compile_cache: the node config's ``compile-cache`` ("" when unset).
    """

    run_config: dict
    partition_id: int
    rank: int
    data: str | None
    ranks: tuple | None
    round: int
    arrays: dict
    compile_cache: str = ""


class TrainReply(NamedTuple):
    """The worker's answer to a ``TrainRequest``.

    Attributes:
      arrays: ``pack`` of the trained factors at the node's rank.
      losses: ``[K]`` the loss before each local step.
      num_examples: the node's data size.
      train_seconds: the ``NodeTrainer.train`` call (its compilation on a trainer's first round).
    """

    arrays: dict
    losses: np.ndarray
    num_examples: int
    train_seconds: float


def key_path(socket_path: str | os.PathLike) -> Path:
    """The file of the worker's authentication key, beside its socket."""
    return Path(f"{socket_path}.key")


def ask(socket_path: str | os.PathLike, request: TrainRequest) -> TrainReply:
    """Sends ``request`` to the worker at ``socket_path`` and waits for its reply.

    Raises:
      WorkerError: no socket or key file, a refused connection, a failed authentication, a worker
        that closed the connection before replying (it died), or the worker's own error; the
        message names the socket.
    """
    where = str(socket_path)
    if not os.path.exists(where):
        raise WorkerError(f"no node worker at {where}: the socket does not exist (start one with "
                          f"`python -m fedhl_jax.flower.worker --socket {where}`)")
    try:
        key = key_path(where).read_bytes()
    except OSError as e:
        raise WorkerError(f"cannot read the key of the node worker at {where} ({key_path(where)}): {e}") from None
    try:
        conn = Client(where, family="AF_UNIX", authkey=key)
    except (ConnectionRefusedError, FileNotFoundError) as e:
        raise WorkerError(f"the node worker at {where} refuses connections ({e}); is it running?") from None
    except Exception as e:  # AuthenticationError and friends
        raise WorkerError(f"cannot connect to the node worker at {where}: {type(e).__name__}: {e}") from None
    with conn:
        try:
            conn.send(request)
            status, body = conn.recv()
        except (EOFError, OSError) as e:
            raise WorkerError(f"the node worker at {where} closed the connection before replying "
                              f"(it died or was stopped): {type(e).__name__}: {e}") from None
    if status != "ok":
        raise WorkerError(f"the node worker at {where} failed: {body}")
    return body


class Worker:
    """The worker's state: its trainers and their locks.

    Args:
      max_trainers: how many trainers are kept (the least recently used beyond it is dropped,
        its model and data freed once no request uses it).
      log: where progress messages go.
    """

    def __init__(self, max_trainers: int = 4, log=lambda *_: None):
        if max_trainers < 1:
            raise ValueError(f"max_trainers={max_trainers} must be at least 1")
        self.max_trainers, self.log = int(max_trainers), log
        self._guard = threading.Lock()  # creation of trainers and locks
        self._locks: dict = {}

    def _lock(self, key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def train(self, request: TrainRequest) -> TrainReply:
        """Serves one request: the cached trainer's ``train`` (one at a time per trainer).

        Raises:
          Whatever ``NodeTrainer`` raises (a bad config, rank or file; the message names it).
        """
        from fedhl_jax.flower.client_app import _trainers, trainer_for, trainer_key, use_compile_cache

        r = request
        key = trainer_key(r.run_config, r.partition_id, r.rank, r.data, r.ranks)
        with self._lock(key):
            use_compile_cache({"compile-cache": r.compile_cache})
            t0, new = time.perf_counter(), key not in _trainers
            trainer = trainer_for(r.run_config, r.partition_id, r.rank, r.data, r.ranks)
            if new:
                self.log(f"loaded the trainer of client {r.partition_id} at rank {r.rank} "
                         f"({time.perf_counter() - t0:.1f} s)")
            with self._guard:  # most recently used last; the oldest beyond max_trainers dropped
                _trainers[key] = _trainers.pop(key)
                for old in list(_trainers)[:-self.max_trainers]:
                    del _trainers[old]
                    self._locks.pop(old, None)
                    self.log(f"dropped the trainer of client {old[1]} at rank {old[2]} (least recently used)")
            t0 = time.perf_counter()
            arrays, losses = trainer.train(r.round, r.arrays)
            return TrainReply(arrays, np.asarray(losses), int(trainer.num_examples), time.perf_counter() - t0)

    def handle(self, conn) -> None:
        """Answers one connection: ``("ok", TrainReply)`` or ``("error", message)``."""
        with conn:
            try:
                request = conn.recv()
                if not isinstance(request, TrainRequest):
                    raise TypeError(f"expected a TrainRequest, got {type(request).__name__}")
                answer = ("ok", self.train(request))
            except EOFError:
                return
            except Exception as e:  # the error goes back to the node, and to the worker's log
                self.log(traceback.format_exc())
                answer = ("error", f"{type(e).__name__}: {e}")
            try:
                conn.send(answer)
            except OSError as e:
                self.log(f"the reply was not delivered: {e}")


def serve(socket_path: str | os.PathLike, *, max_trainers: int = 4, log=print, ready=None) -> None:
    """Listens on ``socket_path`` until interrupted, serving each connection on its own thread.

    Writes a fresh key to ``<socket>.key`` (mode 0600), replaces a stale socket file, and removes
    both on exit.

    Args:
      socket_path: the Unix socket's path (its folder is made if missing).
      max_trainers: as ``Worker``.
      log: where progress messages go.
      ready: an optional ``threading.Event`` set once the socket listens.

    Raises:
      WorkerError: another worker already listens on ``socket_path``.
    """
    where = Path(socket_path).expanduser().absolute()
    where.parent.mkdir(parents=True, exist_ok=True)
    if where.exists():
        try:
            Client(str(where), family="AF_UNIX", authkey=key_path(where).read_bytes()).close()
            raise WorkerError(f"a node worker already listens on {where}")
        except (ConnectionRefusedError, FileNotFoundError, EOFError, OSError):
            where.unlink()  # a socket left by a worker that died
        except WorkerError:
            raise
        except Exception:  # it answered with another key: still someone's live socket
            raise WorkerError(f"a node worker already listens on {where}") from None
    key = secrets.token_bytes(32)
    fd = os.open(key_path(where), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    old = os.umask(0o177)
    try:
        listener = Listener(str(where), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old)
    worker = Worker(max_trainers, log=log)
    log(f"node worker listening on {where}")
    if ready is not None:
        ready.set()
    try:
        with listener:
            while True:
                try:
                    conn = listener.accept()
                except Exception as e:  # a failed authentication, a client gone before the handshake
                    log(f"refused a connection: {type(e).__name__}: {e}")
                    continue
                threading.Thread(target=worker.handle, args=(conn,), daemon=True).start()
    finally:
        for path in (where, key_path(where)):
            path.unlink(missing_ok=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fedhl-node-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on (the node config's worker=)")
    parser.add_argument("--max-trainers", type=int, default=4,
                        help="trainers kept (run config, client id, rank, data); the least recently used beyond "
                             "it is dropped (default 4)")
    args = parser.parse_args(argv)
    if args.max_trainers < 1:
        parser.error(f"--max-trainers={args.max_trainers} must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a clean exit removes the socket and its key
    try:
        serve(args.socket, max_trainers=args.max_trainers, log=lambda m: print(m, file=sys.stderr, flush=True))
    except (KeyboardInterrupt, SystemExit):
        return _end(0)
    except WorkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _end(code: int) -> int:
    """The exit status, or the process ended at once (``os._exit``) while a request is being served.

    A request's thread may be inside JAX; the interpreter's shutdown would end that thread there and
    crash the process (SIGSEGV instead of a clean exit after SIGTERM). The socket and its key are
    already removed; the request's node sees the worker gone.
    """
    if any(t.is_alive() for t in threading.enumerate() if t is not threading.current_thread()):
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":  # run as the module proper, so requests unpickle to its TrainRequest
    from fedhl_jax.flower.worker import main as worker_main

    sys.exit(worker_main())
