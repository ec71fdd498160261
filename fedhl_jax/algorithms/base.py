"""What every algorithm shares: the ``Algorithm`` contract, the registry and the state layouts.

An algorithm is a factory ``factory(r_max, options=None, **overrides) -> Algorithm`` in a module
of the ``fedhl_jax.algorithms`` package, decorated with ``@register("name")``; the package imports
each of its modules when it is imported, so a new module is found without editing any list. Its
server state is a pytree of its own (a ``flax.struct`` dataclass whose class attribute ``layout``
names it and its version, e.g. ``"dense/2"``), read by nothing outside the algorithm except
``state.round``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedhl_jax import aggregation as agg


class ClientStart(NamedTuple):
    """What the sampled clients start a round from.

    Attributes:
      B: ``{module: [n, d_out, r_max]}``.
      A: ``{module: [n, r_max, d_in]}``.
      base_delta: ``{module: [d_out, d_in]}`` added to the frozen base weights of
        every client (shared, not per client), or ``None``.
    """

    B: dict
    A: dict
    base_delta: dict | None


class ClientPlan(NamedTuple):
    """The server's broadcast of a round, before any per-client factor is built.

    Attributes:
      shared: pytree without a client axis (e.g. the SVD's ``U`` and ``Vᵀ``).
      per_client: pytree with a leading client axis ``n`` (``O(r_max)`` per client).
      base_delta: ``{module: [d_out, d_in]}`` shared base update, or ``None``.
    """

    shared: Any
    per_client: Any
    base_delta: dict | None


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of an algorithm that has none."""


def resolve_options(cls, options, overrides: dict):
    """``options`` (an instance of ``cls``, a dict or None) with keyword ``overrides``, validated.

    Raises:
      TypeError: an option ``cls`` does not have (named, with the valid ones), or options of another type.
      ValueError: an invalid value (raised by ``cls``).
    """
    if options is None:
        options = {}
    if isinstance(options, dict):
        options = {**options, **overrides}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"unknown option {unknown[0]!r}; valid options: {', '.join(names) or 'none'}")
        return cls(**options)
    if not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__} or a dict, got {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options


def comm_bytes(shapes: dict, ranks, trainable=("A", "B"), *, stacked_down: bool = False) -> tuple[int, int]:
    """Bytes sent down and up in a round: float32 factors of the clients' active ranks.

    Args:
      shapes: ``{module: (d_out, d_in)}``.
      ranks: ``[n]`` ranks of the round's clients.
      trainable: factors the clients send back (FFA-LoRA: ``B`` only).
      stacked_down: every client also receives the round's stacked factors of all clients (FLoRA).

    Returns:
      ``(down, up)`` in bytes.
    """
    ranks = np.asarray(ranks)
    per_rank = sum(d_out + d_in for d_out, d_in in shapes.values()) * 4
    up_rank = per_rank if "A" in trainable else sum(d for d, _ in shapes.values()) * 4
    down = int(per_rank * ranks.sum())
    if stacked_down:
        down += int(per_rank * ranks.sum() * len(ranks))
    return down, int(up_rank * ranks.sum())


# --------------------------------------------------------------------------- state layouts

#: The layout of checkpoints written when one ``ServerState{G, dec, B, A, round}`` served every
#: algorithm (the fields an algorithm did not use were empty dicts, so they hold no arrays).
LEGACY_LAYOUT = "server-state/1"

_FIELD = re.compile(r"^\.(\w+)")


def state_fields(flat: dict) -> set[str]:
    """The top-level state fields named by the keys of a flat state (``".G['m']"`` → ``"G"``)."""
    names = set()
    for key in flat:
        m = _FIELD.match(key)
        if m is None:
            raise ValueError(f"checkpoint array {key!r} is not a field of a server state")
        names.add(m.group(1))
    return names


def state_migration(state_type, *, from_legacy: bool = True) -> Callable:
    """``migrate_state(layout, flat) -> flat`` for checkpoints of ``state_type``.

    ``flat`` maps ``jax.tree_util.keystr`` paths (``".G['m']"``, ``".dec['m'].U"``, ``".round"``)
    to arrays, as the checkpoints store them. A checkpoint of ``state_type.layout`` is returned
    as it is. With ``from_legacy``, one of ``LEGACY_LAYOUT`` is read too when every array it holds
    is a field of ``state_type`` (the legacy state's unused fields held no arrays, so the paths are
    the same); anything else is refused.

    Raises:
      ValueError: naming the checkpoint's layout and the ones this version reads, or the legacy
        array that has no place in ``state_type``.
    """
    layout = state_type.layout
    fields = {f.name for f in dataclasses.fields(state_type)}
    readable = (layout, LEGACY_LAYOUT) if from_legacy else (layout,)

    def migrate_state(old_layout: str, flat: dict) -> dict:
        if old_layout not in readable:
            raise ValueError(f"checkpoint state layout {old_layout!r} cannot be read: this version reads "
                             + " and ".join(repr(x) for x in readable))
        names = state_fields(flat)
        if names - fields or "round" not in names:
            extra = sorted(names - fields) or ["no 'round'"]
            raise ValueError(f"checkpoint state layout {old_layout!r} holds {extra[0]!r}, which layout "
                             f"{layout!r} ({', '.join(sorted(fields))}) has no place for")
        return dict(flat)

    return migrate_state


# --------------------------------------------------------------------------- the contract


class Algorithm(NamedTuple):
    """A federated LoRA algorithm (see the ``fedhl_jax.algorithms`` package docstring).

    ``state_layout`` names the server state's tree and its version (checkpoints record it);
    ``migrate_state(layout, flat) -> flat`` reads the flat arrays of a checkpoint written with
    ``layout`` into this algorithm's state, or raises ``ValueError`` naming both layouts.
    """

    name: str
    init: Callable
    plan: Callable
    materialize: Callable
    aggregate: Callable
    global_delta: Callable
    check_ranks: Callable
    trainable: tuple = ("A", "B")
    options: Any = NoOptions()
    homogeneous: bool = False
    per_rank_eval: bool = False
    stacked_down: bool = False
    state_layout: str = ""
    migrate_state: Callable | None = None

    def comm_bytes(self, shapes: dict, ranks) -> tuple[int, int]:
        """``(down, up)`` bytes of a round whose clients have ``ranks`` (see ``comm_bytes``)."""
        return comm_bytes(shapes, ranks, self.trainable, stacked_down=self.stacked_down)

    def broadcast(self, state, mask, scale, key) -> ClientStart:
        """Every sampled client's starting factors: ``plan`` then ``materialize`` for each client."""
        plan = self.plan(state, mask, scale, key)
        B, A = jax.vmap(self.materialize, in_axes=(None, 0, 0))(plan.shared, plan.per_client, mask)
        return ClientStart(B, A, plan.base_delta)


# --------------------------------------------------------------------------- shared checks and steps


def check_shapes(shapes: dict, r_max: int) -> None:
    """Raises ``ValueError`` when no module is given or ``r_max`` exceeds a module's smaller side."""
    if not shapes:
        raise ValueError("no LoRA modules given")
    for name, (d_out, d_in) in shapes.items():
        if r_max > min(d_out, d_in):
            raise ValueError(f"r_max={r_max} exceeds min(d_out, d_in)={min(d_out, d_in)} of module {name!r}")


def check_rmax(r_max) -> int:
    """``r_max`` as an int; ``ValueError`` unless it is a positive integer."""
    if not isinstance(r_max, (int, np.integer)) or r_max < 1:
        raise ValueError(f"r_max must be a positive integer, got {r_max!r}")
    return int(r_max)


def require_key(key, what: str):
    """``key``, or ``ValueError`` saying that ``what`` needs one."""
    if key is None:
        raise ValueError(f"{what} needs a PRNG key (every random choice follows from the run's seed)")
    return key


def module_keys(key, names) -> dict:
    """One key per module name, folded from ``key`` in the modules' order."""
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(names)}


def valid_clients(B: dict, A: dict, mask: jax.Array, scale: jax.Array) -> jax.Array:
    """``[n]``: a client is valid when every module's update is finite and does not overflow."""
    ok = [agg.finite_clients(B[k], A[k], mask, scale) for k in B]
    return jnp.all(jnp.stack(ok), axis=0)


def all_finite(tree) -> jax.Array:
    """``[]`` bool: every leaf of ``tree`` is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [jnp.bool_(True)]))


def guard(new_state, old_state, valid: jax.Array, info: dict):
    """Keeps ``old_state`` (and says so in ``info["applied"]``) when no client was kept or the new
    state is not finite, so a diverging round never reaches the server state; counts the round.

    Returns:
      ``(state, info)`` with ``state.round = old_state.round + 1``.
    """
    applied = jnp.any(valid) & all_finite(new_state)
    state = jax.tree.map(lambda a, b: jnp.where(applied, a, b), new_state, old_state)
    return state.replace(round=old_state.round + 1), dict(info, applied=applied)


def zero_round() -> jax.Array:
    """``[]`` int32 zero: the ``round`` of a fresh state."""
    return jnp.zeros((), jnp.int32)


# --------------------------------------------------------------------------- registry

#: Name → factory, filled by ``register`` as the package imports its modules.
ALGORITHMS: dict[str, Callable] = {}


def register(name: str) -> Callable:
    """Decorator: adds ``factory`` to ``ALGORITHMS`` under ``name``.

    Raises:
      ValueError: another factory is registered under ``name`` (both are named).
    """
    def deco(factory: Callable) -> Callable:
        old = ALGORITHMS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (factory.__module__, factory.__qualname__):
            raise ValueError(f"algorithm {name!r} is registered twice: {old.__module__}.{old.__qualname__} "
                             f"and {factory.__module__}.{factory.__qualname__}")
        ALGORITHMS[name] = factory
        return factory

    return deco


def make_algorithm(name: str, r_max: int, options: dict | Any | None = None, **overrides) -> Algorithm:
    """Builds an algorithm by name (``ALGORITHMS``) with its options.

    Args:
      name: a key of ``ALGORITHMS``.
      r_max: padded rank.
      options: the algorithm's options dataclass, or a dict of its fields (e.g. from YAML).
      **overrides: single option fields.

    Raises:
      ValueError: unknown algorithm, or an option that this algorithm does not have (the message
        names the option, the algorithm and its valid options), or an invalid value.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {sorted(ALGORITHMS)}")
    try:
        return ALGORITHMS[name](r_max, options, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"algorithm {name!r}: {e}") from None
