"""Objects built from a validated config: the run's algorithm and its clients' training pieces.

The config classes (``fedhl_jax.config``) hold plain frozen values; this module turns the
``fed`` section into an :class:`~fedhl_jax.algorithms.Algorithm`. ``config.load_config`` (and
``config.from_dict``) run :func:`checked_options` once while parsing, so a bad option is an error
naming its key before anything is loaded or compiled; the runners then call
:func:`build_algorithm` once.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from fedhl_jax.algorithms import ALGORITHMS, Algorithm, make_algorithm
from fedhl_jax.errors import ConfigError

if TYPE_CHECKING:
    import optax

    from fedhl_jax.config import FedConfig, TrainConfig

__all__ = ["ClientPieces", "build_algorithm", "checked_options", "client_pieces", "options_class"]


def options_class(algorithm: str) -> type:
    """The options dataclass of an algorithm (``FedHLOptions``, ``SVDOptions``, ``NoOptions``, ...),
    read from its factory's ``options`` annotation; no algorithm is built.

    Raises:
      ConfigError: an unknown algorithm name.
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"fed.algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    hint = typing.get_type_hints(ALGORITHMS[algorithm]).get("options")
    classes = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
    if classes:
        return classes[0]
    return type(make_algorithm(algorithm, 1).options)  # a factory without the annotation


def _build(fed: FedConfig, options: dict) -> Algorithm:
    try:
        return make_algorithm(fed.algorithm, fed.r_max, dict(options))
    except ValueError as e:
        raise ConfigError(f"fed.options: {e}") from None


def checked_options(fed: FedConfig, coerce: Callable[[Any, Any, str], Any] = lambda value, tp, key: value) -> dict:
    """``fed.options`` checked against the algorithm's options, with every default filled in.

    Each given option must be a field of the algorithm's options dataclass, and
    ``coerce(value, field type, "fed.options.<key>")`` gives its value (``config.coerce_value``:
    a boolean option refuses ``3``, a float option refuses ``.inf`` and ``.nan``); the algorithm is
    then built once (its own checks run, e.g. ``eps > 0``) and discarded. A homogeneous algorithm
    (FedIT, ...) needs one rank for every client.

    Returns:
      A plain dict holding every option of the algorithm.

    Raises:
      ConfigError: naming the offending ``fed.options.<key>`` (or ``fed.ranks``).
    """
    cls = options_class(fed.algorithm)
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(fed.options, dict):
        raise ConfigError(f"fed.options must be a mapping, got {fed.options!r}")
    typed = {}
    for key, value in fed.options.items():
        if key not in valid:
            raise ConfigError(f"fed.options.{key} is not an option of fed.algorithm={fed.algorithm!r}; "
                              f"its options: {', '.join(valid) or 'none'}")
        typed[key] = coerce(value, hints[key], f"fed.options.{key}")
    alg = _build(fed, typed)
    if alg.homogeneous and fed.rank_distribution != "homogeneous" and len(set(fed.ranks)) != 1:
        raise ConfigError(f"fed.algorithm={fed.algorithm!r} needs homogeneous ranks; got fed.ranks={list(fed.ranks)} "
                          f"with fed.rank_distribution={fed.rank_distribution!r}")
    return dataclasses.asdict(alg.options)


def build_algorithm(fed: FedConfig) -> Algorithm:
    """The run's algorithm with its options (``fed.algorithm``, ``fed.options``, ``r_max`` of ``fed.ranks``).

    Raises:
      ConfigError: naming a bad option (only for a ``FedConfig`` that did not come through
        ``config.load_config`` / ``config.from_dict``, which check the options already).
    """
    return _build(fed, fed.options)


class ClientPieces(NamedTuple):
    """What a client's local training is made of (``engine.make_client_step`` / ``make_round_step``).

    Attributes:
      optimizer: the clients' optimizer (``optim``; the algorithm's trainable factors only).
      loss: ``(params, adapter, tokens, mask) -> scalar`` (the model's, with ``model.remat``).
      to_client, from_client: the adapter's layout change into and out of the loss (the built-in Llama
        scans stacked layers), or None.
      merge_delta: ``(params, delta) -> params``: a dense update merged into the base weights (the
        algorithms that move the base, FLoRA).
      length_bucket: ``optim.length_bucket`` for the built-in Llama; 0 (full width) for an NNX model,
        whose batch layout is its own.
    """

    optimizer: optax.GradientTransformation
    loss: Callable
    to_client: Callable | None
    from_client: Callable | None
    merge_delta: Callable
    length_bucket: int


def client_pieces(cfg: TrainConfig, model_cfg, algorithm: Algorithm, bridge=None) -> ClientPieces:
    """The clients' optimizer, loss, adapter layout, base merge and step width, as the simulation and a deployed
    node (``fedhl_jax.flower.node``) both train: one construction, so a node's step is the simulation's.

    Args:
      cfg: the run's config (``optim``, ``model.remat``).
      model_cfg: the built-in Llama's ``LlamaConfig`` (unused with ``bridge``).
      algorithm: the run's algorithm (its ``trainable`` factors).
      bridge: the ``nnx_bridge.NnxLoRA`` of ``model.kind: nnx``: its loss and merge, and the adapter as it is.

    Returns:
      A ``ClientPieces``.
    """
    from fedhl_jax import model as M
    from fedhl_jax.local import make_optimizer

    o = cfg.optim
    optimizer = make_optimizer(o.optimizer, o.lr, lr_b=o.lr_b, weight_decay=o.weight_decay, momentum=o.momentum,
                               grad_clip=o.grad_clip, trainable=algorithm.trainable)
    if bridge is not None:
        return ClientPieces(optimizer, bridge.loss, None, None, bridge.merge_delta, 0)
    train_cfg = model_cfg.replace(remat=cfg.model.remat)  # remat per scanned block, for training
    return ClientPieces(optimizer, lambda params, adapter, tokens, mask: M.loss_fn(train_cfg, params, adapter, tokens, mask),
                        lambda ad: M.stacked_adapter(model_cfg, ad), lambda ad: M.per_layer_adapter(model_cfg, ad),
                        M.merge_delta, o.length_bucket)
