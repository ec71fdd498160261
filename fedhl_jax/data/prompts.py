"""Prompt formats (Alpaca, or the model's own chat template) and one-shot tokenisation into
fixed-shape NumPy arrays.

With the ``alpaca`` format each example ``(instruction, input, output)`` becomes the token
sequence::

    [BOS] + ids(prompt + output) + [EOS]

where ``prompt`` is the Alpaca template (with or without the ``### Input:``
section) ending in ``"### Response:\\n"``. With the ``chat`` format the example is a two-turn
conversation rendered by the tokenizer's chat template (user turn = instruction, then the input
after a blank line; assistant turn = output)::

    ids(template([user, assistant]))  cut after the assistant turn's end-of-turn token

and ``prompt`` is ``template([user])`` with the assistant header (``add_generation_prompt``); the
template supplies its own BOS and end-of-turn tokens, so none are added, and the targets are the
response tokens and the end-of-turn (EOS) token that closes the assistant turn.
``resolve_prompt_format("auto", tokenizer)`` picks ``chat`` when the tokenizer has a chat
template (an instruction-tuned model) and ``alpaca`` otherwise (a base model). The prompt and the full text are
tokenised in two batched calls; the prompt/response boundary is the length of
the common prefix of the two id lists (normally the whole prompt), so the
target tokens are exactly the ones that follow the prompt in the full
sequence. ``loss_mask[i, t] = 1`` marks *target* tokens (the response tokens
and the final EOS): a causal LM's loss uses the logits at position ``t - 1`` to
predict ``tokens[i, t]`` wherever ``loss_mask[i, t] = 1``.

Sequences longer than ``seq_len`` are cut on the right (the response, then its
EOS, is lost first); they are counted in ``TokenizedDataset.n_truncated``.
Examples whose prompt alone fills ``seq_len`` keep no target token and are
dropped (counted in ``n_dropped``); ``source_index`` maps the kept rows back to
the input rows.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "PROMPT_FORMATS",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "TokenizedDataset",
    "build_prompt",
    "chat_messages",
    "format_examples",
    "resolve_prompt_format",
    "pad_prompts",
    "tokenize_dataset",
]

log = logging.getLogger(__name__)

#: Alpaca template for examples with a non-empty input.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

#: Alpaca template for examples without an input.
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def build_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - field name
    """Formats the Alpaca prompt.

    Args:
        instruction: The task.
        input: Optional context; the ``### Input:`` section is included only
            when it is non-empty after stripping whitespace.

    Returns:
        The prompt text, ending in ``"### Response:\\n"``.
    """
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


#: Values of ``data.prompt_format``.
PROMPT_FORMATS = ("auto", "alpaca", "chat")


def resolve_prompt_format(prompt_format: str, tokenizer: Any) -> str:
    """``alpaca`` or ``chat`` for a tokenizer.

    Args:
        prompt_format: ``auto`` (``chat`` when the tokenizer has a chat template, else
            ``alpaca``), ``alpaca`` or ``chat``.
        tokenizer: The model's tokenizer.

    Returns:
        ``"alpaca"`` or ``"chat"``.

    Raises:
        ValueError: An unknown format, or ``chat`` for a tokenizer without a chat template.
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"data.prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "alpaca"
    if prompt_format == "chat" and not has_template:
        raise ValueError("data.prompt_format=chat, but the model's tokenizer has no chat template; "
                         "use data.prompt_format=alpaca (or auto)")
    return prompt_format


def chat_messages(instruction: str, input: str = "", output: str | None = None) -> list[dict]:  # noqa: A002
    """The conversation of one example: the user turn (instruction, then the input after a blank
    line when there is one) and, when ``output`` is given, the assistant turn."""
    user = f"{instruction}\n\n{input}" if input and input.strip() else instruction
    messages = [{"role": "user", "content": user}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    return messages


def format_examples(instructions: Sequence[str], inputs: Sequence[str], outputs: Sequence[str],
                    tokenizer: Any, prompt_format: str) -> tuple[list[str], list[str]]:
    """Prompt texts and full texts (prompt + response) of the examples in one format.

    Args:
        instructions, inputs, outputs: The examples' fields.
        tokenizer: The model's tokenizer (its chat template for ``chat``).
        prompt_format: ``alpaca`` or ``chat`` (see :func:`resolve_prompt_format`).

    Returns:
        ``(prompts, fulls)``: lists of strings; with ``chat`` a full text ends with the template's
        text after the assistant turn (cut later at the end-of-turn token).
    """
    if prompt_format == "alpaca":
        prompts = [build_prompt(i, x) for i, x in zip(instructions, inputs)]
        return prompts, [p + o for p, o in zip(prompts, outputs)]
    if prompt_format != "chat":
        raise ValueError(f"prompt_format must be 'alpaca' or 'chat', got {prompt_format!r}")
    from fedhl_jax.model.gguf_tokenizer import render_chat_template, template_variables

    specials = template_variables(tokenizer)
    template, source = tokenizer.chat_template, getattr(tokenizer, "name_or_path", None) or None
    prompts = [render_chat_template(template, chat_messages(i, x), add_generation_prompt=True, source=source,
                                    **specials) for i, x in zip(instructions, inputs)]
    fulls = [render_chat_template(template, chat_messages(i, x, o), add_generation_prompt=False, source=source,
                                  **specials) for i, x, o in zip(instructions, inputs, outputs)]
    return prompts, fulls


@dataclasses.dataclass
class TokenizedDataset:
    """Fixed-shape token arrays for one dataset (``N`` kept examples).

    Attributes:
        tokens: ``[N, seq_len]`` int32, ``BOS prompt response EOS`` then
            ``pad_id``.
        loss_mask: ``[N, seq_len]`` float32; 1 on target tokens (response and
            final EOS), 0 on BOS, prompt and padding.
        lengths: ``[N]`` int32 number of real (non-pad) tokens after truncation.
        full_lengths: ``[N]`` int32 length before truncation.
        prompt_ids: ``N`` int32 arrays ``[BOS] + prompt`` (not truncated), for
            generation-based evaluation.
        prompt_lengths: ``[N]`` int32 lengths of ``prompt_ids``.
        references: ``N`` reference responses (the untokenised ``output``).
        source_index: ``[N]`` int64 row of each kept example in the input.
        truncated: ``[N]`` bool, True where the sequence was cut.
        n_truncated: Number of kept examples that were cut.
        n_dropped: Number of input examples dropped (no target token left).
        n_boundary_mismatch: Examples where the prompt's ids are not a prefix
            of the full text's ids (tokens merged across the boundary); their
            target starts at the common prefix.
        seq_len: Sequence length ``T``.
        pad_id: Padding id (``tokenizer.pad_token_id``, else EOS).
        bos_id: BOS id (``None`` when not added).
        eos_id: EOS id.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    full_lengths: np.ndarray
    prompt_ids: list[np.ndarray]
    prompt_lengths: np.ndarray
    references: list[str]
    source_index: np.ndarray
    truncated: np.ndarray
    n_truncated: int
    n_dropped: int
    n_boundary_mismatch: int
    seq_len: int
    pad_id: int
    bos_id: int | None
    eos_id: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def truncation_report(self) -> str:
        """Returns a one-line summary of truncation and dropped examples."""
        n_in = len(self) + self.n_dropped
        over = self.n_truncated + self.n_dropped
        return (
            f"seq_len={self.seq_len}: {n_in} examples, {over} longer than seq_len "
            f"({100.0 * over / max(n_in, 1):.1f}%): {self.n_truncated} truncated "
            f"(response cut, kept), {self.n_dropped} dropped (prompt fills seq_len); "
            f"{len(self)} kept; max full length "
            f"{int(self.full_lengths.max()) if len(self) else 0}"
        )


def _columns(records: Any) -> tuple[list[str], list[str], list[str]]:
    """Gets instruction/input/output lists from a Dataset or a list of dicts."""
    if hasattr(records, "column_names"):  # datasets.Dataset
        cols = records[:] if len(records) else {c: [] for c in records.column_names}
        inputs = cols["input"] if "input" in cols else [""] * len(records)
        return list(cols["instruction"]), [x or "" for x in inputs], list(cols["output"])
    rows: Sequence[Mapping[str, str]] = records
    return (
        [r["instruction"] for r in rows],
        [r.get("input", "") or "" for r in rows],
        [r["output"] for r in rows],
    )


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def tokenize_dataset(
    records: Any,
    tokenizer: Any,
    seq_len: int,
    *,
    pad_id: int | None = None,
    add_bos: bool = True,
    drop_empty: bool = True,
    prompt_format: str = "alpaca",
    warn: bool = True,
) -> TokenizedDataset:
    """Tokenises all examples once into fixed-shape arrays.

    Args:
        records: A ``datasets.Dataset`` or a sequence of mappings with
            ``instruction``, ``input`` (optional) and ``output``.
        tokenizer: A Hugging Face tokenizer with ``eos_token_id`` (and
            ``bos_token_id`` when ``add_bos``).
        seq_len: Sequence length ``T`` of the output arrays.
        pad_id: Padding id; default ``tokenizer.pad_token_id`` or, when the
            tokenizer has none, its EOS id. Padding is always masked out.
        add_bos: Prepend the BOS id (``alpaca`` only: a chat template writes its own).
        drop_empty: Drop examples left with no target token after truncation
            (otherwise they are kept with an all-zero ``loss_mask`` row).
        prompt_format: ``alpaca``, ``chat`` or ``auto`` (see :func:`resolve_prompt_format`).
        warn: log a warning when examples were truncated or dropped (callers that report
            ``truncation_report()`` themselves pass False).

    Returns:
        A :class:`TokenizedDataset`; a warning is logged when examples were
        truncated or dropped.

    Raises:
        ValueError: ``seq_len < 2``, a tokenizer without EOS (or BOS when
            ``add_bos``), no examples, or no example left after dropping.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token_id")
    prompt_format = resolve_prompt_format(prompt_format, tokenizer)
    chat = prompt_format == "chat"
    add_bos = add_bos and not chat
    bos_id = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos_id is None:
        raise ValueError("tokenizer has no bos_token_id (pass add_bos=False)")
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    instructions, inputs, outputs = _columns(records)
    n = len(instructions)
    if n == 0:
        raise ValueError("no examples to tokenize")
    prompts, fulls = format_examples(instructions, inputs, outputs, tokenizer, prompt_format)
    # verbose=False: lengths above the tokenizer's model_max_length are
    # expected here (we truncate ourselves) and need no warning.
    p_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    f_ids = tokenizer(fulls, add_special_tokens=False, verbose=False)["input_ids"]

    head = [bos_id] if add_bos else []
    tokens = np.full((n, seq_len), pad_id, dtype=np.int32)
    loss_mask = np.zeros((n, seq_len), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int32)
    full_lengths = np.zeros(n, dtype=np.int32)
    prompt_ids: list[np.ndarray] = []
    n_mismatch = 0
    for i in range(n):
        p, f = p_ids[i], f_ids[i]
        k = len(p)
        if f[:k] != p:
            n_mismatch += 1
            k = _common_prefix(p, f)
        if chat:  # the assistant turn ends at its end-of-turn token; the template's tail is dropped
            ends = [j for j in range(k, len(f)) if f[j] == eos_id]
            seq = f[: ends[0] + 1] if ends else f + [eos_id]
        else:
            seq = head + f + [eos_id]
        start = len(head) + k  # first target position
        full_lengths[i] = len(seq)
        m = min(len(seq), seq_len)
        tokens[i, :m] = seq[:m]
        loss_mask[i, start:m] = 1.0
        lengths[i] = m
        prompt_ids.append(np.asarray(head + p, dtype=np.int32))

    truncated = full_lengths > seq_len
    keep = loss_mask.sum(axis=1) > 0 if drop_empty else np.ones(n, dtype=bool)
    n_dropped = int(n - keep.sum())
    if not keep.any():
        raise ValueError(
            f"all {n} examples have prompts of >= {seq_len} tokens; nothing left to train on"
        )
    idx = np.nonzero(keep)[0]
    out = TokenizedDataset(
        tokens=tokens[idx],
        loss_mask=loss_mask[idx],
        lengths=lengths[idx],
        full_lengths=full_lengths[idx],
        prompt_ids=[prompt_ids[j] for j in idx],
        prompt_lengths=np.asarray([len(prompt_ids[j]) for j in idx], dtype=np.int32),
        references=[outputs[j] for j in idx],
        source_index=idx.astype(np.int64),
        truncated=truncated[idx],
        n_truncated=int(truncated[idx].sum()),
        n_dropped=n_dropped,
        n_boundary_mismatch=n_mismatch,
        seq_len=seq_len,
        pad_id=int(pad_id),
        bos_id=None if bos_id is None else int(bos_id),
        eos_id=int(eos_id),
    )
    if warn and (out.n_truncated or out.n_dropped):
        log.warning("truncation: %s", out.truncation_report())
    return out


def pad_prompts(
    prompt_ids: Sequence[np.ndarray],
    max_len: int,
    pad_id: int,
    *,
    side: str = "left",
) -> tuple[np.ndarray, np.ndarray]:
    """Packs variable-length prompts into one array for batched generation.

    Prompts longer than ``max_len`` keep their *last* ``max_len`` tokens so the
    ``### Response:`` cue survives.

    Args:
        prompt_ids: ``N`` int arrays.
        max_len: Width ``P`` of the output.
        pad_id: Padding id.
        side: ``"left"`` (real tokens end at column ``P - 1``) or ``"right"``.

    Returns:
        ``(tokens [N, P] int32, lengths [N] int32)``.

    Raises:
        ValueError: Unknown ``side`` or ``max_len < 1``.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = np.full((len(prompt_ids), max_len), pad_id, dtype=np.int32)
    lengths = np.zeros(len(prompt_ids), dtype=np.int32)
    for i, ids in enumerate(prompt_ids):
        ids = np.asarray(ids)[-max_len:]
        lengths[i] = len(ids)
        if side == "left":
            out[i, max_len - len(ids):] = ids
        else:
            out[i, : len(ids)] = ids
    return out, lengths
