"""A run's set-up: model + data + algorithm → the round engine, in one process.

``Simulation`` loads and validates everything a run needs before any compile, then exposes the
engine's pieces: the compiled ``round_fn``, the ``schedule`` of clients and batches, the
``evaluator`` and ``run(state, rounds, callbacks)``. It is the in-process ``driver.RoundExecutor``
(``run_round``); the round itself lives in ``engine.py``, the run around it in ``driver.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from fedhl_jax import engine, runtime
from fedhl_jax import model as M
from fedhl_jax.model.hub import resolve_model_source
from fedhl_jax.model.sharded_load import load_sharded
from fedhl_jax.build import build_algorithm, client_pieces
from fedhl_jax.config import ConfigError, TrainConfig
from fedhl_jax.data.federated import build_federated_dataset, load_records
from fedhl_jax.evaluator import GlobalEvaluator, eval_metric

_AUTO_MESH = object()


def client_ranks(fed, seed: int) -> np.ndarray:
    """Each client's LoRA rank, fixed for the run.

    ``list``: ``fed.ranks`` cycled over the clients; ``uniform``: uniform over the
    set; ``heavy_tail_low`` / ``heavy_tail_high``: probability ``∝ 2^-k`` for the
    ``k``-th smallest / largest rank; ``homogeneous``: every client at ``max(fed.ranks)``.

    Returns:
      ``[num_clients]`` int32.
    """
    values = np.array(sorted(set(fed.ranks)), np.int32)
    n = fed.num_clients
    rng = np.random.default_rng([seed, 0x2A4C])
    kind = fed.rank_distribution
    if kind == "list":
        return np.resize(np.asarray(fed.ranks, np.int32), n)
    if kind == "homogeneous":
        return np.full(n, values[-1], np.int32)
    if kind == "uniform":
        return rng.choice(values, size=n).astype(np.int32)
    w = 0.5 ** np.arange(len(values))
    if kind == "heavy_tail_high":
        w = w[::-1]
    return rng.choice(values, size=n, p=w / w.sum()).astype(np.int32)


def random_model_config(mc, vocab_size: int):
    """The ``LlamaConfig`` of ``model.name_or_path: random`` (sizes from ``model.random_*``)."""
    return M.LlamaConfig(vocab_size=vocab_size, hidden_size=mc.random_hidden_size,
                         intermediate_size=mc.random_intermediate_size, num_layers=mc.random_num_layers,
                         num_heads=mc.random_num_heads, num_kv_heads=mc.random_num_kv_heads,
                         head_dim=mc.random_hidden_size // mc.random_num_heads, dtype=mc.dtype,
                         compute_dtype=mc.compute_dtype, bos_token_id=1, eos_token_id=2)


def load_model(cfg: TrainConfig, texts_for_fallback: list[str], mesh=None):
    """``(model_cfg, params, tokenizer, source)`` following ``model.name_or_path``.

    ``auto`` is the embedded stories260K; ``random`` (asked for by name only) a random-init Llama
    with a word-level tokenizer built from ``texts_for_fallback``; anything else a local folder or
    GGUF file, or a Hub id (``model.hub.resolve_model_source``: a missing path is an error naming it).
    On a one-process ``mesh`` with a ``model`` axis, the weights are read straight into their shards
    (``model.sharded_load.load_sharded``).
    """
    mc = cfg.model
    source = resolve_model_source(mc.name_or_path)
    if source.kind != "random":
        if mesh is not None and mesh.shape.get(engine.MODEL, 1) > 1 and not mesh.is_multi_process:
            model_cfg, params = load_sharded(source.path, mesh, dtype=mc.dtype)
        else:
            model_cfg, params = M.load_pretrained(source.path, dtype=mc.dtype)
        model_cfg = model_cfg.replace(compute_dtype=mc.compute_dtype)
        return model_cfg, params, M.load_tokenizer(source.path), source
    from fedhl_jax.data.toy_tokenizer import word_level_tokenizer

    tokenizer = word_level_tokenizer(texts_for_fallback)
    model_cfg = random_model_config(mc, len(tokenizer))
    params = M.init_params(model_cfg, jax.random.PRNGKey(cfg.seed))
    desc = (f"random-init Llama (hidden {mc.random_hidden_size}, {mc.random_num_layers} layers) with a "
            f"word-level tokenizer")
    return model_cfg, params, tokenizer, dataclasses.replace(source, description=desc)


def load_nnx_model(cfg: TrainConfig, texts_for_fallback: list[str]):
    """``(bridge, tokenizer, source)`` of ``model.kind: nnx``: ``model.factory`` called with the
    vocabulary size of a word-level tokenizer built from ``texts_for_fallback`` and the run's seed,
    LoRA placed at the module paths ``model.targets`` matches (``nnx_bridge.from_factory``).

    Raises:
      ConfigError: the factory or a pattern is wrong (``nnx_bridge``'s message).
    """
    from fedhl_jax.data.toy_tokenizer import word_level_tokenizer
    from fedhl_jax.model.hub import ModelSource
    from fedhl_jax.nnx_bridge import from_factory

    tokenizer = word_level_tokenizer(texts_for_fallback)
    try:
        bridge = from_factory(cfg.model.factory, cfg.model.targets, cfg.fed.r_max, vocab_size=len(tokenizer),
                              seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(f"model.factory / model.targets: {e}") from None
    return bridge, tokenizer, ModelSource("nnx", cfg.model.factory,
                                          f"Flax NNX model from {cfg.model.factory} with a word-level tokenizer")


def mesh_from_config(mesh_cfg, clients_per_round: int):
    """The run's device mesh from the config's ``mesh`` section, checked before anything loads.

    Args:
      mesh_cfg: ``MeshConfig`` (``clients: null`` and ``model: 1`` = the automatic layout).
      clients_per_round: the round's client count ``n`` (split evenly over the ``clients`` axis).

    Returns:
      ``None`` (one device), the automatic 1-axis ``clients`` mesh (``engine.client_mesh``), or a
      ``(clients, model)`` mesh (``engine.make_mesh``); with several processes, always a mesh over
      every device of every process.

    Raises:
      ConfigError: ``clients × model`` is not the device count, or ``n`` does not split evenly
        over the ``clients`` axis (the message names the values and the device count).
    """
    count = jax.device_count()
    if not mesh_cfg.explicit and jax.process_count() == 1:
        return engine.client_mesh(clients_per_round)
    model = mesh_cfg.model
    clients = mesh_cfg.clients if mesh_cfg.clients is not None else max(1, count // model)
    if clients * model != count:
        given = f"mesh.clients={mesh_cfg.clients}" if mesh_cfg.clients is not None else "mesh.clients=null"
        raise ConfigError(f"{given} x mesh.model={model} = {clients * model} devices, but there are {count} "
                          f"devices ({jax.process_count()} process(es)); clients x model must equal the device count")
    if clients_per_round % clients:
        raise ConfigError(f"the {clients_per_round} clients of a round (fed.num_clients x fed.participation) do not "
                          f"split evenly over mesh.clients={clients} devices; choose a mesh.clients that divides "
                          f"{clients_per_round}")
    return engine.make_mesh(clients, model)


class Simulation:
    """Everything a run needs, built and validated before any training.

    Args:
      cfg: the run's config.
      log: where progress messages go.
      mesh: a ``clients`` or ``(clients, model)`` mesh; by default the config's ``mesh`` section
        (``mesh_from_config``: every device on ``clients`` when there are several and the round's
        clients split evenly over them); None: one device.
      probe: passed to ``engine.make_round_step`` (shardings of the client factors, for tests).
    """

    def __init__(self, cfg: TrainConfig, *, log: Callable = print, mesh=_AUTO_MESH, probe: Callable | None = None):
        self.cfg, self.log = cfg, log
        fed, dc, o = cfg.fed, cfg.data, cfg.optim
        self.mesh = mesh_from_config(cfg.mesh, fed.clients_per_round) if mesh is _AUTO_MESH else mesh
        self.algorithm = build_algorithm(fed)
        records = load_records(dc, cfg.seed, log)
        if fed.num_clients > len(records[0]):
            raise ConfigError(f"fed.num_clients={fed.num_clients} is more than the {len(records[0])} training "
                              f"examples of {dc.dataset}")
        texts = [" ".join(r.values()) for r in records[0].select(range(min(len(records[0]), 2000)))]
        self.nnx = None
        if cfg.model.kind == "nnx":  # a Flax NNX model from model.factory (fedhl_jax.nnx_bridge)
            self.nnx, self.tokenizer, self.model_source = load_nnx_model(cfg, texts)
            self.model_cfg, self.params, self.shapes = None, self.nnx.base, self.nnx.shapes
        else:
            self.model_cfg, self.params, self.tokenizer, self.model_source = load_model(cfg, texts, self.mesh)
            self.shapes = M.lora_targets(self.model_cfg, cfg.model.targets)
        log(f"model: {self.model_source.description}")
        smallest = min(min(s) for s in self.shapes.values())
        if fed.r_max > smallest:
            raise ConfigError(f"rank {fed.r_max} in fed.ranks exceeds min(d_out, d_in)={smallest} of the "
                              f"LoRA modules {sorted({m.split('.')[-1] for m in self.shapes})}")
        self.ranks = client_ranks(fed, cfg.seed)
        self.algorithm.check_ranks(self.ranks)
        self.data = build_federated_dataset(dc, self.tokenizer, num_clients=fed.num_clients, seed=cfg.seed,
                                            ranks=self.ranks, records=records, log=log)
        self.multi_process = self.mesh is not None and self.mesh.is_multi_process
        self.base = self.params
        if self.mesh is not None:
            model_axis = self.mesh.shape.get(engine.MODEL, 1)
            log(f"sharding the client axis over {self.mesh.shape[engine.CLIENTS]} devices"
                + (f" and the base weights over {model_axis}" if model_axis > 1 else "")
                + (f" ({jax.process_count()} processes)" if self.multi_process else ""))
            if model_axis > 1 or self.multi_process:
                self.base = engine.place_base(self.params, self.mesh)
                if not self.multi_process:
                    self.params = self.base  # one copy of the base, sharded (evaluation follows its layout)
        batcher = self.data.batcher(local_steps=o.local_steps, batch_size=o.batch_size, seed=cfg.seed)
        self.schedule = engine.ClientSchedule(self.ranks, self.data.num_examples, fed.r_max, cfg.model.alpha,
                                              fed.clients_per_round, cfg.seed, batches=batcher,
                                              rslora=cfg.model.rslora, mesh=self.mesh)
        # The clients' optimizer, loss and adapter layout (also used by a deployed node, fedhl_jax.flower).
        pieces = client_pieces(cfg, self.model_cfg, self.algorithm, self.nnx)
        self.optimizer, self.loss, self.merge_delta = pieces.optimizer, pieces.loss, pieces.merge_delta
        self.to_client, self.from_client = pieces.to_client, pieces.from_client
        # Process-wide: the round step, evaluation and generation compile in this mode (fedhl_jax.runtime).
        runtime.set_cpu_matmul(cfg.model.cpu_matmul)
        if cfg.model.cpu_matmul == "accurate" and jax.default_backend() == "cpu":
            log("CPU float32 matmuls: accurate (XLA's own kernels, YNNPACK fusions off; model.cpu_matmul)")
        self.round_fn = engine.compile_round_step(engine.make_round_step(
            self.algorithm, self.loss, self.optimizer, clients_per_chunk=fed.clients_per_chunk,
            merge_delta=self.merge_delta, to_client=self.to_client, from_client=self.from_client,
            mesh=self.mesh, probe=probe, length_bucket=pieces.length_bucket))
        self.evaluator = None
        if self.data.eval is not None and self.nnx is None:  # held-out metrics: the built-in Llama only
            self.evaluator = GlobalEvaluator(self.model_cfg, self.params, self.tokenizer, self.data.eval,
                                             self.algorithm, self.ranks, cfg.eval, eval_metric(dc.dataset),
                                             alpha=cfg.model.alpha, rslora=cfg.model.rslora, r_max=fed.r_max,
                                             validation=self.data.validation)
            if self.multi_process:
                self.evaluator = _OnHostState(self.evaluator, self)

    def init_state(self):
        """The server state before round 0 (random choices from the run's seed)."""
        return self.place_state(self.algorithm.init(self.shapes, jax.random.PRNGKey(self.cfg.seed)))

    def place_state(self, state):
        """A server state (e.g. restored from a checkpoint) where the round expects it: replicated
        over the mesh when it spans several processes, else as it is."""
        return engine.replicate(state, self.mesh) if self.multi_process else state

    def host_state(self, state):
        """The state for work that each process does alone (evaluation, export): host copies of
        the replicated arrays when the mesh spans several processes, else the state itself."""
        return jax.device_get(state) if self.multi_process else state

    def start(self, first_round: int) -> None:
        """Nothing to prepare: the round step compiles on its first call (``driver.RoundExecutor``)."""

    def run(self, state, rounds: Iterable[int], callbacks: Sequence[Callable] = ()):
        """Runs ``rounds`` through ``engine.run_rounds``; returns the final state."""
        return engine.run_rounds(self.round_fn, state, self.base, self.schedule, rounds,
                                 algorithm=self.algorithm, shapes=self.shapes, callbacks=callbacks)

    def run_round(self, state, t: int) -> engine.RoundRecord:
        """One round; the record holds the new state and the round's metrics."""
        out = []
        self.run(state, [t], [out.append])
        return out[0]

    def evaluate(self, state, t: int = 0, *, generate: bool | None = None) -> dict:
        """Held-out metrics of the global model after round ``t`` ({} without held-out data).

        Args:
          state: the server state.
          t: the round just finished (0-based).
          generate: run the generation metrics; None: when ``eval.generate_every`` says so (every
            evaluation when it is null, else every ``generate_every``-th round and the last; 0: the last only).
        """
        if self.evaluator is None:
            return {}
        if generate is None:
            every = self.cfg.eval.generate_every
            generate = every is None or (every > 0 and (t + 1) % every == 0) or t + 1 == self.cfg.fed.rounds
        return self.evaluator(state, self.schedule.key(t), generate=generate)

    def global_delta(self, state) -> dict:
        return self.algorithm.global_delta(state)


class _OnHostState:
    """An evaluator called with host copies of the state: with several processes, each one
    evaluates alone on its own copy of the base (the round's state is replicated over them)."""

    def __init__(self, evaluator, sim: Simulation):
        self.evaluator, self.sim = evaluator, sim

    def __call__(self, state, *args, **kwargs):
        return self.evaluator(self.sim.host_state(state), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.evaluator, name)
