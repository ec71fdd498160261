"""SmolLM2-135M-Instruct (4-bit GGUF in ../shared) against transformers' own GGUF loader.

The reference ``tests/golden/smollm2_gguf.npz`` is written by
``scripts/make_golden_gguf.py`` (PyTorch environment). Skipped when the model
file is absent.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from fedhl_jax import runtime
from fedhl_jax.model import (apply_chat_template, forward, generate, load_pretrained,
                             load_tokenizer)
from fedhl_jax.model import gguf as G
from tests.conftest import shared_path

pytestmark = pytest.mark.shared
GOLDEN = Path(__file__).parent / "golden" / "smollm2_gguf.npz"
FOLDER = ("models", "smollm2-135m-instruct-gguf")
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Both sides dequantise to the same float32 weights (checked value by value); the logits then
# differ only by float32 rounding over 30 layers. With XLA's own CPU kernels
# (cpu_matmul="accurate") that is at most 5.3e-5: the bound is the absolute 1e-4. With XLA's
# default YNNPACK fusions ("fast") it is up to 1.9e-4 on logits up to 38, i.e. 5e-6 of the
# largest logit: the bound there is 1e-5 of the largest |logit| of a prompt.
ABS_TOLERANCE = {"accurate": 1e-4}
REL_TOLERANCE = {"fast": 1e-5}


def assert_close(actual, desired, scale, mode):
    diff = float(np.abs(np.asarray(actual) - np.asarray(desired)).max())
    bound = ABS_TOLERANCE[mode] if mode in ABS_TOLERANCE else REL_TOLERANCE[mode] * scale
    assert diff <= bound, f"{mode}: max abs difference {diff:.3g} > {bound:.3g} (scale {scale:.3g})"


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def model():
    return load_pretrained(shared_path(*FOLDER))  # the folder: dispatches to the GGUF loader


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(shared_path(*FOLDER, FILE))


def prompts(golden) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(golden["ids"], golden["lengths"])]


def test_config_and_types(model):
    cfg, params = model
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e5, 1e-5, 8192)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    types = G.tensor_types(shared_path(*FOLDER, FILE))
    assert set(types.values()) == {"Q4_1", "Q8_0", "F32"}


def test_weights_match_transformers_dequantisation(model, golden):
    from fedhl_jax.model import flatten_params, hf_key_to_path

    _, params = model
    flat = flatten_params(params)
    for name, idx, values, total in zip(golden["weight_names"], golden["weight_index"],
                                        golden["weight_values"], golden["weight_sums"]):
        w = np.asarray(flat[hf_key_to_path(str(name))]).reshape(-1)
        np.testing.assert_array_equal(w[idx], values, err_msg=str(name))
        assert w.astype(np.float64).sum() == pytest.approx(float(total), rel=1e-9, abs=1e-9)


def test_tokenizer_and_chat_template_match_transformers(tok, golden):
    for text, ids in zip(golden["texts"], prompts(golden)):
        assert tok(str(text))["input_ids"] == ids, text
    messages = json.loads(str(golden["chat_messages_json"]))
    assert apply_chat_template(tok, messages) == str(golden["chat_text"])
    assert apply_chat_template(tok, messages, tokenize=True) == prompts(golden)[-1]
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == golden["special_ids"].tolist()
    assert tok.decode(prompts(golden)[0]) == str(golden["texts"][0])


@pytest.mark.parametrize("mode", runtime.CPU_MATMUL_MODES)
def test_logits_match_transformers(model, golden, mode):
    cfg, params = model
    fwd = runtime.jit(partial(forward, cfg), cpu_matmul=mode)
    for i, ids in enumerate(prompts(golden)):
        logits = np.asarray(fwd(params, np.array([ids])))[0]  # [T, V]
        n = len(ids)
        np.testing.assert_array_equal(logits.argmax(-1), golden["logit_argmax"][i, :n])
        scale = float(np.abs(logits).max())
        assert_close(logits.max(-1), golden["logit_max"][i, :n], scale, mode)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        assert_close(lse, golden["logit_lse"][i, :n], scale, mode)
        top = np.take_along_axis(logits, golden["top_ids"][i, :n], axis=-1)
        assert_close(top, golden["top_logits"][i, :n], scale, mode)
        name = {0: "logits_slice_0", len(golden["ids"]) - 1: "logits_slice_chat"}.get(i)
        if name is not None:
            v = int(golden["v_slice"])
            assert_close(logits[:, :v], golden[name], scale, mode)


@pytest.mark.parametrize("mode", runtime.CPU_MATMUL_MODES)
def test_greedy_continuations_match_transformers(model, golden, mode):
    cfg, params = model
    before = runtime.cpu_matmul()
    runtime.set_cpu_matmul(mode)  # generation compiles in the process-wide mode
    try:
        out = generate(cfg, params, prompts(golden), max_new_tokens=golden["greedy"].shape[1],
                       eos_id=None)
    finally:
        runtime.set_cpu_matmul(before)
    np.testing.assert_array_equal(np.asarray(out), golden["greedy"])
