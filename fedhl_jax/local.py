"""Client-side training: a pure ``local_train`` and its vectorised, chunked form.

``local_train`` runs ``K`` optimizer steps under ``jax.lax.scan`` on one client's
rank-masked factors; ``make_clients_train`` maps it over the client axis with
``jax.vmap`` (or ``jax.lax.map`` in chunks of ``clients_per_chunk`` clients, which
bounds memory) while the frozen base parameters are broadcast, never copied.
Clients are stateless across rounds: the optimizer state starts fresh each round.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedhl_jax.lora import Adapter


def make_optimizer(name: str = "adamw", lr: float = 1e-3, *, lr_b: float | None = None,
                   weight_decay: float = 0.0, momentum: float = 0.0, grad_clip: float | None = None,
                   trainable: tuple[str, ...] = ("A", "B")) -> optax.GradientTransformation:
    """Client optimizer over ``{"A": ..., "B": ...}``.

    Args:
      name: ``"adamw"`` or ``"sgd"``.
      lr: learning rate (of ``A``, and of ``B`` unless ``lr_b`` is given).
      lr_b: separate learning rate of ``B`` (LoRA+-style ratio).
      weight_decay: decoupled weight decay (AdamW) / L2 (SGD).
      momentum: SGD momentum.
      grad_clip: global-norm clipping of each client's gradient.
      trainable: which factors train; the others get zero updates (FFA-LoRA freezes ``A``).

    Returns:
      An ``optax.GradientTransformation``.
    """

    def base(rate):
        if name == "adamw":
            return optax.adamw(rate, weight_decay=weight_decay)
        if name == "sgd":
            chain = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
            return optax.chain(*chain, optax.sgd(rate, momentum=momentum or None))
        raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'sgd'")

    transforms = {"A": base(lr) if "A" in trainable else optax.set_to_zero(),
                  "B": base(lr if lr_b is None else lr_b) if "B" in trainable else optax.set_to_zero()}
    opt = optax.multi_transform(transforms, {"A": "A", "B": "B"})
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip else opt


def _mask_updates(updates: dict, mask: jax.Array) -> dict:
    """Zeroes the updates of rank columns past the client's rank (exactly, whatever the optimizer did)."""
    on = mask > 0  # [r_max]
    return {"A": {k: jnp.where(on[:, None], u, 0.0) for k, u in updates["A"].items()},
            "B": {k: jnp.where(on[None, :], u, 0.0) for k, u in updates["B"].items()}}


def make_local_train(loss: Callable, optimizer: optax.GradientTransformation, *, remat: bool = False):
    """Builds ``local_train(params, adapter, tokens, loss_mask) -> (adapter, losses)``.

    Args:
      loss: ``loss(params, adapter, tokens [b, T], loss_mask [b, T]) -> []`` (pure).
      optimizer: the client optimizer (``make_optimizer``).
      remat: rematerialise the forward pass in the backward pass (less memory).

    Returns:
      ``local_train`` with ``tokens``/``loss_mask`` ``[K, b, T]`` (one batch per
      step), returning the trained adapter (same mask and scale) and ``losses [K]``
      (the loss before each step).
    """
    loss = jax.checkpoint(loss) if remat else loss

    def local_train(params, adapter: Adapter, tokens, loss_mask):
        def objective(train, batch):
            return loss(params, Adapter(train["B"], train["A"], adapter.mask, adapter.scale), *batch)

        def step(carry, batch):
            train, opt_state = carry
            value, grads = jax.value_and_grad(objective)(train, batch)
            updates, opt_state = optimizer.update(grads, opt_state, train)
            train = optax.apply_updates(train, _mask_updates(updates, adapter.mask))
            return (train, opt_state), value

        train = {"A": adapter.A, "B": adapter.B}
        (train, _), losses = jax.lax.scan(step, (train, optimizer.init(train)), (tokens, loss_mask))
        return Adapter(train["B"], train["A"], adapter.mask, adapter.scale), losses

    return local_train


def make_clients_train(local_train: Callable, *, clients_per_chunk: int | None = None, n_shared: int = 1):
    """All sampled clients at once.

    ``clients_train(*shared, *per_client)`` calls ``local_train`` for every client, with the first
    ``n_shared`` arguments (the frozen base parameters, ...) passed to every client as they are and
    the others split along their leading client axis. With the default ``n_shared=1``:
    ``(params, adapters [n], tokens [n, K, b, T], loss_mask) -> (adapters, losses [n, K])``.

    With ``clients_per_chunk=None`` every client trains in one ``jax.vmap``; otherwise
    ``jax.lax.map`` runs chunks of that many vmapped clients in sequence (a client count that is
    not a multiple is fine).
    """

    def clients_train(*args):
        shared, per_client = args[:n_shared], args[n_shared:]
        if clients_per_chunk is None:
            return jax.vmap(local_train, in_axes=(None,) * n_shared + (0,) * len(per_client))(*args)
        return jax.lax.map(lambda xs: local_train(*shared, *xs), per_client, batch_size=clients_per_chunk)

    return clients_train
