"""Tree-level algorithm factories: init/broadcast/aggregate over every module."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import fedhl_jax as F
from fedhl_jax.algorithms import LEGACY_LAYOUT, base
from tests.conftest import np_truncate

SHAPES = {"layers.0.self_attn.q_proj": (8, 6), "layers.0.self_attn.v_proj": (4, 6)}
R_MAX = 4
RANKS = np.array([1, 2, 4, 3])
ALL = ["fedhl", "flexlora", "rb_lora", "flora", "hetlora", "fedit", "ffa_lora", "fedex_lora"]
HOMOGENEOUS = {"fedit", "ffa_lora", "fedex_lora"}


def ranks_for(name):
    return np.full(4, 2) if name in HOMOGENEOUS else RANKS


def perturb(start, mask, seed, size=0.2):
    rng = np.random.default_rng(seed)
    B = {k: b + size * jnp.asarray(rng.normal(size=b.shape), jnp.float32) * mask[:, None, :] for k, b in start.B.items()}
    A = {k: a + size * jnp.asarray(rng.normal(size=a.shape), jnp.float32) * mask[:, :, None] for k, a in start.A.items()}
    return B, A


def run_rounds(alg, ranks, rounds=3, seed=0):
    mask = F.rank_mask(ranks, R_MAX)
    scale = F.lora_scale(ranks, 8.0)
    state = alg.init(SHAPES, jax.random.PRNGKey(0))
    for t in range(rounds):
        start = alg.broadcast(state, mask, scale, jax.random.PRNGKey(t))
        B, A = perturb(start, mask, seed + t)
        state, info = alg.aggregate(state, B, A, mask, scale, jnp.arange(1.0, len(ranks) + 1))
    return state, info


@pytest.mark.parametrize("name", ALL)
def test_shapes_and_jit(name):
    alg = F.make_algorithm(name, R_MAX)
    ranks = ranks_for(name)
    mask = F.rank_mask(ranks, R_MAX)
    scale = F.lora_scale(ranks, 8.0)
    state = alg.init(SHAPES, jax.random.PRNGKey(0))
    start = jax.jit(alg.broadcast)(state, mask, scale, jax.random.PRNGKey(1))
    for k, (d_out, d_in) in SHAPES.items():
        assert start.B[k].shape == (len(ranks), d_out, R_MAX)
        assert start.A[k].shape == (len(ranks), R_MAX, d_in)
    B, A = perturb(start, mask, 0)
    eager = alg.aggregate(state, B, A, mask, scale, jnp.ones(len(ranks)))
    jitted = jax.jit(alg.aggregate)(state, B, A, mask, scale, jnp.ones(len(ranks)))
    chex.assert_trees_all_close(eager, jitted, atol=1e-5)
    new_state, info = jitted
    assert int(new_state.round) == 1
    p = np.asarray(info["p"])
    assert p.shape == (len(ranks),) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
    for k, (d_out, d_in) in SHAPES.items():
        assert alg.global_delta(new_state)[k].shape == (d_out, d_in)


@pytest.mark.parametrize("name", ALL)
def test_untrained_clients_change_nothing(name):
    """Clients that send back what they received leave the global model unchanged,
    except FlexLoRA (it loses the truncated tail) and HetLoRA with mixed ranks (zero
    padding shrinks every column that some client does not hold)."""
    alg = F.make_algorithm(name, R_MAX)
    ranks = ranks_for(name)
    mask = F.rank_mask(ranks, R_MAX)
    scale = F.lora_scale(ranks, 8.0)
    state, _ = run_rounds(alg, ranks, rounds=2)
    before = alg.global_delta(state)
    start = alg.broadcast(state, mask, scale, jax.random.PRNGKey(7))
    B, A = start.B, start.A
    if name == "flora":  # fresh LoRA each round: the untrained product is zero
        B = {k: jnp.zeros_like(b) for k, b in B.items()}
    after_state, _ = alg.aggregate(state, B, A, mask, scale, jnp.ones(len(ranks)))
    after = alg.global_delta(after_state)
    diff = max(float(jnp.max(jnp.abs(after[k] - before[k]))) for k in SHAPES)
    if name in ("flexlora", "hetlora"):
        assert diff > 1e-2
    elif name == "rb_lora":  # keeps every component a client holds, drops the tail past the largest rank
        for k in SHAPES:
            np.testing.assert_allclose(after[k], np_truncate(before[k], int(max(ranks))), atol=1e-5)
    else:
        assert diff < 1e-5, diff


def test_hetlora_homogeneous_untrained_is_fixed_point():
    alg = F.hetlora(R_MAX)
    ranks = np.full(3, 3)
    mask = F.rank_mask(ranks, R_MAX)
    scale = F.lora_scale(ranks, 8.0)
    state, _ = run_rounds(alg, ranks, rounds=2)
    start = alg.broadcast(state, mask, scale, jax.random.PRNGKey(0))
    new, _ = alg.aggregate(state, start.B, start.A, mask, scale, None)
    chex.assert_trees_all_close(alg.global_delta(new), alg.global_delta(state), atol=1e-5)


def started(alg, rounds):
    """``alg`` after ``rounds`` rounds, and the next round's masks, scales and broadcast (ranks ``RANKS``)."""
    state, _ = run_rounds(alg, RANKS, rounds=rounds)
    mask = F.rank_mask(RANKS, R_MAX)
    scale = F.lora_scale(RANKS, 8.0)
    return state, mask, scale, alg.broadcast(state, mask, scale, jax.random.PRNGKey(0))


def test_broadcast_gives_best_rank_r():
    state, mask, scale, start = started(F.fedhl(R_MAX), 2)
    for k in SHAPES:
        for i, r in enumerate(RANKS):
            got = float(scale[i]) * np.asarray(start.B[k][i]) @ np.asarray(start.A[k][i])
            np.testing.assert_allclose(got, np_truncate(state.G[k], r), atol=1e-4)


@pytest.mark.parametrize("per_module", [False, True])
def test_tree_fedhl_matches_module_function(per_module):
    """Per-module weights reproduce fedhl_aggregate; per-client weights use r̂ summed over modules."""
    alg = F.fedhl(R_MAX, eps=0.05, eps_mode="absolute", per_module=per_module)
    state, mask, scale, start = started(alg, 2)
    B, A = perturb(start, mask, 42)
    new, info = alg.aggregate(state, B, A, mask, scale, None)
    errs = {k: np.asarray(F.truncation_error(state.G[k], RANKS, r_max=R_MAX)) for k in SHAPES}
    np.testing.assert_allclose(info["errors"], sum(errs.values()), rtol=1e-4)
    shared_p = F.fedhl_weights(jnp.asarray(sum(errs.values())), eps=0.05, eps_mode="absolute")
    for k in SHAPES:
        want, p_k = F.fedhl_aggregate(state.G[k], B[k], A[k], mask, scale, eps=0.05, eps_mode="absolute")
        if per_module:
            np.testing.assert_allclose(new.G[k], want, atol=1e-4)
        else:
            dec = F.svd(state.G[k], R_MAX)
            want = state.G[k] + F.weighted_delta(dec, B[k], A[k], mask, scale, shared_p)
            np.testing.assert_allclose(new.G[k], want, atol=1e-4)
            np.testing.assert_allclose(info["p"], shared_p, atol=1e-6)


def test_fedit_refuses_mixed_ranks():
    with pytest.raises(ValueError, match=r"same rank on every client, got ranks \[1, 2, 3, 4\]"):
        F.fedit(R_MAX).check_ranks(RANKS)
    F.fedit(R_MAX).check_ranks([2, 2, 2])
    with pytest.raises(ValueError, match="rank 5 exceeds r_max=4"):
        F.fedhl(R_MAX).check_ranks([1, 5])


def test_flora_merges_stacked_product():
    alg = F.flora(R_MAX)
    mask = F.rank_mask(RANKS, R_MAX)
    scale = F.lora_scale(RANKS, 8.0)
    state = alg.init(SHAPES)
    start = alg.broadcast(state, mask, scale, jax.random.PRNGKey(0))
    for k in SHAPES:
        assert np.all(np.asarray(start.B[k]) == 0)
        assert start.base_delta[k].shape == SHAPES[k]
    B, A = perturb(start, mask, 1)
    sizes = jnp.array([1.0, 2, 3, 4])
    new, info = alg.aggregate(state, B, A, mask, scale, sizes)
    p = np.asarray(sizes) / 10
    np.testing.assert_allclose(info["p"], p, rtol=1e-6)
    for k in SHAPES:
        want = sum(p[i] * float(scale[i]) * np.asarray(B[k][i], np.float64) @ np.asarray(A[k][i], np.float64)
                   for i in range(4))
        np.testing.assert_allclose(new.G[k], want, atol=1e-5)
    # Next round starts from a fresh LoRA on top of the merged base.
    nxt = alg.broadcast(new, mask, scale, jax.random.PRNGKey(1))
    chex.assert_trees_all_close(nxt.base_delta, new.G)


def test_fedex_lora_is_exact_average_of_products():
    alg = F.fedex_lora(R_MAX)
    ranks = np.full(3, 3)
    mask = F.rank_mask(ranks, R_MAX)
    scale = F.lora_scale(ranks, 6.0)
    state = alg.init(SHAPES, jax.random.PRNGKey(0))
    start = alg.broadcast(state, mask, scale, jax.random.PRNGKey(0))
    B, A = perturb(start, mask, 3, size=0.5)
    new, info = alg.aggregate(state, B, A, mask, scale, jnp.ones(3))
    for k in SHAPES:
        want = np.mean([float(scale[i]) * np.asarray(B[k][i]) @ np.asarray(A[k][i]) for i in range(3)], axis=0)
        np.testing.assert_allclose(alg.global_delta(new)[k], want, atol=1e-5)


def test_hetlora_keeps_uncovered_columns_and_weights_by_norm():
    alg = F.hetlora(R_MAX)
    state = alg.init(SHAPES, jax.random.PRNGKey(0))
    ranks = np.array([1, 2])  # nobody holds columns 2, 3
    mask = F.rank_mask(ranks, R_MAX)
    scale = F.lora_scale(ranks, 8.0)
    start = alg.broadcast(state, mask, scale, jax.random.PRNGKey(0))
    B, A = perturb(start, mask, 5)
    new, info = alg.aggregate(state, B, A, mask, scale, None)
    for k in SHAPES:
        np.testing.assert_array_equal(new.A[k][2:], state.A[k][2:])
        np.testing.assert_array_equal(new.B[k][:, 2:], state.B[k][:, 2:])
    norms = np.array([[np.linalg.norm(float(scale[i]) * np.asarray(B[k][i]) @ np.asarray(A[k][i])) for i in range(2)]
                      for k in SHAPES])
    w = (norms / norms.sum(axis=1, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(info["p"], w / w.sum(), rtol=1e-4)


def test_ffa_lora_trains_only_b():
    assert F.ffa_lora(R_MAX).trainable == ("B",)
    assert F.fedhl(R_MAX).trainable == ("A", "B")


def test_aggregate_compiles_once_across_rank_and_client_changes():
    alg = F.fedhl(R_MAX)
    traces = []

    def agg(state, B, A, mask, scale, n):
        traces.append(1)
        return alg.aggregate(state, B, A, mask, scale, n)

    agg_jit = jax.jit(agg)
    bcast = jax.jit(alg.broadcast)
    state = alg.init(SHAPES)
    rng = np.random.default_rng(0)
    for t in range(4):
        ranks = rng.choice([1, 2, 3, 4], size=4)
        mask = F.rank_mask(ranks, R_MAX)
        scale = F.lora_scale(ranks, 8.0)
        start = bcast(state, mask, scale, jax.random.PRNGKey(t))
        B, A = perturb(start, mask, t)
        state, _ = agg_jit(state, B, A, mask, scale, jnp.asarray(rng.integers(1, 9, 4), jnp.float32))
    assert len(traces) == 1


def test_nonfinite_client_is_dropped_in_tree_aggregate():
    alg = F.fedhl(R_MAX)
    state, mask, scale, start = started(alg, 1)
    B, A = perturb(start, mask, 9)
    k0 = next(iter(SHAPES))
    B_bad = dict(B, **{k0: B[k0].at[2, 0, 0].set(jnp.inf)})
    with pytest.warns(RuntimeWarning, match=r"clients \[2\]"):
        new, info = alg.aggregate(state, B_bad, A, mask, scale, None)
        jax.effects_barrier()
    assert not bool(info["valid"][2]) and float(info["p"][2]) == 0.0
    assert all(np.all(np.isfinite(g)) for g in new.G.values())


@pytest.mark.parametrize("kwargs,msg", [
    (dict(eps=0.0), "eps=0.0"), (dict(eps_mode="weird"), "eps_mode 'weird'"),
    (dict(weighting="nope"), "weighting 'nope'"), (dict(split="x"), "split 'x'"),
    (dict(svd_method="lanczos"), "svd_method 'lanczos'")])
def test_factory_rejects_bad_options(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        F.fedhl(R_MAX, **kwargs)


def test_init_rejects_rmax_above_module_dims():
    with pytest.raises(ValueError, match="r_max=5 exceeds min\\(d_out, d_in\\)=4 of module 'layers.0.self_attn.v_proj'"):
        F.fedhl(5).init(SHAPES)
    with pytest.raises(ValueError, match="unknown algorithm 'fedavg'"):
        F.make_algorithm("fedavg", 4)


# --------------------------------------------------------------------------- state per algorithm


def flat_state(state) -> dict:
    """The flat ``{keystr path: array}`` form checkpoints store."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def unflat_state(template, flat: dict):
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


@struct.dataclass
class LegacyServerState:
    """The single state every algorithm had before ``state_layout`` existed (unused fields empty)."""

    G: dict
    dec: dict
    B: dict
    A: dict
    round: jax.Array


STATE_FIELDS = {"fedhl": {"G", "dec", "round"}, "flexlora": {"G", "dec", "round"}, "rb_lora": {"G", "dec", "round"},
                "flora": {"G", "round"}, "hetlora": {"B", "A", "round"}, "fedit": {"B", "A", "round"},
                "ffa_lora": {"B", "A", "round"}, "fedex_lora": {"B", "A", "G", "round"}}


@pytest.mark.parametrize("name", ALL)
def test_each_algorithm_has_its_own_state_and_reads_legacy_checkpoints(name):
    """A checkpoint of the single-ServerState layout resumes into the algorithm's own state."""
    alg = F.make_algorithm(name, R_MAX)
    state, _ = run_rounds(alg, ranks_for(name), rounds=2)
    assert set(vars(state)) == STATE_FIELDS[name]
    assert alg.state_layout == type(state).layout
    legacy = LegacyServerState(**{f: getattr(state, f, {}) for f in ("G", "dec", "B", "A")}, round=state.round)
    old = flat_state(legacy)
    assert set(old) == set(flat_state(state))  # the empty fields held no arrays
    restored = unflat_state(alg.init(SHAPES, jax.random.PRNGKey(1)), alg.migrate_state(LEGACY_LAYOUT, old))
    chex.assert_trees_all_equal(restored, state)
    assert int(restored.round) == 2


def test_legacy_checkpoint_of_another_family_is_refused_by_name():
    factor_state, _ = run_rounds(F.fedit(R_MAX), ranks_for("fedit"), rounds=1)
    old = flat_state(LegacyServerState(G={}, dec={}, B=factor_state.B, A=factor_state.A, round=factor_state.round))
    with pytest.raises(ValueError, match=r"layout 'server-state/1' holds 'A', which layout 'dense/2' \(G, dec, round\) "
                                         r"has no place for"):
        F.fedhl(R_MAX).migrate_state(LEGACY_LAYOUT, old)
    with pytest.raises(ValueError, match=r"checkpoint state layout 'dense/9' cannot be read: this version reads "
                                         r"'factor/2' and 'server-state/1'"):
        F.fedit(R_MAX).migrate_state("dense/9", old)
    with pytest.raises(ValueError, match=r"holds \"no 'round'\""):
        F.fedit(R_MAX).migrate_state(LEGACY_LAYOUT, {k: v for k, v in old.items() if k != ".round"})


def test_registry_refuses_a_second_factory_under_one_name():
    assert F.ALGORITHMS["fedhl_momentum"].__module__ == "fedhl_jax.algorithms.fedhl_momentum"  # found, not listed

    def fedhl(r_max, options=None):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match=r"algorithm 'fedhl' is registered twice: fedhl_jax.algorithms.dense.fedhl and "):
        F.register("fedhl")(fedhl)
    assert F.ALGORITHMS["fedhl"] is F.fedhl
    assert base.register("fedhl")(F.fedhl) is F.fedhl  # the same factory again (a module reload) is fine
