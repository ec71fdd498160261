"""Client training: masks respected by every optimizer, jit/vmap agreement, chunking."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedhl_jax import model as M
from fedhl_jax.local import make_clients_train, make_local_train, make_optimizer
from fedhl_jax.lora import Adapter, lora_scale, rank_mask

CFG = M.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=4)
PARAMS = M.init_params(CFG, jax.random.PRNGKey(0))
TARGETS = ("q_proj", "v_proj", "down_proj")
R_MAX = 4


def loss(params, adapter, tokens, mask):
    return M.loss_fn(CFG, params, adapter, tokens, mask)


def adapters(ranks, key=1, nonzero_b=True):
    n = len(ranks)
    keys = jax.random.split(jax.random.PRNGKey(key), n)
    ad = jax.vmap(lambda k: M.init_adapter(CFG, TARGETS, R_MAX, k))(keys)
    mask = rank_mask(ranks, R_MAX)
    B = {k: (0.1 * jax.random.normal(jax.random.PRNGKey(9), b.shape) if nonzero_b else b) * mask[:, None, :]
         for k, b in ad.B.items()}
    A = {k: a * mask[:, :, None] for k, a in ad.A.items()}
    return Adapter(B, A, mask, lora_scale(ranks, 8.0))


def batches(n, steps=3, b=2, T=10, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, CFG.vocab_size, size=(n, steps, b, T)), jnp.int32)
    mask = jnp.ones((n, steps, b, T), jnp.float32)
    return tokens, mask


@pytest.mark.parametrize("opt", [
    dict(name="adamw", lr=1e-2, weight_decay=0.1),
    dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.1),
    dict(name="adamw", lr=1e-2, lr_b=3e-2, grad_clip=0.5),
])
def test_masked_columns_never_move(opt):
    ranks = np.array([1, 2, 4])
    ad = adapters(ranks)
    # Put garbage in the padding columns: they must stay exactly as they are.
    off = 1.0 - ad.mask
    ad = ad._replace(B={k: b + 5.0 * off[:, None, :] for k, b in ad.B.items()},
                     A={k: a + 5.0 * off[:, :, None] for k, a in ad.A.items()})
    tokens, mask = batches(3)
    train = make_clients_train(make_local_train(loss, make_optimizer(**opt)))
    out, losses = jax.jit(train)(PARAMS, ad, tokens, mask)
    assert losses.shape == (3, 3)
    for k in out.B:
        for i, r in enumerate(ranks):
            np.testing.assert_array_equal(out.B[k][i, :, r:], ad.B[k][i, :, r:])
            np.testing.assert_array_equal(out.A[k][i, r:], ad.A[k][i, r:])
            assert not np.allclose(out.B[k][i, :, :r], ad.B[k][i, :, :r])


def test_local_training_reduces_loss():
    ad = adapters(np.array([4]))
    tokens, mask = batches(1, steps=30, seed=3)
    tokens = jnp.broadcast_to(tokens[:, :1], tokens.shape)  # the same batch every step
    train = make_clients_train(make_local_train(loss, make_optimizer("adamw", 3e-2)))
    _, losses = jax.jit(train)(PARAMS, ad, tokens, mask)
    assert float(losses[0, -1]) < float(losses[0, 0]) - 0.05


def test_vmap_matches_per_client_and_chunks():
    ranks = np.array([1, 2, 4, 3, 2])
    ad = adapters(ranks)
    tokens, mask = batches(5)
    local = make_local_train(loss, make_optimizer("adamw", 1e-2))
    full = jax.jit(make_clients_train(local))(PARAMS, ad, tokens, mask)
    chunked = jax.jit(make_clients_train(local, clients_per_chunk=2))(PARAMS, ad, tokens, mask)  # 5 = 2+2+1
    chex.assert_trees_all_close(full, chunked, atol=1e-5)
    for i in range(5):
        one = jax.tree.map(lambda x: x[i], ad)
        got, l = local(PARAMS, one, tokens[i], mask[i])
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], full[0]), got, atol=1e-5)
        np.testing.assert_allclose(full[1][i], l, atol=1e-5)


def test_remat_gives_the_same_result():
    ad = adapters(np.array([2, 4]))
    tokens, mask = batches(2)
    opt = make_optimizer("adamw", 1e-2)
    a = jax.jit(make_clients_train(make_local_train(loss, opt)))(PARAMS, ad, tokens, mask)
    b = jax.jit(make_clients_train(make_local_train(loss, opt, remat=True)))(PARAMS, ad, tokens, mask)
    chex.assert_trees_all_close(a, b, atol=1e-6)


def test_frozen_a():
    ad = adapters(np.array([2, 4]))
    tokens, mask = batches(2)
    train = make_clients_train(make_local_train(loss, make_optimizer("adamw", 1e-2, trainable=("B",))))
    out, _ = jax.jit(train)(PARAMS, ad, tokens, mask)
    chex.assert_trees_all_equal(out.A, ad.A)
    assert not np.allclose(out.B["layers.0.self_attn.q_proj"], ad.B["layers.0.self_attn.q_proj"])


def test_base_params_are_not_copied_per_client():
    """Under vmap the base weights enter once: no [n, ...] copy of any base weight in the jaxpr."""
    ad = adapters(np.array([1, 2, 4]))
    tokens, mask = batches(3)
    train = make_clients_train(make_local_train(loss, make_optimizer("adamw", 1e-2)))
    jaxpr = jax.make_jaxpr(train)(PARAMS, ad, tokens, mask)
    emb = PARAMS["embed_tokens"].shape
    assert f"f32[3,{emb[0]},{emb[1]}]" not in str(jaxpr)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        make_optimizer("lion")
