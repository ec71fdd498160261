"""Merged HF export, PEFT export/import, and parity with adapters saved by peft."""

import json
import shutil
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedhl_jax.model import (adapter_delta, export_merged, export_peft, forward, init_adapter,
                             load_peft, load_pretrained, load_tokenizer, lora_factors_from_dense,
                             lora_targets, merge_delta, truncate_dense)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny_llama"
PEFT = REPO / "tests" / "fixtures" / "tiny_peft"
GOLDEN = REPO / "tests" / "golden"
STORIES = REPO.parent / "shared" / "models" / "stories260K-hf"


@pytest.fixture(scope="module")
def tiny():
    cfg, params = load_pretrained(TINY)
    return cfg, params, jax.jit(partial(forward, cfg))


@pytest.fixture(scope="module")
def tokens():
    return np.load(GOLDEN / "tiny_peft_logits.npz")["tokens"]


def shapes_of(file: Path) -> dict:
    with safe_open(str(file), framework="np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def random_dense(cfg, targets, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {n: 0.1 * rng.standard_normal(s) for n, s in lora_targets(cfg, targets).items()}


# ------------------------------------------------------------------------- PEFT
def test_load_peft_reproduces_peft_logits(tiny, tokens):
    cfg, params, fwd = tiny
    ad, config = load_peft(PEFT, cfg=cfg)
    assert config["r"] == 4 and float(ad.scale) == pytest.approx(8 / 4)
    assert ad.A["layers.0.mlp.down_proj"].shape == (4, 48)
    assert ad.B["layers.1.self_attn.v_proj"].shape == (16, 4)
    golden = np.load(GOLDEN / "tiny_peft_logits.npz")["logits"]
    diff = np.abs(np.asarray(fwd(params, tokens, adapter=ad)) - golden).max()
    assert diff < 1e-4, diff
    padded, _ = load_peft(PEFT, r_max=8)
    assert padded.A["layers.0.mlp.down_proj"].shape == (8, 48) and float(padded.mask.sum()) == 4
    np.testing.assert_allclose(np.asarray(fwd(params, tokens, adapter=padded)), golden, atol=1e-4)


def test_export_peft_matches_peft_layout(tmp_path, tiny, tokens):
    cfg, params, fwd = tiny
    ad, ref = load_peft(PEFT)
    out = export_peft(tmp_path / "ours", adapter_delta(ad), rank=4, alpha=8,
                      base_model_name_or_path=ref["base_model_name_or_path"])
    assert shapes_of(out / "adapter_model.safetensors") == shapes_of(PEFT / "adapter_model.safetensors")
    ours = json.loads((out / "adapter_config.json").read_text())
    assert set(ours) <= set(ref), set(ours) - set(ref)
    for field in ("r", "lora_alpha", "peft_type", "task_type", "base_model_name_or_path",
                  "use_rslora", "use_dora", "bias", "fan_in_fan_out", "lora_dropout",
                  "modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        assert ours[field] == ref[field], field
    assert sorted(ours["target_modules"]) == sorted(ref["target_modules"])
    # the dense update has rank 4, so the rank-4 export is exact
    reloaded, _ = load_peft(out, cfg=cfg)
    golden = np.load(GOLDEN / "tiny_peft_logits.npz")["logits"]
    diff = np.abs(np.asarray(fwd(params, tokens, adapter=reloaded)) - golden).max()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("rslora", [False, True])
def test_export_peft_round_trip_equals_truncated_dense(tmp_path, tiny, tokens, rslora):
    cfg, params, fwd = tiny
    G = random_dense(cfg, ("q_proj", "v_proj", "down_proj"))
    export_peft(tmp_path, G, rank=3, alpha=16.0, base_model_name_or_path="base", rslora=rslora)
    ad, config = load_peft(tmp_path, cfg=cfg)
    assert config["use_rslora"] is rslora
    assert float(ad.scale) == pytest.approx(16 / np.sqrt(3) if rslora else 16 / 3)
    truncated = truncate_dense(G, 3)
    for name, d in adapter_delta(ad).items():
        np.testing.assert_allclose(np.asarray(d), truncated[name], atol=1e-5)
    merged = merge_delta(params, {n: jnp.asarray(g, jnp.float32) for n, g in truncated.items()})
    np.testing.assert_allclose(np.asarray(fwd(params, tokens, adapter=ad)),
                               np.asarray(fwd(merged, tokens)), atol=1e-4)


def test_lora_factors_are_balanced_truncated_svd():
    g = np.random.default_rng(1).standard_normal((12, 7))
    b, a = lora_factors_from_dense(g, 3, scale=2.0)
    assert b.shape == (12, 3) and a.shape == (3, 7)
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    np.testing.assert_allclose(2.0 * b @ a, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1), rtol=1e-12)
    with pytest.raises(ValueError, match="rank 8"):
        lora_factors_from_dense(g, 8, 1.0)


def test_peft_errors(tmp_path, tiny):
    cfg, _, _ = tiny
    bad = tmp_path / "bad"
    shutil.copytree(PEFT, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"q_proj": 2}}))
    with pytest.raises(ValueError, match="rank_pattern"):
        load_peft(bad)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="'base_model.model.lm_head.lora_A.weight'"):
        load_peft(bad)
    with pytest.raises(ValueError, match=r"shape mismatch.*down_proj\.lora_A.*\(4, 48\)"):
        load_peft(PEFT, cfg=cfg.replace(intermediate_size=40))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft(tmp_path)
    with pytest.raises(ValueError, match="'layers.0.self_attn.qkv'"):
        export_peft(tmp_path / "x", {"layers.0.self_attn.qkv": np.ones((4, 4))}, 1, 1.0, None)


# ------------------------------------------------------------------------- merged
def test_export_merged_round_trip(tmp_path, tiny, tokens):
    cfg, params, fwd = tiny
    ad = init_adapter(cfg, "all-linear", 4, jax.random.key(0))
    ad = ad._replace(B={n: 0.3 * jax.random.normal(jax.random.key(i), b.shape)
                        for i, (n, b) in enumerate(ad.B.items())})
    delta = adapter_delta(ad)
    expected = np.asarray(fwd(merge_delta(params, delta), tokens))
    out = export_merged(tmp_path / "merged", cfg, params, delta, TINY)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors",
                                               "generation_config.json"}
    source = json.loads((TINY / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in written.items() if k != "dtype"} == {k: v for k, v in source.items()
                                                                  if k != "dtype"}
    assert shapes_of(out / "model.safetensors") == shapes_of(TINY / "model.safetensors")
    cfg2, merged = load_pretrained(out)
    assert cfg2 == cfg
    np.testing.assert_allclose(np.asarray(fwd(merged, tokens)), expected, atol=1e-5)

    sharded = export_merged(tmp_path / "sharded", cfg, params, delta, max_shard_bytes=30_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    _, from_shards = load_pretrained(sharded)
    np.testing.assert_allclose(np.asarray(fwd(from_shards, tokens)), expected, atol=1e-5)

    half = export_merged(tmp_path / "bf16", cfg, params, None, TINY, dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["dtype"] == "bfloat16"
    cfg16, p16 = load_pretrained(half, dtype="bfloat16")
    assert p16["lm_head"].dtype == jnp.bfloat16


@pytest.mark.shared
@pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not found")
def test_export_merged_tied_with_tokenizer(tmp_path):
    cfg, params = load_pretrained(STORIES)
    delta = {"layers.0.self_attn.q_proj": 0.01 * jnp.ones((64, 64))}
    out = export_merged(tmp_path / "stories", cfg, params, delta, STORIES)
    assert "lm_head.weight" not in shapes_of(out / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert load_tokenizer(out)("Once upon a time").input_ids == [1, 403, 407, 261, 378]
    fwd = jax.jit(partial(forward, cfg))
    tokens = np.array([[1, 403, 407, 261, 378]])
    _, reloaded = load_pretrained(out)
    np.testing.assert_allclose(np.asarray(fwd(reloaded, tokens)),
                               np.asarray(fwd(merge_delta(params, delta), tokens)), atol=1e-5)


def test_a_registered_family_round_trips_through_both_formats(tiny, tmp_path):
    """Loaders and exporters take the names, model_type, GGUF arch and q/k order from the family: a
    family with other names of its own reads back what it wrote, in HF and in GGUF."""
    import dataclasses

    from fedhl_jax.model.families import LLAMA, NameMap, register_family, unregister_family
    from fedhl_jax.model.gguf import load_gguf
    from fedhl_jax.model.gguf_export import export_gguf

    cfg, params, _ = tiny
    toy = dataclasses.replace(
        LLAMA, name="toyfam", model_types=("toyfam",), architectures=("ToyForCausalLM",), gguf_arch="toyarch",
        hf_names=NameMap(pairs=tuple((p, "toy." + n) for p, n in LLAMA.hf_names.pairs)),
        gguf_names=NameMap(pairs=tuple((p, n.replace("attn_", "att_")) for p, n in LLAMA.gguf_names.pairs)),
        gguf_permute_qk=False)
    register_family(toy)
    try:
        tcfg = cfg.replace(family="toyfam")
        out = export_merged(tmp_path / "hf", tcfg, params)
        written = json.loads((out / "config.json").read_text())
        assert (written["model_type"], written["architectures"]) == ("toyfam", ["ToyForCausalLM"])
        assert all(k.startswith("toy.") for k in shapes_of(out / "model.safetensors"))
        cfg2, params2 = load_pretrained(out)
        assert cfg2 == tcfg
        jax.tree.map(np.testing.assert_array_equal, params2, params)
        g = export_gguf(tmp_path / "m.gguf", tcfg, params, dtype="f32")
        cfg3, params3 = load_gguf(g)
        assert cfg3.family == "toyfam" and cfg3.num_layers == cfg.num_layers
        jax.tree.map(np.testing.assert_array_equal, params3, params)
        from fedhl_jax.model.gguf import open_gguf
        names = [t.name for t in open_gguf(g).tensors]
        assert "blk.0.att_q.weight" in names and not [n for n in names if "attn_" in n]
        assert open_gguf(g).fields["general.architecture"].contents() == "toyarch"
        # q rows stay in HF order for a family that does not permute them
        q = next(t for t in open_gguf(g).tensors if t.name == "blk.0.att_q.weight")
        from fedhl_jax.model import flatten_params
        np.testing.assert_array_equal(np.asarray(q.data).reshape(-1),
                                      np.asarray(flatten_params(params)["layers.0.self_attn.q_proj"], np.float32).reshape(-1))
    finally:
        unregister_family("toyfam")
    with pytest.raises(ValueError, match="unsupported model_type 'toyfam'"):
        load_pretrained(out)
