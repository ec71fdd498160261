"""Stacked (scanned) layers, per-block rematerialisation and mixed precision."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedhl_jax import model as M
from fedhl_jax.local import make_clients_train, make_local_train, make_optimizer
from fedhl_jax.lora import Adapter, lora_scale, rank_mask
from fedhl_jax.model import planning as P
from fedhl_jax.model.llama import locate_param

CFG = M.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6)
PARAMS = M.init_params(CFG, jax.random.key(0), std=0.2)
TOKENS = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)


def adapter(targets=("q_proj", "v_proj", "down_proj"), key=2, r=4, cfg=CFG):
    ad = M.init_adapter(cfg, targets, r, jax.random.key(key), rank=3, alpha=8.0)
    keys = jax.random.split(jax.random.key(key + 100), len(ad.B))
    return ad._replace(B={n: 0.3 * jax.random.normal(k, b.shape) for k, (n, b) in zip(keys, ad.B.items())})


def reference_forward(cfg, flat, tokens, ad=None):
    """The per-layer decoder written out as a Python loop over the flat parameters."""
    def norm(x, w):
        return w * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)

    def lin(x, name):
        y = x @ flat[name].T
        if ad is not None and name in ad.A:
            y = y + ((x @ ad.A[name].T) * ad.mask * ad.scale) @ ad.B[name].T
        return y

    b, t = tokens.shape
    hd, h, kvh = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [b, t, heads, hd]
        rot = jnp.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    x = flat["embed_tokens"][tokens]
    causal = np.tril(np.ones((t, t), bool))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        y = norm(x, flat[p + "input_layernorm"])
        q = rope(lin(y, p + "self_attn.q_proj").reshape(b, t, h, hd))
        k = rope(lin(y, p + "self_attn.k_proj").reshape(b, t, kvh, hd))
        v = lin(y, p + "self_attn.v_proj").reshape(b, t, kvh, hd)
        k, v = jnp.repeat(k, h // kvh, axis=2), jnp.repeat(v, h // kvh, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd)
        pr = jax.nn.softmax(jnp.where(causal, s, -1e30), -1)
        x = x + lin(jnp.einsum("bhts,bshd->bthd", pr, v).reshape(b, t, h * hd), p + "self_attn.o_proj")
        y = norm(x, flat[p + "post_attention_layernorm"])
        x = x + lin(jax.nn.silu(lin(y, p + "mlp.gate_proj")) * lin(y, p + "mlp.up_proj"), p + "mlp.down_proj")
    return norm(x, flat["norm"]) @ flat["lm_head"].T


def ce(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


# ----------------------------------------------------------------------------- layout
def test_flat_round_trip_and_locate():
    flat = M.flatten_params(PARAMS)
    assert list(flat) == list(M.param_shapes(CFG))  # state-dict order, one entry per layer
    rebuilt = M.unflatten_params(CFG, {k: np.asarray(v) for k, v in flat.items()})  # NumPy: host stack
    assert jax.tree.structure(rebuilt) == jax.tree.structure(PARAMS)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(PARAMS)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    parent, leaf = locate_param(PARAMS, "layers.2.mlp.gate_proj")
    np.testing.assert_array_equal(np.asarray(parent[leaf]), np.asarray(flat["layers.2.mlp.gate_proj"]))
    with pytest.raises(KeyError, match=r"layers\.1\.norm_x|missing"):
        M.unflatten_params(CFG, {k: v for k, v in flat.items() if k != "layers.1.mlp.up_proj"})
    with pytest.raises(KeyError, match="out of range"):
        M.unflatten_params(CFG, {**flat, "layers.3.mlp.up_proj": flat["layers.0.mlp.up_proj"]})


def test_merge_delta_of_some_layers():
    d = {"layers.1.self_attn.q_proj": jnp.ones((32, 32)), "layers.2.self_attn.q_proj": 2 * jnp.ones((32, 32)),
         "norm": jnp.ones(32)}
    merged = jax.jit(M.merge_delta)(PARAMS, d)
    q, q0 = merged["layers"]["self_attn"]["q_proj"], PARAMS["layers"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(np.asarray(q - q0), np.asarray(jnp.stack([0 * d["norm"][0] * jnp.ones((32, 32)),
                                                                         d["layers.1.self_attn.q_proj"],
                                                                         d["layers.2.self_attn.q_proj"]])),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged["norm"]), 2.0)
    np.testing.assert_array_equal(np.asarray(merged["layers"]["mlp"]["up_proj"]),
                                  np.asarray(PARAMS["layers"]["mlp"]["up_proj"]))


# ----------------------------------------------------------------------------- parity
def test_scan_matches_the_per_layer_loop():
    flat = M.flatten_params(PARAMS)
    ad = adapter()
    partial_ad = ad._replace(A={k: v for k, v in ad.A.items() if not k.startswith("layers.1.")},
                             B={k: v for k, v in ad.B.items() if not k.startswith("layers.1.")})
    for a in (None, ad, partial_ad):  # also an adapter that skips a layer (zero factors there)
        got = jax.jit(partial(M.forward, CFG))(PARAMS, TOKENS, adapter=a)
        np.testing.assert_allclose(np.asarray(got), np.asarray(reference_forward(CFG, flat, TOKENS, a)),
                                   atol=1e-5)
    g = jax.jit(jax.grad(lambda a: M.loss_fn(CFG, PARAMS, a, TOKENS, jnp.ones(TOKENS.shape))))(ad)
    g_ref = jax.grad(lambda a: ce(reference_forward(CFG, flat, TOKENS, a), TOKENS))(ad)
    for x, y in zip(jax.tree.leaves((g.A, g.B)), jax.tree.leaves((g_ref.A, g_ref.B))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


@pytest.mark.parametrize("unroll_layers", [0, 8])
def test_scanned_and_unrolled_layers_agree_with_the_per_layer_loop(unroll_layers):
    """Shallow models unroll the layer scan (no loop in the program); both give the reference values."""
    cfg = CFG.replace(unroll_layers=unroll_layers)
    ad = adapter()
    f = jax.jit(lambda p, a: M.forward(cfg, p, TOKENS, adapter=a))
    hlo = f.lower(PARAMS, ad).as_text()
    assert ("while" in hlo) == (unroll_layers < cfg.num_layers), unroll_layers
    np.testing.assert_allclose(np.asarray(f(PARAMS, ad)),
                               np.asarray(reference_forward(cfg, M.flatten_params(PARAMS), TOKENS, ad)), atol=1e-5)


def test_stacked_adapter_form_gives_the_same_values():
    ad = adapter()
    st = M.stacked_adapter(CFG, ad)
    assert st.A["q_proj"].shape == (3, 4, 32) and st.B["down_proj"].shape == (3, 32, 4)
    back = M.per_layer_adapter(CFG, st)
    assert list(back.A) == list(ad.A)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_allclose(np.asarray(M.forward(CFG, PARAMS, TOKENS, adapter=st)),
                               np.asarray(M.forward(CFG, PARAMS, TOKENS, adapter=ad)), atol=1e-6)
    many = jax.vmap(lambda k: M.init_adapter(CFG, "q_proj", 2, k))(jax.random.split(jax.random.key(0), 5))
    assert M.stacked_adapter(CFG, many).A["q_proj"].shape == (5, 3, 2, 32)  # client axis stays in front
    with pytest.raises(ValueError, match="some layers only"):
        M.stacked_adapter(CFG, ad._replace(A={k: v for k, v in ad.A.items() if "layers.0." not in k}))


def test_program_size_does_not_grow_with_depth():
    def n_eqns(layers):
        cfg = CFG.replace(num_layers=layers)
        p = jax.eval_shape(lambda k: M.init_params(cfg, k), jax.random.key(0))
        ad = jax.eval_shape(lambda k: M.stacked_adapter(cfg, M.init_adapter(cfg, "all-linear", 4, k)),
                            jax.random.key(0))
        f = jax.grad(lambda a, p: M.loss_fn(cfg.replace(remat="full"), p, a, TOKENS, jnp.ones(TOKENS.shape)))
        return len(jax.make_jaxpr(f)(ad, p).jaxpr.eqns)

    assert n_eqns(2) == n_eqns(12)


def test_kv_cache_is_stacked():
    k, v = M.init_cache(CFG, 2, 16)
    assert k.shape == v.shape == (3, 2, 16, 2, 8)


# ----------------------------------------------------------------------------- remat
def test_remat_policies_give_the_same_loss_and_gradients():
    ads = jax.tree.map(lambda *x: jnp.stack(x), adapter(key=2), adapter(key=3))
    tokens = jnp.stack([TOKENS, TOKENS[::-1]])
    out = {}
    for remat in M.REMAT_POLICIES:
        cfg = CFG.replace(remat=remat, unroll_layers=0)  # the same scanned program under each policy
        f = jax.jit(jax.vmap(jax.value_and_grad(lambda a, t: M.loss_fn(cfg, PARAMS, a, t, jnp.ones(t.shape)))))
        out[remat] = f(ads, tokens)
    for remat in ("dots_saveable", "full"):
        for x, y in zip(jax.tree.leaves(out[remat]), jax.tree.leaves(out["none"])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    with pytest.raises(ValueError, match="remat"):
        CFG.replace(remat="everything")


def test_remat_policies_keep_fewer_residuals():
    kept = {r: P.activation_bytes(CFG.replace(remat=r), batch=2, seq=8, r_max=4)["per_layer"]
            for r in M.REMAT_POLICIES}
    assert kept["none"] > kept["dots_saveable"] > kept["full"], kept
    assert kept["full"] == 2 * 8 * CFG.hidden_size * 4  # only the block's float32 input x [b, T, D]


def test_planner_matches_xla_memory_analysis_on_a_small_shape():
    cfg = M.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=32)
    rows = P.check_rows([("small", cfg, 4, 2, 2, 64, 8)])
    for row in rows:
        assert 0.8 <= row["ratio"] <= 1.2, row


# ----------------------------------------------------------------------------- mixed precision
def test_bfloat16_local_step_loss_is_close_to_float32():
    """One local AdamW step of 2 vmapped clients: bfloat16 weights and activations (factors,
    optimizer state and loss in float32) against float32; the losses agree within 2% (relative)."""
    ranks = np.array([2, 4])
    keys = jax.random.split(jax.random.key(5), 2)
    ad = jax.vmap(lambda k: M.init_adapter(CFG, "all-linear", 4, k))(keys)
    ad = Adapter({k: 0.05 * jnp.ones_like(b) for k, b in ad.B.items()}, ad.A, rank_mask(ranks, 4),
                 lora_scale(ranks, 8.0))
    tokens = jax.random.randint(jax.random.key(6), (2, 2, 2, 9), 0, CFG.vocab_size)
    mask = jnp.ones(tokens.shape)
    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg = CFG.replace(dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(cfg.jnp_dtype), PARAMS)
        local = make_local_train(lambda p, a, t, m: M.loss_fn(cfg, p, a, t, m), make_optimizer("adamw", 1e-2))
        trained, losses = jax.jit(make_clients_train(local))(params, ad, tokens, mask)
        assert losses.dtype == jnp.float32
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((trained.A, trained.B)))
        results[dtype] = np.asarray(losses)
    np.testing.assert_allclose(results["bfloat16"], results["float32"], rtol=2e-2)
    cfg = CFG.replace(dtype="bfloat16", compute_dtype="float32")  # bf16 weights, f32 activations
    assert cfg.jnp_compute_dtype == jnp.float32 and M.init_cache(cfg, 1, 4)[0].dtype == jnp.float32
