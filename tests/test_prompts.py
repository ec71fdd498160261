"""Alpaca prompts, loss-mask placement and truncation (fedhl_jax.data.prompts)."""

from __future__ import annotations

import numpy as np
import pytest

from fedhl_jax.data import (
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    build_prompt,
    pad_prompts,
    tokenize_dataset,
    word_level_tokenizer,
)

RECORDS = [
    {"instruction": "Add the numbers .", "input": "2 and 3", "output": "The sum is 5 ."},
    {"instruction": "Say hello .", "input": "", "output": "hello there my friend"},
    {"instruction": "Name a colour .", "output": "red"},
]


@pytest.fixture(scope="module")
def tok():
    texts = [build_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in RECORDS]
    return word_level_tokenizer(texts)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_with_input():
    p = build_prompt("Do X.", "some context")
    assert p == PROMPT_WITH_INPUT.format(instruction="Do X.", input="some context")
    assert "### Instruction:\nDo X.\n\n### Input:\nsome context\n\n### Response:\n" in p
    assert p.startswith("Below is an instruction that describes a task, paired with an input")
    assert p.endswith("### Response:\n")


def test_prompt_without_input():
    for inp in ("", "   \n"):
        p = build_prompt("Do X.", inp)
        assert p == PROMPT_NO_INPUT.format(instruction="Do X.")
        assert "### Input:" not in p
        assert p.endswith("### Instruction:\nDo X.\n\n### Response:\n")


def test_toy_tokenizer_has_no_pad(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)


def test_loss_mask_only_on_response_and_eos(tok):
    d = tokenize_dataset(RECORDS, tok, seq_len=96)
    assert d.tokens.shape == d.loss_mask.shape == (3, 96)
    assert d.tokens.dtype == np.int32 and d.loss_mask.dtype == np.float32
    assert d.n_truncated == 0 and d.n_dropped == 0
    for i, r in enumerate(RECORDS):
        prompt = _ids(tok, build_prompt(r["instruction"], r.get("input", "")))
        target = _ids(tok, r["output"]) + [tok.eos_token_id]
        row, mask = d.tokens[i], d.loss_mask[i]
        n = len(prompt) + len(target) + 1
        assert d.lengths[i] == n == d.full_lengths[i]
        assert row[0] == tok.bos_token_id
        assert row[1: 1 + len(prompt)].tolist() == prompt
        assert row[1 + len(prompt): n].tolist() == target
        # Mask: zero on BOS and prompt, one on response + EOS, zero on padding.
        expected = np.zeros(96, np.float32)
        expected[1 + len(prompt): n] = 1
        np.testing.assert_array_equal(mask, expected)
        assert row[mask > 0].tolist() == target
        assert row[mask > 0][-1] == tok.eos_token_id
        # Padding uses EOS (no pad token) and is masked out.
        assert (row[n:] == tok.eos_token_id).all() and d.pad_id == tok.eos_token_id
        # Prompt ids for generation: BOS + prompt.
        assert d.prompt_ids[i].tolist() == [tok.bos_token_id] + prompt
        assert d.prompt_lengths[i] == len(prompt) + 1
    assert d.references == [r["output"] for r in RECORDS]
    assert d.n_boundary_mismatch == 0


def test_explicit_pad_id(tok):
    d = tokenize_dataset(RECORDS, tok, seq_len=96, pad_id=0)
    assert d.pad_id == 0
    assert (d.tokens[0, d.lengths[0]:] == 0).all()
    assert d.loss_mask[0, d.lengths[0]:].sum() == 0


def test_truncation_counted_and_reported(tok):
    full = tokenize_dataset(RECORDS, tok, seq_len=96).full_lengths
    prompt_len = tokenize_dataset(RECORDS, tok, seq_len=96).prompt_lengths
    # Cut inside the first example's response but keep the others whole.
    seq = int(full[0]) - 2
    assert seq >= int(full[1:].max())
    d = tokenize_dataset(RECORDS, tok, seq_len=seq)
    assert d.n_truncated == 1 and d.truncated.tolist() == [True, False, False]
    assert d.n_dropped == 0
    assert d.lengths[0] == seq
    # The truncated row keeps its first response tokens but loses the EOS.
    assert d.tokens[0, -1] != tok.eos_token_id
    assert d.loss_mask[0, prompt_len[0]:].all()
    assert d.loss_mask[0].sum() == seq - prompt_len[0]
    assert "1 truncated" in d.truncation_report()


def test_prompt_filling_seq_len_is_dropped(tok):
    d0 = tokenize_dataset(RECORDS, tok, seq_len=96)
    seq = int(d0.prompt_lengths[0])  # example 0 (with input): prompt fills everything
    assert seq > int(d0.prompt_lengths[1:].max())  # the others keep target tokens
    d = tokenize_dataset(RECORDS, tok, seq_len=seq)
    assert d.source_index.tolist() == [1, 2]
    assert d.n_dropped == 1 and "1 dropped" in d.truncation_report()
    assert (d.loss_mask.sum(axis=1) > 0).all()
    assert d.references == [RECORDS[j]["output"] for j in d.source_index]
    kept = tokenize_dataset(RECORDS, tok, seq_len=seq, drop_empty=False)
    assert len(kept) == 3 and kept.loss_mask[0].sum() == 0 and kept.n_dropped == 0


def test_accepts_datasets_dataset(tok):
    import datasets

    ds = datasets.Dataset.from_list([{**r, "input": r.get("input", "")} for r in RECORDS])
    a = tokenize_dataset(ds, tok, seq_len=96)
    b = tokenize_dataset(RECORDS, tok, seq_len=96)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_pad_prompts_left_and_right():
    ids = [np.array([1, 5, 6]), np.array([1, 7, 8, 9, 10])]
    left, ln = pad_prompts(ids, 4, pad_id=2)
    assert left.tolist() == [[2, 1, 5, 6], [7, 8, 9, 10]]  # long prompt keeps its end
    assert ln.tolist() == [3, 4]
    right, _ = pad_prompts(ids, 4, pad_id=2, side="right")
    assert right.tolist() == [[1, 5, 6, 2], [7, 8, 9, 10]]
    with pytest.raises(ValueError, match="side"):
        pad_prompts(ids, 4, 2, side="middle")


def test_errors(tok):
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        tokenize_dataset(RECORDS, tok, seq_len=1)
    with pytest.raises(ValueError, match="no examples"):
        tokenize_dataset([], tok, seq_len=16)
    with pytest.raises(ValueError, match="nothing left to train on"):
        tokenize_dataset(RECORDS, tok, seq_len=3)

    class NoEos:
        eos_token_id = None
        bos_token_id = 1
        pad_token_id = None

    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_dataset(RECORDS, NoEos(), seq_len=16)
