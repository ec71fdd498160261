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
    """Builds ``local_train(params, adapter, *batch) -> (adapter, losses)``.

    Args:
      loss: ``loss(params, adapter, *batch_k) -> []`` (pure), with ``batch_k`` one step's slice of
        the batch (for a language model ``tokens [b, T], loss_mask [b, T]``).
      optimizer: the client optimizer (``make_optimizer``).
      remat: rematerialise the forward pass in the backward pass (less memory).

    Returns:
      ``local_train`` whose ``batch`` arrays have a leading step axis ``K`` (one slice per step,
      e.g. ``tokens``/``loss_mask`` ``[K, b, T]``), returning the trained adapter (same mask and
      scale) and ``losses [K]`` (the loss before each step).
    """
    loss = jax.checkpoint(loss) if remat else loss

    def local_train(params, adapter: Adapter, *batch):
        def objective(train, step_batch):
            return loss(params, Adapter(train["B"], train["A"], adapter.mask, adapter.scale), *step_batch)

        def step(carry, step_batch):
            train, opt_state = carry
            value, grads = jax.value_and_grad(objective)(train, step_batch)
            updates, opt_state = optimizer.update(grads, opt_state, train)
            train = optax.apply_updates(train, _mask_updates(updates, adapter.mask))
            return (train, opt_state), value

        train = {"A": adapter.A, "B": adapter.B}
        (train, _), losses = jax.lax.scan(step, (train, optimizer.init(train)), tuple(batch))
        return Adapter(train["B"], train["A"], adapter.mask, adapter.scale), losses

    return local_train


def make_clients_train(local_train: Callable, *, clients_per_chunk: int | None = None, n_shared: int = 1,
                       spmd_axis_name: str | None = None):
    """All sampled clients at once.

    ``clients_train(*shared, *per_client)`` calls ``local_train`` for every client, with the first
    ``n_shared`` arguments (the frozen base parameters, ...) passed to every client as they are and
    the others split along their leading client axis. With the default ``n_shared=1``:
    ``(params, adapters [n], tokens [n, K, b, T], loss_mask) -> (adapters, losses [n, K])``.

    With ``clients_per_chunk=None`` every client trains in one ``jax.vmap``; otherwise chunks of
    that many vmapped clients run in sequence (``jax.lax.map``; a client count that is not a
    multiple is fine).

    Args:
      local_train: one client's training (``make_local_train``).
      clients_per_chunk: vmapped clients at a time (memory bound), or None for all.
      n_shared: how many leading arguments every client shares.
      spmd_axis_name: mesh axis the vmapped client axis is partitioned over (``jax.vmap``'s
        ``spmd_axis_name``, as drjax does); with chunks, the chunk's client axis is the one
        partitioned, so ``clients_per_chunk`` should be a multiple of that axis' size.
    """

    def vmapped(*args):
        return jax.vmap(local_train, in_axes=(None,) * n_shared + (0,) * (len(args) - n_shared),
                        spmd_axis_name=spmd_axis_name)(*args)

    def clients_train(*args):
        shared, per_client = args[:n_shared], args[n_shared:]
        if clients_per_chunk is None:
            return vmapped(*args)
        if spmd_axis_name is None:
            return jax.lax.map(lambda xs: local_train(*shared, *xs), per_client, batch_size=clients_per_chunk)
        # lax.map's own batching has no spmd axis: chunks of [c] clients, each vmapped over the mesh axis.
        n = jax.tree.leaves(per_client)[0].shape[0]
        c = min(clients_per_chunk, n)
        full = (n // c) * c
        head = jax.tree.map(lambda x: x[:full].reshape((n // c, c) + x.shape[1:]), per_client)
        out = jax.lax.map(lambda xs: vmapped(*shared, *xs), head)
        out = jax.tree.map(lambda x: x.reshape((full,) + x.shape[2:]), out)
        if full == n:
            return out
        tail = vmapped(*shared, *jax.tree.map(lambda x: x[full:], per_client))
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)

    return clients_train
