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
import re
import threading
import time

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

# Llama-3's split (llama.cpp pre-tokenizer "llama-bpe"/"llama3").
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's split (llama.cpp pre-tokenizer "qwen2", also Qwen2.5 and Qwen3): Llama-3's, one digit at a time.
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2_split():
    """GPT-2's regex split, then the byte-to-unicode mapping."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split():
    """Every digit on its own, then GPT-2's split (llama.cpp's ``"\\p{N}"`` + GPT-2 regex)."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=True)])


def _regex_then_bytes(split: str):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=False)])


def _llama3_split():
    return _regex_then_bytes(LLAMA3_SPLIT)


def _qwen2_split():
    return _regex_then_bytes(QWEN2_SPLIT)


# tokenizer.ggml.pre -> pre-tokenizer factory.
PRE_TOKENIZERS = {
    "default": _gpt2_split, "gpt2": _gpt2_split, "gpt-2": _gpt2_split, "mpt": _gpt2_split,
    "olmo": _gpt2_split,
    "smollm": _digits_then_gpt2_split, "starcoder": _digits_then_gpt2_split,
    "refact": _digits_then_gpt2_split, "command-r": _digits_then_gpt2_split,
    "codeshell": _digits_then_gpt2_split,
    "llama-bpe": _llama3_split, "llama3": _llama3_split, "llama-v3": _llama3_split,
    "smaug-bpe": _llama3_split, "qwen2": _qwen2_split,
}


def _token(meta: dict, key: str) -> str | None:
    """The text of the special token whose id is ``tokenizer.ggml.<key>`` (or ``None``)."""
    i = meta.get(f"tokenizer.ggml.{key}")
    tokens = meta.get("tokenizer.ggml.tokens") or []
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
      ValueError: no tokenizer in the metadata, an unsupported
        ``tokenizer.ggml.model``/``tokenizer.ggml.pre`` (naming it), tokens
        that are not unique strings, or merges that are not pairs of tokens
        of the vocabulary (naming the entry).
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
    if not all(isinstance(t, str) for t in tokens):
        raise ValueError("tokenizer.ggml.tokens holds values that are not strings")
    merges = list(meta.get("tokenizer.ggml.merges", []))
    for i, m in enumerate(merges):
        if not isinstance(m, str) or len(m.split(" ")) != 2:
            raise ValueError(f"tokenizer.ggml.merges[{i}]={m!r} is not two tokens separated by a space")
    merges = [tuple(m.split(" ")) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokenizer.ggml.tokens holds duplicate tokens")
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # the Rust library's error type is not public
        raise ValueError(f"tokenizer.ggml.tokens and .merges do not form a BPE vocabulary: "
                         f"{' '.join(str(e).split())}") from None
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
    """The tokenizer of a GGUF file (or of the one in a folder): a ``PreTrainedTokenizerFast``.

    Raises:
      FileNotFoundError: no GGUF file at ``path``.
      GGUFError: an unreadable file or a tokenizer the metadata cannot build (naming the file).
    """
    from fedhl_jax.model.gguf import GGUFError, find_gguf, open_gguf, read_metadata

    file = find_gguf(path)
    if file is None:
        raise FileNotFoundError(f"no GGUF file at {os.fspath(path)}")
    try:
        tok = tokenizer_from_gguf_metadata(read_metadata(open_gguf(file)))
    except GGUFError:
        raise
    except ValueError as e:
        raise GGUFError(f"{file}: {e}") from e
    tok.name_or_path = file  # names the file in chat-template errors
    return tok


# --------------------------------------------------------------------------- chat template
# Bounds on one rendering of an untrusted chat template. A real template takes a few hundred steps
# and writes a few kilobytes per conversation.
MAX_TEMPLATE_STEPS = 1_000_000  # loop items + calls
MAX_TEMPLATE_CHARS = 1 << 22  # any string the template builds, and its whole output
MAX_TEMPLATE_SECONDS = 5.0
_STEP_CHECK = 1024  # the clock is read every this many steps
# In a format string: a printf width of 7 or more digits or from an argument (``'%99999999s'``,
# ``'%*s'``), or a replacement field with such a width (``'{:>99999999}'``).
_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\d{7,}|\*)|\{[^{}]*:[^{}]*?\d{7,}[^{}]*\}")


class ChatTemplateError(ValueError):
    """A chat template is refused: unsafe, broken, or over its time or size bounds.

    The message is one line naming the template's source and, where known, its line.
    """


class _Budget:
    """Steps and a deadline for one rendering."""

    def __init__(self):
        self.steps, self.deadline = 0, time.monotonic() + MAX_TEMPLATE_SECONDS

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_TEMPLATE_STEPS:
            raise ChatTemplateError(f"takes more than {MAX_TEMPLATE_STEPS} loop iterations and calls")
        if self.steps % _STEP_CHECK < n and time.monotonic() > self.deadline:
            raise ChatTemplateError(f"runs longer than {MAX_TEMPLATE_SECONDS:g} s")


_budget = threading.local()


def _current() -> _Budget:
    b = getattr(_budget, "value", None)
    if b is None:  # rendered outside render_chat_template: a fresh budget
        b = _budget.value = _Budget()
    return b


def _sized(value):
    """``value``, refused when it is a string or sequence longer than :data:`MAX_TEMPLATE_CHARS`."""
    if isinstance(value, (str, list, tuple)) and len(value) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"builds a value of {len(value)} items (the bound is {MAX_TEMPLATE_CHARS})")
    return value


def _check_format(fmt) -> None:
    """Refuses a format string with a huge width (:data:`_WIDE_FORMAT`)."""
    if isinstance(fmt, str) and (m := _WIDE_FORMAT.search(fmt)):
        raise ChatTemplateError(f"uses a format width beyond the bound: {m.group()!r}")


def _check_args(args, kwargs, obj=None) -> None:
    """Refuses arguments that would make a huge string: large ints (widths, counts), and a wide
    format in the string whose ``format``/``format_map`` method ``obj`` is (``'{:>99999999}'.format``)."""
    method = getattr(obj, "__wrapped__", obj)
    if getattr(method, "__name__", None) in ("format", "format_map"):
        _check_format(getattr(method, "__self__", None))
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_TEMPLATE_CHARS:
            raise ChatTemplateError(f"passes {a} to a call (the bound is {MAX_TEMPLATE_CHARS})")


def _guard_filter(fn):
    """A filter with the same bounds as a call (its arguments checked, its result's size)."""
    @functools.wraps(fn)  # keeps the pass_context/pass_environment marks
    def guarded(*args, **kwargs):
        _current().step()
        _check_args(args, kwargs)
        if fn.__name__ == "do_format" and args:  # ``fmt | format(...)``
            _check_format(args[0])
        return _sized(fn(*args, **kwargs))
    return guarded


def _binop_size(op: str, left, right) -> int:
    """The size of ``left op right`` when it is a string or sequence (or the digits of a power), else 0."""
    seq = (str, list, tuple)
    if op == "*":
        for a, n in ((left, right), (right, left)):
            if isinstance(a, seq) and isinstance(n, int):
                return len(a) * max(n, 0)
    if op == "+" and isinstance(left, seq) and isinstance(right, seq):
        return len(left) + len(right)
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        return int(right * max(abs(left), 1).bit_length() * 0.302) + 1  # decimal digits
    if op == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
        return MAX_TEMPLATE_CHARS + 1  # a printf width beyond the bound
    return 0


def _environment():
    """A sandbox (immutable builtins) that also bounds steps, time and sizes.

    Every ``for`` loop's iterable is wrapped so each item counts as a step; every
    call and filter counts as a step, has its integer and format-width arguments
    bounded and its result's size checked; ``*``, ``+``, ``**`` and ``%`` are
    refused before computing a result beyond :data:`MAX_TEMPLATE_CHARS`, and
    ``~`` concatenations are checked in the same way.
    """
    from jinja2 import DictLoader, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**", "%"])

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None,
                                       lineno=loop.lineno)
            for concat in list(tree.find_all(nodes.Concat)):
                concat.nodes = [nodes.Call(nodes.EnvironmentAttribute("bounded_concat"),
                                           list(concat.nodes), [], None, None, lineno=concat.lineno)]
            return tree

        def bounded_iter(self, iterable):
            budget = _current()
            for item in iterable:
                budget.step()
                yield item

        def bounded_concat(self, *parts):
            texts = [str(p) for p in parts]
            if sum(map(len, texts)) > MAX_TEMPLATE_CHARS:
                raise ChatTemplateError(f"builds a string of {sum(map(len, texts))} characters "
                                        f"(the bound is {MAX_TEMPLATE_CHARS})")
            return "".join(texts)

        def call_binop(self, context, operator, left, right):
            _current().step()
            if _binop_size(operator, left, right) > MAX_TEMPLATE_CHARS:
                raise ChatTemplateError(f"builds a value beyond the bound ({MAX_TEMPLATE_CHARS}) with "
                                        f"'{operator}'")
            return _sized(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            _current().step()
            _check_args(args, kwargs, __obj)
            return _sized(super().call(__context, __obj, *args, **kwargs))

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, loader=DictLoader({}))  # no file is loadable
    env.filters = {name: _guard_filter(fn) for name, fn in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    return env


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _template_line(tb) -> int | None:
    """The template line of the innermost template frame of a traceback (jinja maps them)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _refusal(e: BaseException, source: str | None) -> ChatTemplateError:
    """One line: the template's source, its line, what went wrong."""
    from jinja2.exceptions import SecurityError, TemplateNotFound, TemplateSyntaxError

    line = e.lineno if isinstance(e, TemplateSyntaxError) else _template_line(e.__traceback__)
    if isinstance(e, SecurityError):
        what = f"refused by the sandbox: {e}"
    elif isinstance(e, TemplateNotFound):
        what = f"refused: it includes or imports {e.name!r}, and templates may load no other file"
    elif isinstance(e, RecursionError):
        what = "refused: it recurses too deeply"
    elif isinstance(e, ChatTemplateError):
        what = f"refused: it {e}"
    else:
        what = f"failed: {type(e).__name__}: {e}"
    where = f"the chat template of {source}" if source else "the chat template"
    return ChatTemplateError(" ".join(f"{where}{f' (line {line})' if line else ''} {what}".split()))


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                         source: str | None = None, **kwargs) -> str:
    """Renders a Jinja chat template in a bounded sandbox, as ``transformers`` does.

    The template runs in a ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with
    ``trim_blocks``/``lstrip_blocks`` and a ``raise_exception`` helper, so an
    untrusted template from a model file can only format strings; it may load
    no other template or file, and one rendering is bounded to
    :data:`MAX_TEMPLATE_STEPS` loop iterations and calls,
    :data:`MAX_TEMPLATE_SECONDS` and :data:`MAX_TEMPLATE_CHARS` characters of
    output (and of any string it builds).

    Args:
      template: the Jinja source (``tokenizer.chat_template``).
      messages: ``[{"role": ..., "content": ...}, ...]``.
      add_generation_prompt: end with the header of an assistant turn.
      source: where the template comes from (a model file or folder), for messages.
      **kwargs: further template variables (e.g. ``bos_token``).

    Returns:
      The prompt text.

    Raises:
      ChatTemplateError: a syntax error, a sandbox refusal (unsafe attribute,
        include/import), an error the template raises, or a bound exceeded; one
        line naming ``source`` and the template line where known.
    """
    _budget.value = _Budget()
    try:
        chunks, size = [], 0
        for chunk in _compiled_template(template).generate(
                messages=messages, add_generation_prompt=add_generation_prompt, **kwargs):
            size += len(chunk)
            if size > MAX_TEMPLATE_CHARS:
                raise ChatTemplateError(f"writes more than {MAX_TEMPLATE_CHARS} characters")
            chunks.append(chunk)
        return "".join(chunks)
    except Exception as e:  # an untrusted template: anything it raises is a refusal of the template
        raise _refusal(e, source) from e
    finally:
        _budget.value = None


@functools.lru_cache(maxsize=8)
def _compiled_template(template: str):
    """The template compiled once in the bounded sandbox (formatting a dataset renders it per example)."""
    return _environment().from_string(template)


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
                                source=getattr(tokenizer, "name_or_path", None) or None,
                                **template_variables(tokenizer))
    if not tokenize:
        return text
    return tokenizer(text, add_special_tokens=False)["input_ids"]
