"""The run driver: one run, from a validated config to its exported result.

The driver owns everything around a round: the run directory and its lock
(``rundir.RunDir``), the resume rule (:func:`check_resume`), restore and placement of the
server state, the zero-shot evaluation, the evaluation / checkpoint / watchdog cadence, Ctrl-C,
the end summary and the export of ``final/``. The rounds themselves come from a
:class:`RoundExecutor`: the in-process jitted engine (``simulation.Simulation``) or a Flower
federation (``flower.server_app.FederationExecutor``). ``bin/train.py`` (``cli``), the Flower
``ServerApp`` and the results suites are its users.

Guarantees (docs/engine.md, "Guarantees"): the run directory is locked before anything is written;
a refused start leaves nothing behind; the export's checks run before the first round; checkpoints
are verified on restore; ``final/`` is replaced atomically and never holds non-finite values; a
diverging run (an untrained last round, a non-finite loss) stops with exit status 3 keeping its last
good checkpoint; Ctrl-C stops after the current round, saved, with exit status 130, a second one at
once; a failed write is one line with exit status 1; each call's outcome is in ``status.json``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from fedhl_jax.config import ConfigError, TrainConfig, config_diff, to_dict

if TYPE_CHECKING:
    from fedhl_jax.engine import RoundRecord

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: ``status.json``'s ``state`` for each exit status.
STATES = {EXIT_OK: "done", EXIT_FAILED: "failed", EXIT_BAD_INPUT: "failed", EXIT_DIVERGED: "diverged",
          EXIT_INTERRUPTED: "interrupted"}
ZERO_SHOT_FILE = "zero_shot.json"


class RunStopped(Exception):
    """The run stops early (divergence, Ctrl-C); ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class RoundExecutor(Protocol):
    """What the driver needs from whatever runs the rounds.

    Attributes:
      cfg: the run's config.
      model_source: ``model.hub.ModelSource`` of the base model (``kind == "random"``: no files).
      data: the federated dataset (``partition.txt`` is written from it), or None where the
        data lives elsewhere (a Flower server: on the nodes).
      evaluator: held-out evaluation of the global model, or None (no zero-shot then).
      ranks: ``[num_clients]`` each client's rank, or None where unknown before the rounds.
      algorithm: the ``algorithms.Algorithm``; its ``state_layout`` is recorded in each checkpoint
        and its ``migrate_state`` reads checkpoints of another layout.
    """

    cfg: TrainConfig
    algorithm: Any
    model_source: Any
    data: Any
    evaluator: Any
    ranks: Any

    def init_state(self) -> Any:
        """The server state before round 0."""

    def place_state(self, state) -> Any:
        """A restored server state laid out where the round expects it."""

    def host_state(self, state) -> Any:
        """The state for work each process does alone (evaluation, export)."""

    def start(self, first_round: int) -> None:
        """Prepares the rounds ``first_round ..`` of this call (a federation finds its nodes)."""

    def run_round(self, state, t: int) -> RoundRecord:
        """Round ``t`` (0-based) from ``state``; the record holds the new state and its metrics."""

    def evaluate(self, state, t: int = 0, *, generate: bool | None = None) -> dict:
        """Held-out metrics after round ``t`` ({} without held-out data)."""

    def global_delta(self, state) -> dict:
        """``{module: [d_out, d_in]}`` the global model's dense update."""


def drive_rounds(executor: RoundExecutor, state, rounds: Iterable[int], callbacks: Sequence[Callable] = ()):
    """Runs ``rounds`` one ``executor.run_round`` at a time; returns the final state.

    After each round every callback is called in order with its ``RoundRecord``; a callback may
    add entries to ``record.metrics`` for the ones after it, and stops the run by raising.
    """
    for t in rounds:
        record = executor.run_round(state, t)
        state = record.state
        for callback in callbacks:
            callback(record)
    return state


# --------------------------------------------------------------------------- the resume rule
def check_resume(saved: dict, given: dict) -> int | None:
    """The one resume rule: only ``fed.rounds`` may change, and only upwards (the device ``mesh``
    may change too: it moves arrays, not the numbers).

    Args:
      saved: the run's saved config (``config.yaml`` as a dict).
      given: this call's config as a dict (``config.to_dict``), or only the keys its overrides
        name (checked before the overrides are merged and validated).

    Returns:
      The saved ``fed.rounds`` when ``given`` raises it, else None.

    Raises:
      ConfigError: a difference in a key of ``given`` (all are listed, saved -> given), or fewer rounds.
    """
    def restrict(old, new):  # the saved values of the keys that ``given`` holds
        return {k: restrict(old.get(k) if isinstance(old.get(k), dict) else {}, v) if isinstance(v, dict)
                else old.get(k, "<missing>") for k, v in new.items()}

    given = {k: v for k, v in given.items() if k != "mesh"}
    old = restrict(saved, given)
    diff = [d for d in config_diff(old, given) if not d.startswith("fed.rounds:")]
    if diff:
        raise ConfigError("cannot resume with a different config (only fed.rounds may be raised); "
                          "differences (saved -> given):\n  " + "\n  ".join(diff))
    old_rounds, rounds = saved.get("fed", {}).get("rounds"), given.get("fed", {}).get("rounds", "<missing>")
    if rounds == "<missing>" or rounds == old_rounds:
        return None
    if isinstance(old_rounds, int) and isinstance(rounds, int) and rounds < old_rounds:
        raise ConfigError(f"cannot resume with fed.rounds={rounds}: the run was started for "
                          f"{old_rounds} rounds, and fed.rounds may only be raised")
    return old_rounds


# --------------------------------------------------------------------------- round callbacks
class Progress:
    """Round callback: a progress bar (or one log line per round)."""

    def __init__(self, total: int, start: int, bar: bool, log):
        self.total, self.log, self.bar = total, log, None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="round", dynamic_ncols=True)

    def __call__(self, record) -> None:
        m = record.metrics
        summary = {"loss": f"{m['train_loss']:.3f}"}
        if "eval_loss" in m:
            summary["eval"] = f"{m['eval_loss']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix(summary)
            self.bar.update(1)
        else:
            self.log(f"round {record.t + 1}/{self.total} " + " ".join(f"{k}={v}" for k, v in summary.items())
                     + f" ({m['seconds']:.1f} s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Watchdog:
    """Round callback: makes divergence loud.

    A round that keeps no client update (all excluded as non-finite or overflowing) leaves the
    server state unchanged and says so; ``patience`` such rounds in a row, the run's last round
    (``total``) keeping none, a non-finite loss of the kept clients, or a non-finite held-out
    loss at any evaluation stop the run (``RunStopped``, exit status 3) before that round is
    checkpointed. Clients listed in ``metrics["missing"]`` (a federation's
    nodes that did not answer) are reported by the executor, not here.
    """

    def __init__(self, patience: int, log, total: int | None = None):
        self.patience, self.log, self.failed, self.total = patience, log, 0, total

    def __call__(self, record) -> str | None:
        m = record.metrics
        if m.get("short_round"):  # a federation's round below quorum: reported by its executor
            return None
        if not m["applied"]:
            self.failed += 1
            self.log(f"round {record.t + 1}: every client update was excluded ({m['excluded']} non-finite or "
                     f"overflowing); the server state is unchanged")
        else:
            self.failed = 0
            missing = set(m.get("missing", ()))
            bad = [int(c) for c, ok in zip(record.ids, np.asarray(record.info["valid"]))
                   if not ok and int(c) not in missing]
            if bad:
                self.log(f"round {record.t + 1}: clients {bad} sent non-finite or overflowing updates and were "
                         f"excluded; the weights of the others sum to 1")
        if self.failed >= self.patience:
            return (f"no client update was usable in {self.failed} rounds in a row (round {record.t + 1}); "
                    f"training diverged: lower optim.lr or set optim.grad_clip")
        if not m["applied"] and record.t + 1 == self.total:
            return (f"the last round (round {record.t + 1}) kept no client update, so the result would not be "
                    f"trained; training diverged: lower optim.lr or set optim.grad_clip")
        for key in ("train_loss", "eval_loss"):
            if key in m and m[key] is not None and (m["applied"] or key == "eval_loss") and not math.isfinite(m[key]):
                return f"{key} became {m[key]} in round {record.t + 1}; training diverged: lower optim.lr"
        return None


class HardStop:
    """A second Ctrl-C that stops at once, even while a round's compiled step holds the main thread.

    Python runs signal handlers in the main thread between bytecodes only, so a handler cannot stop
    a long device call (and two quick SIGINTs reach it as one). While armed, each signal's wake-up
    byte goes to a pipe that a daemon thread reads: the second SIGINT calls ``on_stop`` (the status)
    and ends the process with ``os._exit(130)``; the first one is the handler's (stop after the round).
    Checkpoints are finalised by an atomic rename, so the last completed one is intact; a metrics line
    torn by the stop is reported on resume.

    ``disarm`` waits for the thread to end. A daemon thread still running when the interpreter shuts
    down may drop the last reference to JAX arrays there; their destructor then needs the GIL the
    shutdown holds, and the thread's forced exit crashed the process (SIGSEGV instead of status 130,
    in 6 of 80 runs stopped by a Ctrl-C).
    """

    def __init__(self, on_stop: Callable[[], None]):
        self.on_stop, self.fds, self.previous, self.thread = on_stop, None, None, None

    def arm(self) -> None:
        """Called in the main thread, before the rounds."""
        if self.fds is not None:
            return
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self.previous = signal.set_wakeup_fd(w)
        except ValueError:  # not the main thread
            os.close(r), os.close(w)
            return
        self.fds = (r, w)
        self.thread = threading.Thread(target=self._wait, args=(r,), daemon=True, name="fedhl-hard-stop")
        self.thread.start()

    def _wait(self, r: int) -> None:
        seen = 0
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:  # disarmed
                os.close(r)
                return
            seen += data.count(int(signal.SIGINT))
            if seen >= 2:
                print("\nsecond Ctrl-C: stopping now (the last completed checkpoint is kept)", file=sys.stderr,
                      flush=True)
                try:
                    self.on_stop()
                finally:
                    os._exit(EXIT_INTERRUPTED)

    def disarm(self) -> None:
        if self.fds is None:
            return
        signal.set_wakeup_fd(self.previous if self.previous is not None else -1)
        w = self.fds[1]
        self.fds = None
        os.close(w)  # the thread's read returns b"" and it closes its end
        thread, self.thread = self.thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)  # it ends at once; never past the interpreter's shutdown


# --------------------------------------------------------------------------- files of a run
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def base_model(executor: RoundExecutor) -> str | None:
    """The base model's path (recorded in the PEFT adapter), None for a random-init model."""
    return None if executor.model_source.kind == "random" else executor.model_source.path


def export_final(executor: RoundExecutor, state, out: Path, log) -> Path:
    """Writes ``final/``: the dense global adapter and a PEFT adapter truncated to ``export_rank``
    (default r_max), atomically, refusing non-finite values (``rundir.write_final``)."""
    import jax
    from safetensors.numpy import save_file

    from fedhl_jax import model as M
    from fedhl_jax.rundir import write_final

    cfg = executor.cfg
    rank = cfg.export_rank or cfg.fed.r_max
    base = base_model(executor)

    def write(folder: Path, delta: dict) -> None:
        save_file({k: np.asarray(v, np.float32) for k, v in delta.items()}, str(folder / "global_adapter.safetensors"))
        if cfg.model.kind != "nnx":  # a PEFT adapter names Llama modules; an NNX model keeps the dense one
            M.export_peft(folder / "peft_adapter", delta, rank, cfg.model.alpha, base, rslora=cfg.model.rslora)

    final = write_final(out, jax.device_get(executor.global_delta(executor.host_state(state))), write)
    log(f"exported the global adapter to {final}/ (dense" + (")" if cfg.model.kind == "nnx" else f", and PEFT rank {rank})"))
    return final


def check_export(executor: RoundExecutor) -> None:
    """Every check :func:`export_final` makes that does not depend on the trained values, run before
    the first round: the export rank against the LoRA modules' shapes, and a dry export of
    zero updates (module names, rank, ``model.alpha``) into a temporary folder.

    Raises:
      ConfigError: naming ``export_rank`` (or ``fed.r_max``) and the largest rank that fits, or
        what ``model.export_peft`` refuses.
    """
    import tempfile

    from fedhl_jax import model as M

    cfg = executor.cfg
    rank = cfg.export_rank or cfg.fed.r_max
    key = "export_rank" if cfg.export_rank else "fed.r_max (the export rank when export_rank is unset)"
    shapes = getattr(executor, "shapes", None)
    if shapes is None:
        import jax

        shapes = jax.eval_shape(lambda: executor.global_delta(executor.host_state(executor.init_state())))
    shapes = {name: tuple(getattr(s, "shape", s)) for name, s in shapes.items()}
    if not shapes:
        raise ConfigError("the model has no LoRA module to export; check model.targets")
    largest = min(min(s) for s in shapes.values())
    if rank > largest:
        raise ConfigError(f"{key}={rank} exceeds the largest rank the LoRA modules allow ({largest}: their "
                          f"smallest dimension); set export_rank to at most {largest}")
    if cfg.model.kind == "nnx":  # no PEFT adapter to check (export_final)
        return
    try:
        with tempfile.TemporaryDirectory(prefix="fedhl-export-check-") as tmp:
            M.export_peft(Path(tmp) / "peft", {name: np.zeros((rank, rank), np.float32) for name in shapes},
                          rank, cfg.model.alpha, base_model(executor), rslora=cfg.model.rslora)
    except ValueError as e:
        raise ConfigError(f"the export would fail: {e}") from None


def zero_shot(executor: RoundExecutor, state, path: Path, log) -> dict:
    """Evaluates the starting global model (generation included) into ``zero_shot.json``, once per run."""
    out = path / ZERO_SHOT_FILE
    if (res := _read_json(out)) is not None:
        return res
    log("zero-shot: evaluating the starting model (eval.zero_shot)")
    t0 = time.perf_counter()
    from fedhl_jax.rundir import jsonable

    res = jsonable(executor.evaluate(state, 0, generate=True))
    res["eval_seconds"] = time.perf_counter() - t0
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)
    shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in res.items() if k.startswith("eval_") and isinstance(v, float)
                      and k != "eval_ppl" and not k.startswith("eval_loss_rank"))
    log(f"zero-shot: {shown} ({res['eval_seconds']:.0f} s)")
    return res


def write_partition(executor: RoundExecutor, path: Path, log) -> None:
    """The partition summary (``partition.txt``, ``partition.png``) of a run, also logged."""
    cfg, data = executor.cfg, executor.data
    table = data.summary().format()
    (path / "partition.txt").write_text(table + "\n")
    try:
        from fedhl_jax.data.partition import plot_partition_summary

        plot_partition_summary(data.partitions, data.labels, path / "partition.png",
                               ranks=tuple(int(r) for r in executor.ranks),
                               title=f"{cfg.data.dataset} / {cfg.data.partition}")
    except Exception as e:  # a plot is a convenience; never fail a run on it
        log(f"could not plot the partition: {e}")
    lines = table.splitlines()
    log(f"partition ({cfg.data.partition}), also in {path / 'partition.txt'}:\n"
        + "\n".join(lines[:12]) + ("\n..." if len(lines) > 12 else ""))


def summary(executor: RoundExecutor, run, last: dict, rounds: int, seconds: float, final: Path) -> str:
    """The end of a run: what ran, the final held-out losses, and how to use the result."""
    cfg = executor.cfg
    lines = [f"done: {cfg.fed.algorithm}, {cfg.fed.rounds} rounds"
             + (f" ({rounds} in this call, {seconds:.1f} s, {seconds / rounds:.1f} s/round)" if rounds else "")]
    zs = _read_json(run.path / ZERO_SHOT_FILE)
    for key, name in (("eval_exact_match", "exact match"), ("eval_rouge_l", "ROUGE-L")):
        if key in last:
            lines.append(f"{name} on {last.get('eval_generated', '?')} held-out prompts: {last[key]:.4f}"
                         + (f" (zero-shot {zs[key]:.4f})" if zs and key in zs else ""))
    if "eval_loss" in last:
        per_rank = {k[len("eval_loss_rank"):]: v for k, v in last.items() if k.startswith("eval_loss_rank")}
        lines.append(f"held-out loss {last['eval_loss']:.4f}" + (" (truncated to rank " + ", ".join(
            f"{r}: {v:.4f}" for r, v in sorted(per_rank.items(), key=lambda kv: int(kv[0]))) + ")" if per_rank else ""))
    base = base_model(executor)
    rank = cfg.export_rank or cfg.fed.r_max
    nnx = cfg.model.kind == "nnx"
    lines += [f"metrics: {run.metrics_path}", f"result:  {final}/global_adapter.safetensors (dense update per module)"
              + ("" if nnx else f", {final}/peft_adapter/ (PEFT LoRA, rank {rank})")]
    if nnx:
        lines += [f"use it: bridge = nnx_bridge.from_factory({cfg.model.factory!r}, ...); "
                  "bridge.bind(bridge.merge_delta(bridge.base, delta)) is the fine-tuned module (docs/nnx.md)"]
    elif base is not None:
        lines += ["use it:",
                  "  from fedhl_jax import model as M; from safetensors.numpy import load_file",
                  f"  cfg, params = M.load_pretrained({base!r})",
                  f"  delta = load_file({str(final / 'global_adapter.safetensors')!r})",
                  "  params = M.merge_delta(params, delta)  # the fine-tuned model, for M.forward / M.generate",
                  f"  # a merged Hugging Face model: M.export_merged('merged', cfg, M.load_pretrained({base!r})[1], "
                  f"delta, hf_config_source={base!r})",
                  f"  # or with transformers + peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                  f"{base!r}), {str(final / 'peft_adapter')!r})"]
    return "\n".join(lines)


def _remove_if_empty(out: Path, created: bool) -> None:
    """A start refused at set-up leaves no run directory behind (only the one it created, if empty)."""
    if created and out.is_dir() and set(os.listdir(out)) <= {".lock"}:
        shutil.rmtree(out, ignore_errors=True)


# --------------------------------------------------------------------------- a run
def run(cfg: TrainConfig, out: Path, build: Callable[[], RoundExecutor], *, resume: bool, log: Callable = print,
        primary: bool = True, progress: bool = False, resume_hint: str | None = None,
        export_only: bool = False) -> int:
    """Runs (or resumes) one run into ``out`` and returns its exit status.

    Args:
      cfg: the run's validated config.
      out: the run directory (created when missing).
      build: makes the executor; called once the directory is locked and the resume is allowed,
        so a start refused at set-up (bad data or model path, ...) leaves nothing behind.
      resume: continue the run found in ``out`` (only ``fed.rounds`` may be raised: :func:`check_resume`).
        A run that has not finished a round (no metrics line, no checkpoint) is started afresh
        with ``cfg`` instead.
      log: where messages go.
      primary: False in the processes other than process 0 of a multi-host run (they neither log
        nor write the run's files; checkpoints: every process).
      progress: a progress bar instead of one log line per round.
      resume_hint: the command that continues an interrupted run (in the Ctrl-C message).
      export_only: write ``final/`` from the newest checkpoint of the run in ``out`` and train
        nothing (``cfg`` is the run's config with its export settings changed, if at all).

    Returns:
      0, ``EXIT_FAILED`` (1: a checkpoint or metrics line could not be written, e.g. a full disk),
      ``EXIT_BAD_INPUT`` (2: refused before any round, the message on stderr), ``EXIT_DIVERGED``
      (3) or ``EXIT_INTERRUPTED`` (130). The outcome is also written to ``out/status.json``
      (:meth:`rundir.RunDir.write_status`), except where a refused start removed ``out`` and
      by ``export_only`` (which leaves the run's outcome as it was).
    """
    from fedhl_jax.rundir import CheckpointLayoutError, RunDir

    out = Path(out)
    created = not out.exists()
    rundir = None
    restart = False
    try:
        rundir = RunDir(out, cfg, resume=resume or export_only, log=log, primary=primary)  # the lock comes first
        restart = resume and primary and not export_only and not rundir.started()
        extended_from = (check_resume(rundir.saved_config(), to_dict(cfg)) if resume and primary
                         and not restart and not export_only else None)
        executor = build()
        check_export(executor)
    except (ConfigError, OSError, ValueError) as e:  # OSError: files, permissions, network, the lock
        print(f"error: {e}", file=sys.stderr)
        if rundir is not None:
            if rundir.lock is not None and not export_only and not (created and set(os.listdir(out)) <= {".lock"}):
                rundir.write_status("failed", str(e).splitlines()[0], 0)  # a directory that stays
            rundir.close()
        if primary:
            _remove_if_empty(out, created)
        return EXIT_BAD_INPUT
    hint = resume_hint or f"fedhl-train --out {out} --resume"
    with rundir:
        driver = Driver(executor, rundir, log=log, progress=progress, resume_hint=hint)
        try:
            if export_only:
                code = driver.export_saved()
            else:
                code = driver.train(resume=resume and not restart, extended_from=extended_from, restart=restart)
        except CheckpointLayoutError as e:  # a checkpoint this version cannot read: left as it is
            print(f"error: {e}", file=sys.stderr)
            driver.reason, code = str(e).splitlines()[0], EXIT_BAD_INPUT
        except OSError as e:  # a file around the rounds (config, partition, zero-shot) on a full disk
            driver.reason, code = (str(e) or type(e).__name__).splitlines()[0], EXIT_FAILED
            print(f"error: {driver.reason}", file=sys.stderr)
        except BaseException as e:  # a crash still leaves its outcome
            if not export_only:
                state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                rundir.write_status(state, f"{type(e).__name__}: {e}".splitlines()[0][:300], driver.saved)
            raise
        if not export_only:  # an export leaves the run's outcome as it was
            rundir.write_status(STATES.get(code, "failed"), driver.reason, driver.saved)
        return code


class Driver:
    """One call of a run on an open, locked ``RunDir`` (see :func:`run`)."""

    def __init__(self, executor: RoundExecutor, run, *, log: Callable, progress: bool, resume_hint: str):
        self.executor, self.run, self.log, self.progress, self.resume_hint = executor, run, log, progress, resume_hint
        self.cfg = executor.cfg
        self.reason, self.saved = "", 0  # for status.json: why the call ended, rounds checkpointed

    def export_saved(self) -> int:
        """``--export-only``: ``final/`` from the newest good checkpoint, no round run; the exit status."""
        from fedhl_jax.rundir import NonFiniteError

        ex, run = self.executor, self.run
        run.begin()  # the run's config.yaml exists: this only opens its checkpoints
        restored, rounds = self.restore_newest(ex.init_state())
        if restored is None:
            self.reason = f"{run.path} holds no checkpoint to export (no round was saved)"
            print(f"error: {self.reason}", file=sys.stderr)
            return EXIT_BAD_INPUT
        self.saved = rounds
        if rounds < self.cfg.fed.rounds:
            self.log(f"the run stopped after round {rounds} of {self.cfg.fed.rounds}; exporting that state")
        try:
            final = export_final(ex, ex.place_state(restored), run.path, self.log)
        except NonFiniteError as e:
            self.reason = f"nothing exported: {e}"
            print(f"error: {self.reason}", file=sys.stderr)
            return EXIT_DIVERGED
        self.log(f"exported the checkpoint of round {rounds} to {final}/ (no round run)")
        return EXIT_OK

    def restore_newest(self, template):
        """``run.restore`` with the algorithm's state layout: ``(state or None, rounds done)``."""
        alg = self.executor.algorithm
        return self.run.restore(template, layout=alg.state_layout, migrate=alg.migrate_state)

    def restore(self, resume: bool, extended_from: int | None):
        """``(state, rounds done)``: the newest good checkpoint on resume, else the initial state."""
        ex, run, log = self.executor, self.run, self.log
        state, start = ex.init_state(), 0
        if resume:
            restored, start = self.restore_newest(state)
            if restored is not None:
                state = ex.place_state(restored)
                log(f"resuming after round {start} from {run.ckpt_path}")
            run.truncate_metrics(start)
            if extended_from is not None:
                log(f"fed.rounds raised from {extended_from} to {self.cfg.fed.rounds}")
        return state, start

    def train(self, *, resume: bool, extended_from: int | None = None, restart: bool = False) -> int:
        """Runs the remaining rounds with their callbacks and exports ``final/``; returns the exit status.

        Args:
          resume: restore the newest good checkpoint first (and drop the metrics after it).
          extended_from: the saved ``fed.rounds`` when this call raises it (``check_resume``).
          restart: the directory holds a run that finished no round; its config is replaced.
        """
        ex, run, log, cfg = self.executor, self.run, self.log, self.cfg
        run.begin(rewrite_config=restart)
        if restart:  # a zero-shot result of the config replaced is not this run's
            (run.path / ZERO_SHOT_FILE).unlink(missing_ok=True)
        state, start = self.restore(resume, extended_from)  # a refused checkpoint rewrites nothing
        self.saved = start
        if extended_from is not None:
            run.write_config()
        if run.primary and ex.data is not None:
            write_partition(ex, run.path, log)
        total = cfg.fed.rounds
        if start >= total:
            log(f"the run already finished {total} rounds")
        if cfg.eval.zero_shot and start == 0 and ex.evaluator is not None:
            zs = zero_shot(ex, state, run.path, log)
            if "eval_loss" in zs and not (isinstance(zs["eval_loss"], float) and math.isfinite(zs["eval_loss"])):
                self.reason = ("the starting model's held-out loss is not finite (zero_shot.json: "
                               f"eval_loss={zs['eval_loss']}); check the base model's weights")
                print(f"stopping: {self.reason}; nothing trained or exported", file=sys.stderr, flush=True)
                return EXIT_DIVERGED

        interrupted = []
        watchdog = Watchdog(cfg.fed.stop_after_failed_rounds, log, total)
        saved = {"round": start}

        def evaluate(record):
            if (record.t + 1) % cfg.eval.every == 0 or record.t + 1 == total:
                t0 = time.perf_counter()
                record.metrics.update(ex.evaluate(record.state, record.t))
                record.metrics["eval_seconds"] = time.perf_counter() - t0

        def save(record):
            problem = watchdog(record)
            run.append_metrics(record.metrics)
            if problem is not None:  # this round's state is not checkpointed
                raise RunStopped(f"stopping: {problem}; the last good checkpoint (round {saved['round']}) is kept in "
                                 f"{run.ckpt_path}", EXIT_DIVERGED)
            if (record.t + 1) % cfg.checkpoint.every == 0 or record.t + 1 == total or interrupted:
                run.save(record.t + 1, record.state, layout=ex.algorithm.state_layout)
                saved["round"] = self.saved = record.t + 1
            if interrupted:
                raise RunStopped(f"interrupted: stopped after round {record.t + 1}, saved; continue with "
                                 f"{self.resume_hint}", EXIT_INTERRUPTED)

        def on_sigint(signum, frame):
            if interrupted:  # a second Ctrl-C: the armed hard stop ends the process (its thread)
                if hard_stop.fds is not None:
                    return
                raise KeyboardInterrupt
            interrupted.append(True)
            log("\nCtrl-C: stopping after this round (saved); press Ctrl-C again to stop at once")

        if start < total:
            try:
                ex.start(start)
            except ConfigError as e:  # e.g. a federation's node configs: nothing ran, nothing blocks a fixed rerun
                print(f"error: {e}", file=sys.stderr)
                self.reason = str(e).splitlines()[0]
                run.unbegin()
                return EXIT_BAD_INPUT
            log(f"round {start + 1}/{total}: compiling the round step (the first round of a run takes longer)")
        main_thread = threading.current_thread() is threading.main_thread()  # signals: the main thread only
        hard_stop = HardStop(lambda: run.write_status("interrupted", "stopped at once by a second Ctrl-C",
                                                      self.saved))
        previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
        if main_thread:
            hard_stop.arm()
        progress = Progress(total, start, self.progress, log)
        t_run = time.perf_counter()
        last = {}
        try:
            state = drive_rounds(ex, state, range(start, total), [evaluate, save, progress,
                                                                  lambda r: last.update(r.metrics)])
        except RunStopped as e:
            progress.close()  # before the message (closing twice is harmless)
            self.reason = str(e).splitlines()[0]
            print(str(e), file=sys.stderr if e.code == EXIT_DIVERGED else sys.stdout, flush=True)
            return e.code
        except OSError as e:  # a full disk, lost permissions: one line, the last checkpoint kept
            progress.close()
            self.reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {self.reason}; the checkpoint of round {saved['round']} is kept; continue with "
                  f"{self.resume_hint} once this is fixed", file=sys.stderr, flush=True)
            return EXIT_FAILED
        finally:
            progress.close()
            hard_stop.disarm()
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        seconds = time.perf_counter() - t_run
        from fedhl_jax.rundir import NonFiniteError

        if not run.primary:  # process 0 exports
            return EXIT_OK
        try:
            final = export_final(ex, state, run.path, log)
        except NonFiniteError as e:
            self.reason = f"nothing exported: {e}"
            print(f"error: {self.reason}", file=sys.stderr)
            return EXIT_DIVERGED
        except OSError as e:
            self.reason = f"cannot write {run.path / 'final'}: {e}"
            print(f"error: {self.reason}; continue with {self.resume_hint} once this is fixed", file=sys.stderr)
            return EXIT_FAILED
        self.reason = f"{total} rounds; exported to {final}"
        log(summary(ex, run, last, total - start, seconds, final))
        return EXIT_OK
