"""Metrics and evaluation drivers (fedhl_jax.metrics)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedhl_jax.metrics import (
    exact_match,
    extract_gsm8k_answer,
    generation_eval,
    gsm8k_exact_match,
    heldout_loss,
    length_bucket_ends,
    normalize_number,
    perplexity,
    rouge_l,
    rouge_l_scores,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 1,234", "1234"),
        ("The answer is $5.00.", "5"),
        ("-3", "-3"),
        ("3.50", "3.5"),
        ("no number", None),
        ("", None),
        ("#### 72\n", "72"),
        ("She had 3 apples, bought 5 more and now has 8.", "8"),
        ("First 12, then 30.\n#### 42\nextra 7", "42"),
        ("The answer is 18. Then I added 4 more.", "18"),
        ("the final answer is: $1,000,000.", "1000000"),
        ("We compute 48/2 = <<48/2=24>>24 clips.", "24"),
        ("#### -12.0", "-12"),
        ("He owes x=-7 dollars", "-7"),
        ("pages 3-4", "4"),
        ("10 - 3", "3"),
        ("It costs .75 dollars", "0.75"),
        ("#### 0.50", "0.5"),
        ("#### $2,000", "2000"),
        ("#### ten", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_hash_marker_beats_answer_is():
    assert extract_gsm8k_answer("The answer is 7. #### 8") == "8"
    assert extract_gsm8k_answer("#### 8 The answer is 7") == "8"


@pytest.mark.parametrize(
    "raw, expected",
    [("1,234", "1234"), ("$5.00", "5"), ("72.0", "72"), ("5.", "5"), ("-0", "0"),
     ("3.50", "3.5"), (" 12 ", "12"), ("abc", None), ("", None), ("0.125", "0.125")],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_exact_match():
    ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert gsm8k_exact_match("So the total is 72 clips.", ref)
    assert gsm8k_exact_match("The answer is $72.00.", ref)
    assert gsm8k_exact_match("#### 72", "72")
    assert not gsm8k_exact_match("The answer is 71", ref)
    assert not gsm8k_exact_match("I do not know", ref)
    assert not gsm8k_exact_match("72", "no number")
    assert exact_match(["72", "1", "x"], [ref, "#### 1", "#### 3"]) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_rouge_l_sanity():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["dogs bark loudly"], ["the cat sat on the mat"]) == 0.0
    partial = rouge_l(["the cat sat"], ["the cat sat on the mat"])
    assert 0.0 < partial < 1.0
    # LCS "the cat sat" = 3 tokens: P = 1, R = 3/6, F = 2PR/(P+R) = 2/3.
    assert partial == pytest.approx(2 / 3)
    scores = rouge_l_scores(["a b", "x"], ["a b", "y"])
    assert scores == [pytest.approx(1.0), 0.0]
    assert rouge_l(["cats running"], ["cat runs"]) == pytest.approx(1.0)  # stemming
    assert rouge_l([], []) == 0.0


def test_perplexity():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="n_tokens > 0"):
        perplexity(1.0, 0)


def test_heldout_loss_matches_direct_and_compiles_once():
    rng = np.random.default_rng(0)
    n, t = 11, 7
    tokens = rng.integers(0, 50, size=(n, t)).astype(np.int32)
    mask = (rng.random((n, t)) > 0.4).astype(np.float32)
    traces = []

    @jax.jit
    def loss_sum_fn(tk, mk):
        traces.append(tk.shape)
        per_token = (tk % 7).astype(jnp.float32) * 0.1  # a stand-in "NLL"
        return (per_token * mk).sum(), mk.sum()

    out = heldout_loss(loss_sum_fn, tokens, mask, batch_size=4)  # 4 + 4 + 3 (padded)
    direct_sum = float(((tokens % 7) * 0.1 * mask).sum())
    direct_n = float(mask.sum())
    assert out["n_tokens"] == direct_n
    assert out["loss"] == pytest.approx(direct_sum / direct_n, rel=1e-6)
    assert out["ppl"] == pytest.approx(math.exp(direct_sum / direct_n), rel=1e-6)
    assert traces == [(4, t)]  # one shape, one compilation
    # Batch size does not change the result.
    out1 = heldout_loss(loss_sum_fn, tokens, mask, batch_size=n)
    assert out1["loss"] == pytest.approx(out["loss"], rel=1e-6)


def test_heldout_loss_errors():
    fn = lambda tk, mk: (0.0, float(mk.sum()))  # noqa: E731
    with pytest.raises(ValueError, match="no target tokens"):
        heldout_loss(fn, np.zeros((2, 3), np.int32), np.zeros((2, 3), np.float32), 2)
    with pytest.raises(ValueError, match="must be"):
        heldout_loss(fn, np.zeros((2, 3), np.int32), np.zeros((2, 4), np.float32), 2)
    with pytest.raises(ValueError, match="no held-out examples"):
        heldout_loss(fn, np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32), 2)


def test_generation_eval_exact_match_with_fixed_batches():
    prompts = ["q1", "q2", "q3", "q4", "q5"]
    refs = ["#### 1", "#### 2", "#### 3", "#### 4", "#### 5"]
    answers = {"q1": "The answer is 1", "q2": "#### 2", "q3": "I think 4", "q4": "4.0", "q5": "none"}
    seen = []

    def generate(batch):
        seen.append(len(batch))
        return [answers[p] for p in batch]

    out = generation_eval(generate, prompts, refs, "exact_match", batch_size=2)
    assert seen == [2, 2, 2]  # last batch padded
    assert out["n"] == 5 and len(out["predictions"]) == 5
    assert out["scores"] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert out["score"] == pytest.approx(0.6)


def test_generation_eval_rouge_and_custom_and_arrays():
    prompts = np.arange(6, dtype=np.int32).reshape(3, 2)  # [N, P] prompt ids
    refs = ["the cat sat", "a dog ran", "birds fly high"]

    def generate(batch):
        assert batch.shape == (2, 2)
        return [refs[int(row[0]) // 2] if row[0] != 2 else "nothing alike" for row in batch]

    out = generation_eval(generate, prompts, refs, "rouge_l", batch_size=2)
    assert out["scores"] == [pytest.approx(1.0), 0.0, pytest.approx(1.0)]
    custom = generation_eval(lambda b: ["x"] * len(b), ["p"], ["x"], lambda p, r: float(p == r))
    assert custom["score"] == 1.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        generation_eval(lambda b: b, ["p"], ["x"], "bleu")
    with pytest.raises(ValueError, match="returned 0 texts for 1 prompts"):
        generation_eval(lambda b: [], ["p"], ["x"])


def test_heldout_loss_per_example_matches_the_rows():
    rng = np.random.default_rng(0)
    n, t = 7, 5
    tokens = rng.integers(0, 9, size=(n, t)).astype(np.int32)
    mask = (rng.random((n, t)) < 0.6).astype(np.float32)
    mask[2] = 0.0  # a row without target tokens
    per_tok = rng.random((n, t))

    def fn(tb, mb):  # per-row sums; the padding rows reuse row 0's tokens with a zero mask
        idx = [int(np.flatnonzero((tokens == row).all(1))[0]) for row in tb]
        loss = per_tok[idx] * mb
        return loss.sum(1), mb.sum(1)

    out = heldout_loss(fn, tokens, mask, batch_size=3)
    want = np.where(mask.sum(1) > 0, (per_tok * mask).sum(1) / np.maximum(mask.sum(1), 1), np.nan)
    np.testing.assert_allclose(out["per_example"], want, rtol=1e-12)
    assert np.isnan(out["per_example"][2]) and out["per_example"].shape == (n,)
    assert out["loss"] == pytest.approx((per_tok * mask).sum() / mask.sum(), rel=1e-12)


def test_length_bucket_ends():
    mask = np.array([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(length_bucket_ends(mask), [3, 5, 1, 1])


def test_heldout_loss_length_buckets_cut_padding_and_keep_every_loss():
    """Rows batched by length, each batch cut to a multiple of the bucket: the same per-row losses
    (in the caller's row order), one compilation per width, and never wider than needed."""
    rng = np.random.default_rng(1)
    n, t, b, w = 13, 24, 4, 8
    tokens = rng.integers(0, 50, size=(n, t)).astype(np.int32)
    ends = rng.integers(2, t + 1, size=n)
    ends[3] = t  # one full-width row
    mask = ((np.arange(t)[None] >= 1) & (np.arange(t)[None] < ends[:, None])).astype(np.float32)
    mask *= rng.random((n, t)) > 0.3
    mask[5] = 0.0  # a row without target tokens

    def make(traces):
        @jax.jit
        def fn(tk, mk):  # a causal stand-in: each column's "NLL" depends on that column and earlier ones only
            traces.append(tk.shape)
            per_token = jnp.cumsum((tk % 7).astype(jnp.float32), axis=1) * 0.01
            return (per_token * mk).sum(1), mk.sum(1)
        return fn

    full_traces, traces = [], []
    full = heldout_loss(make(full_traces), tokens, mask, batch_size=b)
    fn = make(traces)
    cut = heldout_loss(fn, tokens, mask, batch_size=b, length_bucket=w)
    np.testing.assert_allclose(cut["per_example"], full["per_example"], rtol=1e-6)
    assert np.isnan(cut["per_example"][5])
    assert cut["loss"] == pytest.approx(full["loss"], rel=1e-6) and cut["n_tokens"] == full["n_tokens"]
    assert full_traces == [(b, t)]
    widths = [s[1] for s in traces]
    assert len(widths) == len(set(widths)) <= -(-t // w)  # one compilation per width
    assert all(s[0] == b and s[1] % w == 0 for s in traces)
    heldout_loss(fn, tokens, mask, batch_size=b, length_bucket=w)  # a second evaluation compiles nothing
    assert len(traces) == len(widths)
    # the batches hold the rows in length order, so the cut skips padding: never wider than its longest row
    need = np.sort(np.where(mask.any(1), length_bucket_ends(mask), 1))
    want = [min(t, -(-int(need[i:i + b].max()) // w) * w) for i in range(0, n, b)]
    assert sorted(set(want)) == sorted(widths) and sum(want) < (-(-n // b)) * t
    with pytest.raises(ValueError, match="length_bucket must be >= 0.*-1"):
        heldout_loss(fn, tokens, mask, batch_size=b, length_bucket=-1)


def test_heldout_loss_length_buckets_on_a_llama_match_the_full_width():
    """A causal model's per-example losses with batches cut to length equal the full-width ones (float32,
    up to rounding), so the option changes speed only."""
    from fedhl_jax import model as M

    cfg = M.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8)
    params = M.init_params(cfg, jax.random.key(0), std=0.2)
    rng = np.random.default_rng(2)
    n, t = 10, 48
    tokens = rng.integers(0, 97, size=(n, t)).astype(np.int32)
    starts, ends = rng.integers(2, 12, size=n), rng.integers(14, t + 1, size=n)
    cols = np.arange(t)[None]
    mask = ((cols >= starts[:, None]) & (cols < ends[:, None])).astype(np.float32)
    tokens = np.where(cols < ends[:, None], tokens, 0)  # right padding
    fn = jax.jit(lambda tk, mk: M.token_losses(cfg, params, None, tk, mk, per_example=True))
    full = heldout_loss(fn, tokens, mask, batch_size=4)
    for w in (1, 16):  # 1: every batch cut exactly at its longest row's last target
        cut = heldout_loss(fn, tokens, mask, batch_size=4, length_bucket=w)
        np.testing.assert_allclose(cut["per_example"], full["per_example"], rtol=1e-5)
        assert cut["loss"] == pytest.approx(full["loss"], rel=1e-5)
