"""The Qwen2, Qwen3 and Llama-3.x families: parity with transformers, exports, LoRA training and errors.

The tiny models under ``tests/fixtures/tiny_{qwen2,qwen3,llama32}`` and their reference outputs in
``tests/golden/families.npz`` come from ``scripts/make_golden_families.py`` (transformers and peft);
nothing here needs torch, the network or ``../shared``.
"""

from __future__ import annotations

import json
import math
import shutil
from functools import partial
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedhl_jax import runtime
from fedhl_jax.lora import Adapter, lora_scale
from fedhl_jax.model import (LlamaConfig, adapter_delta, export_gguf, export_merged, export_peft, flatten_params,
                             forward, generate, init_adapter, load_gguf, load_peft, load_pretrained, loss_fn,
                             merge_delta, param_shapes)
from fedhl_jax.model import gguf as G
from fedhl_jax.model.families import LLAMA, QWEN2, QWEN3, family_for_gguf_arch, family_for_model_type
from fedhl_jax.model.llama import rope_inv_freq

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
GOLDEN = np.load(REPO / "tests" / "golden" / "families.npz")
FAMILIES = ("qwen2", "qwen3", "llama32")
TOL = 1e-4


def fixture(name: str) -> Path:
    return FIXTURES / f"tiny_{name}"


def golden(name: str, key: str) -> np.ndarray:
    return GOLDEN[f"{name}_{key}"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    """``(name, cfg, params, accurate jitted forward)`` of one tiny fixture."""
    cfg, params = load_pretrained(fixture(request.param))
    fwd = runtime.jit(lambda p, t, adapter=None, attention_mask=None: forward(
        cfg, p, t, adapter=adapter, attention_mask=attention_mask), cpu_matmul="accurate")
    return request.param, cfg, params, fwd


# ------------------------------------------------------------------------- registry and config
def test_each_family_is_what_its_checkpoint_says(model):
    name, cfg, params, _ = model
    want = {"qwen2": (QWEN2, "default", True, 8), "qwen3": (QWEN3, "default", False, 16),
            "llama32": (LLAMA, "llama3", True, 16)}[name]
    assert (cfg.model_family, cfg.rope_type, cfg.tie_word_embeddings, cfg.head_dim) == want
    attn = params["layers"]["self_attn"]
    assert ("q_proj_bias" in attn) == (name == "qwen2") and ("q_norm" in attn) == (name == "qwen3")
    if name == "qwen2":
        assert attn["q_proj_bias"].shape == (2, 32) and attn["k_proj_bias"].shape == (2, 16)
    if name == "qwen3":  # head_dim 16 != hidden 32 / 4 heads
        assert attn["q_norm"].shape == (2, 16) and attn["q_proj"].shape == (2, 64, 32)
        assert attn["o_proj"].shape == (2, 32, 64)
    if name == "llama32":
        assert (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                cfg.rope_original_max_position_embeddings) == (4.0, 1.0, 8.0, 1024)
    assert "lm_head" not in params if cfg.tie_word_embeddings else params["lm_head"].shape == (97, 32)
    # config.json round trip (the merged export writes it)
    assert LlamaConfig.from_hf(cfg.to_hf_dict()) == cfg


def test_registry_lookups():
    assert family_for_model_type("qwen2") is family_for_gguf_arch("qwen2") is QWEN2
    assert family_for_model_type("qwen3") is family_for_gguf_arch("qwen3") is QWEN3
    assert family_for_model_type("llama") is LLAMA and "llama3" in LLAMA.rope_types
    assert (QWEN2.qkv_bias, QWEN2.qk_norm, QWEN2.gguf_permute_qk) == (True, False, False)
    assert (QWEN3.qkv_bias, QWEN3.qk_norm, QWEN3.gguf_permute_qk) == (False, True, False)
    for fam, cfg in ((QWEN2, LlamaConfig(97, 32, 48, 2, 4, 2, 8, family="qwen2")),
                     (QWEN3, LlamaConfig(97, 32, 48, 2, 4, 2, 16, family="qwen3"))):
        for path in param_shapes(cfg):  # every parameter has one name in each format, and back
            assert fam.hf_names.to_path(fam.hf_names.to_name(path)) == path
            assert fam.gguf_names.to_path(fam.gguf_names.to_name(path)) == path
    assert QWEN2.hf_names.to_name("layers.1.self_attn.v_proj_bias") == "model.layers.1.self_attn.v_proj.bias"
    assert QWEN2.gguf_names.to_name("layers.1.self_attn.v_proj_bias") == "blk.1.attn_v.bias"
    assert QWEN3.gguf_names.to_name("layers.0.self_attn.k_norm") == "blk.0.attn_k_norm.weight"


def test_7b_presets_have_the_published_parameter_counts():
    def count(cfg):
        return sum(math.prod(shape) for shape in param_shapes(cfg).values())

    assert count(LlamaConfig.llama31_8b()) == 8_030_261_248  # meta-llama/Llama-3.1-8B
    assert count(LlamaConfig.qwen25_7b()) == 7_615_616_512  # Qwen/Qwen2.5-7B, biases included
    assert LlamaConfig.llama31_8b().rope_type == "llama3" and LlamaConfig.qwen25_7b().family == "qwen2"


# ------------------------------------------------------------------------- parity with transformers
def test_logits_match_transformers(model):
    name, cfg, params, fwd = model
    diff = np.abs(np.asarray(fwd(params, golden(name, "tokens"))) - golden(name, "logits")).max()
    assert diff < TOL, diff
    # a left-padded batch (transformers given the same position ids): real positions only
    mask = golden(name, "padded_mask")
    out = np.asarray(fwd(params, golden(name, "padded_tokens"), attention_mask=mask))
    diff = np.abs(out - golden(name, "padded_logits"))[mask.astype(bool)].max()
    assert diff < TOL, diff


def test_greedy_continuations_match_transformers(model):
    name, cfg, params, _ = model
    before = runtime.cpu_matmul()
    runtime.set_cpu_matmul("accurate")
    try:
        out = generate(cfg, params, golden(name, "prompts"), lengths=golden(name, "prompt_lengths"),
                       max_new_tokens=golden(name, "generated").shape[1], eos_id=None)
    finally:
        runtime.set_cpu_matmul(before)
    np.testing.assert_array_equal(np.asarray(out), golden(name, "generated"))


def peft_adapter(name: str, cfg: LlamaConfig) -> Adapter:
    """The golden PEFT adapter (r=4, alpha=8 on every linear module) as an :class:`Adapter`."""
    a, b = {}, {}
    for key in GOLDEN.files:
        prefix = f"{name}_peft_layers."
        if key.startswith(prefix):
            module, which = key[len(f"{name}_peft_"):].rsplit(".lora_", 1)
            (a if which == "A" else b)[module] = jnp.asarray(GOLDEN[key])
    assert len(a) == len(b) == 7 * cfg.num_layers
    return Adapter(B=b, A=a, mask=jnp.ones(4), scale=jnp.asarray(lora_scale(4, 8.0), jnp.float32))


def test_lora_on_every_linear_module_matches_peft(model):
    """LoRA adapts the linear part only: q/k/v biases and q/k norms stay as they are."""
    name, cfg, params, fwd = model
    adapter = peft_adapter(name, cfg)
    tokens = golden(name, "tokens")
    diff = np.abs(np.asarray(fwd(params, tokens, adapter)) - golden(name, "peft_logits")).max()
    assert diff < TOL, diff
    merged = np.asarray(fwd(merge_delta(params, adapter_delta(adapter)), tokens))
    np.testing.assert_allclose(merged, golden(name, "peft_logits"), atol=TOL, rtol=0)


# ------------------------------------------------------------------------- exports round trips
def test_hf_folder_to_gguf_and_back(model, tmp_path):
    name, cfg, params, fwd = model
    file = export_gguf(tmp_path / f"{name}.gguf", cfg, params, dtype="f32")
    reader = G.open_gguf(file)
    assert reader.fields["general.architecture"].contents() == cfg.model_family.gguf_arch
    names = {t.name for t in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == (name == "qwen2")
    assert ("blk.1.attn_k_norm.weight" in names) == (name == "qwen3")
    assert ("rope_freqs.weight" in names) == (name == "llama32")
    assert ("output.weight" in names) == (not cfg.tie_word_embeddings)
    cfg2, params2 = load_gguf(file)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    # q rows: llama.cpp order for llama (permuted), Hugging Face order for qwen2/qwen3
    q = np.asarray(next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data).reshape(-1, 32)
    hf_q = np.asarray(flatten_params(params)["layers.0.self_attn.q_proj"])
    want = G.permute_qk(hf_q, cfg.num_heads) if name == "llama32" else hf_q
    np.testing.assert_array_equal(q, want)
    # Q8_0 export: the model still follows transformers' logits closely
    _, params_q8 = load_gguf(export_gguf(tmp_path / "q8.gguf", cfg, params, dtype="q8_0"))
    close = np.abs(np.asarray(fwd(params_q8, golden(name, "tokens"))) - golden(name, "logits")).max()
    assert close < 0.05 * np.abs(golden(name, "logits")).max(), close


def test_merged_hf_export_round_trip(model, tmp_path):
    name, cfg, params, fwd = model
    rng = np.random.default_rng(3)
    delta = {f"layers.{i}.self_attn.{m}": jnp.asarray(0.05 * rng.standard_normal(params["layers"]["self_attn"][m].shape[1:]),
                                                      jnp.float32)
             for i in range(cfg.num_layers) for m in ("q_proj", "k_proj", "v_proj")}
    out = export_merged(tmp_path / "merged", cfg, params, delta, fixture(name))
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == {"llama32": "llama"}.get(name, name)
    keys = set(load_file(out / "model.safetensors"))
    assert ("model.layers.0.self_attn.q_proj.bias" in keys) == (name == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in keys) == (name == "qwen3")
    cfg2, params2 = load_pretrained(out)
    assert cfg2 == cfg
    merged = merge_delta(params, delta)
    jax.tree.map(np.testing.assert_array_equal, params2, merged)
    # built from the config alone (no source folder), the folder describes the same model
    cfg3, _ = load_pretrained(export_merged(tmp_path / "bare", cfg, params))
    assert cfg3 == cfg


def test_peft_export_round_trip(model, tmp_path):
    name, cfg, params, fwd = model
    adapter = peft_adapter(name, cfg)
    dense = {n: np.asarray(d, np.float64) for n, d in adapter_delta(adapter).items()}
    out = export_peft(tmp_path / "peft", dense, rank=4, alpha=8.0, base_model_name_or_path=str(fixture(name)))
    reloaded, config = load_peft(out, cfg=cfg)
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tokens = golden(name, "tokens")
    diff = np.abs(np.asarray(fwd(params, tokens, reloaded)) - golden(name, "peft_logits")).max()
    assert diff < TOL, diff


# ------------------------------------------------------------------------- training
def test_a_lora_training_step_leaves_biases_and_norms_frozen(model):
    from fedhl_jax.local import make_local_train, make_optimizer

    name, cfg, params, _ = model
    adapter = init_adapter(cfg, "all-linear", 4, jax.random.key(0), alpha=8.0)
    tokens = jnp.asarray(np.tile(golden(name, "tokens")[None], (3, 1, 1)))  # K=3 steps of the same batch
    mask = jnp.ones_like(tokens)
    before = jax.tree.map(np.asarray, params)
    train = make_local_train(partial(loss_fn, cfg), make_optimizer("adamw", 3e-2))
    trained, losses = train(params, adapter, tokens, mask)
    assert np.all(np.isfinite(np.asarray(losses))) and float(losses[-1]) < float(losses[0]) - 1e-3, losses
    for n in adapter.B:  # every linear module learned something (B starts at zero)
        assert float(jnp.abs(trained.B[n]).max()) > 0, n
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), before)


# ------------------------------------------------------------------------- llama3 RoPE
def llama3_inv_freq_f64(hd, theta, factor, low, high, original):
    """float64 NumPy reference of transformers' ``_compute_llama3_parameters``."""
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > original / low, inv / factor, inv)
    smooth = (original / wavelen - low) / (high - low)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


@pytest.mark.parametrize("hd, theta, factor, low, high, original", [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama-3.1
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama-3.2 1B
    (16, 10000.0, 4.0, 1.0, 8.0, 1024),  # the tiny fixture
])
def test_llama3_rope_frequencies_and_gguf_divisors(hd, theta, factor, low, high, original):
    cfg = LlamaConfig(97, 32, 48, 1, 1, 1, hd, rope_theta=theta, rope_type="llama3", rope_scaling_factor=factor,
                      rope_low_freq_factor=low, rope_high_freq_factor=high,
                      rope_original_max_position_embeddings=original)
    ref = llama3_inv_freq_f64(hd, theta, factor, low, high, original)
    np.testing.assert_allclose(rope_inv_freq(cfg), ref, rtol=2e-6)
    divisors = G.llama3_rope_factors(hd, theta, factor, low, high, original)
    np.testing.assert_allclose(divisors, 1.0 / theta ** (np.arange(0, hd, 2) / hd) / ref, rtol=1e-6)
    assert divisors.min() == 1.0 and divisors.max() == factor
    back = G.llama3_rope_from_factors(divisors, head_dim=hd, theta=theta, original=original)
    assert back == {"rope_type": "llama3", "rope_scaling_factor": factor, "rope_low_freq_factor": low,
                    "rope_high_freq_factor": high, "rope_original_max_position_embeddings": original}
    # without the original context in the metadata, another one reproduces the same frequencies
    other = G.llama3_rope_from_factors(divisors, head_dim=hd, theta=theta, original=4096)
    np.testing.assert_allclose(rope_inv_freq(cfg.replace(**other)), ref, rtol=2e-6)


def test_rope_freqs_not_of_llama3_form_is_refused():
    divisors = G.llama3_rope_factors(16, 10000.0, 4.0, 1.0, 8.0, 1024)
    assert G.llama3_rope_from_factors(np.ones(8), head_dim=16, theta=1e4) == {"rope_type": "default"}
    with pytest.raises(ValueError, match="does not follow Llama-3's RoPE scaling"):
        G.llama3_rope_from_factors(divisors[::-1].copy(), head_dim=16, theta=1e4)
    with pytest.raises(ValueError, match="rope_freqs.weight has 7 values, head_dim=16 needs 8"):
        G.llama3_rope_from_factors(divisors[:7], head_dim=16, theta=1e4)


def test_qwen2_pre_tokenizer_splits_digits_one_by_one():
    from fedhl_jax.model.gguf_tokenizer import PRE_TOKENIZERS

    def words(pre):
        return [w for w, _ in PRE_TOKENIZERS[pre]().pre_tokenize_str("In 2025, x'll cost 12345!")]

    assert words("qwen2") == ["In", "Ġ", "2", "0", "2", "5", ",", "Ġx", "'ll", "Ġcost", "Ġ", "1", "2", "3", "4",
                              "5", "!"]
    assert words("llama-bpe")[1:3] == ["Ġ", "202"]  # Llama-3 groups up to three digits


# ------------------------------------------------------------------------- errors name the problem
QWEN2_HF = json.loads((fixture("qwen2") / "config.json").read_text())


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma3"}, r"unsupported model_type 'gemma3': supported are \['llama', 'qwen2', 'qwen3'\]"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, r"unsupported RoPE scaling type 'yarn': supported are \['default'\]"),
    ({"use_sliding_window": True}, r"unsupported use_sliding_window=True"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, r"unsupported layer_types entry 'sliding_attention'"),
    ({"architectures": ["Qwen2MoeForCausalLM"]}, r"unsupported architecture 'Qwen2MoeForCausalLM'"),
])
def test_unsupported_config_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf({**QWEN2_HF, **change})


def test_unsupported_rope_and_bias_per_family():
    with pytest.raises(ValueError, match=r"unsupported RoPE scaling type 'llama3' for model family 'qwen2'"):
        LlamaConfig(97, 32, 48, 1, 4, 2, 8, family="qwen2", rope_type="llama3", rope_scaling_factor=8.0)
    with pytest.raises(ValueError, match=r"unsupported RoPE scaling type 'dynamic'"):
        LlamaConfig(97, 32, 48, 1, 4, 2, 8, rope_type="dynamic")
    with pytest.raises(ValueError, match="low_freq_factor=4.0, high_freq_factor=1.0"):
        LlamaConfig(97, 32, 48, 1, 4, 2, 8, rope_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=4.0,
                    rope_high_freq_factor=1.0)
    qwen3 = json.loads((fixture("qwen3") / "config.json").read_text())
    with pytest.raises(ValueError, match="unsupported attention_bias=True"):
        LlamaConfig.from_hf({**qwen3, "attention_bias": True})
    llama3 = json.loads((fixture("llama32") / "config.json").read_text())
    del llama3["rope_parameters"]["low_freq_factor"]
    with pytest.raises(ValueError, match="llama3 RoPE scaling lacks low_freq_factor"):
        LlamaConfig.from_hf(llama3)


def test_unsupported_model_type_folder_is_named(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(fixture("qwen2"), folder)
    (folder / "config.json").write_text(json.dumps({**QWEN2_HF, "model_type": "phi3"}))
    with pytest.raises(ValueError, match="unsupported model_type 'phi3'"):
        load_pretrained(folder)


@pytest.mark.parametrize("name, key, shape", [
    ("qwen2", "model.layers.1.self_attn.k_proj.bias", (8,)),
    ("qwen3", "model.layers.0.self_attn.q_norm.weight", (8,)),
])
def test_hf_tensor_shape_disagreeing_with_config_is_named(tmp_path, name, key, shape):
    folder = tmp_path / "ckpt"
    shutil.copytree(fixture(name), folder)
    tensors = load_file(folder / "model.safetensors")
    expected = tensors[key].shape
    tensors[key] = np.ones(shape, np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    pattern = (rf"shape mismatch for '{key}' in .*model\.safetensors: checkpoint has \({shape[0]},\), "
               rf"config expects \({expected[0]},\)")
    with pytest.raises(ValueError, match=pattern):
        load_pretrained(folder)


def rewrite_gguf(src: Path, dst: Path, arch: str | None = None, edit=lambda name, w: w) -> Path:
    """Copies a GGUF file, optionally under another architecture name and with tensors edited."""
    reader = G.open_gguf(src)
    old = reader.fields["general.architecture"].contents()
    arch = arch or old
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key.replace(f"{old}.", f"{arch}.", 1), field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        writer.add_tensor(t.name, np.ascontiguousarray(edit(t.name, np.asarray(t.data, np.float32).reshape(shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory):
    cfg, params = load_pretrained(fixture("qwen3"))
    return export_gguf(tmp_path_factory.mktemp("q3") / "qwen3.gguf", cfg, params, dtype="f32")


def test_unsupported_gguf_arch_is_named(qwen3_gguf, tmp_path):
    bad = rewrite_gguf(qwen3_gguf, tmp_path / "gemma.gguf", arch="gemma3")
    with pytest.raises(G.GGUFError, match=r"gemma\.gguf: unsupported GGUF architecture 'gemma3': supported are "
                                          r"\['llama', 'qwen2', 'qwen3'\]"):
        load_pretrained(bad)


def test_gguf_tensor_shape_disagreeing_with_config_is_named(qwen3_gguf, tmp_path):
    bad = rewrite_gguf(qwen3_gguf, tmp_path / "bad.gguf",
                       edit=lambda name, w: w[:8] if name == "blk.1.attn_q_norm.weight" else w)
    with pytest.raises(G.GGUFError, match=r"shape mismatch for 'blk\.1\.attn_q_norm\.weight' in .*bad\.gguf: "
                                          r"file has \(8,\), metadata implies \(16,\)"):
        load_gguf(bad)


def test_gguf_rope_freqs_read_and_refused(tmp_path):
    cfg, params = load_pretrained(fixture("llama32"))
    file = export_gguf(tmp_path / "l3.gguf", cfg, params, dtype="f32")
    # llama.cpp's converter writes no original context length: the frequencies are the same
    meta = G.read_metadata(G.open_gguf(file))
    meta.pop("llama.rope.scaling.original_context_length")
    freqs = G.read_rope_freqs(G.open_gguf(file), file)
    other = G.config_from_gguf(meta, tensor_names=[t.name for t in G.open_gguf(file).tensors], rope_freqs=freqs)
    np.testing.assert_allclose(rope_inv_freq(other), rope_inv_freq(cfg), rtol=1e-6)
    bad = rewrite_gguf(file, tmp_path / "bad.gguf",
                       edit=lambda name, w: w[::-1].copy() if name == "rope_freqs.weight" else w)
    with pytest.raises(G.GGUFError, match=r"bad\.gguf: rope_freqs\.weight does not follow Llama-3's RoPE scaling"):
        load_gguf(bad)
