"""Server aggregation rules on one LoRA module, vectorised over clients.

Every function takes the clients' trained factors with a leading client axis,
``B [n, d_out, r_max]``, ``A [n, r_max, d_in]``, their rank masks ``[n, r_max]``
and scales ``[n]``. Columns past a client's rank are ignored whatever they hold.
A client whose active factors hold NaN/Inf, or whose update's norm overflows, is
left out of the round (weight 0, the others renormalised, a warning); if every
client is left out, the module is returned unchanged.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from fedhl_jax.truncation import SVD, masked_factors, svd, weighted_delta, weighted_product

WEIGHTINGS = ("optimal", "uniform", "data_size", "optimal_data_size", "balanced", "drift_sampling")
#: The weightings that need the clients' data sizes.
DATA_WEIGHTINGS = ("data_size", "optimal_data_size", "balanced", "drift_sampling")
EPS_MODES = ("absolute", "relative")
#: The one default of FedHL's ε and its mode, shared by ``fedhl_weights``, ``fedhl_aggregate``,
#: ``algorithms.FedHLOptions`` and the configs: ``ε_eff = 1e-2 · mean(r̂^power)`` (docs/algorithms.md).
DEFAULT_EPS = 1e-2
DEFAULT_EPS_MODE = "relative"


def check_eps(eps) -> float:
    """Raises ``ValueError`` unless ``eps`` is a finite float > 0."""
    try:
        val = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a positive number, got {eps!r}") from None
    if not np.isfinite(val) or val <= 0:
        raise ValueError(f"eps must be > 0, got eps={eps!r}")
    return val


def check_weighting(weighting: str, num_examples) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if weighting in DATA_WEIGHTINGS and num_examples is None:
        raise ValueError(f"weighting={weighting!r} needs num_examples")


def check_client_shapes(G_shape, B, A, mask, scale) -> None:
    """Shape checks with messages that name the mismatching arrays."""
    d_out, d_in = G_shape
    n, r_max = mask.shape
    if B.shape != (n, d_out, r_max):
        raise ValueError(f"B has shape {tuple(B.shape)}, expected [n, d_out, r_max] = {(n, d_out, r_max)}")
    if A.shape != (n, r_max, d_in):
        raise ValueError(f"A has shape {tuple(A.shape)}, expected [n, r_max, d_in] = {(n, r_max, d_in)}")
    if jnp.shape(scale) != (n,):
        raise ValueError(f"scale has shape {tuple(jnp.shape(scale))}, expected [n] = ({n},)")


def finite_clients(B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """``[n]`` bool: the client's update is usable.

    Its active factors are all finite and, when ``scale`` is given, the squared Frobenius norm of its
    update ``‖s·B·A‖²_F`` does not overflow (computed from ``[r, r]`` Gram matrices, no
    ``[d_out, d_in]`` product). A diverged client (factors of 1e19, say) is left out this way before
    its update can turn the server's ``G`` non-finite.
    """
    Bm, Am = masked_factors(B, A, mask)
    ok = jnp.all(jnp.isfinite(Bm), axis=(1, 2)) & jnp.all(jnp.isfinite(Am), axis=(1, 2))
    if scale is None:
        return ok
    Bz, Az = jnp.where(ok[:, None, None], Bm, 0.0), jnp.where(ok[:, None, None], Am, 0.0)
    gram = jnp.einsum("nor,nos->nrs", Bz, Bz) * jnp.einsum("nri,nsi->nrs", Az, Az)
    norm2 = jnp.asarray(scale, Bz.dtype) ** 2 * jnp.sum(gram, axis=(1, 2))
    return ok & jnp.isfinite(norm2)


def _warn(valid) -> None:
    valid = np.asarray(valid)
    if not valid.all():
        bad = np.flatnonzero(~valid).tolist()
        msg = (f"clients {bad} sent non-finite or overflowing updates and are left out of this round's aggregate"
               + ("; no client left, the state is unchanged" if not valid.any() else ""))
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


def warn_excluded(valid: jax.Array) -> None:
    """Warns (also from inside ``jit``) when some clients were left out."""
    jax.debug.callback(_warn, valid)


def normalise(w: jax.Array, valid: jax.Array) -> jax.Array:
    """``w ⊙ valid / Σ(w ⊙ valid)``, all zeros when nothing is left."""
    w = jnp.where(valid, w, 0.0)
    total = jnp.sum(w)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def fedhl_weights(errors: jax.Array, *, eps: float = DEFAULT_EPS, eps_mode: str = DEFAULT_EPS_MODE, power: float = 2.0,
                  weighting: str = "optimal", num_examples: jax.Array | None = None,
                  valid: jax.Array | None = None) -> jax.Array:
    """FedHL's drift-minimising weights ``p_i ∝ 1/(r̂_i^power + ε)`` (Eq. 12 of the paper).

    ``r̂_i = ‖G − G_{r_i}‖²_F`` is already a squared norm and the paper squares it
    again; ``power=2`` follows the text as written, ``power=1`` uses the plain
    tail energy. When some ``r̂_i → 0`` (a client whose rank covers the whole
    spectrum of ``G``) its weight tends to ``1/ε`` and, for a small absolute ε,
    takes almost all the mass (weight explosion); ``eps_mode="relative"`` sets
    ``ε_eff = ε · mean(r̂^power)`` so the cap scales with the errors. The weights
    are computed as ``(min_j x_j + ε)/(x_i + ε)`` before normalising, which never
    overflows, and define ``0/0 = 1`` (all errors zero and ε_eff = 0 gives
    uniform weights).

    Args:
      errors: ``[n]`` truncation errors ``r̂_i``.
      eps: ε > 0.
      eps_mode: ``"relative"`` (default, ``DEFAULT_EPS_MODE``) or ``"absolute"``.
      power: exponent applied to ``r̂_i``.
      weighting: ``"optimal"`` (default), ``"uniform"``, ``"data_size"`` (∝ n_i),
        ``"optimal_data_size"`` (∝ n_i/(r̂_i^power + ε)), ``"balanced"``
        (∝ n_i/(r̂_i^power + m), see :func:`balanced_weights`) or ``"drift_sampling"``
        (∝ 1/(r̂_i^power + m/q_i), see :func:`drift_sampling_weights`); the last two ignore ``eps``
        and ``eps_mode``.
      num_examples: ``[n]`` local data sizes, needed by the data-size variants.
      valid: ``[n]`` bool; invalid clients (and clients whose ``r̂_i`` is not finite) get weight 0.

    Returns:
      ``[n]`` weights: finite, ≥ 0, summing to 1 over the clients kept (all 0 if none is kept).
    """
    check_weighting(weighting, num_examples)
    if eps_mode not in EPS_MODES:
        raise ValueError(f"unknown eps_mode {eps_mode!r}; expected one of {EPS_MODES}")
    n = errors.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid
    r = jnp.maximum(errors, 0.0)
    valid = valid & jnp.isfinite(r)  # a non-finite r̂ has no meaningful weight
    r = jnp.where(valid, r, 0.0)
    if eps_mode == "relative":
        # The relative weights do not change when every r̂ is scaled by one constant; scaling by the
        # largest keeps r̂^power from overflowing when G is large.
        top = jnp.max(r)
        r = r / jnp.where(top > 0, top, 1.0)
    x = r**power  # [n]
    if eps_mode == "relative":
        mean = jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
        eps_eff = eps * mean
    else:
        eps_eff = jnp.asarray(eps, x.dtype)
    xmin = jnp.min(jnp.where(valid, x, jnp.inf))
    xmin = jnp.where(jnp.isfinite(xmin), xmin, 0.0)
    den = x + eps_eff
    opt = jnp.where(den > 0, (xmin + eps_eff) / jnp.where(den > 0, den, 1.0), 1.0)  # in (0, 1]
    if weighting == "balanced":
        return balanced_weights(errors, num_examples, power=power, valid=valid)
    if weighting == "drift_sampling":
        return drift_sampling_weights(errors, num_examples, power=power, valid=valid)
    if weighting == "optimal":
        w = opt
    elif weighting == "uniform":
        w = jnp.ones_like(x)
    else:
        size = jnp.asarray(num_examples, x.dtype)
        w = size if weighting == "data_size" else size * opt
    return normalise(w, valid)


def drift_terms(errors: jax.Array, num_examples: jax.Array, power: float, valid: jax.Array | None):
    """The inputs of the ε-free weightings: drift terms scaled to ``[0, 1]``, data sizes, valid clients.

    Returns:
      ``(x [n], size [n], valid [n])``: ``x_i = (r̂_i / max_j r̂_j)^power`` (the weights built from it
      are invariant to the scale of ``r̂``), ``size_i = n_i`` (0 for the clients left out), and
      ``valid`` without the clients whose ``r̂_i`` is not finite.
    """
    n = errors.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else valid
    r = jnp.maximum(errors, 0.0)
    valid = valid & jnp.isfinite(r)
    r = jnp.where(valid, r, 0.0)
    top = jnp.max(r)
    x = (r / jnp.where(top > 0, top, 1.0)) ** power
    return x, jnp.where(valid, jnp.asarray(num_examples, x.dtype), 0.0), valid


def balanced_weights(errors: jax.Array, num_examples: jax.Array, *, power: float = 2.0,
                     valid: jax.Array | None = None) -> jax.Array:
    """Data weights tempered by drift, with no tuned ε: ``p_i ∝ n_i / (x_i + m)``, ``x_i = r̂_i^power``.

    ``m = Σ_j n_j x_j / Σ_j n_j`` is the data-weighted mean of the clients' drift terms in this
    round. With a Lagrange multiplier λ for ``Σ_i p_i = 1``, ``∂/∂p_i [Σ_j p_j² (x_j + m)/n_j] =
    2 p_i (x_i + m)/n_i = λ``, so these weights minimise ``Σ_i p_i² (x_i + m) / n_i`` (a per-example
    drift ``Σ p_i² x_i / n_i`` plus a sampling term ``m Σ p_i² / n_i``). They do **not** minimise
    FedHL's drift ``Σ p_i² x_i`` (Eq. 12) plus FedAvg's sampling term ``Σ p_i² σ²/n_i``: that sum
    is minimised by ``p_i ∝ 1/(x_i + σ²/n_i)`` (:func:`drift_sampling_weights`).

    Properties (tested): scaling every ``r̂`` by one constant leaves the weights unchanged; equal
    errors (as in round 1, where ``G = 0``) give the data-size weights exactly; and no client can be
    driven to ~0 weight: since ``m ≥ q_i x_i`` with ``q_i = n_i / Σ n``, for any two clients
    ``(p_i / n_i) / (p_j / n_j) = (x_j + m)/(x_i + m) ≥ q_i / (1 + q_i)``. (FedHL's optimal weights
    gave the rank-2 clients < 0.5% of the weight in docs/results.md.)

    Args:
      errors: ``[n]`` truncation errors ``r̂_i``.
      num_examples: ``[n]`` local data sizes ``n_i``.
      power: exponent applied to ``r̂_i`` (FedHL's ``power``).
      valid: ``[n]`` bool; invalid (or non-finite ``r̂``) clients get weight 0.

    Returns:
      ``[n]`` weights: finite, ≥ 0, summing to 1 over the clients kept.
    """
    x, size, valid = drift_terms(errors, num_examples, power, valid)
    m = jnp.sum(size * x) / jnp.maximum(jnp.sum(size), jnp.finfo(x.dtype).tiny)
    den = x + m
    w = size * jnp.where(den > 0, (jnp.min(jnp.where(valid, x, jnp.inf)) + m) / jnp.where(den > 0, den, 1.0), 1.0)
    return normalise(jnp.where(jnp.isfinite(w), w, 0.0), valid)


def drift_sampling_weights(errors: jax.Array, num_examples: jax.Array, *, power: float = 2.0,
                           valid: jax.Array | None = None) -> jax.Array:
    """Drift plus sampling weights: ``p_i ∝ 1/(x_i + m/q_i) ∝ n_i/(q_i x_i + m)``, ``x_i = r̂_i^power``.

    The minimiser of FedHL's drift term plus FedAvg's sampling term,
    ``Σ_i p_i² x_i + Σ_i p_i² σ²/n_i`` subject to ``Σ_i p_i = 1``: the Lagrange condition
    ``2 p_i (x_i + σ²/n_i) = λ`` gives ``p_i ∝ 1/(x_i + σ²/n_i)``. The noise scale is tied to the
    round's drift, ``σ² = m Σ_j n_j`` with ``m = Σ_j q_j x_j`` and ``q_j = n_j/Σ n`` (so
    ``σ²/n_i = m/q_i``), which leaves nothing to tune. When no client has any drift (``m = 0``,
    as in round 1 where ``G = 0``) only the sampling term is left and the weights are the data
    sizes.

    Properties (tested): invariant to the scale of ``r̂``; equal errors ``x_i = x > 0`` give
    ``p_i ∝ q_i/(1 + q_i)`` (a little flatter than the data sizes: the drift term favours equal
    weights); and since ``q_i x_i ≤ m``, ``m/(q_i x_i + m) ∈ [1/2, 1]``, so for any two clients
    ``(p_i/n_i)/(p_j/n_j) ≥ 1/2``: drift moves a client's weight at most a factor 2 away from its
    data-size weight.

    Args:
      errors: ``[n]`` truncation errors ``r̂_i``.
      num_examples: ``[n]`` local data sizes ``n_i``.
      power: exponent applied to ``r̂_i`` (FedHL's ``power``).
      valid: ``[n]`` bool; invalid (or non-finite ``r̂``) clients get weight 0 and are left out
        of ``q`` and ``m``.

    Returns:
      ``[n]`` weights: finite, ≥ 0, summing to 1 over the clients kept.
    """
    x, size, valid = drift_terms(errors, num_examples, power, valid)
    q = size / jnp.maximum(jnp.sum(size), jnp.finfo(x.dtype).tiny)  # [n] data shares
    m = jnp.sum(q * x)
    den = q * x + m  # p_i ∝ n_i / (q_i x_i + m)
    w = jnp.where(m > 0, size * m / jnp.where(den > 0, den, 1.0), size)  # m/(q_i x_i + m) ∈ (0, 1]
    return normalise(jnp.where(jnp.isfinite(w), w, 0.0), valid)


def rank_rarity(mask: jax.Array, num_examples: jax.Array, valid: jax.Array, cap: float | None = None) -> jax.Array:
    """RB-LoRA's rank-rarity factors ``β_r = Σ_k n_k / Σ_{k: r_k > r} n_k`` over the valid clients.

    Rank column ``r`` held by clients with a share ``q_r`` of the round's data gets ``β_r = 1/q_r``,
    so with the data shares ``α_k = n_k / Σ n`` the weights ``γ_r^(k) = α_k β_r`` of the clients
    holding column ``r`` sum to 1. Columns nobody holds get 0. ``β_r`` has no upper bound: one
    client with 1% of the round's data holding a column gives ``β_r = 100``; ``cap`` replaces it
    by ``min(β_r, cap)`` (the holders' weights of a capped column then sum to ``cap · q_r < 1``).

    Args:
      mask: ``[n, r_max]`` rank masks.
      num_examples: ``[n]`` data sizes.
      valid: ``[n]`` bool.
      cap: ``None`` (no cap) or the largest ``β_r`` (``≥ 1``; see :func:`check_beta_cap`).

    Returns:
      ``[r_max]`` float32.
    """
    size = jnp.where(valid, jnp.asarray(num_examples, jnp.float32), 0.0)  # [n]
    held = jnp.einsum("n,nr->r", size, (mask > 0).astype(jnp.float32))  # [r_max]
    beta = jnp.where(held > 0, jnp.sum(size) / jnp.where(held > 0, held, 1.0), 0.0)
    return beta if cap is None else jnp.minimum(beta, cap)


def check_beta_cap(cap) -> float | None:
    """``cap`` as a float, or ``None``; ``ValueError`` naming it unless it is a finite number ``≥ 1``
    (``β_r ≥ 1`` always, so a cap below 1 would shrink the columns every client holds too)."""
    if cap is None:
        return None
    if isinstance(cap, bool) or not isinstance(cap, (int, float, np.integer, np.floating)) \
            or not np.isfinite(cap) or cap < 1:
        raise ValueError(f"beta_cap must be None or a finite number >= 1, got beta_cap={cap!r}")
    return float(cap)


def rb_lora_aggregate(G: jax.Array, B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array, *,
                      num_examples: jax.Array | None = None, beta_cap: float | None = None) -> jax.Array:
    """RB-LoRA on one module: ``G ← Σ_k Σ_{r < r_k} α_k β_r s_k b_r^(k) a_r^(k)ᵀ``.

    Each client's update is split into its rank-one components (column ``r`` of ``B_k`` times row
    ``r`` of ``A_k``); component ``r`` is averaged over the clients that hold it, with data-size
    weights (``α_k β_r``, :func:`rank_rarity`). Clients receive SVD truncations of ``G``, so
    column ``r`` of every client is aligned with the ``r``-th singular direction of ``G``.
    ``beta_cap`` (``None`` or ``≥ 1``) bounds ``β_r`` (:func:`rank_rarity`).

    Returns:
      ``[d_out, d_in]``; ``G`` unchanged when no client is valid.
    """
    cap = check_beta_cap(beta_cap)
    valid, sizes = round_clients(G.shape, B, A, mask, scale, num_examples)
    return rb_lora_update(G, B, A, mask, scale, data_weights(sizes, valid), rank_rarity(mask, sizes, valid, cap),
                          jnp.any(valid))


def data_weights(num_examples: jax.Array, valid: jax.Array) -> jax.Array:
    """FedAvg weights ``p_i ∝ n_i`` over valid clients."""
    return normalise(jnp.asarray(num_examples, jnp.float32), valid)


def num_examples_or_ones(num_examples, n: int) -> jax.Array:
    """``[n]`` float32 data sizes, or ones when none are given."""
    return jnp.ones((n,), jnp.float32) if num_examples is None else jnp.asarray(num_examples, jnp.float32)


def fedhl_aggregate(G: jax.Array, B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array, *,
                    eps: float = DEFAULT_EPS, num_examples: jax.Array | None = None, weighting: str = "optimal",
                    eps_mode: str = DEFAULT_EPS_MODE, power: float = 2.0, dec: SVD | None = None):
    """FedHL on one module: ``G ← G + Σ p_i ΔW_i`` with ``ΔW_i = s_i B_i A_i − G_{r_i}`` (Eqs. 6, 12).

    The update is added to the full-rank ``G``, not to a truncated copy, so the
    tail ``G − G_{r_i}`` that a client never saw is kept.

    Args:
      G: ``[d_out, d_in]`` dense global adapter (the one the clients were truncated from).
      B: ``[n, d_out, r_max]`` trained factors.
      A: ``[n, r_max, d_in]`` trained factors.
      mask: ``[n, r_max]`` rank masks.
      scale: ``[n]`` LoRA scales.
      eps: ε > 0 of the weights.
      num_examples: ``[n]`` data sizes (for the data-size weightings).
      weighting, eps_mode, power: see ``fedhl_weights``.
      dec: the SVD of ``G`` if already computed (the one used for broadcast).

    Returns:
      ``(G_next [d_out, d_in], p [n])``.
    """
    check_eps(eps)
    check_weighting(weighting, num_examples)
    valid, _ = round_clients(G.shape, B, A, mask, scale, num_examples)
    dec = svd(G, mask.shape[1]) if dec is None else dec
    ranks = jnp.sum(mask > 0, axis=1)
    p = fedhl_weights(dec.tail[ranks], eps=eps, eps_mode=eps_mode, power=power, weighting=weighting,
                      num_examples=num_examples, valid=valid)
    return fedhl_update(G, dec, B, A, mask, scale, p), p


def flexlora_aggregate(G: jax.Array, B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array, *,
                       num_examples: jax.Array | None = None) -> jax.Array:
    """FlexLoRA on one module: ``G ← Σ p_i s_i B_i A_i``, ``p_i ∝ n_i``.

    The tail ``G − G_{r_i}`` that each client never received is dropped every
    round (the truncation bias that FedHL removes).

    Returns:
      ``[d_out, d_in]``; ``G`` unchanged when no client is valid.
    """
    valid, sizes = round_clients(G.shape, B, A, mask, scale, num_examples)
    return flexlora_update(G, B, A, mask, scale, data_weights(sizes, valid), jnp.any(valid))


# --------------------------------------------------------------------------- one update per rule
# The module functions above and the tree-level algorithms (``fedhl_jax.algorithms``) both apply
# these, given the round's weights; the algorithms choose the weights over every module at once.


def round_clients(G_shape, B, A, mask, scale, num_examples=None):
    """The shape checks, the valid clients (warning about the others) and the data sizes of a round.

    Returns:
      ``(valid [n] bool, num_examples [n] float32)`` (ones when no sizes are given).
    """
    check_client_shapes(G_shape, B, A, mask, scale)
    valid = finite_clients(B, A, mask, scale)
    warn_excluded(valid)
    return valid, num_examples_or_ones(num_examples, mask.shape[0])


def fedhl_update(G: jax.Array, dec: SVD, B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array,
                 p: jax.Array) -> jax.Array:
    """FedHL's update (Eq. 6) with given weights: ``G + Σ_i p_i (s_i B_i A_i − G_{r_i})``.

    Args:
      G: ``[d_out, d_in]``; dec: its SVD (``G_r`` are its truncations).
      B, A, mask, scale: the clients' factors ``[n, d_out, r_max]``, ``[n, r_max, d_in]``, masks
        ``[n, r_max]`` and scales ``[n]``.
      p: ``[n]`` weights (0 for the clients left out).

    Returns:
      ``[d_out, d_in]``.
    """
    return G + weighted_delta(dec, B, A, mask, scale, p)


def flexlora_update(G: jax.Array, B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array, p: jax.Array,
                    keep: jax.Array) -> jax.Array:
    """FlexLoRA's update with given weights: ``Σ_i p_i s_i B_i A_i``, or ``G`` when ``keep`` is false.

    Args:
      G: ``[d_out, d_in]`` the current adapter (kept when no client is).
      B, A, mask, scale: as in :func:`fedhl_update`.
      p: ``[n]`` weights.
      keep: ``[]`` bool, some client is kept.

    Returns:
      ``[d_out, d_in]``.
    """
    return jnp.where(keep, weighted_product(B, A, mask, scale, p), G)


def rb_lora_update(G: jax.Array, B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array, p: jax.Array,
                   beta: jax.Array, keep: jax.Array) -> jax.Array:
    """RB-LoRA's update with given data shares ``p [n]`` and rank rarities ``beta [r_max]``
    (:func:`rank_rarity`): :func:`flexlora_update` of the factors with column ``r`` of ``B`` scaled
    by ``β_r``.

    Returns:
      ``[d_out, d_in]``.
    """
    return flexlora_update(G, B * beta[None, None, :], A, mask, scale, p, keep)


def flora_stack(B: jax.Array, A: jax.Array, mask: jax.Array, scale: jax.Array, p: jax.Array):
    """FLoRA's stacking: ``[p_1 s_1 B_1 | … | p_n s_n B_n] @ [A_1; …; A_n]``.

    Returns:
      ``(B_stack [d_out, n·r_max], A_stack [n·r_max, d_in])`` whose product is
      ``Σ_i p_i s_i B_i A_i`` (the product is what gets merged into the base).
    """
    Bm, Am = masked_factors(B, A, mask, p)
    n, d_out, r = Bm.shape
    Bs = (Bm * (p * scale)[:, None, None]).transpose(1, 0, 2).reshape(d_out, n * r)
    return Bs, Am.reshape(n * r, Am.shape[2])


def factor_average(B: jax.Array, A: jax.Array, mask: jax.Array, p: jax.Array):
    """FedAvg of the zero-padded factors separately: ``(Σ p_i B_i, Σ p_i A_i)``.

    Returns:
      ``(B [d_out, r_max], A [r_max, d_in])``.
    """
    Bm, Am = masked_factors(B, A, mask, p)
    return jnp.einsum("n,nor->or", p, Bm), jnp.einsum("n,nri->ri", p, Am)


def hetlora_weights(B, A, mask, scale, valid):
    """HetLoRA's weights ``p_i ∝ ‖s_i B_i A_i‖_F`` over valid clients."""
    Bm, Am = masked_factors(B, A, mask, valid.astype(mask.dtype))
    # ‖B A‖²_F = Σ (BᵀB) ⊙ (AAᵀ): [n, r, r] Gram matrices instead of [n, d_out, d_in].
    gram = jnp.einsum("nor,nos->nrs", Bm, Bm) * jnp.einsum("nri,nsi->nrs", Am, Am)
    norms = jnp.abs(scale) * jnp.sqrt(jnp.maximum(jnp.sum(gram, axis=(1, 2)), 0.0))
    norms = jnp.where(valid, norms, 0.0)
    # All-zero updates (e.g. B = 0 at the start): fall back to uniform.
    norms = jnp.where(jnp.sum(norms) > 0, norms, 1.0)
    return normalise(norms, valid)
