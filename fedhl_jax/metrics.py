"""Evaluation metrics and model-agnostic evaluation drivers.

Metrics:

* GSM8K: :func:`extract_gsm8k_answer` takes the number after the last
  ``####``, else after the last "The answer is", else the last number in the
  text; :func:`normalize_number` removes ``$``, thousands separators and a
  trailing period and writes the value canonically (``"5.00" -> "5"``,
  ``"3.50" -> "3.5"``); :func:`gsm8k_exact_match` compares the two.
* ROUGE-L F-measure via the ``rouge_score`` package (:func:`rouge_l`).
* Perplexity ``exp(loss_sum / n_tokens)`` (:func:`perplexity`).

Drivers take callables, so they work with any model:

* :func:`heldout_loss` runs a (jitted) ``loss_sum_fn(tokens, mask) -> (sum,
  count)`` over fixed-size batches (the last one padded with zero-mask rows,
  so shapes never change).
* :func:`generation_eval` runs ``generate_fn(prompts) -> texts`` in batches and
  scores the texts with exact match, ROUGE-L or a custom metric.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Sequence

import numpy as np

__all__ = [
    "METRICS",
    "exact_match",
    "extract_gsm8k_answer",
    "generation_eval",
    "gsm8k_exact_match",
    "heldout_loss",
    "length_bucket_ends",
    "normalize_number",
    "perplexity",
    "rouge_l",
    "rouge_l_scores",
]

# A number: an optional minus (not one joining two words/numbers, as in
# "3-4"), an optional "$", then digits with optional thousands separators and
# decimals, or a bare ".5". Digits glued to a preceding digit or "." are not a
# new number.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?(?<![\d.])(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_ANSWER_IS = re.compile(r"the (?:final )?answer is", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """Writes a numeric string canonically.

    Removes whitespace, ``$``, ``,`` and a trailing ``.``; integral values lose
    their decimals (``"5.00" -> "5"``, ``"72.0" -> "72"``), other decimals lose
    trailing zeros (``"3.50" -> "3.5"``); ``"-0" -> "0"``.

    Args:
        text: E.g. ``"$1,234.00."``.

    Returns:
        The canonical string, or ``None`` when ``text`` is not a number.
    """
    s = re.sub(r"[\s$,]", "", text).rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    out = format(d.normalize(), "f")
    return out


def extract_gsm8k_answer(text: str) -> str | None:
    """Extracts the final numeric answer from a GSM8K solution or model output.

    Order: the first number after the last ``####``; else the first number
    after the last "The answer is" (case-insensitive, "final" optional); else
    the last number anywhere in the text.

    Args:
        text: A reference answer or a generated completion.

    Returns:
        The normalised number (see :func:`normalize_number`), or ``None`` when
        there is no number.
    """
    for marker in (re.compile(re.escape("####")), _ANSWER_IS):
        hits = list(marker.finditer(text))
        if hits:
            m = _NUMBER.search(text, hits[-1].end())
            if m:
                return normalize_number(m.group(0))
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def gsm8k_exact_match(prediction: str, reference: str) -> bool:
    """Whether a completion's extracted answer equals the reference's.

    Args:
        prediction: Model output.
        reference: Reference solution (with ``#### N``) or a bare number.

    Returns:
        ``True`` iff both extractions succeed and are equal.
    """
    ref = extract_gsm8k_answer(reference)
    pred = extract_gsm8k_answer(prediction)
    return ref is not None and pred is not None and pred == ref


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean GSM8K exact match.

    Args:
        predictions: ``N`` model outputs.
        references: ``N`` references.

    Returns:
        Fraction in ``[0, 1]`` (0.0 for empty input).
    """
    _same_length(predictions, references)
    if not predictions:
        return 0.0
    return float(np.mean([gsm8k_exact_match(p, r) for p, r in zip(predictions, references)]))


def _same_length(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} predictions for {len(b)} references")


_SCORER: Any = None


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example ROUGE-L F-measure (``rouge_score``, Porter stemming on).

    Args:
        predictions: ``N`` texts.
        references: ``N`` texts.

    Returns:
        ``N`` scores in ``[0, 1]``.
    """
    global _SCORER
    _same_length(predictions, references)
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(_SCORER.score(r, p)["rougeL"].fmeasure) for p, r in zip(predictions, references)]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure.

    Args:
        predictions: ``N`` texts.
        references: ``N`` texts.

    Returns:
        Mean in ``[0, 1]`` (0.0 for empty input).
    """
    scores = rouge_l_scores(predictions, references)
    return float(np.mean(scores)) if scores else 0.0


def perplexity(loss_sum: float, n_tokens: float) -> float:
    """``exp(loss_sum / n_tokens)``.

    Args:
        loss_sum: Summed token negative log-likelihood (nats).
        n_tokens: Number of target tokens.

    Returns:
        The perplexity (``inf`` on overflow).

    Raises:
        ValueError: ``n_tokens <= 0``.
    """
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs n_tokens > 0, got {n_tokens}")
    mean = float(loss_sum) / float(n_tokens)
    return math.exp(mean) if mean < 700 else math.inf


def length_bucket_ends(loss_mask: np.ndarray) -> np.ndarray:
    """``[N]`` the columns each row of a ``[N, T]`` target mask needs: one past its last target (1 for a
    row without targets), so cutting a causal model's batch there leaves every target's loss as it was."""
    mask = np.asarray(loss_mask) != 0
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # [N] last target column
    return np.where(mask.any(axis=1), last + 1, 1)


def heldout_loss(
    loss_sum_fn: Callable[[Any, Any], tuple[Any, Any]],
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    batch_size: int,
    *,
    length_bucket: int = 0,
) -> dict[str, float]:
    """Mean token loss and perplexity over a held-out set.

    Every call of ``loss_sum_fn`` gets ``batch_size`` rows: the last batch is
    padded with copies of a row whose mask is zero. Without ``length_bucket``
    every call has the same shape, so a jitted function compiles once. With
    ``length_bucket = w``, rows are batched in order of their last target
    position and each batch is cut to its longest row, rounded up to a
    multiple of ``w`` (at most ``T``): for a causal model the cut columns
    change nothing (a position sees only earlier tokens), the forward pass
    shrinks with the padding it skips, and a jitted function compiles at most
    ``ceil(T / w)`` times, once per width, on the first call (the widths
    depend on the fixed held-out set only). Results are fetched once at the
    end, letting device work overlap.

    Args:
        loss_sum_fn: ``(tokens [b, T], mask [b, T]) -> (loss_sum, n_tokens)``,
            both scalars, or both ``[b]`` (per row; typically jitted).
        tokens: ``[N, T]`` token ids.
        loss_mask: ``[N, T]`` target mask.
        batch_size: ``b``.
        length_bucket: ``w`` (0: every batch is ``T`` wide).

    Returns:
        ``{"loss": mean nats per target token, "ppl": exp(loss),
        "n_tokens": target token count}``; with a per-row ``loss_sum_fn`` also
        ``"per_example"``: ``[N]`` float64 mean nats per target token of each
        row (NaN for a row without target tokens).

    Raises:
        ValueError: Shape mismatch, empty input, ``batch_size < 1``,
            ``length_bucket < 0`` or no target token at all.
    """
    tokens = np.asarray(tokens)
    loss_mask = np.asarray(loss_mask)
    if tokens.ndim != 2 or tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens and loss_mask must be [N, T]; got {tokens.shape}, {loss_mask.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if length_bucket < 0:
        raise ValueError(f"length_bucket must be >= 0 (0: no cut), got {length_bucket}")
    n, t = tokens.shape
    if n == 0:
        raise ValueError("no held-out examples")
    if length_bucket:
        ends = length_bucket_ends(loss_mask)  # [N] columns each row needs
        order = np.argsort(ends, kind="stable")
    else:
        order = np.arange(n)
    outs = []
    for start in range(0, n, batch_size):
        rows = order[start: start + batch_size]
        width = min(t, -(-int(ends[rows].max()) // length_bucket) * length_bucket) if length_bucket else t
        tb, mb = tokens[rows, :width], loss_mask[rows, :width]
        short = batch_size - tb.shape[0]
        if short:
            tb = np.concatenate([tb, np.repeat(tokens[order[:1], :width], short, axis=0)])
            mb = np.concatenate([mb, np.zeros((short, width), dtype=mb.dtype)])
        outs.append(loss_sum_fn(tb, mb))
    sums = [np.asarray(s, dtype=np.float64) for s, _ in outs]  # each [] or [b]
    counts = [np.asarray(c, dtype=np.float64) for _, c in outs]
    total, count = float(np.sum(sums)), float(np.sum(counts))
    if count <= 0:
        raise ValueError("loss_mask selects no target tokens")
    out = {"loss": total / count, "ppl": perplexity(total, count), "n_tokens": count}
    if sums[0].ndim == 1:  # per row: drop the padding rows of the last batch, undo the length order
        s, c = np.empty(n), np.empty(n)
        s[order], c[order] = np.concatenate(sums)[:n], np.concatenate(counts)[:n]
        with np.errstate(invalid="ignore", divide="ignore"):
            out["per_example"] = np.where(c > 0, s / np.maximum(c, 1), np.nan)
    return out


#: Generation metrics by name: ``(name shown in tables, per-example score(prediction, reference))``.
METRICS: dict[str, tuple[str, Callable[[str, str], float]]] = {
    "exact_match": ("exact match", lambda p, r: float(gsm8k_exact_match(p, r))),
    "rouge_l": ("ROUGE-L", lambda p, r: rouge_l_scores([p], [r])[0]),
}


def generation_eval(
    generate_fn: Callable[[Any], Sequence[str]],
    prompts: Sequence[Any] | np.ndarray,
    references: Sequence[str],
    metric: str | Callable[[str, str], float] = "exact_match",
    *,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Generates completions and scores them against references.

    Args:
        generate_fn: Maps a batch of prompts (a list slice, or an array slice
            ``[b, ...]`` when ``prompts`` is an array) to ``b`` texts.
        prompts: ``N`` prompts (strings, id arrays, or one ``[N, P]`` array).
        references: ``N`` reference texts.
        metric: ``"exact_match"`` (GSM8K answer match), ``"rouge_l"``, or
            ``f(prediction, reference) -> float``.
        batch_size: Prompts per ``generate_fn`` call; ``None`` for one call.
            The last batch is padded with copies of its last prompt (outputs
            for the padding are discarded) so shapes stay fixed.

    Returns:
        ``{"score": mean metric, "n": N, "scores": per-example list,
        "predictions": N texts}``.

    Raises:
        ValueError: Unknown metric, length mismatch, or ``generate_fn``
            returning the wrong number of texts.
    """
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)} or a callable")
        metric_fn = METRICS[metric][1]
    else:
        metric_fn = metric
    n = len(prompts)
    _same_length(prompts, references)
    is_array = isinstance(prompts, np.ndarray)
    bs = n if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    predictions: list[str] = []
    for start in range(0, n, bs):
        chunk = prompts[start: start + bs]
        real = len(chunk)
        if batch_size is not None and real < bs:
            if is_array:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - real, axis=0)])
            else:
                chunk = list(chunk) + [chunk[-1]] * (bs - real)
        out = list(generate_fn(chunk))
        if len(out) != len(chunk):
            raise ValueError(f"generate_fn returned {len(out)} texts for {len(chunk)} prompts")
        predictions.extend(out[:real])
    if metric == "rouge_l":
        scores = rouge_l_scores(predictions, list(references))
    else:
        scores = [float(metric_fn(p, r)) for p, r in zip(predictions, references)]
    return {
        "score": float(np.mean(scores)) if scores else 0.0,
        "n": n,
        "scores": scores,
        "predictions": predictions,
    }
