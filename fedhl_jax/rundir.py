"""Storage of a run: its directory and lock, config, metrics.jsonl, Orbax checkpoints, final/.

Crash safety: a round's metrics line is appended (and fsynced) before its
checkpoint is written, and Orbax finalises a checkpoint by an atomic rename, so
after a kill at any moment the newest *complete* checkpoint is a consistent
point. On resume, metrics of rounds after that checkpoint are dropped (the file
is rewritten atomically) and those rounds run again, so each round appears once.

One run at a time: :class:`RunDir` holds an exclusive ``flock`` on ``<out>/.lock``
(holder's pid inside) from before anything is written until :meth:`RunDir.close`
or the end of the process; the kernel drops it when the process dies, so a
killed run never blocks its resume.

Integrity: each checkpoint carries a SHA-256 of its arrays (a JSON item next to
the arrays, finalised with them); restore checks it, and a checkpoint that does
not restore or does not match is set aside into ``checkpoints_unreadable/`` and
the previous one is used. The final export goes through :func:`write_final`:
non-finite arrays are refused and ``final/`` is replaced atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedhl_jax.algorithms.base import LEGACY_LAYOUT
from fedhl_jax.config import ConfigError, TrainConfig, save_config


def _flatten(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _unflatten(template, flat: dict[str, Any]):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


# --------------------------------------------------------------------------- run lock
LOCK_NAME = ".lock"
#: The run's outcome for scripts (:meth:`RunDir.write_status`).
STATUS_NAME = "status.json"


class RunLockedError(OSError):
    """The run directory is held by another live process (its pid is in the message)."""


class RunLock:
    """An exclusive ``flock`` on ``<dir>/.lock``; see :func:`acquire_run_lock`."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Releases the lock (idempotent). The file stays: removing it would race with a new holder."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


def read_lock_holder(out_dir: str | os.PathLike) -> str | None:
    """The ``"pid N on HOST"`` written by the last holder of ``<out_dir>/.lock`` (held or not)."""
    try:
        text = (Path(out_dir) / LOCK_NAME).read_text().strip()
    except OSError:
        return None
    return text or None


def acquire_run_lock(out_dir: str | os.PathLike) -> RunLock:
    """Takes the exclusive lock of a run directory without waiting.

    The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<out_dir>/.lock``, into which
    the holder's pid and host are written. The kernel releases it when the holder's
    process ends in any way (including SIGKILL), so a stale file never blocks.

    Args:
      out_dir: an existing directory.

    Returns:
      The held :class:`RunLock` (release with ``.release()`` or ``with``).

    Raises:
      RunLockedError: another process holds the lock; the message names its pid.
      OSError: the lock file cannot be created (e.g. the directory is not writable).
    """
    path = Path(out_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = read_lock_holder(out_dir) or "pid unknown"
        raise RunLockedError(f"{out_dir} is in use by another run ({holder}; lock file {path}); wait for it to "
                             "finish or stop that process, or choose another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        raise
    return RunLock(path, fd)


# --------------------------------------------------------------------------- checksums, finiteness
CHECKSUM_ALGORITHM = "sha256"


class ChecksumMismatchError(ValueError):
    """A checkpoint's arrays do not match the checksum saved with them."""


class NonFiniteError(ValueError):
    """Arrays to be written hold NaN or infinite values."""


def _as_numpy(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def arrays_checksum(flat: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over a flat ``{key: array}`` dict, in sorted key order.

    Each entry contributes its key, dtype, shape and C-order bytes, so a renamed,
    re-typed or reshaped array changes the digest as well as changed values.
    """
    h = hashlib.sha256()
    for key in sorted(flat):
        a = np.ascontiguousarray(_as_numpy(flat[key]))
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def check_finite(arrays: Mapping[str, Any], what: str = "arrays") -> None:
    """Raises :class:`NonFiniteError` naming the arrays that hold NaN or infinite values.

    Integer and boolean arrays are skipped; bfloat16 and other float types are checked.
    """
    bad = []
    for key in sorted(arrays):
        a = _as_numpy(arrays[key])
        if a.dtype.kind in "biu" or a.size == 0:
            continue
        finite = np.isfinite(a if a.dtype.kind in "fc" else a.astype(np.float32))
        if not finite.all():
            vals = a[~finite].astype(np.float64) if a.dtype.kind != "c" else np.abs(a[~finite])
            bad.append(f"{key} ({int(np.isnan(vals).sum())} NaN, {int(np.isinf(vals).sum())} inf of {a.size})")
    if bad:
        raise NonFiniteError(f"refusing to write {what}: non-finite values in {len(bad)} of {len(arrays)} "
                             f"arrays: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the training "
                             "diverged (try a lower optim.lr, or resume from an earlier checkpoint)")


# --------------------------------------------------------------------------- atomic directories
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths with ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _recover_directory(dest: Path) -> None:
    """Undoes what a kill during an earlier :func:`atomic_directory` left behind."""
    parent = dest.parent
    olds = sorted(parent.glob(f".{dest.name}.old-*"))
    if not dest.exists() and olds:  # killed between the two renames of the fallback swap
        os.rename(olds.pop(), dest)
    for stale in [*olds, *parent.glob(f".{dest.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike) -> Iterator[Path]:
    """Writes a directory so that ``dest`` is always either the old complete one or the new one.

    Yields a temporary sibling folder (``.<name>.tmp-*``) to write into. When the block
    ends normally its files are fsynced and it is swapped into place with
    ``renameat2(RENAME_EXCHANGE)`` (or, where that is unsupported, two renames with a
    recovery on the next call), and the old contents are removed. When the block raises,
    the temporary folder is removed and ``dest`` is untouched.

    Raises:
      whatever the block raises; OSError when the swap fails.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _recover_directory(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        _fsync_tree(tmp)
        if not dest.exists():
            os.rename(tmp, dest)
        elif _exchange(tmp, dest):
            shutil.rmtree(tmp)  # now the old contents
        else:
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_final(out_dir: str | os.PathLike, arrays: Mapping[str, Any],
                write: Callable[[Path, dict[str, np.ndarray]], None], *, name: str = "final") -> Path:
    """Exports the final result into ``<out_dir>/<name>/`` atomically, refusing non-finite arrays.

    Args:
      out_dir: the run directory.
      arrays: flat ``{key: array}`` (host or device arrays) to export.
      write: ``write(folder, numpy_arrays)`` writes every file of the export into ``folder``
        (a temporary sibling of the final folder).
      name: the folder name.

    Returns:
      The final folder.

    Raises:
      NonFiniteError: an array holds NaN/inf (nothing is written; an older ``final/`` stays).
      whatever ``write`` raises (an older ``final/`` stays as it was).
    """
    host = {k: _as_numpy(v) for k, v in arrays.items()}
    dest = Path(out_dir) / name
    check_finite(host, f"{dest}/")
    with atomic_directory(dest) as tmp:
        write(tmp, host)
    return dest


# --------------------------------------------------------------------------- restore noise
def _is_loop_closed_noise(unraisable) -> bool:
    exc = unraisable.exc_value
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


_noise_filter_installed = False


def _install_loop_closed_filter() -> None:
    """Drops, for the rest of the process, the "Event loop is closed" errors that TensorStore
    callbacks of an aborted Orbax restore raise in their threads after the restore returned."""
    global _noise_filter_installed
    if _noise_filter_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_loop_closed_noise(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    _noise_filter_installed = True


@contextlib.contextmanager
def quiet_restore() -> Iterator[list]:
    """Silences Orbax/TensorStore/asyncio noise while a checkpoint restores.

    A truncated or corrupt checkpoint makes Orbax abandon in-flight TensorStore reads; their
    callbacks then print tracebacks ("Exception ignored in coroutine", "Event loop is closed")
    through ``sys.unraisablehook``, and absl/asyncio log errors and warnings. Inside this block
    those are collected into the yielded list instead of printed; the restore's own exception
    still propagates (and is reported by the caller in one line).
    """
    dropped: list = []
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "orbax", "jax._src.distributed")]
    levels = [lg.level for lg in loggers]
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: dropped.append(f"{type(u.exc_value).__name__}: {u.exc_value}")
    failed = False
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                yield dropped
            except BaseException:
                failed = True
                raise
            finally:
                if failed:  # let abandoned reads finish and collect their coroutines while silenced
                    time.sleep(0.05)
                    gc.collect()
    finally:
        sys.unraisablehook = old_hook
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if failed:
            _install_loop_closed_filter()


def _error_line(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause of an exception (at most 200 characters)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if "See full TensorStore details" in first:
        first = first.split("See full TensorStore details")[0].rstrip(" .") + "."
    return f"{type(e).__name__}: {first[:200]}".rstrip(": ")


def jsonable(x):
    """``x`` with arrays, NumPy scalars and non-finite floats (as None) turned into JSON values."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


#: Orbax item names inside a checkpoint step folder.
STATE_ITEM, CHECKSUM_ITEM = "state", "checksum"
#: The single item of checkpoints written before checksums existed.
LEGACY_ITEM = "default"
#: The key of the checksum item that records the server state's layout (``Algorithm.state_layout``).
LAYOUT_KEY = "state_layout"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, lost permissions); the message is one line."""


class CheckpointLayoutError(ConfigError):
    """A checkpoint whose server-state layout this version's algorithm cannot read."""


class RunDir:
    """One run's output directory.

    Args:
      out_dir: the directory (created when missing).
      cfg: the run's resolved config.
      resume: continue a run found there; without it, an existing run is refused
        (nothing already written is touched).
      log: where messages go.
      primary: False in the processes other than process 0 of a multi-host run: they neither
        lock, check nor write the directory's files, and take part in the checkpoints' saves and
        restores only (Orbax coordinates the processes).

    The directory's lock (:func:`acquire_run_lock`) is taken first, before anything
    is written, and held until :meth:`close` (or ``with``, or the process's end).

    Raises:
      PermissionError / OSError: the directory cannot be created or written.
      RunLockedError: another live process holds the directory (its pid is named).
      ConfigError: resuming where there is no run, or a run already exists and ``resume`` is
        false. Whether a resume may change the config is the driver's rule (``driver.check_resume``).
    """

    def __init__(self, out_dir: str | Path, cfg: TrainConfig, *, resume: bool, log: Callable = print,
                 primary: bool = True):
        self.path = Path(out_dir)
        self.log = log
        self.lock = None
        self.primary = primary
        self.cfg = cfg
        self.max_to_keep = cfg.checkpoint.max_to_keep
        self.manager = None
        if not primary:  # another process of a multi-host run: process 0 holds the lock and writes the files
            self.config_path, self.metrics_path = self.path / "config.yaml", self.path / "metrics.jsonl"
            self.ckpt_path = (self.path / "checkpoints").resolve()
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock = acquire_run_lock(self.path)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):
                pass
        except RunLockedError:
            raise
        except OSError as e:
            if self.lock is not None:
                self.lock.release()
            raise PermissionError(f"output directory {str(self.path)!r} is not writable: {e}") from e
        try:
            self._check_existing(resume)
        except BaseException:
            self.lock.release()
            raise

    def _check_existing(self, resume: bool) -> None:
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.ckpt_path = (self.path / "checkpoints").resolve()
        exists = self.config_path.exists() or self.metrics_path.exists() or self.ckpt_path.exists()
        if exists and not resume:
            raise ConfigError(f"{self.path} already holds a run; pass --resume to continue it or choose another --out")
        if resume and not self.config_path.exists():
            raise ConfigError(f"--resume: {self.path} holds no run (no config.yaml); start it without --resume")

    def saved_config(self) -> dict:
        """The run's saved ``config.yaml`` as a plain dict ({} where there is none)."""
        if not self.config_path.exists():
            return {}
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(self.config_path))

    def close(self) -> None:
        """Releases the directory's lock (idempotent); the process's end releases it too."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def begin(self, *, rewrite_config: bool = False) -> None:
        """Writes the resolved config (a new run, or ``rewrite_config``: a run that finished no round,
        started again with another config) and opens the checkpoint manager.

        Called once the run is known to start, so a run refused at set-up leaves nothing behind.
        """
        if not self.config_path.exists() or rewrite_config:
            self.write_config()
        self.manager = self._open_manager()

    def write_config(self) -> None:
        """Writes the run's resolved config to ``config.yaml`` (process 0 only)."""
        if self.primary:
            save_config(self.cfg, self.config_path)

    def started(self) -> bool:
        """Whether a round of the run has left a trace (a metrics line or a checkpoint step)."""
        if self.metrics_path.exists() and self.metrics_path.stat().st_size > 0:
            return True
        return self.ckpt_path.is_dir() and any(p.name.isdigit() for p in self.ckpt_path.iterdir())

    def unbegin(self) -> None:
        """Undoes :meth:`begin` of a run that ran no round (a start refused once the rounds were
        about to begin, e.g. a federation's node configs): ``config.yaml`` and the empty checkpoint
        folder go, so a corrected start is a new run, not a resume."""
        if not self.primary or self.started():
            return
        self.config_path.unlink(missing_ok=True)
        if self.ckpt_path.is_dir():
            shutil.rmtree(self.ckpt_path, ignore_errors=True)

    def write_status(self, state: str, reason: str, rounds: int) -> None:
        """Writes ``status.json`` ``{"state", "reason", "rounds", "time"}`` atomically: the run's outcome
        for scripts (``state``: ``done``, ``failed``, ``diverged``, ``interrupted``; ``rounds``: rounds
        done and checkpointed)."""
        if not self.primary:
            return
        status = {"state": state, "reason": reason, "rounds": int(rounds),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = self.path / f".{STATUS_NAME}.{os.getpid()}-{threading.get_ident()}.tmp"  # one per writer
        try:
            tmp.write_text(json.dumps(status, indent=1) + "\n")
            os.replace(tmp, self.path / STATUS_NAME)
        except OSError as e:  # a full disk: the exit status still says it
            self.log(f"could not write {self.path / STATUS_NAME}: {e}")

    def _open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.ckpt_path,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           CHECKSUM_ITEM: ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def _set_aside(self, step: int) -> Path:
        """Moves an unreadable checkpoint out of the manager's way (kept for inspection, not deleted)."""
        dest = self.path / "checkpoints_unreadable" / f"{step}-{int(time.time())}"
        dest.parent.mkdir(exist_ok=True)
        os.replace(self.ckpt_path / str(step), dest)
        return dest

    # ---------------------------------------------------------------- checkpoints
    def _restore_step(self, step: int, abstract: dict) -> tuple[dict, dict]:
        """The flat arrays of one checkpoint, checked against its checksum, and its JSON item.

        Raises:
          ChecksumMismatchError: the arrays differ from what was saved.
          Exception: anything Orbax raises for missing, truncated or corrupt files.
        """
        step_dir = self.ckpt_path / str(step)
        if (step_dir / LEGACY_ITEM).is_dir() and not (step_dir / STATE_ITEM).exists():
            # Written before checkpoints carried a checksum: restorable, not verifiable.
            return ocp.StandardCheckpointer().restore(step_dir / LEGACY_ITEM, abstract), {}
        out = self.manager.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(abstract), CHECKSUM_ITEM: ocp.args.JsonRestore()}))
        flat, meta = out[STATE_ITEM], out[CHECKSUM_ITEM]
        want = meta.get(CHECKSUM_ALGORITHM) if isinstance(meta, dict) else None
        if not isinstance(want, str):
            raise ChecksumMismatchError(f"no {CHECKSUM_ALGORITHM} in the checksum item ({meta!r:.80})")
        got = arrays_checksum(flat)
        if got != want:
            raise ChecksumMismatchError(f"{CHECKSUM_ALGORITHM} of the arrays is {got[:12]}..., "
                                        f"saved {want[:12]}...")
        return flat, meta

    def _unreadable(self, step: int, e: BaseException) -> None:
        what = "does not match its checksum" if isinstance(e, ChecksumMismatchError) else "is unreadable"
        dest = self._set_aside(step)
        self.log(f"checkpoint of round {step} in {self.ckpt_path} {what} ({_error_line(e)}); "
                 f"moved to {dest}; trying the previous one")

    def restore(self, template, *, layout: str | None = None,
                migrate: Callable[[str, dict], dict] | None = None) -> tuple[Any, int]:
        """Newest complete checkpoint that restores and matches its checksum, else ``(None, 0)``.

        Args:
          template: a server state of the expected tree (its arrays' shapes and dtypes are read).
          layout: the algorithm's ``state_layout``. A checkpoint records the layout it was written
            with (those written before layouts were recorded are ``algorithms.LEGACY_LAYOUT``);
            when it differs, ``migrate(old_layout, flat) -> flat`` reads its arrays.
          migrate: the algorithm's ``migrate_state``.

        Returns:
          ``(state, rounds_done)``. A checkpoint that fails to restore or whose arrays do not
          match its checksum is moved into ``checkpoints_unreadable/`` with one log line,
          and the previous one is tried. Orbax/TensorStore noise is kept off stderr.

        Raises:
          CheckpointLayoutError: the newest good checkpoint's layout cannot be read by this version (both
            layouts are named); the checkpoint is left where it is.
        """
        several = jax.process_count() > 1  # restore straight into the template's (global) layout
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            np.shape(x), x.dtype, sharding=getattr(x, "sharding", None) if several else None), _flatten(template))
        result = (None, 0)
        bad = False
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with quiet_restore():
                    flat, meta = self._restore_step(step, abstract)
            except Exception as e:  # corrupt, partial or tampered files
                self._unreadable(step, e)
                bad = True
                continue
            old = meta.get(LAYOUT_KEY, LEGACY_LAYOUT) if isinstance(meta, dict) else LEGACY_LAYOUT
            if layout is not None and old != layout:
                try:
                    if migrate is None:
                        raise ValueError("the algorithm reads no other layout")
                    flat = migrate(old, flat)
                except ValueError as e:
                    raise CheckpointLayoutError(f"checkpoint of round {step} in {self.ckpt_path} holds server-state "
                                      f"layout {old!r}, which this algorithm's layout {layout!r} cannot read "
                                      f"({e}); resume it with the version that wrote it") from None
                self.log(f"checkpoint of round {step}: server state read from layout {old!r} as {layout!r}")
            try:
                result = (_unflatten(template, flat), int(step))
                break
            except Exception as e:  # arrays that do not fit the state's tree
                self._unreadable(step, e)
                bad = True
        if bad:
            self.manager = self._open_manager()
        return result

    def save(self, rounds_done: int, state, *, layout: str | None = None) -> None:
        """Checkpoints the state after ``rounds_done`` rounds, with the checksum of its arrays and
        (``layout``: the algorithm's ``state_layout``) the layout of its tree."""
        flat = _flatten(state)
        meta = {CHECKSUM_ALGORITHM: arrays_checksum(flat), "arrays": len(flat)}
        if layout is not None:
            meta[LAYOUT_KEY] = layout
        try:
            self.manager.save(rounds_done, args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardSave(flat), CHECKSUM_ITEM: ocp.args.JsonSave(meta)}), force=True)
            self.manager.wait_until_finished()
        except Exception as e:
            cause = e
            while cause.__cause__ is not None and not isinstance(cause, OSError):
                cause = cause.__cause__
            if not isinstance(cause, OSError):
                raise
            raise CheckpointWriteError(cause.errno, f"cannot write the checkpoint of round {rounds_done} to "
                                       f"{self.ckpt_path}: {cause.strerror or cause}") from None

    # ---------------------------------------------------------------- metrics
    def read_metrics_lines(self) -> tuple[list[dict], list[int]]:
        """``(rows, bad)``: the readable rows of ``metrics.jsonl`` in file order, and the 1-based
        numbers of its lines that are not a JSON object with an integer ``round`` (torn by a kill,
        damaged bytes, not UTF-8)."""
        if not self.metrics_path.exists():
            return [], []
        rows, bad = [], []
        for i, raw in enumerate(self.metrics_path.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                row = None
            if isinstance(row, dict) and isinstance(row.get("round"), int) and not isinstance(row["round"], bool):
                rows.append(row)
            else:
                bad.append(i)
        return rows, bad

    def read_metrics(self) -> list[dict]:
        """The readable rows of ``metrics.jsonl`` (see :meth:`read_metrics_lines`)."""
        return self.read_metrics_lines()[0]

    def truncate_metrics(self, rounds_done: int) -> None:
        """Keeps the readable metrics of rounds ``< rounds_done`` only (atomic rewrite).

        The run's checkpoint decides (``rounds_done``): a readable row of an earlier round is kept
        wherever it stands in the file, rows of later rounds are dropped (they run again). Lines
        that cannot be read are reported with their line numbers, and the file as it was is kept
        beside the repaired one as ``metrics.jsonl.damaged-<time>`` (nothing is deleted).
        """
        if not self.primary or not self.metrics_path.exists():
            return
        rows, bad = self.read_metrics_lines()
        if bad:
            kept = self.path / f"{self.metrics_path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.copy2(self.metrics_path, kept)
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            self.log(f"{self.metrics_path}: {len(bad)} unreadable line(s) (line {shown}) left out; the file as it "
                     f"was is kept as {kept}")
        rows = [r for r in rows if r["round"] < rounds_done]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)

    def append_metrics(self, record: dict) -> None:
        if not self.primary:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())
