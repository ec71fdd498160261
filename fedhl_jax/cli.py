"""``bin/train.py``: run a federated simulation from a YAML config.

Guarantees (docs/engine.md, "Guarantees"): the run directory is locked before anything is written;
a refused start leaves nothing behind; checkpoints are verified on restore; ``final/`` is replaced
atomically and never holds non-finite values; a diverging run stops with exit status 3 keeping
its last good checkpoint; Ctrl-C stops after the current round, saved, with exit status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from fedhl_jax.config import ConfigError, load_config

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class RunStopped(Exception):
    """The run stops early (divergence, Ctrl-C); ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bin/train.py",
        description="Federated LoRA fine-tuning with heterogeneous ranks (FedHL and peers).",
        epilog="Overrides are dotted key=value pairs, e.g. fed.algorithm=flexlora optim.lr=3e-4 fed.ranks=[2,8]. "
               "With --resume the run's own config.yaml is used; fed.rounds=N may raise its rounds.")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--out", type=Path, required=True, help="output directory (metrics, checkpoints, export)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (reads --out/config.yaml)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    g = p.add_argument_group("several hosts (jax.distributed; or the environment variables JAX_COORDINATOR_ADDRESS, "
                             "JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, default=None, help="how many processes take part")
    g.add_argument("--process-id", type=int, default=None, help="this process's id, 0 .. num-processes-1")
    g.add_argument("--local-device-ids", default=None, help="comma-separated ids of the local devices this process uses")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p.parse_args(argv)


def distributed_settings(args, environ=os.environ) -> dict | None:
    """``jax.distributed.initialize`` arguments from the flags, else the environment; None for one process.

    Raises:
      ConfigError: some settings are given and others missing, or a value is out of range (the
        message names them).
    """
    def pick(flag, env, kind):
        value = getattr(args, flag)
        if value is None and environ.get(env) not in (None, ""):
            try:
                value = kind(environ[env])
            except ValueError:
                raise ConfigError(f"{env}={environ[env]!r} is not a valid value") from None
        return value

    got = {"coordinator_address": pick("coordinator_address", "JAX_COORDINATOR_ADDRESS", str),
           "num_processes": pick("num_processes", "JAX_NUM_PROCESSES", int),
           "process_id": pick("process_id", "JAX_PROCESS_ID", int)}
    ids = pick("local_device_ids", "JAX_LOCAL_DEVICE_IDS", str)
    if all(v is None for v in got.values()):
        if ids is not None:
            raise ConfigError("--local-device-ids needs --coordinator-address, --num-processes and --process-id")
        return None
    missing = [k for k, v in got.items() if v is None]
    if missing:
        raise ConfigError("several processes need all of --coordinator-address, --num-processes, --process-id "
                          f"(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing: "
                          + ", ".join("--" + k.replace("_", "-") for k in missing))
    if got["num_processes"] < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {got['num_processes']}")
    if not 0 <= got["process_id"] < got["num_processes"]:
        raise ConfigError(f"--process-id must be in [0, {got['num_processes']}), got {got['process_id']}")
    if ids is not None:
        try:
            got["local_device_ids"] = [int(i) for i in str(ids).split(",") if i.strip()]
        except ValueError:
            raise ConfigError(f"--local-device-ids must be comma-separated integers, got {ids!r}") from None
    return got


def init_distributed(settings: dict | None) -> None:
    """Joins the processes of a multi-host run (``jax.distributed.initialize``; CPU collectives
    over gloo). Must run before anything touches a JAX device."""
    if settings is None:
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)


def read_config(args):
    """The run's config: ``--config`` and overrides, or with ``--resume`` the run's own config.yaml."""
    saved = args.out / "config.yaml"
    if args.resume and args.config is None:
        if not saved.is_file():
            raise ConfigError(f"--resume: {args.out} holds no run (no config.yaml); start it without --resume")
        refuse_changes(load_config(saved), args.overrides)
        return load_config(saved, args.overrides)
    return load_config(args.config, args.overrides)


def refuse_changes(saved_cfg, overrides) -> None:
    """On resume, overrides may raise ``fed.rounds`` (and change the device ``mesh``) only; any other
    change is refused, listed."""
    from omegaconf import OmegaConf

    from fedhl_jax.config import config_diff, to_dict

    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # OmegaConf parse errors
        raise ConfigError(f"cannot parse the overrides: {e}") from e

    def restrict(old, new):  # the saved values of the keys the overrides name
        return {k: restrict(old.get(k, {}), v) if isinstance(v, dict) else old.get(k, "<missing>")
                for k, v in new.items()}

    diff = [d for d in config_diff(restrict(to_dict(saved_cfg), given), given) if not d.startswith(("fed.rounds:", "mesh."))]
    if diff:
        raise ConfigError("cannot resume with a different config (only fed.rounds may be raised); "
                          "differences (saved -> given):\n  " + "\n  ".join(diff))


def export_final(sim, state, out: Path, log) -> Path:
    """Writes ``final/``: the dense global adapter and a PEFT adapter truncated to ``export_rank``
    (default r_max), atomically, refusing non-finite values (``checkpointing.write_final``)."""
    import jax
    from safetensors.numpy import save_file

    from fedhl_jax import model as M
    from fedhl_jax.checkpointing import write_final

    rank = sim.cfg.export_rank or sim.cfg.fed.r_max
    base = None if sim.model_source.kind == "random" else sim.model_source.path

    def write(folder: Path, delta: dict) -> None:
        save_file({k: np.asarray(v, np.float32) for k, v in delta.items()}, str(folder / "global_adapter.safetensors"))
        M.export_peft(folder / "peft_adapter", delta, rank, sim.cfg.model.alpha, base, rslora=sim.cfg.model.rslora)

    final = write_final(out, jax.device_get(sim.global_delta(sim.host_state(state))), write)
    log(f"exported the global adapter to {final}/ (dense, and PEFT rank {rank})")
    return final


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
    server state unchanged and says so; ``patience`` such rounds in a row, or a non-finite loss
    of the kept clients or of the held-out set, stop the run (``RunStopped``, exit status 3)
    before that round is checkpointed.
    """

    def __init__(self, patience: int, log):
        self.patience, self.log, self.failed = patience, log, 0

    def __call__(self, record) -> str | None:
        m = record.metrics
        if not m["applied"]:
            self.failed += 1
            self.log(f"round {record.t + 1}: every client update was excluded ({m['excluded']} non-finite or "
                     f"overflowing); the server state is unchanged")
        else:
            self.failed = 0
            if m["excluded"]:
                bad = [int(c) for c, ok in zip(record.ids, np.asarray(record.info["valid"])) if not ok]
                self.log(f"round {record.t + 1}: clients {bad} sent non-finite or overflowing updates and were "
                         f"excluded; the weights of the others sum to 1")
        if self.failed >= self.patience:
            return (f"no client update was usable in {self.failed} rounds in a row (round {record.t + 1}); "
                    f"training diverged: lower optim.lr or set optim.grad_clip")
        for key in ("train_loss", "eval_loss"):
            if key in m and m[key] is not None and m["applied"] and not math.isfinite(m[key]):
                return f"{key} became {m[key]} in round {record.t + 1}; training diverged: lower optim.lr"
        return None


def main(argv=None) -> int:
    import warnings

    args = parse_args(argv)
    # The run log says which clients were excluded (Watchdog); the library's warning would repeat it.
    warnings.filterwarnings("ignore", message=r"clients \[.*\] sent non-finite", category=RuntimeWarning)
    try:
        cfg = read_config(args)
        settings = distributed_settings(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    init_distributed(settings)
    primary = settings is None or settings["process_id"] == 0
    # Several processes: process 0 alone logs and writes the run's files (checkpoints: every process).
    log = (lambda msg: print(msg, flush=True)) if primary else (lambda msg: None)
    if not primary:
        args.no_progress = True

    from fedhl_jax.checkpointing import RunDir
    from fedhl_jax.simulation import Simulation

    created = not args.out.exists()
    run = None
    try:
        run = RunDir(args.out, cfg, resume=args.resume, log=log, primary=primary)  # the lock comes first
        sim = Simulation(cfg, log=log)
    except (ConfigError, OSError, ValueError) as e:  # OSError: files, permissions, network, the lock
        print(f"error: {e}", file=sys.stderr)
        if run is not None:
            run.close()
        if primary:
            _remove_if_empty(args.out, created)
        return EXIT_BAD_INPUT
    with run:
        return _train(args, cfg, run, sim, log)


def _remove_if_empty(out: Path, created: bool) -> None:
    """A start refused at set-up leaves no run directory behind (only the one it created, if empty)."""
    if created and out.is_dir() and set(os.listdir(out)) <= {".lock"}:
        shutil.rmtree(out, ignore_errors=True)


def _train(args, cfg, run, sim, log) -> int:
    run.begin()
    if run.primary:
        write_partition(sim, run.path, log)
    state = sim.init_state()
    start = 0
    if args.resume:
        restored, start = run.restore(state)
        if restored is not None:
            state = sim.place_state(restored)
            log(f"resuming after round {start} from {run.ckpt_path}")
        run.truncate_metrics(start)
        if run.extended_from is not None:
            log(f"fed.rounds raised from {run.extended_from} to {cfg.fed.rounds}")
    total = cfg.fed.rounds
    if start >= total:
        log(f"the run already finished {total} rounds")
    if cfg.eval.zero_shot and start == 0 and sim.evaluator is not None:
        zero_shot(sim, state, run.path, log)

    interrupted = []
    watchdog = Watchdog(cfg.fed.stop_after_failed_rounds, log)
    saved = {"round": start}

    def evaluate(record):
        if (record.t + 1) % cfg.eval.every == 0 or record.t + 1 == total:
            t0 = time.perf_counter()
            record.metrics.update(sim.evaluate(record.state, record.t))
            record.metrics["eval_seconds"] = time.perf_counter() - t0

    def save(record):
        problem = watchdog(record)
        run.append_metrics(record.metrics)
        if problem is not None:  # this round's state is not checkpointed
            raise RunStopped(f"stopping: {problem}; the last good checkpoint (round {saved['round']}) is kept in "
                             f"{run.ckpt_path}", EXIT_DIVERGED)
        if (record.t + 1) % cfg.checkpoint.every == 0 or record.t + 1 == total or interrupted:
            run.save(record.t + 1, record.state)
            saved["round"] = record.t + 1
        if interrupted:
            raise RunStopped(f"interrupted: stopped after round {record.t + 1}, saved; continue with "
                             f"bin/train.py --out {run.path} --resume", EXIT_INTERRUPTED)

    def on_sigint(signum, frame):
        if interrupted:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        interrupted.append(True)
        log("\nCtrl-C: stopping after this round (saved); press Ctrl-C again to stop at once")

    if start < total:
        log(f"round {start + 1}/{total}: compiling the round step (the first round of a run takes longer)")
    previous = signal.signal(signal.SIGINT, on_sigint)
    progress = Progress(total, start, not args.no_progress, log)
    t_run = time.perf_counter()
    last = {}
    try:
        state = sim.run(state, range(start, total), [evaluate, save, progress, lambda r: last.update(r.metrics)])
    except RunStopped as e:
        progress.close()  # before the message (closing twice is harmless)
        print(str(e), file=sys.stderr if e.code == EXIT_DIVERGED else sys.stdout, flush=True)
        return e.code
    finally:
        progress.close()
        signal.signal(signal.SIGINT, previous)
    seconds = time.perf_counter() - t_run
    from fedhl_jax.checkpointing import NonFiniteError

    if not run.primary:  # process 0 exports
        return 0
    try:
        final = export_final(sim, state, run.path, log)
    except NonFiniteError as e:
        print(f"error: nothing exported: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    log(summary(sim, run, last, total - start, seconds, final))
    return 0


def summary(sim, run, last: dict, rounds: int, seconds: float, final: Path) -> str:
    """The end of a run: what ran, the final held-out losses, and how to use the result."""
    cfg = sim.cfg
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
    base = None if sim.model_source.kind == "random" else sim.model_source.path
    rank = cfg.export_rank or cfg.fed.r_max
    lines += [f"metrics: {run.metrics_path}", f"result:  {final}/global_adapter.safetensors (dense update per module), "
              f"{final}/peft_adapter/ (PEFT LoRA, rank {rank})"]
    if base is not None:
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


ZERO_SHOT_FILE = "zero_shot.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def zero_shot(sim, state, path: Path, log) -> dict:
    """Evaluates the starting global model (generation included) into ``zero_shot.json``, once per run."""
    out = path / ZERO_SHOT_FILE
    if (res := _read_json(out)) is not None:
        return res
    log("zero-shot: evaluating the starting model (eval.zero_shot)")
    t0 = time.perf_counter()
    from fedhl_jax.checkpointing import _jsonable  # the metrics' own conversion to JSON values

    res = _jsonable(sim.evaluate(state, 0, generate=True))
    res["eval_seconds"] = time.perf_counter() - t0
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)
    shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in res.items() if k.startswith("eval_") and isinstance(v, float)
                      and k != "eval_ppl" and not k.startswith("eval_loss_rank"))
    log(f"zero-shot: {shown} ({res['eval_seconds']:.0f} s)")
    return res


def write_partition(sim, path: Path, log) -> None:
    """The partition summary (``partition.txt``, ``partition.png``) of a run, also logged."""
    cfg = sim.cfg
    table = sim.data.summary().format()
    (path / "partition.txt").write_text(table + "\n")
    try:
        from fedhl_jax.data.partition import plot_partition_summary

        plot_partition_summary(sim.data.partitions, sim.data.labels, path / "partition.png",
                               ranks=tuple(int(r) for r in sim.ranks), title=f"{cfg.data.dataset} / {cfg.data.partition}")
    except Exception as e:  # a plot is a convenience; never fail a run on it
        log(f"could not plot the partition: {e}")
    lines = table.splitlines()
    log(f"partition ({cfg.data.partition}), also in {path / 'partition.txt'}:\n"
        + "\n".join(lines[:12]) + ("\n..." if len(lines) > 12 else ""))
