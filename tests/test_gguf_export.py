"""Exporting merged models to GGUF and loading them back (no ../shared needed)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedhl_jax.model import (export_gguf, flatten_params, forward, load_pretrained, load_tokenizer,
                             merge_delta, unflatten_params)
from fedhl_jax.model import gguf as G
from tests.gguf_helpers import CFG, write_tiny_gguf

TOKENS = np.array([[5, 17, 200, 3, 99, 271, 42, 8], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf_src") / "tiny.gguf"
    write_tiny_gguf(path)
    cfg, params = G.load_gguf(path)
    # make every weight float16-representable, so an F16 export is lossless
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(np.float16), jnp.float32),
                          params)
    return path, cfg, params


def logits(cfg, params):
    return np.asarray(jax.jit(partial(forward, cfg))(params, TOKENS))


def _pairs(a, b):
    """``((path, a_leaf), b_leaf)`` over the flat per-layer parameters of two models of one config."""
    fa, fb = flatten_params(a), flatten_params(b)
    assert set(fa) == set(fb)
    return [((k, fa[k]), fb[k]) for k in fa]


def test_f16_roundtrip_is_exact_and_keeps_tokenizer(source, tmp_path):
    path, cfg, params = source
    out = export_gguf(tmp_path / "out" / "model.gguf", cfg, params, dtype="f16", gguf_source=path)
    types = G.tensor_types(out)
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    cfg2, params2 = load_pretrained(out)
    assert cfg2 == cfg
    for (k, a), b in _pairs(params, params2):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=k)
    np.testing.assert_array_equal(logits(cfg2, params2), logits(cfg, params))
    src, new = G.read_metadata(G.open_gguf(path)), G.read_metadata(G.open_gguf(out))
    for key in src:
        if key.startswith("tokenizer.") or key == "general.name":
            assert new[key] == src[key], key
    assert new["general.file_type"] == 1 and new["llama.block_count"] == cfg.num_layers
    text = "<|im_start|>hello the world 12<|im_end|>"
    assert load_tokenizer(out)(text)["input_ids"] == load_tokenizer(path)(text)["input_ids"]


def test_q8_0_roundtrip_within_quantisation_error(source, tmp_path):
    path, cfg, params = source
    out = export_gguf(tmp_path / "q8.gguf", cfg, params, dtype="q8_0", gguf_source=path)
    types = G.tensor_types(out)
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
    cfg2, params2 = load_pretrained(out)
    assert cfg2 == cfg
    for (k, a), b in _pairs(params, params2):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim == 1:
            np.testing.assert_array_equal(b, a, err_msg=k)
        else:  # per block of 32: |error| <= d/2, plus 127 times the f16 rounding of d
            amax = np.abs(a).reshape(-1, 32).max(1)
            err = np.abs(b - a).reshape(-1, 32).max(1)
            assert np.all(err <= amax * (0.51 / 127 + 2.0**-11)), k
    ref, got = logits(cfg, params), logits(cfg2, params2)
    diff = np.abs(got - ref).max()  # a random 2-layer model amplifies the 0.4 % weight error
    assert 0 < diff < 0.05 * np.abs(ref).max(), diff


def test_delta_is_merged_and_qk_permuted(source, tmp_path):
    path, cfg, params = source
    rng = np.random.default_rng(3)
    delta = {"layers.0.self_attn.q_proj": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32),
             "layers.1.self_attn.k_proj": jnp.asarray(rng.standard_normal((32, 64)), jnp.float32),
             "layers.1.mlp.down_proj": jnp.asarray(rng.standard_normal((64, 96)), jnp.float32)}
    out = export_gguf(tmp_path / "d.gguf", cfg, params, delta, dtype="f32", gguf_source=path)
    _, params2 = load_pretrained(out)
    merged = merge_delta(params, delta)
    for (k, a), b in _pairs(merged, params2):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=k)
    # the file itself holds llama.cpp's row order
    _, raw = G.read_tensors(out)
    q = np.asarray(flatten_params(merged)["layers.0.self_attn.q_proj"])
    np.testing.assert_array_equal(raw["blk.0.attn_q.weight"], G.permute_qk(q, cfg.num_heads))


def test_tied_without_source_and_bf16(tmp_path):
    cfg = CFG.replace(tie_word_embeddings=True)
    write_tiny_gguf(tmp_path / "tied.gguf", cfg=cfg)
    cfg, params = G.load_gguf(tmp_path / "tied.gguf")
    out = export_gguf(tmp_path / "bare.gguf", cfg, params, dtype="bf16")
    assert "output.weight" not in G.tensor_types(out)
    assert G.tensor_types(out)["token_embd.weight"] == "BF16"
    meta = G.read_metadata(G.open_gguf(out))
    assert "tokenizer.ggml.tokens" not in meta and meta["tokenizer.ggml.eos_token_id"] == 2
    cfg2, params2 = G.load_gguf(out)
    assert cfg2 == cfg
    as_bf16 = {k: x.astype(jnp.bfloat16).astype(jnp.float32) if x.ndim == 2 else x  # matrices rounded,
               for k, x in flatten_params(params).items()}                          # norm gains kept
    got = flatten_params(params2)
    assert set(got) == set(as_bf16)
    for k, a in as_bf16.items():
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(a), err_msg=k)


def test_export_errors(source, tmp_path):
    path, cfg, params = source
    with pytest.raises(ValueError, match="unsupported GGUF export dtype"):
        export_gguf(tmp_path / "x.gguf", cfg, params, dtype="q4_0")
    with pytest.raises(ValueError, match="do not match the config"):
        export_gguf(tmp_path / "x.gguf", cfg.replace(num_layers=1), params)
    big = cfg.replace(vocab_size=300)
    flat = flatten_params(params)
    flat["embed_tokens"] = jnp.zeros((300, 64))
    flat["lm_head"] = jnp.zeros((300, 64))
    with pytest.raises(ValueError, match="272 tokens"):
        export_gguf(tmp_path / "x.gguf", big, unflatten_params(big, flat), gguf_source=path)
    flat = flatten_params(params)
    flat["norm"] = flat["norm"] * 0 + 1e6
    huge = unflatten_params(cfg, flat)
    export_gguf(tmp_path / "ok.gguf", cfg, huge, dtype="f16")  # 1-D tensors stay F32
    flat["lm_head"] = flat["lm_head"] * 1e6
    with pytest.raises(ValueError, match="float16's range"):
        export_gguf(tmp_path / "x.gguf", cfg, unflatten_params(cfg, flat), dtype="f16")
