"""Llama forward pass, LoRA application, losses and config parsing."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedhl_jax.lora import Adapter
from fedhl_jax.model import (LORA_MODULES, LlamaConfig, adapter_delta, flatten_params, forward,
                             init_adapter, init_params, lora_targets, loss_fn, merge_delta,
                             param_shapes, token_losses, unflatten_params)

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6)
TARGETS = ("q_proj", "v_proj", "down_proj")
R_MAX = 4


@pytest.fixture(scope="module")
def params():
    return jax.jit(partial(init_params, CFG, std=0.2))(jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)


def random_adapter(key, rank=R_MAX, targets=TARGETS, std=0.3):
    """An adapter with non-zero B (``init_adapter`` starts from B = 0)."""
    ad = init_adapter(CFG, targets, R_MAX, key, rank=rank, alpha=8.0)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(ad.B))
    b = {n: std * jax.random.normal(k, x.shape) for k, (n, x) in zip(keys, ad.B.items())}
    return ad._replace(B=b)


fwd = jax.jit(partial(forward, CFG))


def test_param_layout(params):
    shapes = param_shapes(CFG)
    flat = flatten_params(params)
    assert {k: v.shape for k, v in flat.items()} == shapes
    assert shapes["layers.1.self_attn.k_proj"] == (16, 32)  # [K*hd, D]
    assert shapes["layers.0.mlp.down_proj"] == (32, 48)  # [D, I]
    # blocks stacked along a leading layer axis (the flat form above has one entry per layer)
    assert params["layers"]["self_attn"]["k_proj"].shape == (2, 16, 32)
    assert params["layers"]["input_layernorm"].shape == (2, 32)
    np.testing.assert_array_equal(np.asarray(flat["layers.1.mlp.up_proj"]),
                                  np.asarray(params["layers"]["mlp"]["up_proj"][1]))
    rebuilt = unflatten_params(CFG, flat)
    assert jax.tree.structure(rebuilt) == jax.tree.structure(params)
    tied = CFG.replace(tie_word_embeddings=True)
    assert "lm_head" not in param_shapes(tied)


def test_forward_shape_dtype_and_jit(params, tokens):
    eager = forward(CFG, params, tokens)
    assert eager.shape == (2, 9, CFG.vocab_size) and eager.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(fwd(params, tokens)), np.asarray(eager), atol=1e-5)


def test_causal(params, tokens):
    changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % CFG.vocab_size)
    a, b = fwd(params, tokens), fwd(params, changed)
    np.testing.assert_allclose(np.asarray(a[:, :5]), np.asarray(b[:, :5]), atol=1e-6)
    assert not np.allclose(np.asarray(a[:, 5:]), np.asarray(b[:, 5:]))


def test_left_padding_matches_unpadded(params, tokens):
    row = tokens[0, :6]
    padded = jnp.concatenate([jnp.zeros(3, row.dtype), row])[None]
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    out = fwd(params, padded, attention_mask=mask)
    ref = fwd(params, row[None])
    np.testing.assert_allclose(np.asarray(out[0, 3:]), np.asarray(ref[0]), atol=1e-5)


def test_lora_targets():
    t = lora_targets(CFG)
    assert list(t) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                       "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    assert t["layers.0.self_attn.v_proj"] == (16, 32)
    every = lora_targets(CFG, "all-linear")
    assert len(every) == 2 * len(LORA_MODULES)
    assert every["layers.1.mlp.gate_proj"] == (48, 32)
    assert lora_targets(CFG, ["all-linear"]) == every  # as a YAML list writes it
    assert lora_targets(CFG, ["v_proj", "q_proj", "v_proj"]) == t  # canonical order, de-duplicated
    with pytest.raises(ValueError, match="'qkv_proj'"):
        lora_targets(CFG, ("q_proj", "qkv_proj"))


def test_init_adapter():
    ad = init_adapter(CFG, TARGETS, R_MAX, jax.random.key(2), rank=3, alpha=6.0)
    assert set(ad.A) == set(lora_targets(CFG, TARGETS))
    name = "layers.0.mlp.down_proj"
    assert ad.A[name].shape == (R_MAX, 48) and ad.B[name].shape == (32, R_MAX)
    assert float(jnp.abs(ad.A[name]).max()) <= 1 / np.sqrt(48)
    assert all(float(jnp.abs(b).max()) == 0 for b in ad.B.values())
    np.testing.assert_array_equal(np.asarray(ad.mask), [1, 1, 1, 0])
    assert float(ad.scale) == pytest.approx(2.0)
    # traced ranks: a stacked adapter for several clients
    many = jax.vmap(lambda k, r: init_adapter(CFG, TARGETS, R_MAX, k, rank=r))(
        jax.random.split(jax.random.key(3), 3), jnp.array([1, 2, 4]))
    np.testing.assert_array_equal(np.asarray(many.mask.sum(-1)), [1, 2, 4])
    assert many.A[name].shape == (3, R_MAX, 48)


def test_zero_b_gives_base_logits(params, tokens):
    ad = init_adapter(CFG, "all-linear", R_MAX, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(fwd(params, tokens, adapter=ad)),
                                  np.asarray(fwd(params, tokens)))


def test_adapter_equals_merged_delta(params, tokens):
    ad = random_adapter(jax.random.key(5), rank=3)
    delta = adapter_delta(ad)
    assert delta["layers.0.self_attn.v_proj"].shape == (16, 32)
    with_adapter = fwd(params, tokens, adapter=ad)
    merged = fwd(merge_delta(params, delta), tokens)
    np.testing.assert_allclose(np.asarray(with_adapter), np.asarray(merged), atol=1e-4)
    assert not np.allclose(np.asarray(with_adapter), np.asarray(fwd(params, tokens)), atol=1e-3)
    # merge_delta leaves its input untouched and rejects unknown modules / shapes
    assert float(jnp.abs(params["layers"]["self_attn"]["v_proj"]
                         - merge_delta(params, {})["layers"]["self_attn"]["v_proj"]).max()) == 0
    with pytest.raises(KeyError, match="layers.7.self_attn.q_proj"):
        merge_delta(params, {"layers.7.self_attn.q_proj": jnp.zeros((32, 32))})
    with pytest.raises(ValueError, match=r"\(32, 16\)"):
        merge_delta(params, {"layers.0.self_attn.v_proj": jnp.zeros((32, 16))})


def test_masked_columns_contribute_nothing_and_get_zero_grad(params, tokens):
    ad = random_adapter(jax.random.key(6), rank=2)
    # scrambling the masked columns (>= rank) changes nothing
    scrambled = ad._replace(
        A={n: a.at[2:].set(7.0) for n, a in ad.A.items()},
        B={n: b.at[:, 2:].set(-5.0) for n, b in ad.B.items()})
    np.testing.assert_array_equal(np.asarray(fwd(params, tokens, adapter=ad)),
                                  np.asarray(fwd(params, tokens, adapter=scrambled)))
    mask = jnp.ones(tokens.shape)
    grads = jax.jit(jax.grad(lambda a: loss_fn(CFG, params, a, tokens, mask)))(scrambled)
    for name in ad.A:
        assert float(jnp.abs(grads.A[name][2:]).max()) == 0.0
        assert float(jnp.abs(grads.B[name][:, 2:]).max()) == 0.0
        assert float(jnp.abs(grads.A[name][:2]).max()) > 0
        assert float(jnp.abs(grads.B[name][:, :2]).max()) > 0


def test_vmap_over_clients_matches_per_client_calls(params, tokens):
    clients = [random_adapter(jax.random.key(10 + i), rank=r) for i, r in enumerate((1, 2, 4))]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *clients)
    per_client = jax.jit(jax.vmap(lambda p, a, t: forward(CFG, p, t, adapter=a),
                                  in_axes=(None, 0, None)))(params, stacked, tokens)
    assert per_client.shape == (3, 2, 9, CFG.vocab_size)
    for i, ad in enumerate(clients):
        np.testing.assert_allclose(np.asarray(per_client[i]),
                                   np.asarray(fwd(params, tokens, adapter=ad)), atol=1e-5)


def test_bfloat16_compute_is_close(params, tokens):
    cfg16 = CFG.replace(dtype="bfloat16")
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ad = random_adapter(jax.random.key(7))
    out = jax.jit(partial(forward, cfg16))(p16, tokens, adapter=ad)
    ref = fwd(params, tokens, adapter=ad)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    err = float(jnp.abs(out - ref).max()) / float(jnp.abs(ref).max())
    assert err < 0.05, err
    g = jax.jit(jax.grad(lambda a: loss_fn(cfg16, p16, a, tokens, jnp.ones(tokens.shape))))(ad)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


def test_token_losses_match_manual_cross_entropy(params, tokens):
    loss_mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1]])
    total, n = jax.jit(partial(token_losses, CFG))(params, None, tokens, loss_mask)
    logits = np.asarray(fwd(params, tokens), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    t, m = np.asarray(tokens), np.asarray(loss_mask)
    manual = -sum(logp[b, i, t[b, i + 1]] for b in range(2) for i in range(8) if m[b, i + 1])
    assert float(n) == m[:, 1:].sum() == 12
    assert float(total) == pytest.approx(manual, rel=1e-5)
    mean = jax.jit(partial(loss_fn, CFG))(params, None, tokens, loss_mask)
    assert float(mean) == pytest.approx(manual / 12, rel=1e-5)


def test_loss_with_no_target_tokens_is_zero_not_nan(params, tokens):
    ad = random_adapter(jax.random.key(8))
    zero = jnp.zeros(tokens.shape)
    value, grads = jax.jit(jax.value_and_grad(lambda a: loss_fn(CFG, params, a, tokens, zero)))(ad)
    assert float(value) == 0.0
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(grads))


def test_loss_is_stable_for_huge_logits(params, tokens):
    big = jax.tree.map(lambda x: x, params)
    big["lm_head"] = params["lm_head"] * 1e4
    value = jax.jit(partial(loss_fn, CFG))(big, None, tokens, jnp.ones(tokens.shape))
    assert bool(jnp.isfinite(value)) and float(value) > 0


# ------------------------------------------------------------------------- config
HF_BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
           "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "eos_token_id": [2, 7]}


def test_config_from_hf_dict_and_object():
    from transformers import LlamaConfig as HFConfig

    v4 = LlamaConfig.from_hf({**HF_BASE, "rope_theta": 500000.0})
    assert (v4.head_dim, v4.num_kv_heads, v4.rope_theta, v4.eos_token_id) == (8, 2, 500000.0, 2)
    v5 = LlamaConfig.from_hf({**HF_BASE, "rope_parameters": {"rope_type": "default",
                                                             "rope_theta": 1e6}})
    assert v5.rope_theta == 1e6
    linear = LlamaConfig.from_hf({**HF_BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling_factor == 2.0
    hf = HFConfig(vocab_size=100, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    ours = LlamaConfig.from_hf(hf, dtype="bfloat16")
    assert (ours.num_kv_heads, ours.tie_word_embeddings, ours.dtype) == (4, True, "bfloat16")
    assert hash(ours) == hash(LlamaConfig.from_hf(ours.to_hf_dict(), dtype="bfloat16"))
    assert LlamaConfig.from_hf(ours.to_hf_dict(), dtype="bfloat16") == ours
    seven = LlamaConfig.llama2_7b()
    assert (seven.hidden_size, seven.num_layers, seven.vocab_size) == (4096, 32, 32000)


@pytest.mark.parametrize("change, offending", [
    ({"hidden_act": "gelu"}, "'gelu'"),
    ({"architectures": ["MistralForCausalLM"]}, "'MistralForCausalLM'"),
    ({"model_type": "gpt2"}, "'gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, "'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_config_rejects_unsupported(change, offending):
    with pytest.raises(ValueError, match=offending):
        LlamaConfig.from_hf({**HF_BASE, **change})


def test_config_validation():
    with pytest.raises(ValueError, match="float16"):
        CFG.replace(dtype="float16")
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        CFG.replace(num_kv_heads=3)


def test_adapter_type_is_the_shared_one():
    ad = init_adapter(CFG, "q_proj", 2, jax.random.key(0))
    assert isinstance(ad, Adapter)


# ------------------------------------------------------------------------- model families
def test_unsupported_family_and_gguf_arch_are_named():
    from fedhl_jax.model.architecture import LlamaConfig as LC
    from fedhl_jax.model.families import family_for_gguf_arch, family_for_model_type, get_family
    from fedhl_jax.model.gguf import config_from_gguf

    with pytest.raises(ValueError, match=r"^unsupported model_type 'gemma3': supported are \['llama', 'qwen2', 'qwen3'\]$"):
        family_for_model_type("gemma3")
    with pytest.raises(ValueError, match=r"^unsupported model_type 'gemma3': supported are \['llama', 'qwen2', 'qwen3'\]$"):
        LC.from_hf({**HF_BASE, "model_type": "gemma3"})
    with pytest.raises(ValueError, match=r"^unsupported GGUF architecture 'gemma3': supported are \['llama', 'qwen2', 'qwen3'\]$"):
        family_for_gguf_arch("gemma3")
    with pytest.raises(ValueError, match=r"^unsupported GGUF architecture 'phi3': supported are \['llama', 'qwen2', 'qwen3'\]$"):
        config_from_gguf({"general.architecture": "phi3"})
    with pytest.raises(ValueError, match=r"^unsupported model family 'gpt2': supported are \['llama', 'qwen2', 'qwen3'\]$"):
        get_family("gpt2")
    with pytest.raises(ValueError, match="unsupported model family 'gpt2'"):
        CFG.replace(family="gpt2")


def test_llama_family_holds_todays_layout():
    from fedhl_jax.model.families import LLAMA, families, family_for_gguf_arch, family_for_model_type

    assert families()[0] is LLAMA and family_for_model_type("llama") is family_for_gguf_arch("llama") is LLAMA
    assert (LLAMA.qkv_bias, LLAMA.qk_norm, LLAMA.tied_embeddings, LLAMA.rope_types, LLAMA.gguf_permute_qk) == \
        (False, False, "config", ("default", "linear", "llama3"), True)
    assert CFG.family == "llama" and CFG.model_family is LLAMA
    for path in param_shapes(CFG):  # every parameter has one name in each format, and back
        assert LLAMA.hf_names.to_path(LLAMA.hf_names.to_name(path)) == path
        assert LLAMA.gguf_names.to_path(LLAMA.gguf_names.to_name(path)) == path
    assert LLAMA.hf_names.to_name("layers.1.mlp.gate_proj") == "model.layers.1.mlp.gate_proj.weight"
    assert LLAMA.gguf_names.to_name("layers.1.self_attn.o_proj") == "blk.1.attn_output.weight"
    assert LLAMA.hf_names.to_path("model.layers.0.self_attn.q_proj.bias") is None
    assert LLAMA.hf_names.is_ignored("model.layers.3.self_attn.rotary_emb.inv_freq")


def test_name_maps_refuse_mismatched_placeholders():
    from fedhl_jax.model.families import NameMap

    with pytest.raises(ValueError, match="different placeholders"):
        NameMap(pairs=(("layers.{L}.norm", "blk.norm"),))
    m = NameMap(pairs=(("layers.{L}.{a|b}_proj", "h.{L}.{a|b}.w"),))
    assert (m.to_name("layers.12.b_proj"), m.to_path("h.3.a.w"), m.to_path("h.3.c.w")) == ("h.12.b.w", "layers.3.a_proj",
                                                                                          None)


def test_assets_is_data_only():
    """No import circle model <-> assets: the assets package imports nothing of fedhl_jax (not even
    inside a function), and model.hub resolves model names."""
    import ast
    import inspect

    import fedhl_jax.assets as assets
    from fedhl_jax.model.hub import resolve_model_source

    tree = ast.parse(inspect.getsource(assets))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + \
        [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("fedhl_jax")], imported
    assert resolve_model_source("auto").path == str(assets.embedded_model_dir())


def test_a_family_clashing_with_a_registered_one_is_refused():
    import dataclasses

    from fedhl_jax.model.families import LLAMA, register_family

    for change in ({}, {"name": "other"}, {"name": "other", "model_types": ("x",)}):
        with pytest.raises(ValueError, match="clashes with the registered family 'llama'"):
            register_family(dataclasses.replace(LLAMA, **change))
