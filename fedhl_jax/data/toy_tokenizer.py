"""A tiny offline word-level tokenizer for tests and smoke runs.

Builds a :class:`transformers.PreTrainedTokenizerFast` from a list of texts
with no download: ids 0-2 are ``<unk>``, ``<s>`` (BOS) and ``</s>`` (EOS), the
rest are the whitespace/punctuation-separated words of the texts. It has no
pad token, like the Llama tokenizers it stands in for.
"""

from __future__ import annotations

from typing import Any, Iterable

__all__ = ["word_level_tokenizer"]


def word_level_tokenizer(texts: Iterable[str], *, extra_words: Iterable[str] = ()) -> Any:
    """Builds a word-level tokenizer over ``texts``.

    Args:
        texts: Texts whose words form the vocabulary (unknown words map to
            ``<unk>``).
        extra_words: Additional words to include.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``bos_token="<s>"``
        (id 1), ``eos_token="</s>"`` (id 2), ``unk_token="<unk>"`` (id 0) and
        no pad token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for text in [*texts, " ".join(extra_words)]:
        for word, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
