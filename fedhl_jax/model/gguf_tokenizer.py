"""Tokenizers and chat templates from GGUF metadata (no torch, no llama.cpp).

A GGUF file stores its tokenizer as metadata under llama.cpp's key names:
``tokenizer.ggml.model`` (``"gpt2"`` = byte-level BPE), ``.pre`` (which
pre-tokenizer split the merges were learned with), ``.tokens``, ``.merges``,
``.token_type`` (3 = control, 4 = user-defined), the special token ids and
``.add_bos_token``/``.add_eos_token``; the chat template is
``tokenizer.chat_template``. :func:`tokenizer_from_gguf_metadata` rebuilds it
with the ``tokenizers`` library and wraps it in a
``transformers.PreTrainedTokenizerFast``, so ``tok(text)["input_ids"]``,
``tok.decode`` and ``tok.apply_chat_template`` work as for a Hugging Face
tokenizer.

Only byte-level BPE vocabularies are supported (the ``"gpt2"`` model, used by
SmolLM, Llama-3, Qwen and most recent models); the pre-tokenizer split is
chosen by ``tokenizer.ggml.pre`` from :data:`PRE_TOKENIZERS`, which mirrors
llama.cpp's table for the names it lists.
"""

from __future__ import annotations

import functools
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

# Llama-3's split (llama.cpp pre-tokenizer "llama-bpe"/"llama3").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_split():
    """GPT-2's regex split, then the byte-to-unicode mapping."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split():
    """Every digit on its own, then GPT-2's split (llama.cpp's ``"\\p{N}"`` + GPT-2 regex)."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=True)])


def _llama3_split():
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=False)])


# tokenizer.ggml.pre -> pre-tokenizer factory.
PRE_TOKENIZERS = {
    "default": _gpt2_split, "gpt2": _gpt2_split, "gpt-2": _gpt2_split, "mpt": _gpt2_split,
    "olmo": _gpt2_split,
    "smollm": _digits_then_gpt2_split, "starcoder": _digits_then_gpt2_split,
    "refact": _digits_then_gpt2_split, "command-r": _digits_then_gpt2_split,
    "codeshell": _digits_then_gpt2_split,
    "llama-bpe": _llama3_split, "llama3": _llama3_split, "llama-v3": _llama3_split,
    "smaug-bpe": _llama3_split,
}


def _token(meta: dict, key: str) -> str | None:
    """The text of the special token whose id is ``tokenizer.ggml.<key>`` (or ``None``)."""
    i = meta.get(f"tokenizer.ggml.{key}")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def build_backend(meta: dict) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` a GGUF file's metadata describes.

    Args:
      meta: GGUF metadata (``fedhl_jax.model.gguf.read_metadata``).

    Returns:
      A byte-level BPE ``Tokenizer`` with the control tokens as special added
      tokens, user-defined tokens as added tokens, and BOS/EOS added as the
      ``add_bos_token``/``add_eos_token`` flags say.

    Raises:
      ValueError: no tokenizer in the metadata, or an unsupported
        ``tokenizer.ggml.model``/``tokenizer.ggml.pre`` (naming it).
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError("the GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}: only byte-level BPE "
                         f"('gpt2') is supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}: supported are "
                         f"{sorted(PRE_TOKENIZERS)}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokenizer.ggml.tokens holds duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()

    types = list(meta.get("tokenizer.ggml.token_type") or [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    bos, eos = _token(meta, "bos_token_id"), _token(meta, "eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head = f"{bos}:0 " if add_bos else ""
        tail = f" {eos}:0" if add_eos else ""
        special = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{head}$A:0{tail}", pair=f"{head}$A:0{tail} {head}$B:1{tail}",
            special_tokens=list(dict(special).items()))
    return tok


def tokenizer_from_gguf_metadata(meta: dict):
    """A ``transformers.PreTrainedTokenizerFast`` built from GGUF metadata.

    The special tokens (BOS, EOS, UNK, PAD) come from the ``tokenizer.ggml.*_id``
    keys and the chat template from ``tokenizer.chat_template``, so
    ``tok.apply_chat_template`` renders it.

    Args:
      meta: GGUF metadata (``fedhl_jax.model.gguf.read_metadata``).

    Returns:
      The tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    specials = {name: _token(meta, key) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    tok = PreTrainedTokenizerFast(tokenizer_object=build_backend(meta),
                                  clean_up_tokenization_spaces=False,
                                  **{k: v for k, v in specials.items() if v is not None})
    template = meta.get("tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer of a GGUF file (or of the one in a folder): a ``PreTrainedTokenizerFast``."""
    from fedhl_jax.model.gguf import find_gguf, open_gguf, read_metadata

    file = find_gguf(path)
    if file is None:
        raise FileNotFoundError(f"no GGUF file at {os.fspath(path)}")
    return tokenizer_from_gguf_metadata(read_metadata(open_gguf(file)))


# --------------------------------------------------------------------------- chat template
def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def render_chat_template(template: str, messages: list[dict], *,
                         add_generation_prompt: bool = False, **kwargs) -> str:
    """Renders a Jinja chat template in a sandbox, as ``transformers`` does.

    The template runs in ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with
    ``trim_blocks``/``lstrip_blocks`` and a ``raise_exception`` helper, so an
    untrusted template from a model file can only format strings.

    Args:
      template: the Jinja source (``tokenizer.chat_template``).
      messages: ``[{"role": ..., "content": ...}, ...]``.
      add_generation_prompt: end with the header of an assistant turn.
      **kwargs: further template variables (e.g. ``bos_token``).

    Returns:
      The prompt text.
    """
    return _compiled_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               **kwargs)


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """The template compiled once in the sandbox (formatting a dataset renders it per example)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def template_variables(tokenizer) -> dict[str, str]:
    """The special tokens a chat template may use (``bos_token``, ``eos_token``, ``pad_token``,
    ``unk_token``), those the tokenizer has."""
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {k: v for k, v in specials.items() if v is not None}


def apply_chat_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
                        tokenize: bool = False):
    """Formats a conversation with the tokenizer's own chat template.

    Args:
      tokenizer: a tokenizer with ``chat_template`` set (e.g. from
        :func:`load_gguf_tokenizer`).
      messages: ``[{"role": "user", "content": ...}, ...]``.
      add_generation_prompt: end with the header of an assistant turn.
      tokenize: return token ids instead of text (special tokens in the
        template are matched whole; no BOS/EOS is added besides the template's).

    Returns:
      The prompt text, or its ``list[int]`` token ids.

    Raises:
      ValueError: the tokenizer has no chat template.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template")
    text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                **template_variables(tokenizer))
    if not tokenize:
        return text
    return tokenizer(text, add_special_tokens=False)["input_ids"]
