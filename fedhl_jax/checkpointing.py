"""Run directory: resolved config, metrics.jsonl and Orbax checkpoints.

Crash safety: a round's metrics line is appended (and fsynced) before its
checkpoint is written, and Orbax finalises a checkpoint by an atomic rename, so
after a kill at any moment the newest *complete* checkpoint is a consistent
point. On resume, metrics of rounds after that checkpoint are dropped (the file
is rewritten atomically) and those rounds run again, so each round appears once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from fedhl_jax.config import ConfigError, TrainConfig, config_diff, save_config, to_dict


def _flatten(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _unflatten(template, flat: dict[str, Any]):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


class RunDir:
    """One run's output directory.

    Args:
      out_dir: the directory (created when missing).
      cfg: the run's resolved config.
      resume: continue a run found there; without it, an existing run is refused
        (nothing already written is touched).
      log: where messages go.

    Raises:
      PermissionError / OSError: the directory cannot be created or written.
      ConfigError: resuming with a different config (the differences are listed),
        or a run already exists and ``resume`` is false.
    """

    def __init__(self, out_dir: str | Path, cfg: TrainConfig, *, resume: bool, log: Callable = print):
        self.path = Path(out_dir)
        self.log = log
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-"):
                pass
        except OSError as e:
            raise PermissionError(f"output directory {str(self.path)!r} is not writable: {e}") from e
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.ckpt_path = (self.path / "checkpoints").resolve()
        exists = self.config_path.exists() or self.metrics_path.exists() or self.ckpt_path.exists()
        if exists and not resume:
            raise ConfigError(f"{self.path} already holds a run; pass --resume to continue it or choose another --out")
        if resume and self.config_path.exists():
            from omegaconf import OmegaConf

            old = OmegaConf.to_container(OmegaConf.load(self.config_path))
            diff = config_diff(old, to_dict(cfg))
            if diff:
                raise ConfigError("cannot resume with a different config; differences (saved -> given):\n  "
                                  + "\n  ".join(diff))
        self.cfg = cfg
        self.max_to_keep = cfg.checkpoint.max_to_keep
        self.manager = None

    def begin(self) -> None:
        """Writes the resolved config (new runs) and opens the checkpoint manager.

        Called once the run is known to start, so a run refused at set-up leaves nothing behind.
        """
        if not self.config_path.exists():
            save_config(self.cfg, self.config_path)
        self.manager = self._open_manager()

    def _open_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.ckpt_path,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def _set_aside(self, step: int) -> Path:
        """Moves an unreadable checkpoint out of the manager's way (kept for inspection, not deleted)."""
        dest = self.path / "checkpoints_unreadable" / f"{step}-{int(time.time())}"
        dest.parent.mkdir(exist_ok=True)
        os.replace(self.ckpt_path / str(step), dest)
        return dest

    # ---------------------------------------------------------------- checkpoints
    def restore(self, template) -> tuple[Any, int]:
        """Newest complete checkpoint that restores, else ``(None, 0)``.

        Returns:
          ``(state, rounds_done)``. A checkpoint that fails to restore is reported
          and the previous one is tried.
        """
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), _flatten(template))
        result = (None, 0)
        bad = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                flat = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
                result = (_unflatten(template, flat), int(step))
                break
            except Exception as e:  # corrupt or partial files
                first = str(e).splitlines()[0][:200] if str(e) else ""
                self.log(f"checkpoint of round {step} in {self.ckpt_path} is unreadable "
                         f"({type(e).__name__}: {first}); trying the previous one")
                bad.append(step)
        if bad:
            for step in bad:
                dest = self._set_aside(step)
                warnings.warn(f"unreadable checkpoint of round {step} moved to {dest}", RuntimeWarning, stacklevel=2)
                self.log(f"moved the unreadable checkpoint of round {step} to {dest}")
            self.manager = self._open_manager()
        return result

    def save(self, rounds_done: int, state) -> None:
        """Checkpoints the state after ``rounds_done`` rounds."""
        self.manager.save(rounds_done, args=ocp.args.StandardSave(_flatten(state)), force=True)
        self.manager.wait_until_finished()

    # ---------------------------------------------------------------- metrics
    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a kill
        return rows

    def truncate_metrics(self, rounds_done: int) -> None:
        """Keeps the metrics of rounds ``< rounds_done`` only (atomic rewrite)."""
        rows = [r for r in self.read_metrics() if r.get("round", -1) < rounds_done]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metrics_path)

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())
