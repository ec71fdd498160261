"""Client-side training: a pure ``local_train`` and its vectorised, chunked form.

``local_train`` runs ``K`` optimizer steps under ``jax.lax.scan`` on one client's
rank-masked factors; ``make_clients_train`` maps it over the client axis with
``jax.vmap`` (or ``jax.lax.map`` in chunks of ``clients_per_chunk`` clients, which
bounds memory) while the frozen base parameters are broadcast, never copied.
Clients are stateless across rounds: the optimizer state starts fresh each round.

With a length bucket ``w`` (language models: a batch of ``tokens, loss_mask [..., T]``), each
local step runs at the narrowest width ``w, 2w, ..., T`` that holds every target of its batch,
chosen by ``jax.lax.switch``: a causal model's targets do not see the columns past them, so the
step's loss and gradient are those of the full width up to float rounding, at the cost of the
columns it keeps. The width is chosen once per step for all the clients that are vmapped
together (``step_widths``), so the switch stays a branch and never becomes a select.
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


def bucket_widths(seq_len: int, length_bucket: int) -> tuple[int, ...]:
    """The widths a step may run at: ``w, 2w, ...`` below ``seq_len``, then ``seq_len`` itself."""
    if length_bucket < 0:
        raise ValueError(f"length_bucket must be >= 0 (0: no cut), got {length_bucket}")
    if not length_bucket:
        return (seq_len,)
    return tuple(range(length_bucket, seq_len, length_bucket)) + (seq_len,)


def step_widths(loss_mask: jax.Array, length_bucket: int, *, axes: int = 1) -> jax.Array:
    """Index into ``bucket_widths`` of the narrowest width each step's targets fit in.

    Args:
      loss_mask: ``[..., K, b, T]`` target mask (nonzero: a target).
      length_bucket: ``w`` (> 0).
      axes: how many leading axes to keep (1: ``[K]``; 2 for ``[n, K, b, T]``: ``[n, K]``); the
        others (the batch rows) are reduced with ``max``.

    Returns:
      int32 indices, ``loss_mask.shape[:axes]``; a step without targets gets the narrowest width.
    """
    t = loss_mask.shape[-1]
    cols = jnp.arange(1, t + 1, dtype=jnp.int32)
    ends = jnp.max(jnp.where(loss_mask != 0, cols, 1), axis=-1)  # [..., K, b] one past the last target
    ends = jnp.max(ends.reshape(ends.shape[:axes] + (-1,)), axis=-1)
    n = len(bucket_widths(t, length_bucket))
    return (jnp.minimum(-(-ends // length_bucket), n) - 1).astype(jnp.int32)


def make_local_train(loss: Callable, optimizer: optax.GradientTransformation, *, remat: bool = False,
                     length_bucket: int = 0):
    """Builds ``local_train(params, adapter, *batch, widths=None) -> (adapter, losses)``.

    Args:
      loss: ``loss(params, adapter, *batch_k) -> []`` (pure), with ``batch_k`` one step's slice of
        the batch (for a language model ``tokens [b, T], loss_mask [b, T]``).
      optimizer: the client optimizer (``make_optimizer``).
      remat: rematerialise the forward pass in the backward pass (less memory).
      length_bucket: ``w`` > 0: each step runs at the narrowest of ``bucket_widths(T, w)`` that
        holds its targets (the batch arrays are cut along their last axis, the sequence; the last
        batch array is the target mask, and ``loss`` must be causal). 0: always ``T``.

    Returns:
      ``local_train`` whose ``batch`` arrays have a leading step axis ``K`` (one slice per step,
      e.g. ``tokens``/``loss_mask`` ``[K, b, T]``), returning the trained adapter (same mask and
      scale) and ``losses [K]`` (the loss before each step). ``widths [K]`` (int32, from
      ``step_widths``) sets each step's width; when it is None it is computed from the batch,
      which under ``jax.vmap`` would make every width run (``make_clients_train`` passes it).
    """
    loss = jax.checkpoint(loss) if remat else loss
    if length_bucket < 0:
        raise ValueError(f"length_bucket must be >= 0 (0: no cut), got {length_bucket}")

    def local_train(params, adapter: Adapter, *batch, widths=None):
        def objective(train, step_batch):
            return loss(params, Adapter(train["B"], train["A"], adapter.mask, adapter.scale), *step_batch)

        grad_fn = jax.value_and_grad(objective)
        cuts = bucket_widths(batch[-1].shape[-1], length_bucket) if length_bucket else ()
        if len(cuts) > 1 and widths is None:
            widths = step_widths(batch[-1], length_bucket)  # [K]

        def step(carry, xs):
            (train, opt_state), (step_batch, width) = carry, xs
            if len(cuts) > 1:  # one branch per width; only the chosen one runs
                value, grads = jax.lax.switch(width, [
                    lambda tr, sb, w=w: grad_fn(tr, tuple(x[..., :w] for x in sb)) for w in cuts],
                    train, step_batch)
            else:
                value, grads = grad_fn(train, step_batch)
            updates, opt_state = optimizer.update(grads, opt_state, train)
            train = optax.apply_updates(train, _mask_updates(updates, adapter.mask))
            return (train, opt_state), value

        train = {"A": adapter.A, "B": adapter.B}
        xs = (tuple(batch), widths if len(cuts) > 1 else None)  # None: an empty pytree, nothing scanned
        (train, _), losses = jax.lax.scan(step, (train, optimizer.init(train)), xs)
        return Adapter(train["B"], train["A"], adapter.mask, adapter.scale), losses

    return local_train


def make_clients_train(local_train: Callable, *, clients_per_chunk: int | None = None, n_shared: int = 1,
                       spmd_axis_name: str | None = None, length_bucket: int = 0):
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
      length_bucket: the ``length_bucket`` ``local_train`` was built with (0: none). The last
        per-client argument is then the target mask ``[n, K, b, T]``, and each chunk's step runs
        at the narrowest width that holds the targets of all the chunk's clients (one chunk of
        one client: each client's own width).
    """

    def vmapped(*args, widths=None):
        fn = local_train if widths is None else (lambda *a: local_train(*a, widths=widths))
        return jax.vmap(fn, in_axes=(None,) * n_shared + (0,) * (len(args) - n_shared),
                        spmd_axis_name=spmd_axis_name)(*args)

    def in_chunks(shared, per_client, c, widths=None):
        # Chunks of [c] clients in sequence, each vmapped (over the mesh axis when there is one),
        # with the chunk's widths [K] (the widest of its clients') passed to all of them unbatched.
        n = jax.tree.leaves(per_client)[0].shape[0]
        full = (n // c) * c
        chunk_widths = (lambda w: None) if widths is None else (lambda w: jnp.max(w, axis=0))  # [c, K] -> [K]
        head = jax.tree.map(lambda x: x[:full].reshape((n // c, c) + x.shape[1:]), (per_client, widths))
        if full == c:  # one chunk: no loop
            xs, w = jax.tree.map(lambda x: x[0], head)
            out = jax.tree.map(lambda x: x[None], vmapped(*shared, *xs, widths=chunk_widths(w)))
        else:
            out = jax.lax.map(lambda xw: vmapped(*shared, *xw[0], widths=chunk_widths(xw[1])), head)
        out = jax.tree.map(lambda x: x.reshape((full,) + x.shape[2:]), out)
        if full == n:
            return out
        tail = jax.tree.map(lambda x: x[full:], (per_client, widths))
        tail = vmapped(*shared, *tail[0], widths=chunk_widths(tail[1]))
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)

    def clients_train(*args):
        shared, per_client = args[:n_shared], args[n_shared:]
        n = jax.tree.leaves(per_client)[0].shape[0]
        if length_bucket and len(bucket_widths(per_client[-1].shape[-1], length_bucket)) > 1:
            widths = step_widths(per_client[-1], length_bucket, axes=2)  # [n, K]
            return in_chunks(shared, per_client, n if clients_per_chunk is None else min(clients_per_chunk, n),
                             widths)
        if clients_per_chunk is None:
            return vmapped(*args)
        if spmd_axis_name is None:
            return jax.lax.map(lambda xs: local_train(*shared, *xs), per_client, batch_size=clients_per_chunk)
        # lax.map's own batching has no spmd axis: chunks of [c] clients, each vmapped over the mesh axis.
        return in_chunks(shared, per_client, min(clients_per_chunk, n))

    return clients_train
