"""Batched KV-cache generation."""

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedhl_jax.model import (adapter_delta, forward, generate, init_adapter, load_pretrained,
                             load_tokenizer, merge_delta, sample_logits, strip_after_eos)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "tiny_llama"
GOLDEN = REPO / "tests" / "golden"
STORIES = REPO.parent / "shared" / "models" / "stories260K-hf"
needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not found")

PROMPTS = [[1, 5, 9, 13, 40, 2 + 70, 11], [1, 20], [1, 33, 34, 35, 36]]
N = 6


@pytest.fixture(scope="module")
def tiny():
    return load_pretrained(TINY)


def naive_greedy(cfg, params, prompt, n, adapter=None, width=16):
    """Reference: re-run the full forward pass for every new token (no cache, no left padding).

    The sequence is right-padded to a fixed ``width`` (causal attention ignores
    later slots) so that one compilation serves every step.
    """
    fwd = jax.jit(partial(forward, cfg))
    seq = list(prompt)
    for _ in range(n):
        logits = fwd(params, jnp.array([seq + [0] * (width - len(seq))]), adapter=adapter)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def reference(tiny):
    cfg, params = tiny
    return [naive_greedy(cfg, params, p, N) for p in PROMPTS]


def test_batched_greedy_matches_naive_decoding(tiny, reference):
    cfg, params = tiny
    out = generate(cfg, params, PROMPTS, max_new_tokens=N, eos_id=None)
    assert out.shape == (3, N) and out.dtype == jnp.int32
    assert np.asarray(out).tolist() == reference


def test_padded_array_with_lengths(tiny, reference):
    cfg, params = tiny
    arr = np.zeros((3, 7), np.int32)
    for i, p in enumerate(PROMPTS):
        arr[i, : len(p)] = p
    out = generate(cfg, params, arr, lengths=[len(p) for p in PROMPTS], max_new_tokens=N,
                   eos_id=None)
    assert np.asarray(out).tolist() == reference


def test_stops_at_eos_per_row(tiny, reference):
    cfg, params = tiny
    eos = reference[0][2]  # row 0 emits it as its third token
    out = np.asarray(generate(cfg, params, PROMPTS, max_new_tokens=N, eos_id=eos, pad_id=0))
    for row, ref in zip(out.tolist(), reference):
        cut = ref.index(eos) + 1 if eos in ref else N
        assert row == ref[:cut] + [0] * (N - cut)
    assert out[0].tolist()[:3] == reference[0][:3] and out[0, 3:].tolist() == [0] * (N - 3)
    assert strip_after_eos(out, eos)[0] == reference[0][:2]
    assert strip_after_eos(out, eos, keep_eos=True)[0] == reference[0][:3]


def test_adapter_is_applied(tiny):
    cfg, params = tiny
    ad = init_adapter(cfg, ("q_proj", "v_proj"), 4, jax.random.key(0))
    ad = ad._replace(B={n: 0.5 * jax.random.normal(jax.random.key(i), b.shape)
                        for i, (n, b) in enumerate(ad.B.items())})
    with_adapter = generate(cfg, params, PROMPTS, max_new_tokens=N, adapter=ad, eos_id=None)
    merged = generate(cfg, merge_delta(params, adapter_delta(ad)), PROMPTS, max_new_tokens=N,
                      eos_id=None)
    assert np.asarray(with_adapter).tolist() == np.asarray(merged).tolist()
    assert np.asarray(with_adapter)[0].tolist() == naive_greedy(cfg, params, PROMPTS[0], N, ad)


def test_sampling(tiny, reference):
    cfg, params = tiny
    sample = partial(generate, cfg, params, PROMPTS, max_new_tokens=N, eos_id=None,
                     temperature=1.0)
    assert np.asarray(sample(key=jax.random.key(0), top_k=1)).tolist() == reference
    a, b = sample(key=jax.random.key(1)), sample(key=jax.random.key(1))
    assert np.asarray(a).tolist() == np.asarray(b).tolist()
    assert np.asarray(a).tolist() != np.asarray(sample(key=jax.random.key(2))).tolist()
    assert int(a.max()) < cfg.vocab_size and int(a.min()) >= 0
    with pytest.raises(ValueError, match="PRNG key"):
        generate(cfg, params, PROMPTS, max_new_tokens=2, temperature=0.7)


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    keys = jax.random.split(jax.random.key(0), 400)

    def draw(keys, **kw):
        return jax.jit(jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, **kw)[0]))(keys)

    assert set(np.asarray(draw(keys, top_k=3)).tolist()) == {0, 1, 2}
    assert set(np.asarray(draw(keys, top_p=0.7)).tolist()) == {0, 1}
    assert set(np.asarray(draw(keys, top_p=0.85)).tolist()) == {0, 1, 2}
    assert int(sample_logits(logits, keys[0])[0]) == 0  # greedy


def test_bad_prompts(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(cfg, params, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="lengths"):
        generate(cfg, params, np.ones((2, 3), np.int32), max_new_tokens=2)


@pytest.mark.shared
@needs_stories
def test_stories260k_greedy():
    cfg, params = load_pretrained(STORIES)
    prompt = load_tokenizer(STORIES)("Once upon a time").input_ids
    assert prompt == [1, 403, 407, 261, 378]
    # a batch of prompts of different lengths (row 0 is the prompt above) reproduces
    # transformers' per-prompt greedy output
    golden = np.load(GOLDEN / "stories260K_logits.npz")
    assert golden["prompts"][0, : golden["prompt_lengths"][0]].tolist() == prompt
    out = np.asarray(generate(cfg, params, golden["prompts"], lengths=golden["prompt_lengths"],
                              max_new_tokens=16))
    assert out[0].tolist() == [432, 383, 286, 261, 376, 298, 315, 421, 395, 317,
                               426, 338, 401, 396, 267, 337]
    np.testing.assert_array_equal(out, golden["generated"])
