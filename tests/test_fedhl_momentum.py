"""FedHL with server momentum: its own state, against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedhl_jax as F
from fedhl_jax.algorithms import LEGACY_LAYOUT
from tests.conftest import REPO, np_tail, np_truncate

SHAPES = {"q": (8, 6), "v": (5, 6)}
R_MAX = 4
RANKS = np.array([1, 2, 4, 3])
SIZES = jnp.array([3.0, 1.0, 2.0, 5.0])


def trained(start, mask, seed, size=0.3):
    rng = np.random.default_rng(seed)
    B = {k: b + size * jnp.asarray(rng.normal(size=b.shape), jnp.float32) * mask[:, None, :] for k, b in start.B.items()}
    A = {k: a + size * jnp.asarray(rng.normal(size=a.shape), jnp.float32) * mask[:, :, None] for k, a in start.A.items()}
    return B, A


def rounds(alg, n, state=None, jit=False):
    """``n`` rounds with fixed inputs; returns the states and infos of every round."""
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    state = alg.init(SHAPES) if state is None else state
    broadcast, aggregate = (jax.jit(alg.broadcast), jax.jit(alg.aggregate)) if jit else (alg.broadcast, alg.aggregate)
    out = []
    for t in range(n):
        B, A = trained(broadcast(state, mask, scale, jax.random.PRNGKey(t)), mask, t)
        state, info = aggregate(state, B, A, mask, scale, SIZES)
        out.append((state, info))
    return out


def np_momentum_round(G, v, B, A, scale, beta, eps=1e-2):
    """float64 FedHL weights (relative ε, power 2, r̂ summed over modules), then v ← βv + Δ, G ← G + v."""
    G = {k: np.asarray(g, np.float64) for k, g in G.items()}
    err = np.array([sum(np_tail(G[k], r) for k in G) for r in RANKS])
    x = err**2
    p = 1 / (x + eps * x.mean())
    p /= p.sum()
    v_new, G_new = {}, {}
    for k in G:
        delta = sum(p[i] * (float(scale[i]) * np.asarray(B[k][i], np.float64)[:, :r] @ np.asarray(A[k][i], np.float64)[:r]
                            - np_truncate(G[k], r)) for i, r in enumerate(RANKS))
        v_new[k] = beta * np.asarray(v[k], np.float64) + delta
        G_new[k] = G[k] + v_new[k]
    return G_new, v_new, p


def rel(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def test_registered_with_its_own_state():
    alg = F.make_algorithm("fedhl_momentum", R_MAX, {"beta": 0.5, "eps": 0.1})
    assert alg.options.beta == 0.5 and alg.options.eps == 0.1 and alg.per_rank_eval
    state = alg.init(SHAPES)
    assert sorted(f for f in vars(state)) == ["G", "dec", "round", "v"]
    assert alg.state_layout == "fedhl-momentum/1" != F.fedhl(R_MAX).state_layout
    assert all(np.all(np.asarray(v) == 0) for v in state.v.values())


@pytest.mark.parametrize("beta", [0.9, 0.5])
def test_matches_float64_numpy(beta):
    alg = F.make_algorithm("fedhl_momentum", R_MAX, beta=beta)
    state, _ = rounds(alg, 2)[-1]  # a state with G ≠ 0 and v ≠ 0
    assert all(float(jnp.abs(v).max()) > 1e-2 for v in state.v.values())
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    B, A = trained(alg.broadcast(state, mask, scale, jax.random.PRNGKey(9)), mask, 9)
    new, info = jax.jit(alg.aggregate)(state, B, A, mask, scale, SIZES)
    G_want, v_want, p_want = np_momentum_round(state.G, state.v, B, A, scale, beta)
    np.testing.assert_allclose(info["p"], p_want, rtol=1e-5, atol=1e-7)
    for k in SHAPES:
        assert rel(new.G[k], G_want[k]) <= 1e-5, (k, rel(new.G[k], G_want[k]))
        assert rel(new.v[k], v_want[k]) <= 1e-5, (k, rel(new.v[k], v_want[k]))
        np.testing.assert_allclose(new.dec[k].S, np.linalg.svd(G_want[k], compute_uv=False)[:R_MAX], rtol=1e-5, atol=1e-6)
    assert int(new.round) == 3


def test_untrained_round_with_zero_velocity_is_a_fixed_point():
    alg = F.make_algorithm("fedhl_momentum", R_MAX, beta=0.9)
    state, _ = rounds(alg, 2)[-1]
    state = state.replace(v={k: jnp.zeros_like(v) for k, v in state.v.items()})
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    start = alg.broadcast(state, mask, scale, jax.random.PRNGKey(5))
    new, info = alg.aggregate(state, start.B, start.A, mask, scale, SIZES)
    assert bool(info["applied"])
    for k in SHAPES:
        np.testing.assert_allclose(new.G[k], state.G[k], atol=1e-5)
        np.testing.assert_allclose(new.v[k], 0.0, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_zero_beta_is_fedhl_exactly(jit):
    ours = rounds(F.make_algorithm("fedhl_momentum", R_MAX, beta=0.0, eps=0.05), 3, jit=jit)
    ref = rounds(F.fedhl(R_MAX, eps=0.05), 3, jit=jit)
    for (s, i), (s_ref, i_ref) in zip(ours, ref):
        for k in SHAPES:
            np.testing.assert_array_equal(s.G[k], s_ref.G[k])
            np.testing.assert_array_equal(s.dec[k].S, s_ref.dec[k].S)
        np.testing.assert_array_equal(i["p"], i_ref["p"])


def test_a_diverging_client_leaves_g_and_v_untouched():
    alg = F.make_algorithm("fedhl_momentum", R_MAX)
    state, _ = rounds(alg, 1)[-1]
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, 8.0)
    B, A = trained(alg.broadcast(state, mask, scale, jax.random.PRNGKey(1)), mask, 1)
    bad = {k: b.at[:, 0, 0].set(jnp.nan) for k, b in B.items()}  # every client
    with pytest.warns(RuntimeWarning, match="no client left"):
        new, info = alg.aggregate(state, bad, A, mask, scale, SIZES)
        jax.effects_barrier()
    assert not bool(info["applied"]) and int(new.round) == int(state.round) + 1
    for k in SHAPES:
        np.testing.assert_array_equal(new.G[k], state.G[k])
        np.testing.assert_array_equal(new.v[k], state.v[k])


@pytest.mark.parametrize("beta", [1.0, -0.1, "0.5", True])
def test_bad_beta_is_refused_by_name(beta):
    with pytest.raises(ValueError, match=rf"algorithm 'fedhl_momentum': beta must be a number in \[0, 1\), got beta={beta!r}"):
        F.make_algorithm("fedhl_momentum", R_MAX, {"beta": beta})


def test_checkpoints_of_its_own_layout_only():
    alg = F.make_algorithm("fedhl_momentum", R_MAX)
    state, _ = rounds(alg, 1)[-1]
    paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    flat = {jax.tree_util.keystr(p): x for p, x in paths}
    back = alg.migrate_state(alg.state_layout, flat)
    restored = jax.tree_util.tree_unflatten(treedef, [back[jax.tree_util.keystr(p)] for p, _ in paths])
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=f"layout '{LEGACY_LAYOUT}' cannot be read: this version reads 'fedhl-momentum/1'$"):
        alg.migrate_state(LEGACY_LAYOUT, flat)


def test_docs_show_this_factory():
    """docs/engine.md's worked example is this algorithm's module, as it is."""
    text = (REPO / "docs" / "engine.md").read_text()
    section = text[text.index("## Adding an algorithm with its own server state"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    block = block[:block.index("```")]
    source = (REPO / "fedhl_jax" / "algorithms" / "fedhl_momentum.py").read_text()
    assert block.startswith("# fedhl_jax/algorithms/fedhl_momentum.py\n")
    assert block.split("\n", 1)[1].strip() in source
