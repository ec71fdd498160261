"""The round engine: one pure, jitted federated round and the host loop that drives it.

A round (``make_round_step``) is one compiled call, whatever clients are sampled and whatever
their ranks::

    plan      = algorithm.plan(state, mask, scale, key)           # server: one SVD per module
    base      = merge_delta(base, plan.base_delta)                # FLoRA / FedEx-LoRA only
    B_i, A_i  = algorithm.materialize(plan, i)                    # client i, inside the vmap
    B_i, A_i  = K optimizer steps of loss(base, (B_i, A_i), batch_i[k])
    state     = algorithm.aggregate(state, B, A, mask, scale, n_i, key')

Every array with a client axis has the same leading size ``n`` (the clients of a round), so
ranks, client sampling and data never change a shape and never recompile. The loss is any
``loss(base, adapter, *batch_k) -> []``: the language model's cross-entropy for training runs,
a least-squares loss for the bias experiment (``experiments/linreg.py``).

The client side of a round (``make_client_step``), the schedule of sampled clients
(``ClientSchedule``: ids, masks, scales, keys, batches) and the metrics record (``round_metrics``)
are shared with a deployed federation (``fedhl_jax.flower``). ``run_rounds`` is the bare host loop
(the benchmarks use it); a run around the rounds is ``driver.py``'s.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedhl_jax import runtime
from fedhl_jax.algorithms import Algorithm
from fedhl_jax.data.batching import sample_clients
from fedhl_jax.local import make_clients_train, make_local_train
from fedhl_jax.lora import Adapter, lora_scale, rank_mask

#: Mesh axis of the simulated clients.
CLIENTS = "clients"
#: Mesh axis over which the frozen base weights are sharded (FSDP-style).
MODEL = "model"
#: ``fold_in`` stream of the round key that the server's aggregation draws from (``plan`` uses the key itself).
AGGREGATE_STREAM = 0x5EED


class RoundInputs(NamedTuple):
    """Everything a round needs besides the server state and the frozen base.

    Attributes:
      mask: ``[n, r_max]`` 0/1 rank masks of the round's clients.
      scale: ``[n]`` LoRA scales ``s_i``.
      num_examples: ``[n]`` local data sizes (FedAvg-style weights).
      batch: tuple of arrays ``[n, K, ...]``: client ``i``'s slice for local step ``k``
        (language model: ``tokens, loss_mask`` each ``[n, K, b, T]``).
      key: the round's PRNG key (``fold_in(PRNGKey(seed), t)``).
    """

    mask: jax.Array
    scale: jax.Array
    num_examples: jax.Array
    batch: tuple
    key: jax.Array


def add_delta(base: dict, delta: dict) -> dict:
    """Default ``merge_delta``: ``{module: base[module] + delta[module]}`` over a flat dict."""
    return {k: (v + delta[k] if k in delta else v) for k, v in base.items()}


class ClientStep(NamedTuple):
    """One client's side of a round, as pure functions (the simulation vmaps them over the round's
    clients; a deployed node, ``flower.node.NodeTrainer``, calls ``train`` for itself).

    Attributes:
      train: ``train(base, B, A, mask, scale, *batch) -> (adapter, losses)``: ``K`` local steps
        from the starting factors ``B {module: [d_out, r_max]}``, ``A {module: [r_max, d_in]}``
        with ``mask [r_max]``, ``scale []`` and ``batch`` arrays ``[K, ...]``; returns the trained
        ``Adapter`` (one factor per module) and ``losses [K]`` (the loss before each step).
      from_broadcast: ``from_broadcast(base, shared, per_client, mask, scale, *batch)``: the same,
        the starting factors first built from the server's broadcast (``algorithm.materialize``).
    """

    train: Callable
    from_broadcast: Callable


def make_client_step(algorithm: Algorithm, loss: Callable, optimizer: optax.GradientTransformation, *,
                     remat: bool = False, to_client: Callable | None = None,
                     from_client: Callable | None = None, length_bucket: int = 0) -> ClientStep:
    """Builds a client's step (``ClientStep``); the arguments are ``make_round_step``'s."""
    local_train = make_local_train(loss, optimizer, remat=remat, length_bucket=length_bucket)

    def train(base, B, A, mask, scale, *batch, widths=None):
        adapter = Adapter(B, A, mask, scale)
        trained, losses = local_train(base, to_client(adapter) if to_client else adapter, *batch, widths=widths)
        return (from_client(trained) if from_client else trained), losses

    def from_broadcast(base, shared, per_client, mask, scale, *batch, widths=None):
        # The client builds its starting factors from the broadcast (its slice of the SVD), then trains.
        B, A = algorithm.materialize(shared, per_client, mask)
        return train(base, B, A, mask, scale, *batch, widths=widths)

    return ClientStep(train, from_broadcast)


def make_round_step(algorithm: Algorithm, loss: Callable, optimizer: optax.GradientTransformation, *,
                    clients_per_chunk: int | None = None, remat: bool = False,
                    merge_delta: Callable = add_delta, to_client: Callable | None = None,
                    from_client: Callable | None = None, mesh: Mesh | None = None,
                    probe: Callable | None = None, length_bucket: int = 0) -> Callable:
    """Builds the pure ``round_step(state, base, inputs) -> (state, info)``.

    Args:
      algorithm: the federated algorithm (``algorithms.make_algorithm``).
      loss: ``loss(base, adapter, *batch_k) -> []`` of one client on one step's batch.
      optimizer: the clients' optimizer (``local.make_optimizer``).
      clients_per_chunk: vmapped clients at a time (None: all at once).
      remat: rematerialise the forward pass in the backward pass.
      merge_delta: ``merge_delta(base, delta) -> base`` for algorithms that move the base
        (``plan.base_delta``); the language model passes ``model.merge_delta``.
      to_client, from_client: change the layout of a client's adapter for local training and back
        (the language model stacks its per-layer factors along the layer axis, so the optimizer
        sees one array per module type and compile time does not grow with depth); the server
        math always sees one factor per module.
      mesh: a mesh with a ``clients`` axis: the client axis of every per-client array is
        partitioned over it (``jax.vmap(..., spmd_axis_name="clients")`` plus sharding
        constraints on the client inputs and outputs).
      probe: ``probe(name, shape, sharding)``, called at compile time with the sharding of each
        trained client factor (``"B"``, ``"A"``) inside the round; for tests and debugging.
      length_bucket: ``w`` > 0: every local step runs at the narrowest width ``w, 2w, ..., T`` that
        holds the targets of the clients vmapped with it (``local.make_local_train``); the batch
        is then ``(..., loss_mask)`` with the sequence as the last axis and ``loss`` causal.

    Returns:
      ``round_step``; ``info`` holds the algorithm's aggregation info (``p``, ``valid``, ...)
      and ``losses [n, K]`` (each client's loss before each local step).
    """
    client = make_client_step(algorithm, loss, optimizer, remat=remat, to_client=to_client, from_client=from_client,
                              length_bucket=length_bucket)
    if mesh is not None and clients_per_chunk is not None:  # each chunk's clients split evenly over the mesh
        size = mesh.shape[CLIENTS]
        clients_per_chunk = -(-clients_per_chunk // size) * size

    clients_train = make_clients_train(client.from_broadcast, clients_per_chunk=clients_per_chunk, n_shared=2,
                                       spmd_axis_name=CLIENTS if mesh is not None else None,
                                       length_bucket=length_bucket)

    def on_clients(tree):
        if mesh is None:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(CLIENTS))), tree)

    def everywhere(tree):
        # Several processes: the new state and the info are replicated, so every process reads them whole.
        if mesh is None or not mesh.is_multi_process:
            return tree
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P())), tree)

    def round_step(state, base, inputs: RoundInputs):
        mask, scale, num_examples, batch = on_clients((inputs.mask, inputs.scale, inputs.num_examples,
                                                       tuple(inputs.batch)))
        plan = algorithm.plan(state, mask, scale, inputs.key)  # server: O(r_max) per client on top of shared arrays
        if plan.base_delta is not None:
            base = merge_delta(base, plan.base_delta)
        trained, losses = clients_train(base, plan.shared, plan.per_client, mask, scale, *batch)  # losses [n, K]
        B, A, losses = on_clients((trained.B, trained.A, losses))
        if probe is not None:
            for name, tree in (("B", B), ("A", A)):
                for leaf in jax.tree.leaves(tree):
                    jax.debug.inspect_array_sharding(
                        leaf, callback=lambda s, name=name, shape=leaf.shape: probe(name, shape, s))
        key = jax.random.fold_in(inputs.key, AGGREGATE_STREAM)
        state, info = algorithm.aggregate(state, B, A, mask, scale, num_examples, key=key)
        return everywhere((state, dict(info, losses=losses)))

    return round_step


def compile_round_step(round_step: Callable) -> Callable:
    """``jax.jit`` of a round step with the server state donated (its buffers are reused)."""
    return runtime.jit(round_step, donate_argnums=(0,))


# --------------------------------------------------------------------------- host side


def round_key(seed: int, t: int) -> jax.Array:
    """Round ``t``'s PRNG key: the plan draws from it, the aggregation from its ``AGGREGATE_STREAM``
    fold (a simulation and a deployment of the same seed use the same keys)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), t)


@dataclasses.dataclass(frozen=True)
class ClientSchedule:
    """Who trains in round ``t``, with which rank and data (host side, NumPy).

    Attributes:
      ranks: ``[num_clients]`` each client's rank, fixed for the run.
      num_examples: ``[num_clients]`` local data sizes.
      r_max: padded rank.
      alpha: LoRA α (``s = α/r``, or ``α/√r`` with ``rslora``).
      clients_per_round: clients sampled each round (same count every round: static shapes).
      seed: the run's seed; round ``t`` samples and keys from ``(seed, t)`` only, so a resumed
        run repeats the same rounds exactly.
      batches: ``batches(t, ids) -> tuple of arrays [n, K, ...]`` (None: no per-round data).
      rslora: ``s = α/√r``.
      mesh: partition the per-client arrays over its ``clients`` axis.
    """

    ranks: np.ndarray
    num_examples: np.ndarray
    r_max: int
    alpha: float
    clients_per_round: int
    seed: int
    batches: Callable | None = None
    rslora: bool = False
    mesh: Mesh | None = None

    def sample(self, t: int) -> np.ndarray:
        """``[clients_per_round]`` ids of round ``t``'s clients (all of them when everyone participates)."""
        return sample_clients(len(self.ranks), self.clients_per_round, t, self.seed)

    def key(self, t: int) -> jax.Array:
        return round_key(self.seed, t)

    def __call__(self, t: int) -> tuple[RoundInputs, np.ndarray]:
        """Round ``t``'s inputs and its client ids.

        On a mesh that spans several processes, each process builds the batches of the clients
        its own devices hold only, and the inputs are global arrays (``process_local_inputs``).
        """
        ids = self.sample(t)
        ranks = self.ranks[ids]
        if self.mesh is not None and self.mesh.is_multi_process:
            return self.process_local_inputs(t, ids), ids
        batch = tuple(jnp.asarray(b) for b in self.batches(t, ids)) if self.batches is not None else ()
        per_client = (rank_mask(ranks, self.r_max), lora_scale(ranks, self.alpha, rslora=self.rslora),
                      jnp.asarray(self.num_examples[ids], jnp.float32), batch)
        if self.mesh is not None:
            per_client = jax.device_put(per_client, NamedSharding(self.mesh, P(CLIENTS)))
        return RoundInputs(*per_client, self.key(t)), ids

    def process_local_inputs(self, t: int, ids: np.ndarray) -> RoundInputs:
        """Round ``t``'s inputs as global arrays over a multi-process mesh.

        The client axis ``[n]`` is split over the mesh's ``clients`` axis; this process calls
        ``batches`` for the rows its addressable devices hold and no others
        (``jax.make_array_from_callback``). Masks, scales, sizes and the key are cheap and are
        computed whole by every process (the same values everywhere).
        """
        n = len(ids)
        clients = NamedSharding(self.mesh, P(CLIENTS))
        rows = sorted({i for idx in clients.addressable_devices_indices_map((n,)).values() for i in range(n)[idx[0]]})
        where = {row: k for k, row in enumerate(rows)}

        def spread(local: np.ndarray, local_rows: bool) -> jax.Array:
            local = np.asarray(local)
            pick = (lambda idx: [where[i] for i in range(n)[idx[0]]]) if local_rows else (lambda idx: idx[0])
            return jax.make_array_from_callback((n,) + local.shape[1:], clients,
                                                lambda idx: local[pick(idx)])

        ranks = self.ranks[ids]
        host = (rank_mask(ranks, self.r_max), lora_scale(ranks, self.alpha, rslora=self.rslora),
                np.asarray(self.num_examples[ids], np.float32))
        batch = self.batches(t, ids[rows]) if self.batches is not None else ()
        key = np.asarray(self.key(t))
        return RoundInputs(*(spread(x, False) for x in host), tuple(spread(b, True) for b in batch),
                           replicate(key, self.mesh))


def _global_array(x, sharding: NamedSharding) -> jax.Array:
    """A host value that every process holds whole, as a global array with ``sharding`` (each
    process puts the shards of its own devices)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicate(tree, mesh: Mesh):
    """``tree``'s host values (the same in every process) as arrays replicated over ``mesh``."""
    everywhere = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _global_array(x, everywhere), tree)


def client_mesh(clients_per_round: int, devices: Sequence | None = None) -> Mesh | None:
    """A 1-axis ``clients`` mesh over every device when there are several and the round's clients
    split evenly over them; else None (one device)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) > 1 and clients_per_round % len(devices) == 0:
        return Mesh(np.array(devices), (CLIENTS,))
    return None


def make_mesh(clients: int, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """A 2-axis ``(clients, model)`` mesh over ``devices`` (default: every device of every process).

    Args:
      clients: size of the ``clients`` axis (the round's client axis is split over it).
      model: size of the ``model`` axis (the frozen base weights are sharded over it).
      devices: the devices, ``clients * model`` of them, in ``jax.devices()`` order: the ``model``
        axis runs over neighbouring devices (those of one process first), so the base weights'
        gathers stay within a host whenever ``model`` is at most its device count.

    Raises:
      ValueError: ``clients * model`` differs from the device count (the message names both).
    """
    devices = list(jax.devices() if devices is None else devices)
    if clients * model != len(devices):
        raise ValueError(f"mesh clients={clients} x model={model} = {clients * model} devices, but there are "
                         f"{len(devices)} devices; the product must equal the device count")
    return Mesh(np.array(devices, dtype=object).reshape(clients, model), (CLIENTS, MODEL))


def fsdp_spec(shape: Sequence[int], size: int) -> P:
    """The ``PartitionSpec`` of one frozen base weight over a ``model`` axis of ``size`` devices.

    The largest dimension that ``size`` divides is split over ``model`` (the first of equal ones);
    a weight with no such dimension (norm gains of odd sizes, scalars) is replicated.
    """
    if size <= 1:
        return P()
    dims = [d for d in range(len(shape)) if shape[d] % size == 0 and shape[d] >= size]
    if not dims:
        return P()
    best = max(dims, key=lambda d: (shape[d], -d))
    return P(*([None] * best + [MODEL]))


def base_shardings(base, mesh: Mesh):
    """``NamedSharding`` of every leaf of the frozen base on ``mesh`` (``fsdp_spec`` over its
    ``model`` axis, replicated over ``clients``; fully replicated on a mesh without ``model``)."""
    size = mesh.shape.get(MODEL, 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size)), base)


def place_base(base, mesh: Mesh | None):
    """The frozen base laid out on ``mesh`` (``base_shardings``); unchanged without a mesh.

    On a mesh of several processes each process reads the shards of its own devices from its
    copy of the base (every process loads the same weights).
    """
    if mesh is None:
        return base
    shardings = base_shardings(base, mesh)
    if not mesh.is_multi_process:
        return jax.device_put(base, shardings)
    return jax.tree.map(_global_array, base, shardings)


@dataclasses.dataclass
class RoundRecord:
    """What a round produced, for callbacks.

    Attributes:
      t: the round (0-based).
      state: the server state after it.
      info: the round step's ``info`` (device arrays).
      ids: ``[n]`` the clients that trained.
      ranks: ``[n]`` their ranks.
      metrics: the round's metrics (``round_metrics``); callbacks may add to it.
    """

    t: int
    state: Any
    info: dict
    ids: np.ndarray
    ranks: np.ndarray
    metrics: dict


def round_metrics(t: int, ids: np.ndarray, ranks: np.ndarray, info: dict, algorithm: Algorithm,
                  shapes: dict, seconds: float) -> dict:
    """The per-round metrics line (``metrics.jsonl``): losses, weights, exclusions, bytes, time.

    The train losses are means over the clients whose update was kept (``info["valid"]``);
    ``applied`` says whether the aggregate changed the server state.
    """
    losses = np.asarray(info["losses"])  # [n, K]
    valid = np.asarray(info["valid"])
    kept = losses[valid] if valid.any() else np.full_like(losses[:1], np.nan)
    down, up = algorithm.comm_bytes(shapes, ranks)
    m = {"round": t, "clients": ids, "ranks": ranks,
         "train_loss": float(kept.mean()), "train_loss_first_step": float(kept[:, 0].mean()),
         "train_loss_last_step": float(kept[:, -1].mean()),
         "p": np.asarray(info["p"]), "excluded": int((~valid).sum()), "applied": bool(info["applied"]),
         "bytes_down": down, "bytes_up": up}
    if "errors" in info:
        m["trunc_error"] = np.asarray(info["errors"])
    m["seconds"] = seconds
    return m


def run_rounds(step: Callable, state, base, schedule: ClientSchedule, rounds: Iterable[int], *,
               algorithm: Algorithm, shapes: dict, callbacks: Sequence[Callable] = ()):
    """Runs ``rounds`` with the compiled ``step`` and returns the final server state.

    After each round, every callback is called in order with a ``RoundRecord`` (evaluation,
    metrics, checkpoints, progress); a callback may add entries to ``record.metrics`` for the
    ones after it, and stops the run by raising.

    Args:
      step: ``compile_round_step(make_round_step(...))``.
      state: the server state before the first of ``rounds`` (donated to the step).
      base: the frozen base parameters.
      schedule: the ``ClientSchedule``.
      rounds: the rounds to run, e.g. ``range(start, total)``.
      algorithm, shapes: for the metrics (bytes per round).
      callbacks: ``callback(record) -> None``.
    """
    for t in rounds:
        t0 = time.perf_counter()
        inputs, ids = schedule(t)
        state, info = jax.block_until_ready(step(state, base, inputs))
        ranks = schedule.ranks[ids]
        metrics = round_metrics(t, ids, ranks, info, algorithm, shapes, time.perf_counter() - t0)
        record = RoundRecord(t, state, info, ids, ranks, metrics)
        for callback in callbacks:
            callback(record)
    return state
