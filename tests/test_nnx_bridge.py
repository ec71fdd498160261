"""The NNX bridge: the LoRA layer against float64 NumPy, merge_delta, errors before compile, and a
Llama written in NNX that trains exactly as the project's Llama through the engine (2 FedHL rounds,
one compile across rank changes)."""

import json
import os
import math
import re
import subprocess
import textwrap
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import fedhl_jax as F
from fedhl_jax import engine
from fedhl_jax import model as M
from fedhl_jax.local import make_optimizer
from fedhl_jax.lora import Adapter
from fedhl_jax.config import ConfigError, load_config
from fedhl_jax.nnx_bridge import nnx_lora
from fedhl_jax.simulation import Simulation
from tests.conftest import REPO, tiny_overrides

# --------------------------------------------------------------------------- a Llama in NNX
# The math of fedhl_jax/model/llama.py (RMSNorm with float32 statistics, rotate-half RoPE,
# grouped-query attention with a float32 softmax, SwiGLU), written as ordinary NNX modules.


class RMSNorm(nnx.Module):
    def __init__(self, d: int, eps: float):
        self.weight = nnx.Param(jnp.ones((d,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotate-half RoPE on ``x [B, T, heads, hd]`` at ``positions [T]``."""
    hd = x.shape[-1]
    inv = 1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    freqs = positions.astype(jnp.float32)[:, None] * inv  # [T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[None, :, None, :]  # [1, T, 1, hd]
    half = hd // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * jnp.cos(emb) + rotated * jnp.sin(emb)


class Attention(nnx.Module):
    def __init__(self, cfg: M.LlamaConfig, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.hd, self.theta = cfg.num_heads, cfg.num_kv_heads, hd, cfg.rope_theta
        self.q_proj = nnx.Linear(d, cfg.num_heads * hd, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(d, cfg.num_kv_heads * hd, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(d, cfg.num_kv_heads * hd, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(cfg.num_heads * hd, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        pos = jnp.arange(t)
        q = rope(self.q_proj(x).reshape(b, t, self.heads, self.hd), pos, self.theta)
        k = rope(self.k_proj(x).reshape(b, t, self.kv_heads, self.hd), pos, self.theta)
        v = self.v_proj(x).reshape(b, t, self.kv_heads, self.hd)
        q = q.reshape(b, t, self.kv_heads, self.heads // self.kv_heads, self.hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(self.hd)
        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, self.heads * self.hd)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: M.LlamaConfig, rngs: nnx.Rngs):
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nnx.Linear(d, i, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(d, i, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(i, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: M.LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class NnxLlama(nnx.Module):
    """``tokens [B, T]`` → float32 logits ``[B, T, V]``; module paths as the project's Llama
    (``layers.0.self_attn.q_proj``)."""

    def __init__(self, cfg: M.LlamaConfig, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs))

    def __call__(self, tokens):
        x = self.embed_tokens(tokens)
        for block in self.layers:
            x = block(x)
        x = self.norm(x)
        return (self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)).astype(jnp.float32)


def nnx_llama_from_params(cfg: M.LlamaConfig, params: dict) -> NnxLlama:
    """An ``NnxLlama`` of ``cfg``'s shape holding the project Llama's weights (``[out, in]`` → NNX ``[in, out]`` kernels)."""
    model = NnxLlama(cfg, nnx.Rngs(0))
    model.embed_tokens.embedding.set_value(params["embed_tokens"])
    model.norm.weight.set_value(params["norm"])
    if model.lm_head is not None:
        model.lm_head.kernel.set_value(params["lm_head"].T)
    layers = params["layers"]
    for i, block in enumerate(model.layers):
        block.input_layernorm.weight.set_value(layers["input_layernorm"][i])
        block.post_attention_layernorm.weight.set_value(layers["post_attention_layernorm"][i])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(block.self_attn, name).kernel.set_value(layers["self_attn"][name][i].T)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(block.mlp, name).kernel.set_value(layers["mlp"][name][i].T)
    return model


def lm_loss(model, tokens, loss_mask):
    """Mean next-token cross-entropy over target tokens (``model/llama.py``'s ``loss_fn``)."""
    logits = model(tokens[:, :-1])
    weights = loss_mask[:, 1:].astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum((logz - target) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def tiny_nnx_llama(vocab_size: int, seed: int):
    """A ``model.factory``: a 2-layer ``NnxLlama`` and its loss (tests of ``model.kind: nnx``)."""
    return NnxLlama(TINY.replace(vocab_size=vocab_size), nnx.Rngs(seed)), lm_loss


TINY = M.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8)
TARGETS = ("q_proj", "v_proj", "down_proj")
PATTERNS = [r"layers\.\d+\.self_attn\.(q|v)_proj", r".*down_proj"]


@pytest.fixture(scope="module")
def llama():
    params = M.init_params(TINY, jax.random.PRNGKey(0), std=0.2)
    return params, nnx_llama_from_params(TINY, params)


def random_adapter(shapes, r_max, rank, alpha=8.0, seed=1):
    rng = np.random.default_rng(seed)
    B = {k: jnp.asarray(rng.normal(size=(o, r_max)), jnp.float32) for k, (o, i) in shapes.items()}
    A = {k: jnp.asarray(rng.normal(size=(r_max, i)) * 0.3, jnp.float32) for k, (o, i) in shapes.items()}
    return Adapter(B, A, F.rank_mask([rank], r_max)[0], F.lora_scale(rank, alpha))


# --------------------------------------------------------------------------- the LoRA layer


def np_lora(x, W_in_out, A, B, mask, s):
    """float64 reference: ``x W + s ((x Aᵀ) ⊙ mask) Bᵀ``."""
    x, W, A, B, mask = (np.asarray(v, np.float64) for v in (x, W_in_out, A, B, mask))
    return x @ W + float(s) * ((x @ A.T) * mask) @ B.T


def layers_under_test():
    r = nnx.Rngs(3)
    return {
        "linear": (nnx.Linear(6, 5, use_bias=False, rngs=r), lambda m: m.kernel[...]),
        "einsum_io": (nnx.Einsum("...i,io->...o", (6, 5), rngs=r), lambda m: m.kernel[...]),
        "einsum_oi": (nnx.Einsum("bti,oi->bto", (5, 6), rngs=r), lambda m: m.kernel[...].T),
        # own factors frozen in the base: their term stays in the output
        "lora_linear": (nnx.LoRALinear(6, 5, lora_rank=2, use_bias=False, rngs=r,
                                       b_initializer=nnx.initializers.normal(1.0)),
                        lambda m: m.kernel[...] + m.lora.lora_a[...] @ m.lora.lora_b[...]),
        "lora_base": (nnx.LoRA(6, 2, 5, base_module=nnx.Linear(6, 5, use_bias=False, rngs=r), rngs=r,
                               b_initializer=nnx.initializers.normal(1.0)),
                      lambda m: m.base_module.kernel[...] + m.lora_a[...] @ m.lora_b[...]),
    }


class Holder(nnx.Module):
    def __init__(self, layer):
        self.proj = layer


@pytest.mark.parametrize("kind", list(layers_under_test()))
def test_lora_layer_matches_float64_numpy(kind):
    layer, dense = layers_under_test()[kind]
    W = np.asarray(dense(layer), np.float64)  # [d_in, d_out] of the layer as it is
    bridge = nnx_lora(Holder(layer), lambda m, x: m.proj(x), ["proj"], r_max=4)
    assert bridge.shapes == {"proj": (5, 6)}
    ad = random_adapter(bridge.shapes, 4, rank=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6)), jnp.float32)
    got = jax.jit(bridge.loss)(bridge.base, ad, x)
    want = np_lora(x, W, ad.A["proj"], ad.B["proj"], ad.mask, ad.scale)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    delta = {"proj": jnp.asarray(np.random.default_rng(1).normal(size=(5, 6)), jnp.float32)}  # [d_out, d_in]
    merged = bridge.merge_delta(bridge.base, delta)
    off = ad._replace(mask=jnp.zeros_like(ad.mask))
    np.testing.assert_allclose(np.asarray(bridge.loss(merged, off, x)),
                               np.asarray(x, np.float64) @ (W + np.asarray(delta["proj"], np.float64).T),
                               rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(rank=st.integers(1, 4), alpha=st.floats(0.5, 32.0), seed=st.integers(0, 2**16))
def test_lora_term_over_ranks_matches_float64_numpy_with_one_compile(rank, alpha, seed):
    ad = random_adapter(BRIDGE_1.shapes, 4, rank=rank, alpha=alpha, seed=seed)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(3, 6)), jnp.float32)
    got = LOSS_1(BRIDGE_1.base, ad, x)
    W = np.asarray(BRIDGE_1.base["proj"]["inner"]["kernel"], np.float64)
    want = np_lora(x, W, ad.A["proj"], ad.B["proj"], ad.mask, ad.scale) + np.asarray(BRIDGE_1.base["proj"]["inner"]["bias"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert LOSS_1._cache_size() == 1  # ranks and scales are data


BRIDGE_1 = nnx_lora(Holder(nnx.Linear(6, 5, rngs=nnx.Rngs(7))), lambda m, x: m.proj(x), ["proj"], r_max=4)
LOSS_1 = jax.jit(BRIDGE_1.loss)


def test_merge_delta_refuses_a_lora_without_base_and_unknown_modules():
    bridge = nnx_lora(Holder(nnx.LoRA(6, 2, 5, rngs=nnx.Rngs(0))), lambda m, x: m.proj(x), ["proj"], r_max=2)
    with pytest.raises(ValueError, match=r"module 'proj' is an nnx.LoRA without a full-rank base module"):
        bridge.merge_delta(bridge.base, {"proj": jnp.zeros((5, 6))})
    with pytest.raises(KeyError, match=r"unknown module 'other'"):
        bridge.merge_delta(bridge.base, {"other": jnp.zeros((5, 6))})


def test_masked_columns_get_no_gradient_and_model_is_untouched():
    lin = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    before = np.asarray(lin.kernel[...])
    bridge = nnx_lora(Holder(lin), lambda m, x: jnp.sum(m.proj(x) ** 2), ["proj"], r_max=4)
    assert isinstance(lin, nnx.Linear) and isinstance(Holder(lin).proj, nnx.Linear)
    ad = random_adapter(bridge.shapes, 4, rank=2)
    g = jax.grad(bridge.loss, argnums=1)(bridge.base, ad, jnp.ones((3, 6)))
    assert np.all(np.asarray(g.A["proj"])[2:] == 0) and np.all(np.asarray(g.B["proj"])[:, 2:] == 0)
    assert np.any(np.asarray(g.A["proj"])[:2] != 0)
    np.testing.assert_array_equal(np.asarray(lin.kernel[...]), before)


# --------------------------------------------------------------------------- errors, before any compile


def test_unmatched_pattern_is_named(llama):
    with pytest.raises(ValueError, match=re.escape(r"pattern '.*attn\.qq_proj' matches no module")):
        nnx_lora(llama[1], lm_loss, [r".*self_attn\.q_proj", r".*attn\.qq_proj"], r_max=2)


def test_unsupported_layer_is_named(llama):
    with pytest.raises(ValueError, match=r"module 'layers.0.input_layernorm' is a .*RMSNorm"):
        nnx_lora(llama[1], lm_loss, [r".*input_layernorm"], r_max=2)
    conv = Holder(nnx.Conv(3, 4, kernel_size=(3,), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"module 'proj' is a flax.nnx.*Conv"):
        nnx_lora(conv, lambda m, x: m.proj(x), ["proj"], r_max=2)
    batched = Holder(nnx.Einsum("bi,bio->bo", (2, 6, 5), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"module 'proj' is an nnx.Einsum 'bi,bio->bo'.*not a plain projection"):
        nnx_lora(batched, lambda m, x: m.proj(x), ["proj"], r_max=2)


def test_bad_rank_and_nested_matches_are_named(llama):
    with pytest.raises(ValueError, match=r"r_max=17 exceeds min\(d_out, d_in\)=16 of module 'layers.0.self_attn.v_proj'"):
        nnx_lora(llama[1], lm_loss, [r".*v_proj"], r_max=17)
    lora = Holder(nnx.LoRALinear(6, 5, lora_rank=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"match both 'proj' and its submodule 'proj.lora'"):
        nnx_lora(lora, lambda m, x: m.proj(x), ["proj.*"], r_max=2)


def test_errors_come_before_any_compile(llama, monkeypatch):
    def no_compile(*a, **k):
        raise AssertionError("compiled")
    monkeypatch.setattr(jax, "jit", no_compile)
    for patterns in ([r"nothing"], [r".*input_layernorm"]):
        with pytest.raises(ValueError):
            nnx_lora(llama[1], lm_loss, patterns, r_max=2)


# --------------------------------------------------------------------------- the NNX Llama


@pytest.mark.parametrize("tied", [False, True])
def test_nnx_llama_forward_matches_project_llama(llama, tied):
    params, model = llama
    if tied:  # the head is the embedding (stories260K's layout)
        cfg = TINY.replace(tie_word_embeddings=True)
        params = {k: v for k, v in params.items() if k != "lm_head"}
        model = nnx_llama_from_params(cfg, params)
    else:
        cfg = TINY
    bridge = nnx_lora(model, lm_loss, PATTERNS, r_max=4)
    shapes = M.lora_targets(TINY, TARGETS)
    assert bridge.shapes == shapes
    ad = random_adapter(shapes, 4, rank=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 9)), jnp.int32)
    want = M.forward(cfg, params, tokens, adapter=ad)
    got = bridge.bind(bridge.base, ad)(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    delta = M.adapter_delta(ad)
    np.testing.assert_allclose(np.asarray(bridge.bind(bridge.merge_delta(bridge.base, delta))(tokens)),
                               np.asarray(M.forward(cfg, M.merge_delta(params, delta), tokens)),
                               rtol=1e-5, atol=1e-5)


def round_inputs(ranks, r_max, t, n_steps=2, b=2, T=10):
    rng = np.random.default_rng(t)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (len(ranks), n_steps, b, T)), jnp.int32)
    loss_mask = jnp.asarray(rng.random(tokens.shape) < 0.8, jnp.float32)
    return engine.RoundInputs(F.rank_mask(ranks, r_max), F.lora_scale(ranks, 8.0),
                              jnp.asarray([3.0, 5.0, 4.0]), (tokens, loss_mask), engine.round_key(0, t))


def test_two_fedhl_rounds_equal_project_llama_and_compile_once(llama):
    params, model = llama
    r_max = 4
    alg = F.fedhl(r_max)
    opt = make_optimizer("adamw", 1e-2, trainable=alg.trainable)
    bridge = nnx_lora(model, lm_loss, PATTERNS, r_max=r_max)
    ours = engine.compile_round_step(engine.make_round_step(alg, bridge.loss, opt, merge_delta=bridge.merge_delta))
    ref = jax.jit(engine.make_round_step(
        alg, lambda p, a, t, m: M.loss_fn(TINY, p, a, t, m), opt, merge_delta=M.merge_delta,
        to_client=lambda a: M.stacked_adapter(TINY, a), from_client=lambda a: M.per_layer_adapter(TINY, a)))
    state = alg.init(M.lora_targets(TINY, TARGETS), jax.random.PRNGKey(0))
    s_nnx = jax.tree.map(jnp.copy, state)
    s_ref = state
    for t, ranks in enumerate(([1, 2, 4], [4, 3, 1])):  # the ranks change between the rounds
        inputs = round_inputs(np.array(ranks), r_max, t)
        s_ref, info_ref = ref(s_ref, params, inputs)
        s_nnx, info = ours(s_nnx, bridge.base, inputs)
        np.testing.assert_allclose(np.asarray(info["losses"]), np.asarray(info_ref["losses"]), rtol=1e-5, atol=1e-5)
    assert set(s_nnx.G) == set(s_ref.G)
    for name in s_ref.G:
        assert float(jnp.abs(s_ref.G[name]).max()) > 1e-3  # the adapter moved
        np.testing.assert_allclose(np.asarray(s_nnx.G[name]), np.asarray(s_ref.G[name]), rtol=1e-5, atol=1e-5)
    assert ours._cache_size() == 1


# --------------------------------------------------------------------------- model.kind: nnx

NNX_RUN = {"model.kind": "nnx", "model.factory": "tests.test_nnx_bridge:tiny_nnx_llama",
           "model.targets": "[.*self_attn.q_proj,.*self_attn.v_proj]", "data.eval_examples": 0}


def test_simulation_trains_an_nnx_model_from_config(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **NNX_RUN))
    sim = Simulation(cfg, log=lambda *_: None)
    assert sim.evaluator is None and sorted(sim.shapes) == [f"layers.{i}.self_attn.{m}_proj"
                                                            for i in range(2) for m in "qv"]
    state = sim.init_state()
    losses, ranks = [], set()
    for t in range(3):
        out = sim.run_round(state, t)
        state = out.state
        losses.append(out.metrics["train_loss"])
        ranks.add(tuple(out.metrics["ranks"]))
    assert np.all(np.isfinite(losses)) and len(ranks) > 1
    assert sim.round_fn._cache_size() == 1
    assert float(jnp.abs(state.G["layers.0.self_attn.q_proj"]).max()) > 0


@pytest.mark.parametrize("extra, message", [
    ({"model.targets": "[.*nothing]"}, r"pattern '\.\*nothing' matches no module"),
    ({"model.targets": "[.*input_layernorm]"}, r"module 'layers.0.input_layernorm' is a .*RMSNorm"),
    ({"model.factory": "tests.test_nnx_bridge:no_such_factory"}, r"has no function 'no_such_factory'"),
])
def test_nnx_config_errors_name_the_value(tmp_path, extra, message):
    cfg = load_config(None, tiny_overrides(tmp_path, **{**NNX_RUN, **extra}))
    with pytest.raises(ConfigError, match=message):
        Simulation(cfg, log=lambda *_: None)


def test_nnx_kind_needs_a_factory(tmp_path):
    with pytest.raises(ConfigError, match=r"model.kind: nnx needs model.factory as package.module:function"):
        load_config(None, tiny_overrides(tmp_path, **{"model.kind": "nnx"}))
    with pytest.raises(ConfigError, match=r"model.kind must be llama or nnx, got 'flax'"):
        load_config(None, tiny_overrides(tmp_path, **{"model.kind": "flax"}))


def test_nnx_model_on_a_clients_x_model_mesh_matches_one_device(tmp_path):
    """The same NNX run on 8 simulated CPU devices (a 4 x 2 clients x model mesh: the clients split
    over 4 devices, the NNX base sharded over 2) gives the single-device global adapter."""
    script = textwrap.dedent(f"""
        import sys, numpy as np, jax
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from fedhl_jax.config import load_config
        from fedhl_jax.simulation import Simulation
        from tests.conftest import tiny_overrides
        from tests.test_nnx_bridge import NNX_RUN
        ov = {{**NNX_RUN, "fed.num_clients": 8, "fed.participation": 1.0}}
        meshed = Simulation(load_config(None, tiny_overrides(Path({str(tmp_path)!r}), **ov, **{{"mesh.clients": 4,
                            "mesh.model": 2}})), log=lambda *_: None)
        assert jax.device_count() == 8 and dict(meshed.mesh.shape) == {{"clients": 4, "model": 2}}, meshed.mesh
        single = Simulation(load_config(None, tiny_overrides(Path({str(tmp_path)!r}), **ov)), log=lambda *_: None,
                            mesh=None)
        a, b = meshed.init_state(), single.init_state()
        for t in range(2):
            a, b = meshed.run_round(a, t).state, single.run_round(b, t).state
        d = max(float(np.abs(np.asarray(a.G[k]) - np.asarray(b.G[k])).max()) for k in b.G)
        scale = max(float(np.abs(np.asarray(b.G[k])).max()) for k in b.G)
        print("maxdiff", d, "scale", scale)
        assert scale > 1e-4 and d < 1e-5, (d, scale)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "maxdiff" in res.stdout


def test_train_cli_runs_an_nnx_model_from_yaml(tmp_path):
    overrides = tiny_overrides(tmp_path, **{**NNX_RUN, "fed.rounds": 2})
    res = subprocess.run([sys.executable, str(REPO / "bin" / "train.py"), "--out", str(tmp_path / "run"),
                          *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "train_loss" in r] == [0, 1]
    assert (tmp_path / "run" / "final" / "global_adapter.safetensors").exists()
    assert not (tmp_path / "run" / "final" / "peft_adapter").exists()
    out = res.stdout + res.stderr  # the summary names what was written, and no PEFT adapter
    assert "peft_adapter" not in out and "bridge.merge_delta(bridge.base, delta)" in out, out[-2000:]


# --------------------------------------------------------------------------- a second model: examples/nnx_classifier


def test_classifier_example_separates_fedhl_from_flexlora():
    """The NNX MLP classifier under label skew with ranks 1-8: FedHL improves on the base model and
    ends well below FlexLoRA, which stalls (the ordering of docs/bias_experiment.md), on a fixed seed;
    one compile per method."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nnx_classifier", REPO / "examples" / "nnx_classifier" / "train.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # dataclasses look their module up
    spec.loader.exec_module(example)
    res = example.run(example.Setup(rounds=30, methods=("fedhl", "flexlora")))
    base_loss = res["base"][0]
    fedhl, flex = res["fedhl"]["loss"], res["flexlora"]["loss"]
    assert fedhl[-1] < base_loss - 0.15, (fedhl[-1], base_loss)
    assert fedhl[-1] < flex[-1] - 0.15, (fedhl[-1], flex[-1])
    assert flex[-1] > base_loss - 0.05, (flex[-1], base_loss)  # FlexLoRA does not get below the base
    assert res["fedhl"]["accuracy"][-1] > res["flexlora"]["accuracy"][-1] + 0.05
    assert res["fedhl"]["compilations"] == res["flexlora"]["compilations"] == 1


def test_docs_example_runs(tmp_path):
    """docs/nnx.md's example runs as written."""
    (block,) = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "nnx.md").read_text(), re.S)
    script = tmp_path / "example.py"
    script.write_text(block)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(32, 4)" in res.stdout
