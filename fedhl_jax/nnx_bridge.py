"""Any Flax NNX model through the round engine: rank-masked LoRA at module paths.

The engine needs ``loss(base, adapter, *batch)``, the LoRA shapes ``{module: (d_out, d_in)}``
and ``merge_delta(base, delta)`` (``engine.make_round_step``). ``nnx_lora`` builds them from an
``nnx.Module``, regular expressions over its module paths and ``r_max``::

    bridge = nnx_lora(model, loss_fn, [r".*attn\\.(q|v)_proj"], r_max=16)
    step = engine.make_round_step(algorithm, bridge.loss, optimizer, merge_delta=bridge.merge_delta)
    state = algorithm.init(bridge.shapes, key)
    state, info = step(state, bridge.base, inputs)

Every matched layer is wrapped by ``LoRAAdapted``, which computes (``lora.py``'s convention, as the
project's Llama in ``model/llama.py``)

    y = layer(x) + s · ((x Aᵀ) ⊙ mask) Bᵀ,        A [r_max, d_in], B [d_out, r_max]

on the last axis of ``x``, so no dense ``W + sBA`` is formed per client. The client's factors,
``mask · s`` included, enter as ``LoRAFactor`` variables of a functional ``nnx.merge`` inside
the pure loss; they are never part of the base.

Recognised layers: ``nnx.Linear`` (kernel ``[d_in, d_out]``), ``nnx.Einsum`` when it is a plain
projection of the last input axis (a 2-D kernel ``[d_in, d_out]`` or ``[d_out, d_in]``, e.g.
``"...i,io->...o"``), ``nnx.LoRALinear`` and ``nnx.LoRA``. The own factors of an ``nnx.LoRA`` /
``nnx.LoRALinear`` are ``nnx.LoRAParam`` (a ``Param``): they stay in the frozen base and keep
adding their term; the federated adapter is added on top of them. ``merge_delta`` adds a dense
delta to the layer's full-rank kernel (a ``LoRALinear``'s, or an ``nnx.LoRA``'s
``base_module``'s); an ``nnx.LoRA`` without a base module has none, which is an error there.

Module paths join the attribute names and list indices with dots (``"layers.0.attn.q_proj"``);
a pattern must match a whole path (``re.fullmatch``).
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fedhl_jax.lora import Adapter

class LoRAFactor(nnx.Variable):
    """A client's LoRA factor or gate (``mask · s``): filled on each call, never part of the base."""


class LoRAAdapted(nnx.Module):
    """A recognised layer plus the rank-masked LoRA term on its last input axis.

    Args:
      inner: the original layer (its own parameters stay frozen base weights).
      d_in, d_out: the projection's sizes.
      r_max: padded rank.
    """

    def __init__(self, inner: nnx.Module, d_in: int, d_out: int, r_max: int):
        self.inner = inner
        self.lora_a = LoRAFactor(jnp.zeros((r_max, d_in), jnp.float32))  # [r_max, d_in]
        self.lora_b = LoRAFactor(jnp.zeros((d_out, r_max), jnp.float32))  # [d_out, r_max]
        self.lora_gate = LoRAFactor(jnp.zeros((r_max,), jnp.float32))  # [r_max] mask · s

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        """``x [..., d_in]`` → ``[..., d_out]``: ``inner(x) + ((x Aᵀ) ⊙ gate) Bᵀ`` in ``x``'s dtype."""
        y = self.inner(x, *args, **kwargs)
        a, b = self.lora_a.get_value().astype(x.dtype), self.lora_b.get_value().astype(x.dtype)
        h = jnp.einsum("...i,ri->...r", x, a) * self.lora_gate.get_value().astype(x.dtype)  # [..., r_max]
        return y + jnp.einsum("...r,or->...o", h, b).astype(y.dtype)


class NnxLoRA(NamedTuple):
    """What the engine needs from an NNX model (``nnx_lora``).

    Attributes:
      base: the frozen base, a nested dict of the adapted model's ``nnx.Param`` values
        (``nnx.State.to_pure_dict``; a matched layer's own weights sit under ``<path>.inner``).
      shapes: ``{module_path: (d_out, d_in)}`` of the adapted layers, in graph order.
      loss: ``loss(base, adapter, *batch) -> []``, pure: the user's loss of the model with the
        adapter applied (``adapter`` an ``lora.Adapter`` keyed by module path).
      merge_delta: ``merge_delta(base, delta) -> base`` with ``{module_path: [d_out, d_in]}`` added
        to each layer's full-rank kernel (in float32, cast back).
      bind: ``bind(base, adapter=None) -> nnx.Module``: the model with these weights and adapter
        (None: no LoRA term), e.g. for evaluation.
      kernels: ``{module_path: (path of the kernel in base, transposed)}``; ``transposed`` when the
        kernel is stored ``[d_in, d_out]``.
    """

    base: dict
    shapes: dict
    loss: Callable
    merge_delta: Callable
    bind: Callable
    kernels: dict


def module_path(path: Sequence) -> str:
    """``("layers", 0, "attn", "q_proj")`` → ``"layers.0.attn.q_proj"``."""
    return ".".join(str(p) for p in path)


def _einsum_layout(layer: nnx.Einsum) -> bool | None:
    """``True`` for a plain projection with kernel ``[d_in, d_out]``, ``False`` for ``[d_out, d_in]``,
    None when the einsum is anything else (batched kernel, several contracted axes, ...)."""
    spec = layer.einsum_str.replace(" ", "")
    m = re.fullmatch(r"([a-zA-Z.]+),([a-zA-Z])([a-zA-Z])->([a-zA-Z.]+)", spec)
    if m is None or len(layer.kernel_shape) != 2:
        return None
    lhs, p, q, out = m.groups()
    if p == q or p in lhs[:-1] or q in lhs[:-1]:
        return None
    if lhs[-1] == p and out == lhs[:-1] + q:
        return True
    if lhs[-1] == q and out == lhs[:-1] + p:
        return False
    return None


def _layer_info(path: str, layer: nnx.Module) -> tuple[int, int, tuple | None, bool]:
    """``(d_in, d_out, kernel path relative to the layer or None, kernel stored [d_in, d_out])``.

    Raises:
      ValueError: the layer is not a recognised projection (naming the path and the type).
    """
    if isinstance(layer, nnx.Linear):  # LoRALinear too: its kernel is the full-rank weight
        return layer.in_features, layer.out_features, ("kernel",), True
    if isinstance(layer, nnx.Einsum):
        layout = _einsum_layout(layer)
        if layout is None:
            raise ValueError(f"module {path!r} is an nnx.Einsum {layer.einsum_str!r} with kernel "
                             f"{tuple(layer.kernel_shape)}, not a plain projection of the last input axis "
                             f"(e.g. '...i,io->...o'); LoRA cannot be placed on it")
        d0, d1 = layer.kernel_shape
        return (d0, d1, ("kernel",), True) if layout else (d1, d0, ("kernel",), False)
    if isinstance(layer, nnx.LoRA):
        d_in, d_out = layer.lora_a.shape[0], layer.lora_b.shape[1]
        base = layer.base_module
        if isinstance(base, nnx.Linear) and (base.in_features, base.out_features) == (d_in, d_out):
            return d_in, d_out, ("base_module", "kernel"), True
        return d_in, d_out, None, True
    raise ValueError(f"module {path!r} is a {type(layer).__module__}.{type(layer).__qualname__}; LoRA is "
                     f"placed on nnx.Linear, nnx.Einsum (plain projection), nnx.LoRA or nnx.LoRALinear only")


def find_modules(model: nnx.Module, patterns: Sequence[str]) -> dict[str, tuple]:
    """``{module_path: (path tuple, layer)}`` of the modules whose path fully matches a pattern.

    Raises:
      ValueError: a pattern that is not a regular expression or matches no module, or a match
        inside another match (each named).
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not patterns:
        raise ValueError("no module-path patterns given")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"module-path pattern '{p}' is not a regular expression: {e}") from None
    modules = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module) and path]
    found: dict[str, tuple] = {}
    for p, rx in zip(patterns, compiled):
        hits = [(path, node) for path, node in modules if rx.fullmatch(module_path(path))]
        if not hits:
            some = ", ".join(repr(module_path(path)) for path, _ in modules[:8])
            raise ValueError(f"module-path pattern '{p}' matches no module of the "
                             f"{type(model).__qualname__} (its module paths include {some})")
        found.update({module_path(path): (tuple(path), node) for path, node in hits})
    for name in found:
        for other in found:
            if other != name and other.startswith(name + "."):
                raise ValueError(f"the patterns match both {name!r} and its submodule {other!r}; "
                                 f"match one of them")
    order = {module_path(path): k for k, (path, _) in enumerate(modules)}
    return {name: found[name] for name in sorted(found, key=order.get)}


def _set_child(parent, key, child) -> None:
    if isinstance(key, int):
        parent[key] = child
    else:
        setattr(parent, key, child)


def _get_path(tree, path: Sequence):
    for key in path:
        tree = tree[key] if isinstance(tree, (dict, list, nnx.List, nnx.Dict)) else getattr(tree, key)
    return tree


def nnx_lora(model: nnx.Module, loss_fn: Callable, patterns: Sequence[str], r_max: int) -> NnxLoRA:
    """Places a rank-masked LoRA of rank up to ``r_max`` on the modules ``patterns`` match.

    Everything is checked here, on the host, before any compile. ``model`` itself is left as it
    is (the bridge adapts a clone).

    Args:
      model: any ``nnx.Module``.
      loss_fn: ``loss_fn(model, *batch) -> []``, the user's loss of a model on one step's batch.
      patterns: regular expressions over module paths (``".*attn\\.(q|v)_proj"``); each must match
        at least one module, and every match must be a recognised layer (module docstring).
      r_max: the padded rank; at most ``min(d_out, d_in)`` of every adapted layer.

    Returns:
      ``NnxLoRA``. Non-``Param`` state (RNG counters, batch statistics) is taken as it is now and
      held constant.

    Raises:
      ValueError: a pattern that matches nothing, a matched layer of another type, or ``r_max``
        out of range (each naming the pattern, path or value).
    """
    if int(r_max) != r_max or r_max < 1:
        raise ValueError(f"r_max must be a positive integer, got {r_max!r}")
    model = nnx.clone(model)
    found = find_modules(model, patterns)
    shapes, kernels = {}, {}
    for name, (path, layer) in found.items():
        d_in, d_out, kernel, in_out = _layer_info(name, layer)
        if r_max > min(d_out, d_in):
            raise ValueError(f"r_max={r_max} exceeds min(d_out, d_in)={min(d_out, d_in)} of module {name!r} "
                             f"(d_out={d_out}, d_in={d_in})")
        shapes[name] = (d_out, d_in)
        if kernel is not None:
            kernels[name] = (path + ("inner",) + kernel, in_out)
        _set_child(_get_path(model, path[:-1]), path[-1], LoRAAdapted(layer, d_in, d_out, r_max))
    graphdef, factors, params, rest = nnx.split(model, LoRAFactor, nnx.Param, ...)
    factor_vars = dict(nnx.to_flat_state(factors))
    param_vars = list(nnx.to_flat_state(params))
    paths = {name: path for name, (path, _) in found.items()}

    def to_params(base: dict) -> nnx.State:
        return nnx.from_flat_state([(p, v.replace(_get_path(base, p))) for p, v in param_vars])

    def to_factors(adapter: Adapter | None) -> nnx.State:
        flat = []
        for name, path in paths.items():
            parts = {"lora_a": None, "lora_b": None, "lora_gate": None}
            if adapter is not None:
                parts = {"lora_a": adapter.A[name], "lora_b": adapter.B[name],
                         "lora_gate": adapter.mask * adapter.scale}
            for leaf, value in parts.items():
                var = factor_vars[path + (leaf,)]
                flat.append((path + (leaf,), var if value is None else var.replace(value)))
        return nnx.from_flat_state(flat)

    def bind(base: dict, adapter: Adapter | None = None) -> nnx.Module:
        return nnx.merge(graphdef, to_factors(adapter), to_params(base), rest, copy=True)

    def loss(base: dict, adapter: Adapter, *batch) -> jax.Array:
        return loss_fn(bind(base, adapter), *batch)

    def merge_delta(base: dict, delta: dict) -> dict:
        merged = jax.tree.map(lambda x: x, base)  # fresh containers, shared leaves
        for name, d in delta.items():
            if name not in shapes:
                raise KeyError(f"delta names unknown module {name!r}")
            if name not in kernels:
                raise ValueError(f"module {name!r} is an nnx.LoRA without a full-rank base module: a dense "
                                 f"delta cannot be merged into it")
            path, in_out = kernels[name]
            w = _get_path(merged, path)
            d = jnp.asarray(d, jnp.float32)
            d = d.T if in_out else d
            if d.shape != w.shape:
                raise ValueError(f"delta for {name!r} has shape {tuple(d.T.shape if in_out else d.shape)}, "
                                 f"the module is {shapes[name]}")
            _get_path(merged, path[:-1])[path[-1]] = (w.astype(jnp.float32) + d).astype(w.dtype)
        return merged

    return NnxLoRA(nnx.to_pure_dict(params), shapes, loss, merge_delta, bind, kernels)


def load_factory(spec: str) -> Callable:
    """The function named by ``"package.module:function"`` (``model.factory``).

    The module is looked up on ``sys.path`` and then in the working directory (as ``python -m``
    does), so ``fedhl-train`` run from a project's root finds that project's modules.

    Raises:
      ValueError: a malformed spec, a module that does not import or a missing function (naming it).
    """
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model factory {spec!r} is not of the form package.module:function")
    import os
    import sys

    try:
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model factory {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model factory {spec!r}: {module_name!r} has no function {attr!r}")
    return fn


def from_factory(spec: str, patterns: Sequence[str], r_max: int, **kwargs) -> NnxLoRA:
    """``nnx_lora`` of the ``(module, loss)`` that ``load_factory(spec)(**kwargs)`` returns.

    Raises:
      ValueError: as ``load_factory`` and ``nnx_lora``, or a factory that does not return an
        ``nnx.Module`` and a callable loss.
    """
    out = load_factory(spec)(**kwargs)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nnx.Module) and callable(out[1])):
        raise ValueError(f"model factory {spec!r} must return (nnx.Module, loss); got {type(out).__name__}")
    return nnx_lora(out[0], out[1], patterns, r_max)
