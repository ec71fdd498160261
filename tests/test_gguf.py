"""GGUF loading: dequantisation, q/k row order, config, names and errors (no ../shared needed)."""

from __future__ import annotations

from functools import partial

import gguf
import jax
import numpy as np
import pytest

from fedhl_jax.model import forward, load_pretrained
from fedhl_jax.model import gguf as G
from tests.gguf_helpers import CFG, T, TYPES, hf_to_gguf_rows, write_tiny_gguf

QUANT_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    reference = write_tiny_gguf(path)
    return path, reference


def random_blocks(qtype, n_blocks: int, rng) -> np.ndarray:
    """Random bytes of ``n_blocks`` blocks, with finite f16 scales/minimums."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
    n_half = 2 if qtype == T.Q4_1 else 1
    halves = (rng.standard_normal((n_blocks, n_half)) * 0.05).astype(np.float16)
    raw[:, : 2 * n_half] = halves.view(np.uint8)
    return raw


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_dequantisers_match_gguf_package(qtype):
    raw = random_blocks(qtype, 257, np.random.default_rng(int(qtype)))
    ours = G.dequantize(raw, qtype, (257 * 32,))
    theirs = gguf.quants.dequantize(raw, qtype).reshape(-1)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", (*QUANT_TYPES, T.F16, T.BF16, T.F32), ids=lambda t: t.name)
def test_dequantisers_match_float64_reference(qtype):
    from tests.gguf_helpers import encode, ref_decode

    x = np.random.default_rng(1).standard_normal((6, 64)).astype(np.float32)
    data = encode(x, qtype)
    ours = G.dequantize(data, qtype, x.shape)
    ref = ref_decode(data, qtype, x.shape)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    # float32 arithmetic as in ggml: exact but for the final rounding of d*q + m
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2 * np.finfo(np.float32).eps * 4)
    if qtype in QUANT_TYPES:  # and the codes are within the format's error of the input
        # half a step (d/2), or a whole step where Q4_0 clips the far end of its range
        bound = {T.Q8_0: 0.6 / 127, T.Q4_0: 1.01 / 8, T.Q4_1: 0.6 * 2 / 15}[qtype]
        amax = np.abs(x).reshape(-1, 32).max(1)
        err = np.abs(ours - x).reshape(-1, 32).max(1)
        assert np.all(err <= bound * amax), (err / amax).max()


def test_unsupported_type_names_type_and_tensor(tmp_path):
    path = tmp_path / "q5.gguf"
    write_tiny_gguf(path, types={"blk.1.ffn_up.weight": T.Q5_0})
    with pytest.raises(G.GGUFError, match=r"'blk\.1\.ffn_up\.weight'.*Q5_0"):
        G.load_gguf(path)


def test_permutation_roundtrip_and_rope_equivalence():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4 * 16, 8))
    p = G.permute_qk(w, 4)
    np.testing.assert_array_equal(p, w[hf_to_gguf_rows(64, 4)])
    np.testing.assert_array_equal(G.unpermute_qk(p, 4), w)
    # Interleaved RoPE (llama.cpp) on the permuted rows == rotate-half RoPE (HF) on the originals.
    hd, pos, x = 16, 5, rng.standard_normal(8)
    theta = pos / 10000.0 ** (np.arange(0, hd, 2) / hd)  # [hd/2]
    cos, sin = np.cos(theta), np.sin(theta)
    q_hf = (w @ x).reshape(4, hd)
    half = hd // 2
    rot_hf = np.concatenate([q_hf[:, :half] * cos - q_hf[:, half:] * sin,
                             q_hf[:, half:] * cos + q_hf[:, :half] * sin], axis=1)
    q_cpp = (p @ x).reshape(4, hd // 2, 2)
    rot_cpp = np.stack([q_cpp[..., 0] * cos - q_cpp[..., 1] * sin,
                        q_cpp[..., 0] * sin + q_cpp[..., 1] * cos], axis=-1).reshape(4, hd)
    np.testing.assert_allclose(G.unpermute_qk(rot_cpp.reshape(-1, 1), 4).reshape(4, hd), rot_hf,
                               atol=1e-12)


def test_names_roundtrip():
    assert G.gguf_key_to_path("blk.3.attn_q.weight") == "layers.3.self_attn.q_proj"
    assert G.gguf_key_to_path("blk.0.attn_output.weight") == "layers.0.self_attn.o_proj"
    assert G.gguf_key_to_path("blk.1.ffn_norm.weight") == "layers.1.post_attention_layernorm"
    assert G.gguf_key_to_path("rope_freqs.weight") is None
    from fedhl_jax.model import param_shapes

    for path in param_shapes(CFG):
        assert G.gguf_key_to_path(G.path_to_gguf_key(path)) == path


def test_config_from_metadata(tiny):
    path, _ = tiny
    assert G.gguf_config(path) == CFG
    assert G.tensor_types(path)["blk.1.attn_q.weight"] == "Q4_1"


def test_load_matches_float64_reference(tiny):
    path, reference = tiny
    cfg, params = G.load_gguf(path)
    assert cfg == CFG
    from fedhl_jax.model import flatten_params

    flat = flatten_params(params)
    assert len(flat) == len(reference)
    for name, ref in reference.items():
        got = np.asarray(flat[G.gguf_key_to_path(name)])
        assert got.dtype == np.float32 and got.shape == ref.shape, name
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6, err_msg=name)
    assert {TYPES[n].name for n in TYPES} >= {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "F32"}


def test_load_pretrained_dispatch_and_bfloat16(tiny, tmp_path):
    path, _ = tiny
    cfg, params = G.load_gguf(path)
    cfg_dir, p_dir = load_pretrained(path.parent)  # a folder holding one .gguf
    tokens = np.array([[5, 17, 200, 3, 99, 271]])
    fwd = jax.jit(partial(forward, cfg))
    np.testing.assert_array_equal(np.asarray(fwd(p_dir, tokens)), np.asarray(fwd(params, tokens)))
    cfg16, p16 = load_pretrained(path, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16" and p16["embed_tokens"].dtype == jax.numpy.bfloat16
    out16 = np.asarray(jax.jit(partial(forward, cfg16))(p16, tokens))
    assert np.abs(out16 - np.asarray(fwd(params, tokens))).max() < 0.1 * np.abs(out16).max()


def test_tied_embeddings_without_output(tmp_path):
    cfg = CFG.replace(tie_word_embeddings=True)
    path = tmp_path / "tied.gguf"
    reference = write_tiny_gguf(path, cfg=cfg)
    cfg2, params = G.load_gguf(path)
    assert cfg2.tie_word_embeddings and "lm_head" not in params
    np.testing.assert_allclose(np.asarray(params["embed_tokens"]), reference["token_embd.weight"],
                               atol=1e-6)


def test_errors(tmp_path):
    path = tmp_path / "extra.gguf"
    write_tiny_gguf(path, extra={"blk.0.attn_q.bias": (np.ones(8, np.float32), T.F32)})
    with pytest.raises(G.GGUFError, match="unexpected tensor 'blk.0.attn_q.bias'"):
        G.load_gguf(path)
    with pytest.raises(FileNotFoundError):
        G.load_gguf(tmp_path / "missing")
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        write_tiny_gguf(tmp_path / "two" / name)
    with pytest.raises(ValueError, match="several GGUF files"):
        load_pretrained(tmp_path / "two")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(G.GGUFError, match="cannot read GGUF"):
        G.load_gguf(bad)
    assert G.find_gguf(tmp_path / "extra.gguf") is not None
    (tmp_path / "not.gguf").write_bytes(b"nope")
    assert G.find_gguf(tmp_path / "not.gguf") is None
