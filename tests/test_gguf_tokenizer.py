"""Byte-level BPE tokenizer and chat template from GGUF metadata (no ../shared needed)."""

from __future__ import annotations

import pytest

from fedhl_jax.model import load_tokenizer
from fedhl_jax.model import gguf as G
from fedhl_jax.model import gguf_tokenizer as GT
from tests.gguf_helpers import CHAT_TEMPLATE, tiny_vocab, write_tiny_gguf

TOKENS, _ = tiny_vocab()
ID = {t: i for i, t in enumerate(TOKENS)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_tok")
    out = {}
    for name, kwargs in {"smollm": {}, "gpt2": {"pre": "gpt2"}, "bos": {"add_bos": True}}.items():
        out[name] = root / f"{name}.gguf"
        write_tiny_gguf(out[name], **kwargs)
    return out


@pytest.fixture(scope="module")
def tok(files):
    return load_tokenizer(files["smollm"])


def test_bpe_merges_and_digit_split(tok, files):
    text = "hello the world 12"
    # smollm splits every digit off before the byte-level regex, so the "1 2" merge never applies
    assert tok(text)["input_ids"] == [ID["hello"], ID["Ġthe"], ID["Ġworld"], ID["Ġ"], ID["1"],
                                      ID["2"]]
    gpt2 = load_tokenizer(files["gpt2"])
    assert gpt2(text)["input_ids"] == [ID["hello"], ID["Ġthe"], ID["Ġworld"], ID["Ġ"], ID["12"]]
    for t in (tok, gpt2):
        assert t.decode(t(text)["input_ids"]) == text


def test_special_tokens(tok, files):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 2, 0)
    assert tok.eos_token == "<|im_end|>"
    ids = tok("<|im_start|>user\nhi<think><|im_end|>")["input_ids"]
    assert ids == [ID["<|im_start|>"], ID["u"], ID["s"], ID["e"], ID["r"], ID["Ċ"], ID["h"],
                   ID["i"], ID["<think>"], ID["<|im_end|>"]]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi<think>"
    assert tok("é")["input_ids"] == [ID["Ã"], ID["©"]]  # UTF-8 bytes 0xC3 0xA9
    assert tok.decode(tok("héllo ü")["input_ids"]) == "héllo ü"
    with_bos = load_tokenizer(files["bos"])
    assert with_bos("hello")["input_ids"] == [0, ID["hello"]]
    assert tok("hello")["input_ids"] == [ID["hello"]]


def test_batch_call_and_padding(tok):
    batch = tok(["hello", "hello the world"], padding=True)
    assert batch["input_ids"][0] in ([ID["hello"], 0, 0], [0, 0, ID["hello"]])  # pad id 0
    assert sum(batch["attention_mask"][0]) == 1


def test_chat_template(tok):
    messages = [{"role": "user", "content": "hello"}]
    want = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template == CHAT_TEMPLATE
    assert GT.apply_chat_template(tok, messages) == want
    assert GT.apply_chat_template(tok, messages, add_generation_prompt=False) == want[:-len(
        "<|im_start|>assistant\n")]
    ids = GT.apply_chat_template(tok, messages, tokenize=True)
    assert ids[0] == ID["<|im_start|>"] and ids[-1] == ID["Ċ"] and ID["<|im_end|>"] in ids
    # transformers' own implementation renders the same template
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want


def test_chat_template_is_sandboxed():
    from jinja2.exceptions import SecurityError, TemplateError

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(GT.ChatTemplateError, match="refused by the sandbox.*__class__") as e:
        GT.render_chat_template(evil, [])
    assert isinstance(e.value.__cause__, SecurityError) and isinstance(e.value, ValueError)
    mutate = "{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}"
    with pytest.raises(GT.ChatTemplateError, match="refused by the sandbox") as e:
        GT.render_chat_template(mutate, [{"role": "user", "content": "a"}])
    assert isinstance(e.value.__cause__, SecurityError)
    with pytest.raises(GT.ChatTemplateError, match="TemplateError: no system") as e:
        GT.render_chat_template("{{ raise_exception('no system') }}", [])
    assert isinstance(e.value.__cause__, TemplateError)


def test_unsupported_tokenizers(files):
    meta = G.read_metadata(G.open_gguf(files["smollm"]))
    with pytest.raises(ValueError, match="'llama'"):
        GT.build_backend({**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery'"):
        GT.build_backend({**meta, "tokenizer.ggml.pre": "mystery"})
    no_tok = {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}
    with pytest.raises(ValueError, match="no tokenizer"):
        GT.build_backend(no_tok)
    tok = GT.tokenizer_from_gguf_metadata({k: v for k, v in meta.items()
                                           if k != "tokenizer.chat_template"})
    with pytest.raises(ValueError, match="no chat template"):
        GT.apply_chat_template(tok, [{"role": "user", "content": "x"}])
