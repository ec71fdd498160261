"""The Flower ``ServerApp``: runs the federation's rounds with ``FedLoRAStrategy``.

Run config (``deploy/flower/pyproject.toml``, or ``flwr run --run-config``): ``config`` (the run's
YAML, the same file the nodes read), ``overrides``, ``out`` (the server's run directory: config,
metrics, checkpoints, the final adapter), ``round-timeout`` and ``discover-timeout`` (seconds).
A server started again on the same ``out`` resumes after its last checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedhl_jax import model as M
from fedhl_jax.model.hub import resolve_model_source
from fedhl_jax.build import build_algorithm
from fedhl_jax.config import ConfigError, TrainConfig
from fedhl_jax.deploy.node import run_settings
from fedhl_jax.deploy.strategy import FedLoRAStrategy


def lora_shapes(cfg: TrainConfig) -> dict:
    """``{module: (d_out, d_in)}`` of the run's LoRA modules, without loading any data.

    Raises:
      ConfigError: ``fed.r_max`` exceeds a module's smaller dimension.
    """
    mc = cfg.model
    source = resolve_model_source(mc.name_or_path)
    if source.kind == "random":  # the shapes of the LoRA modules do not depend on the vocabulary
        model_cfg = M.LlamaConfig(vocab_size=mc.random_vocab_size, hidden_size=mc.random_hidden_size,
                                  intermediate_size=mc.random_intermediate_size, num_layers=mc.random_num_layers,
                                  num_heads=mc.random_num_heads, num_kv_heads=mc.random_num_kv_heads,
                                  head_dim=mc.random_hidden_size // mc.random_num_heads)
    else:
        model_cfg, _ = M.load_pretrained(source.path, dtype=mc.dtype)
    shapes = M.lora_targets(model_cfg, mc.targets)
    smallest = min(min(s) for s in shapes.values())
    if cfg.fed.r_max > smallest:
        raise ConfigError(f"rank {cfg.fed.r_max} in fed.ranks exceeds min(d_out, d_in)={smallest} of the LoRA modules")
    return shapes


def serve(grid: Grid, cfg: TrainConfig, out: Path, *, round_timeout: float = 600.0,
          discover_timeout: float = 120.0, log: Callable = print) -> FedLoRAStrategy:
    """Runs (or resumes) the federation's rounds on ``grid``; writes ``out``'s run directory.

    The server state is checkpointed after every round (``checkpoint.every``); a server started
    again on the same ``out`` restores the newest checkpoint and runs the remaining rounds, Flower's
    round ``k`` being global round ``start + k - 1``. Ends by writing
    ``out/final/global_adapter.safetensors`` (the dense global update per module).
    """
    from safetensors.numpy import save_file

    from fedhl_jax.checkpointing import RunDir, write_final

    shapes = lora_shapes(cfg)
    algorithm = build_algorithm(cfg.fed)
    out = Path(out)
    resume = (out / "config.yaml").exists()
    with RunDir(out, cfg, resume=resume, log=log) as run:
        run.begin()
        state = algorithm.init(shapes, jax.random.PRNGKey(cfg.seed))
        start = 0
        if resume:
            restored, start = run.restore(state)
            if restored is not None:
                state = restored
                log(f"resuming after round {start} from {run.ckpt_path}")
            run.truncate_metrics(start)
        strategy = FedLoRAStrategy(cfg, shapes, state, start_round=start, run=run, log=log)
        if start < cfg.fed.rounds:
            strategy.discover(grid, timeout=discover_timeout)
            strategy.start(grid, ArrayRecord(), num_rounds=cfg.fed.rounds - start, timeout=round_timeout)
        else:
            log(f"the run already finished {cfg.fed.rounds} rounds")
        delta = jax.device_get(algorithm.global_delta(strategy.state))
        final = write_final(out, delta, lambda folder, d: save_file(
            {k: np.asarray(v, np.float32) for k, v in d.items()}, str(folder / "global_adapter.safetensors")))
        log(f"exported the global adapter to {final}/global_adapter.safetensors")
    return strategy


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = run_settings(rc)
    serve(grid, cfg, Path(str(rc.get("out", "runs/flower"))), round_timeout=float(rc.get("round-timeout", 600)),
          discover_timeout=float(rc.get("discover-timeout", 120)), log=lambda m: print(m, flush=True))
