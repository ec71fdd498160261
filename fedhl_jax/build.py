"""Objects built from a validated config: the run's algorithm.

The config classes (``fedhl_jax.config``) hold plain frozen values; this module turns the
``fed`` section into an :class:`~fedhl_jax.algorithms.Algorithm`. ``config.load_config`` (and
``config.from_dict``) run :func:`checked_options` once while parsing, so a bad option is an error
naming its key before anything is loaded or compiled; the runners then call
:func:`build_algorithm` once.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Callable

from fedhl_jax.algorithms import ALGORITHMS, Algorithm, make_algorithm
from fedhl_jax.errors import ConfigError

if TYPE_CHECKING:
    from fedhl_jax.config import FedConfig

__all__ = ["build_algorithm", "checked_options", "options_class"]


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
