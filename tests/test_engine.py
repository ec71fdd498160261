"""The pure round engine: a FedHL round against a float64 NumPy reference, jit vs no-jit, keys,
algorithm facts and options, and the worked example of docs/engine.md."""

import re
import subprocess

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedhl_jax as F
from fedhl_jax import algorithms, engine
from fedhl_jax.local import make_optimizer
from fedhl_jax.truncation import masked_factors
from tests.conftest import REPO

D_OUT, D_IN, M, K, LR, ALPHA = 6, 5, 7, 3, 0.05, 8.0
RANKS = np.array([1, 2, 4])
R_MAX = 4


def lsq_loss(base, adapter, X, Y):
    Bm, Am = masked_factors(adapter.B["w"][None], adapter.A["w"][None], adapter.mask[None])
    W = base["w"] + adapter.scale * Bm[0] @ Am[0]
    return 0.5 * jnp.mean(jnp.sum((X @ W.T - Y) ** 2, axis=-1))


def problem(seed=0):
    rng = np.random.default_rng(seed)
    G0 = rng.normal(size=(D_OUT, D_IN)) * 0.5
    X = rng.normal(size=(len(RANKS), M, D_IN))
    Y = rng.normal(size=(len(RANKS), M, D_OUT))
    return G0, X, Y


def state_at(alg, G0):
    state = alg.init({"w": (D_OUT, D_IN)}, jax.random.PRNGKey(0))
    G = {"w": jnp.asarray(G0, jnp.float32)}
    return state.replace(G=G, dec={"w": F.svd(G["w"], R_MAX)})


def inputs(X, Y, key=jax.random.PRNGKey(3)):
    steps = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.float32)[:, None], (a.shape[0], K) + a.shape[1:])
    return engine.RoundInputs(F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, ALPHA), jnp.array([3.0, 5.0, 9.0]),
                              (steps(X), steps(Y)), key)


def np_fedhl_round(G0, X, Y, eps=1e-2):
    """One FedHL round in float64 NumPy: balanced truncation, K SGD steps, unbiased aggregation."""
    U, S, Vt = np.linalg.svd(G0, full_matrices=False)
    tail = np.array([np.sum(S[r:] ** 2) for r in range(len(S) + 1)])
    deltas, errs = [], []
    for i, r in enumerate(RANKS):
        s = ALPHA / r
        B = U[:, :r] * np.sqrt(S[:r]) / np.sqrt(s)
        A = (np.sqrt(S[:r])[:, None] * Vt[:r]) / np.sqrt(s)
        for _ in range(K):
            W = s * B @ A
            dW = (X[i] @ W.T - Y[i]).T @ X[i] / M  # dL/dW of 0.5 mean ||W x - y||²
            B, A = B - LR * s * dW @ A.T, A - LR * s * B.T @ dW
        G_r = (U[:, :r] * S[:r]) @ Vt[:r]
        deltas.append(s * B @ A - G_r)
        errs.append(tail[r])
    x = np.asarray(errs) ** 2
    e = eps * x.mean()  # relative ε, the default
    p = 1 / (x + e)
    p /= p.sum()
    return G0 + sum(pi * d for pi, d in zip(p, deltas)), p


def test_fedhl_round_matches_float64_numpy():
    G0, X, Y = problem()
    alg = F.fedhl(R_MAX)
    step = engine.make_round_step(alg, lsq_loss, make_optimizer("sgd", LR, trainable=alg.trainable))
    base = {"w": jnp.zeros((D_OUT, D_IN))}
    state, info = jax.jit(step)(state_at(alg, G0), base, inputs(X, Y))
    want, p = np_fedhl_round(G0, X, Y)
    np.testing.assert_allclose(np.asarray(info["p"]), p, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.G["w"]), want, atol=2e-5)
    assert info["losses"].shape == (len(RANKS), K)


@pytest.mark.parametrize("name", sorted(F.ALGORITHMS))
def test_round_step_jit_matches_eager(name):
    G0, X, Y = problem(1)
    ranks = np.full(3, 2) if F.make_algorithm(name, R_MAX).homogeneous else RANKS
    alg = F.make_algorithm(name, R_MAX)
    step = engine.make_round_step(alg, lsq_loss, make_optimizer("adamw", 1e-2, trainable=alg.trainable),
                                  clients_per_chunk=2)
    inp = inputs(X, Y)._replace(mask=F.rank_mask(ranks, R_MAX), scale=F.lora_scale(ranks, ALPHA))
    base = {"w": jnp.zeros((D_OUT, D_IN))}
    state = alg.init({"w": (D_OUT, D_IN)}, jax.random.PRNGKey(0))
    eager = step(state, base, inp)
    jitted = engine.compile_round_step(step)(alg.init({"w": (D_OUT, D_IN)}, jax.random.PRNGKey(0)), base, inp)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5)


def test_every_random_choice_follows_the_key():
    G0, X, Y = problem(2)
    alg = F.flora(R_MAX)  # FLoRA draws a fresh A from the round key
    step = jax.jit(engine.make_round_step(alg, lsq_loss, make_optimizer("sgd", LR)))
    base = {"w": jnp.zeros((D_OUT, D_IN))}
    run = lambda key: np.asarray(step(alg.init({"w": (D_OUT, D_IN)}), base, inputs(X, Y, key))[0].G["w"])
    np.testing.assert_array_equal(run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1)))
    assert np.abs(run(jax.random.PRNGKey(1)) - run(jax.random.PRNGKey(2))).max() > 1e-4
    with pytest.raises(ValueError, match="needs a PRNG key"):
        F.svd(jnp.ones((4, 4)), 2, method="randomized")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        F.fedit(R_MAX).init({"w": (D_OUT, D_IN)})
    rand = F.fedhl(R_MAX, svd_method="randomized")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        rand.aggregate(state_at(rand, G0), {"w": jnp.zeros((3, D_OUT, R_MAX))}, {"w": jnp.zeros((3, R_MAX, D_IN))},
                       F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, ALPHA))


def test_algorithm_facts():
    shapes = {"a": (8, 6), "b": (4, 6)}
    ranks = np.array([1, 2, 4])
    per_rank = (8 + 6 + 4 + 6) * 4
    assert F.fedhl(4).comm_bytes(shapes, ranks) == (per_rank * 7, per_rank * 7)
    assert F.flora(4).comm_bytes(shapes, ranks) == (per_rank * 7 * 4, per_rank * 7)  # + everyone's stack
    assert F.ffa_lora(4).comm_bytes(shapes, ranks)[1] == (8 + 4) * 4 * 7  # only B travels up
    homogeneous = {n for n in F.ALGORITHMS if F.make_algorithm(n, 4).homogeneous}
    assert homogeneous == {"fedit", "ffa_lora", "fedex_lora"}
    per_rank_eval = {n for n in F.ALGORITHMS if F.make_algorithm(n, 4).per_rank_eval}
    assert per_rank_eval == {"fedhl", "flexlora", "rb_lora", "fedhl_momentum", "fedhl_rb", "raflora"}
    assert F.fedhl(4).options == F.FedHLOptions()
    assert F.fedhl(4, {"eps": 0.5}, power=1.0).options == F.FedHLOptions(eps=0.5, power=1.0)


def test_options_are_validated_once_with_their_names():
    with pytest.raises(ValueError, match=r"algorithm 'flexlora': unknown option 'eps'; valid options: split, svd_method"):
        F.make_algorithm("flexlora", 4, {"eps": 1.0})
    with pytest.raises(ValueError, match=r"algorithm 'hetlora': unknown option 'split'; valid options: none"):
        F.make_algorithm("hetlora", 4, {"split": "left"})
    with pytest.raises(ValueError, match="power must be > 0"):
        F.FedHLOptions(power=0.0)
    # One default ε mode for the function API, the factory and the configs.
    from fedhl_jax.config import load_config
    assert F.FedHLOptions().eps_mode == load_config().fed.options["eps_mode"] == "relative"
    G0, X, _ = problem(3)
    G = jnp.asarray(G0, jnp.float32)
    mask, scale = F.rank_mask(RANKS, R_MAX), F.lora_scale(RANKS, ALPHA)
    B, A = F.truncate(G, mask, scale)
    B = B + 0.1 * mask[:, None, :]
    _, p_fn = F.fedhl_aggregate(G, B, A, mask, scale, eps=1e-2)
    alg = F.fedhl(R_MAX, eps=1e-2)
    _, info = alg.aggregate(state_at(alg, G0), {"w": B}, {"w": A}, mask, scale)
    np.testing.assert_allclose(p_fn, info["p"], rtol=1e-5)


def test_no_code_outside_algorithms_compares_algorithm_names():
    res = subprocess.run(["grep", "-rnE", r"\.name ==|\.name in", "fedhl_jax"], cwd=REPO, capture_output=True,
                         text=True)
    hits = [line for line in res.stdout.splitlines() if not line.startswith("fedhl_jax/algorithms.py")]
    assert hits == []


def test_docs_worked_example_adds_an_algorithm():
    """The example of docs/engine.md ("Adding an algorithm") runs as written."""
    text = (REPO / "docs" / "engine.md").read_text()
    section = text[text.index("### Adding an algorithm"):]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    assert len(blocks) == 2
    try:
        exec(blocks[0], vars(algorithms))  # the factory, in algorithms.py's namespace
        ns = {}
        exec(blocks[1], ns)
        ns["test_flexlora_uniform_matches_numpy"]()
        from fedhl_jax.config import load_config
        cfg = load_config(None, ["fed.algorithm=flexlora_uniform", "fed.options.split=left"])
        from fedhl_jax.build import build_algorithm
        assert build_algorithm(cfg.fed).options.split == "left"
    finally:
        algorithms.ALGORITHMS.pop("flexlora_uniform", None)
