"""``bin/train.py``: run a federated simulation from a YAML config."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fedhl_jax.config import ConfigError, load_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="bin/train.py",
        description="Federated LoRA fine-tuning with heterogeneous ranks (FedHL and peers).",
        epilog="Overrides are dotted key=value pairs, e.g. fed.algorithm=flexlora optim.lr=3e-4 fed.ranks=[2,8].")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--out", type=Path, required=True, help="output directory (metrics, checkpoints, export)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p.parse_args(argv)


def export_final(sim, state, out: Path, log) -> None:
    """Writes the dense global adapter and a PEFT adapter truncated to ``export_rank`` (default r_max)."""
    import jax
    from safetensors.numpy import save_file

    from fedhl_jax import model as M

    final = out / "final"
    final.mkdir(exist_ok=True)
    delta = {k: np.asarray(v, np.float32) for k, v in jax.device_get(sim.global_delta(state)).items()}
    save_file(delta, str(final / "global_adapter.safetensors"))
    rank = sim.cfg.export_rank or sim.cfg.fed.r_max
    name = sim.cfg.model.name_or_path
    M.export_peft(final / "peft_adapter", delta, rank, sim.cfg.model.alpha,
                  None if name in ("auto", "random") else name, rslora=sim.cfg.model.rslora)
    log(f"exported the global adapter to {final}/ (dense, and PEFT rank {rank})")


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


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from fedhl_jax.checkpointing import RunDir
    from fedhl_jax.data.loading import DataError
    from fedhl_jax.simulation import Simulation

    try:
        run = RunDir(args.out, cfg, resume=args.resume, log=log)
        sim = Simulation(cfg, log=log)
    except (ConfigError, DataError, OSError, ValueError) as e:  # OSError: files, permissions, network
        print(f"error: {e}", file=sys.stderr)
        return 2
    run.begin()
    write_partition(sim, run.path, log)

    state = sim.init_state()
    start = 0
    if args.resume:
        restored, start = run.restore(state)
        if restored is not None:
            state = restored
            log(f"resuming after round {start} from {run.ckpt_path}")
        run.truncate_metrics(start)
    total = cfg.fed.rounds
    if start >= total:
        log(f"the run already finished {total} rounds")

    def evaluate(record):
        if (record.t + 1) % cfg.eval.every == 0 or record.t + 1 == total:
            t0 = time.perf_counter()
            record.metrics.update(sim.evaluate(record.state, record.t))
            record.metrics["eval_seconds"] = time.perf_counter() - t0

    def save(record):
        run.append_metrics(record.metrics)
        if (record.t + 1) % cfg.checkpoint.every == 0 or record.t + 1 == total:
            run.save(record.t + 1, record.state)

    progress = Progress(total, start, not args.no_progress, log)
    t_run = time.perf_counter()
    try:
        state = sim.run(state, range(start, total), [evaluate, save, progress])
    finally:
        progress.close()
    if start < total:
        log(f"{total - start} rounds in {time.perf_counter() - t_run:.1f} s; metrics in {run.metrics_path}")
    export_final(sim, state, Path(args.out), log)
    return 0


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
