"""The Flower ``ServerApp``: the run driver (``driver.run``) with the federation as its round executor.

Run config (``deploy/flower/pyproject.toml``, or ``flwr run --run-config``): ``config`` (the run's
YAML, the same file the nodes read), ``overrides``, ``out`` (the server's run directory: config,
metrics, checkpoints, the final adapter), ``round-timeout`` (each round's deadline, seconds),
``min-replies`` / ``min-reply-fraction`` (the quorum), ``on-short-round`` (``skip`` or ``stop``) and
``discover-timeout`` (seconds). The server never loads a base weight (``no_base_weights``): the LoRA
shapes come from the model's ``config.json`` or GGUF header, or (``model.kind: nnx``) from the
factory's model built abstractly under ``jax.eval_shape``.
A server started again on the same ``out`` resumes after its last checkpoint. The run's outcome is
in ``out/status.json`` (``flwr run`` exits 0 whatever it is; docs/deployment.md).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import jax
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedhl_jax import driver
from fedhl_jax import model as M
from fedhl_jax.model.hub import ModelSource, resolve_model_source
from fedhl_jax.build import build_algorithm
from fedhl_jax.config import ConfigError, TrainConfig
from fedhl_jax.flower.node import run_settings
from fedhl_jax.flower.strategy import FedLoRAStrategy, RoundPolicy
from fedhl_jax.engine import RoundRecord


def lora_shapes(cfg: TrainConfig) -> dict:
    """``{module: (d_out, d_in)}`` of the run's LoRA modules, from the model's config alone (no
    weight and no data is read).

    For ``model.kind: nnx`` the shapes are the bridge's (``nnx_bridge.from_factory``), found on an
    abstract model: ``model.factory`` runs under ``jax.eval_shape``, so no weight is materialised
    (``nnx_shapes``).

    Raises:
      ConfigError: ``fed.r_max`` exceeds a module's smaller dimension, or (``model.kind: nnx``) as
        ``nnx_shapes``.
    """
    from fedhl_jax.model.shapes import read_model_config
    from fedhl_jax.simulation import random_model_config

    mc = cfg.model
    if mc.kind == "nnx":
        return nnx_shapes(cfg)
    source = resolve_model_source(mc.name_or_path)
    if source.kind == "random":  # the shapes of the LoRA modules do not depend on the vocabulary
        model_cfg = random_model_config(mc, mc.random_vocab_size)
    else:
        model_cfg = read_model_config(source.path, dtype=mc.dtype)
    shapes = M.lora_targets(model_cfg, mc.targets)
    smallest = min(min(s) for s in shapes.values())
    if cfg.fed.r_max > smallest:
        raise ConfigError(f"rank {cfg.fed.r_max} in fed.ranks exceeds min(d_out, d_in)={smallest} of the LoRA modules")
    return shapes


def nnx_shapes(cfg: TrainConfig, vocab_sizes: tuple[int, ...] | None = None) -> dict:
    """The LoRA shapes ``{module_path: (d_out, d_in)}`` of ``model.kind: nnx``, in the bridge's
    (graph) order, without a weight: ``model.factory(vocab_size=V, seed=cfg.seed)`` and the
    bridge's module matching run under ``jax.eval_shape``, on tracers.

    The run's vocabulary is a word-level tokenizer's, built from the training texts (as the
    simulation's ``load_nnx_model``), which the server does not hold. The shapes are found at two
    vocabulary sizes; the LoRA modules' shapes must not depend on it (true of any target that is
    not an embedding or an output head over the vocabulary).

    Args:
      cfg: the run's config (``model.factory``, ``model.targets``, ``fed.r_max``, ``seed``).
      vocab_sizes: the sizes tried (default ``model.random_vocab_size`` and ``2 *`` it ``+ 7``).

    Returns:
      ``{module_path: (d_out, d_in)}``, the simulation's ``Simulation.shapes`` of the run.

    Raises:
      ConfigError: the factory does not import or returns no ``(nnx.Module, loss)``, a pattern
        matches nothing, a matched layer is not supported, ``fed.r_max`` is too large (each as the
        simulation names it), a factory that needs concrete weights to build the model, or a LoRA
        module whose shape follows the vocabulary size (naming the modules).
    """
    from fedhl_jax.nnx_bridge import from_factory

    mc = cfg.model
    vocab_sizes = vocab_sizes or (mc.random_vocab_size, 2 * mc.random_vocab_size + 7)
    found = []
    for vocab_size in vocab_sizes:
        out = {}

        def build(vocab_size=vocab_size, out=out):  # no array is computed: every weight is a tracer
            out.update(from_factory(mc.factory, mc.targets, cfg.fed.r_max, vocab_size=vocab_size,
                                    seed=cfg.seed).shapes)

        try:
            jax.eval_shape(build)
        except ValueError as e:
            raise ConfigError(f"model.factory / model.targets: {e}") from None
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError) as e:
            raise ConfigError(f"model.factory {mc.factory!r} needs concrete weights to build its model, but the "
                              f"server builds it abstractly (jax.eval_shape: it loads no weight): "
                              f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        found.append(out)
    first = found[0]
    moving = [k for k in first if any(f.get(k) != first[k] for f in found[1:])]
    if moving or any(list(f) != list(first) for f in found[1:]):
        sizes = "; ".join(f"{k}: " + ", ".join(f"{f.get(k)} at vocab_size={v}" for f, v in zip(found, vocab_sizes))
                          for k in moving) or "the matched modules change"
        raise ConfigError(f"model.targets {list(mc.targets)} match LoRA modules whose shape follows the vocabulary "
                          f"size ({sizes}); the vocabulary of model.kind: nnx is built from the training texts, "
                          f"which the server of a federation does not hold: place LoRA on modules whose shape does "
                          f"not depend on the vocabulary")
    return first


class FederationExecutor:
    """The round executor (``driver.RoundExecutor``) of a Flower federation: each ``run_round`` is
    one Flower round (``configure_train``, ``grid.send_and_receive``, ``aggregate_train``).

    The server holds no data and no base weights: no partition summary and no held-out evaluation
    (``data`` and ``evaluator`` are None); the nodes are found when the rounds start.

    Args:
      cfg: the run's config.
      grid: Flower's ``Grid``.
      round_timeout: seconds a round waits for its replies (the policy's deadline when given).
      policy: quorum, deadline and what a round below quorum does (default: 1 reply, skip).
      discover_timeout: seconds to wait for one node per partition.
      log: where messages go.
    """

    data = evaluator = ranks = None

    def __init__(self, cfg: TrainConfig, grid: Grid, *, round_timeout: float = 600.0,
                 discover_timeout: float = 120.0, policy: RoundPolicy | None = None, log: Callable = print):
        policy = policy or RoundPolicy(deadline=round_timeout)
        self.cfg, self.grid, self.policy, self.discover_timeout = cfg, grid, policy, discover_timeout
        self.round_timeout = policy.deadline
        self.model_source = (resolve_model_source(cfg.model.name_or_path) if cfg.model.kind != "nnx" else
                             ModelSource("nnx", cfg.model.factory, f"Flax NNX model from {cfg.model.factory}"))
        self.shapes = lora_shapes(cfg)
        self.strategy = FedLoRAStrategy(cfg, self.shapes, None, policy=policy, log=log)
        self.algorithm = self.strategy.algorithm

    def init_state(self):
        return self.algorithm.init(self.shapes, jax.random.PRNGKey(self.cfg.seed))

    def place_state(self, state):
        return state

    host_state = place_state

    def start(self, first_round: int) -> None:
        """Finds the nodes; Flower's round 1 of this call is global round ``first_round``."""
        self.strategy.start_round = first_round
        self.strategy.discover(self.grid, timeout=self.discover_timeout)

    def run_round(self, state, t: int) -> RoundRecord:
        strategy = self.strategy
        strategy.state = state
        server_round = t - strategy.start_round + 1
        messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), self.grid)
        strategy.aggregate_train(server_round, self.grid.send_and_receive(messages, timeout=self.round_timeout))
        record = strategy.last
        if record.metrics["short_round"] and self.policy.on_short_round == "stop":
            replies = len(record.ids) - len(record.metrics["missing"])
            raise driver.RunStopped(f"stopping: round {t + 1} got {replies} of {len(record.ids)} replies, below the "
                                    f"quorum of {strategy.quorum} (on-short-round=stop); it was not aggregated, the "
                                    f"last checkpoint is kept", driver.EXIT_FAILED)
        return record

    def evaluate(self, state, t: int = 0, *, generate: bool | None = None) -> dict:
        return {}  # the held-out data is on no machine of the server

    def global_delta(self, state) -> dict:
        return self.algorithm.global_delta(state)


class BaseWeightsOnServer(RuntimeError):
    """A base-weight loader was called where no base weight may be loaded (the server)."""


#: Where a base weight can come from: ``(module, function name)``.
WEIGHT_LOADERS = (("fedhl_jax.model", "load_pretrained"), ("fedhl_jax.model.checkpoint", "load_pretrained"),
                  ("fedhl_jax.model.gguf", "load_gguf"), ("fedhl_jax.model", "init_params"),
                  ("fedhl_jax.model.llama", "init_params"), ("fedhl_jax.simulation", "load_model"),
                  ("fedhl_jax.simulation", "load_nnx_model"))


@contextlib.contextmanager
def no_base_weights():
    """Within it, every base-weight loader (``WEIGHT_LOADERS``) raises ``BaseWeightsOnServer``
    instead of loading: the server of a federation reads shapes from the model's config only.

    Yields:
      The list of refused calls (loader names), for the log and for tests.
    """
    import importlib

    refused, saved = [], []

    def guard(name):
        def refuse(*args, **kwargs):
            refused.append(name)
            raise BaseWeightsOnServer(f"the server does not load base weights, but {name} was called")
        return refuse

    for module, name in WEIGHT_LOADERS:
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, guard(f"{module}.{name}"))
    try:
        yield refused
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)


def serve(grid: Grid, cfg: TrainConfig, out: Path, *, round_timeout: float = 600.0,
          discover_timeout: float = 120.0, policy: RoundPolicy | None = None, log: Callable = print) -> int:
    """Runs (or resumes) the federation's rounds on ``grid`` through ``driver.run``; writes ``out``'s
    run directory (the same files as ``bin/train.py``'s) and returns the driver's exit status.

    A server started again on the same ``out`` restores the newest checkpoint and runs the remaining
    rounds (``fed.rounds`` may be raised, nothing else changed: ``driver.check_resume``). A start
    refused at node discovery leaves no ``config.yaml``, and a directory whose run finished no round
    is started afresh, so a corrected rerun is never refused as a changed config.
    """
    out = Path(out)
    with no_base_weights() as refused:
        code = driver.run(cfg, out, lambda: FederationExecutor(cfg, grid, round_timeout=round_timeout,
                                                               discover_timeout=discover_timeout, policy=policy,
                                                               log=log),
                          resume=(out / "config.yaml").exists(), log=log,
                          resume_hint=f"flwr run with the same out={str(out)!r}")
    log(f"base weights loaded on the server: {len(refused)}" + (f" (refused: {refused})" if refused else ""))
    return code


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = run_settings(rc)
    code = serve(grid, cfg, Path(str(rc.get("out", "runs/flower"))), policy=RoundPolicy.from_run_config(rc),
                 discover_timeout=float(rc.get("discover-timeout", 120)), log=lambda m: print(m, flush=True))
    if code:
        raise RuntimeError(f"the federation's run stopped with exit status {code} (see the messages above and "
                           f"{Path(str(rc.get('out', 'runs/flower'))) / 'status.json'})")
