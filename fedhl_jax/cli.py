"""``fedhl-train`` (also ``bin/train.py``): run a federated simulation from a YAML config.

Argument parsing and the joining of several processes; the run itself is ``driver.run`` (its
guarantees: docs/engine.md, "Guarantees").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedhl_jax.config import ConfigError, load_config
from fedhl_jax.driver import EXIT_BAD_INPUT

#: The keys ``--export-only`` may change.
EXPORT_KEYS = ("export_rank",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="fedhl-train",
        description="Federated LoRA fine-tuning with heterogeneous ranks (FedHL and peers).",
        epilog="Overrides are dotted key=value pairs, e.g. fed.algorithm=flexlora optim.lr=3e-4 fed.ranks=[2,8]. "
               "With --resume the run's own config.yaml is used; fed.rounds=N may raise its rounds.")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--out", type=Path, required=True, help="output directory (metrics, checkpoints, export)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (reads --out/config.yaml)")
    p.add_argument("--export-only", action="store_true",
                   help="write --out/final/ from the run's newest checkpoint, training nothing (export_rank=N may change)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    g = p.add_argument_group("several hosts (jax.distributed; or the environment variables JAX_COORDINATOR_ADDRESS, "
                             "JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, default=None, help="how many processes take part")
    g.add_argument("--process-id", type=int, default=None, help="this process's id, 0 .. num-processes-1")
    g.add_argument("--local-device-ids", default=None, help="comma-separated ids of the local devices this process uses")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p.parse_intermixed_args(argv)  # key=value pairs may come before the options too


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
    """The run's config: ``--config`` and overrides, or with ``--resume`` the run's own config.yaml
    with the overrides (which changes are allowed is ``driver.check_resume``)."""
    saved = args.out / "config.yaml"
    flag = "--export-only" if args.export_only else "--resume"
    if args.export_only and (args.resume or args.config is not None):
        raise ConfigError("--export-only reads the run's own config.yaml; leave out --resume and --config")
    if (args.resume or args.export_only) and args.config is None:
        if not saved.is_file():
            raise ConfigError(f"{flag}: {args.out} holds no run (no config.yaml); start it without {flag}")
        from omegaconf import OmegaConf

        from fedhl_jax.driver import check_resume

        try:
            given = OmegaConf.to_container(OmegaConf.from_dotlist(list(args.overrides)))
        except Exception as e:  # OmegaConf parse errors
            raise ConfigError(f"cannot parse the overrides: {e}") from e
        if args.export_only:
            other = sorted(o.split("=", 1)[0] for o in args.overrides if o.split("=", 1)[0] not in EXPORT_KEYS)
            if other:
                raise ConfigError(f"--export-only may change the export settings only ({', '.join(EXPORT_KEYS)}); "
                                  f"refused: {', '.join(other)}")
        else:
            check_resume(OmegaConf.to_container(OmegaConf.load(saved)), given)  # before the merged config is validated
        return load_config(saved, args.overrides)
    return load_config(args.config, args.overrides)


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

    from fedhl_jax import driver
    from fedhl_jax.simulation import Simulation

    return driver.run(cfg, args.out, lambda: Simulation(cfg, log=log), resume=args.resume, log=log, primary=primary,
                      progress=primary and not args.no_progress, export_only=args.export_only)
