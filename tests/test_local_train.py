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


# ----------------------------------------------------------------------------- length buckets
def ragged_batches(n, steps=2, b=2, T=40, seed=3):
    """Targets ending at assorted columns: a bucket's last column, one past it, none at all."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CFG.vocab_size, size=(n, steps, b, T))
    ends = rng.choice([1, 8, 9, 16, 17, 23, 33, 40], size=(n, steps, b))
    ends[0, 0, :] = 8  # a step of client 0 that fits the narrowest width exactly
    ends[-1, -1, :] = 0  # a step without targets
    cols = np.arange(T)
    mask = (cols >= 2) & (cols < ends[..., None])
    tokens = np.where(cols < np.maximum(ends, 1)[..., None], tokens, 0)  # padding after the answer
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.float32)


def test_bucket_widths_and_step_widths():
    from fedhl_jax.local import bucket_widths, step_widths

    assert bucket_widths(40, 8) == (8, 16, 24, 32, 40)
    assert bucket_widths(40, 16) == (16, 32, 40) and bucket_widths(40, 0) == (40,)
    assert bucket_widths(40, 64) == (40,)
    mask = np.zeros((2, 3, 40))
    mask[0, 0, 5:9] = 1  # ends at 9 -> 16 (index 1)
    mask[0, 1, 2:8] = 1  # ends at 8 -> 8 (index 0)
    mask[1, 2, 39] = 1  # ends at 40 -> index 4; the other rows have no targets -> 8
    np.testing.assert_array_equal(step_widths(jnp.asarray(mask), 8), [1, 4])  # max over the rows
    np.testing.assert_array_equal(step_widths(jnp.asarray(mask)[None], 8, axes=2), [[1, 4]])
    with pytest.raises(ValueError, match="length_bucket must be >= 0.*-8"):
        make_local_train(loss, make_optimizer("adamw", 1e-2), length_bucket=-8)


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_length_bucketed_steps_match_the_full_width(chunk):
    """Each local step cut to its bucket trains the same factors as the full width (5 clients:
    chunks of 1, of 2 with a remainder, and one vmap), and the width is a real branch: the
    compiled round holds a conditional, not a select over every width."""
    ranks = np.array([1, 2, 4, 3, 4])
    ad = adapters(ranks)
    tokens, mask = ragged_batches(5)
    opt = make_optimizer("adamw", 3e-2)
    full = jax.jit(make_clients_train(make_local_train(loss, opt), clients_per_chunk=chunk))
    cut_fn = make_clients_train(make_local_train(loss, opt, length_bucket=8), clients_per_chunk=chunk,
                                length_bucket=8)
    ref, ref_losses = full(PARAMS, ad, tokens, mask)
    out, losses = jax.jit(cut_fn)(PARAMS, ad, tokens, mask)
    chex.assert_trees_all_close((out.B, out.A, losses), (ref.B, ref.A, ref_losses), rtol=1e-5, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(out.B[k] - ad.B[k]))) for k in out.B) > 1e-3  # it trained
    jaxpr = str(jax.make_jaxpr(cut_fn)(PARAMS, ad, tokens, mask))
    assert " cond[" in jaxpr and jaxpr.count("branches=(") >= 1


def test_length_bucketed_single_client_computes_its_own_widths():
    """``local_train`` of one client (a deployed node) picks its widths from its own batch."""
    ad = jax.tree.map(lambda x: x[0], adapters(np.array([3])))
    tokens, mask = ragged_batches(1)
    opt = make_optimizer("adamw", 3e-2)
    ref, ref_losses = jax.jit(make_local_train(loss, opt))(PARAMS, ad, tokens[0], mask[0])
    out, losses = jax.jit(make_local_train(loss, opt, length_bucket=8))(PARAMS, ad, tokens[0], mask[0])
    chex.assert_trees_all_close((out.B, out.A, losses), (ref.B, ref.A, ref_losses), rtol=1e-5, atol=1e-6)


def test_length_bucketed_steps_run_at_the_chosen_width():
    """The loss sees exactly the columns of its bucket: the chunk's widest target, rounded up."""
    seen = []

    def spy(params, adapter, tokens, mask):
        jax.debug.callback(lambda w: seen.append(int(w)), jnp.int32(tokens.shape[-1]))
        return loss(params, adapter, tokens, mask)

    tokens, mask = ragged_batches(4, seed=5)
    ad = adapters(np.array([1, 2, 3, 4]))
    fn = jax.jit(make_clients_train(make_local_train(spy, make_optimizer("sgd", 1e-2), length_bucket=8),
                                    clients_per_chunk=2, length_bucket=8))
    jax.block_until_ready(fn(PARAMS, ad, tokens, mask))
    ends = np.asarray(jnp.max(jnp.where(mask > 0, jnp.arange(1, 41), 1), axis=-1)).max(-1)  # [4, K]
    want = np.minimum(-(-ends.reshape(2, 2, -1).max(1) // 8) * 8, 40)  # [chunks, K]
    assert sorted(seen) == sorted(want.ravel().tolist())
