"""Per-example labels used to build non-IID partitions.

The label kinds of a dataset are its spec's ``label_kinds`` (:mod:`fedhl_jax.data.registry`); the
shipped datasets' kinds (``fedhl_jax/data/catalog.py``; the first is the default) are these functions:

``dolly``
    ``category``: Dolly's own ``category`` field when every row has one (the
    Hub release). When it is missing, as in the 151-row local subset, the
    ``derived`` label is used instead (a warning is logged).

    ``derived``: ``"with_context"`` when the example has a non-empty
    context/input; otherwise a bucket of the instruction's first word
    (lower-cased, punctuation stripped): ``"what"``;
    ``"who/when/where/which"`` for who, whom, whose, when, where, which;
    ``"how/why"`` for how, why; ``"other"`` for anything else (imperatives
    such as "Give", "List", "Classify", yes/no questions, ...).

    ``context``: ``"with_context"`` or ``"no_context"``.

``codealpaca``
    ``language``: the programming language, from fixed rules applied in
    order:

    1. Language names in the instruction (case-insensitive word matches,
       e.g. ``python``, ``javascript``/``node.js``/``typescript``/``react``,
       ``java``, ``c++``/``cpp``, ``c#``, ``C`` as in "a C program",
       ``sql``/``mysql``/``postgresql``, ``html``/``css``, ``bash``/``shell``).
       When several are named, the *last* mention wins (so "Translate this
       C++ code into Java" is ``java``).
    2. Otherwise, code signatures in the output, then in the input: each
       language has a few regular expressions (e.g. python: ``def f(...):``,
       ``import x``, ``print(``; c++: ``#include <iostream>``, ``std::``,
       ``cout <<``; java: ``public static``, ``System.out.print``; sql:
       upper-case ``SELECT ... FROM``, ``INSERT INTO``; html-css: HTML tags or
       ``selector { prop: value; }``; shell: ``#!/bin/bash``, ``echo``). The
       language with the most matching expressions wins; ties go to the
       earlier language in :data:`CODE_LANGUAGES`.
    3. Otherwise ``"other"``.

    Languages outside :data:`CODE_LANGUAGES` (PHP, Ruby, Go, Rust, ...) are
    ``"other"``.

``gsm8k``
    ``steps``: number of non-empty solution lines before ``####``, bucketed
    as ``"steps<=2"``, ``"steps=3"``, ``"steps=4"``, ``"steps=5"``,
    ``"steps>=6"``.

    ``answer_size``: digits in the integer part of the final answer:
    ``"digits=1"``, ``"digits=2"``, ``"digits=3"``, ``"digits>=4"``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import numpy as np

from fedhl_jax.data.registry import DataError, dataset_spec

__all__ = [
    "CODE_LANGUAGES",
    "code_language",
    "code_language_labels",
    "dataset_labels",
    "dolly_category_labels",
    "dolly_context_labels",
    "dolly_derived_label",
    "dolly_derived_labels",
    "gsm8k_answer_size",
    "gsm8k_answer_size_labels",
    "gsm8k_num_steps",
    "gsm8k_steps_label",
    "gsm8k_steps_labels",
    "label_counts",
]

log = logging.getLogger(__name__)

#: Code labels, in tie-break order.
CODE_LANGUAGES = (
    "python", "javascript", "java", "c++", "c", "c#", "sql", "html-css", "shell", "other",
)

_I = re.IGNORECASE
_M = re.MULTILINE

# Step 1: language names mentioned in the instruction.
_MENTIONS: dict[str, re.Pattern[str]] = {
    "python": re.compile(r"\bpython[23]?\b|\bpandas\b|\bnumpy\b|\bdjango\b|\bflask\b", _I),
    "javascript": re.compile(
        r"\bjavascript\b|\bjs\b|\bnode\.?js\b|\btypescript\b|\breact(?:\.js)?\b|\bjquery\b", _I
    ),
    "java": re.compile(r"\bjava\b(?!\s*script)", _I),
    "c++": re.compile(r"\bc\+\+|\bcpp\b", _I),
    "c#": re.compile(r"\bc#|\bc\s+sharp\b", _I),
    # Bare "C" is ambiguous (variables named c), so require a case-sensitive
    # "C" followed by a programming noun, or "in C" / "ANSI C".
    "c": re.compile(
        r"(?<![-\w])C\s+(?:program|programs|code|function|functions|language|snippet|implementation|"
        r"compiler|library|struct)\b|\b(?:in|ANSI)\s+C\b(?![+#\w])"
    ),
    "sql": re.compile(r"\b(?:my|postgre|t-|pl/)?sql\b|\bsqlite\b|\bpostgres\b", _I),
    "html-css": re.compile(r"\bhtml5?\b|\bcss3?\b", _I),
    "shell": re.compile(r"\bbash\b|\bshell\b|\bzsh\b|\bunix command|\blinux command", _I),
    # Languages folded into "other" (named so that they are not mistaken for
    # a listed language by their signatures, e.g. PHP's `echo $x`).
    "php": re.compile(r"\bphp\b", _I),
    "ruby": re.compile(r"\bruby\b|\brails\b", _I),
    "go": re.compile(
        r"\bgolang\b|\bGo\s+(?:program|code|function|language|snippet|script|routine)\b|\bin Go\b"
    ),
    "rust": re.compile(r"\brust\b", _I),
    "swift": re.compile(r"\bswift\b", _I),
    "kotlin": re.compile(r"\bkotlin\b", _I),
    "perl": re.compile(r"\bperl\b", _I),
    "r": re.compile(r"\bR\s+(?:program|code|function|language|script)\b|\bin R\b"),
    "objective-c": re.compile(r"\bobjective-?c\b", _I),
}

# Step 2: code signatures in the output / input.
_SIGNATURES: dict[str, tuple[re.Pattern[str], ...]] = {
    "python": (
        re.compile(r"^\s*def \w+\(.*\)\s*(?:->.*)?:\s*$", _M),
        re.compile(r"^\s*(?:import \w+|from [\w.]+ import )", _M),
        re.compile(r"\bprint\("),
        re.compile(r"^\s*(?:for \w+ in .+|while .+|if .+|elif .+|else|class \w+.*):\s*$", _M),
        re.compile(r"\bself\.|\bNone\b|\bTrue\b|\bFalse\b"),
    ),
    "javascript": (
        re.compile(r"console\.log\("),
        re.compile(r"\bfunction\s*\w*\s*\("),
        re.compile(r"\b(?:const|let)\s+\w+\s*="),
        re.compile(r"=>"),
        re.compile(r"\bdocument\.|\brequire\(|module\.exports|\bwindow\."),
    ),
    "java": (
        re.compile(r"\bpublic\s+(?:static\s+)?(?:class|void|int|String|boolean|double)\b"),
        re.compile(r"System\.out\.print"),
        re.compile(r"\bString\[\]|\bimport java\.|\bnew \w+<"),
    ),
    "c++": (
        re.compile(r"#include\s*<(?:iostream|vector|string|map|algorithm|unordered_map|bits/)"),
        re.compile(r"\bstd::|using namespace std"),
        re.compile(r"\bcout\s*<<|\bcin\s*>>"),
    ),
    "c": (
        re.compile(r"#include\s*<(?:stdio|stdlib|string|math|stdbool)\.h>"),
        re.compile(r"\bprintf\s*\(|\bscanf\s*\(|\bmalloc\s*\("),
    ),
    "c#": (
        re.compile(r"Console\.Write(?:Line)?\("),
        re.compile(r"^\s*using System", _M),
        re.compile(r"\bstatic void Main\("),
    ),
    "sql": (
        re.compile(r"\bSELECT\b[\s\S]*?\bFROM\b"),
        re.compile(r"\bINSERT INTO\b|\bCREATE TABLE\b|\bDELETE FROM\b|\bUPDATE\s+\w+\s+SET\b"),
    ),
    "html-css": (
        re.compile(
            r"<(?:!DOCTYPE|html|head|body|div|p|span|a|ul|ol|li|table|tr|td|form|input|button|"
            r"h[1-6]|style|script|img)\b", _I,
        ),
        re.compile(r"^\s*[.#]?[\w-]+(?:[\s,>:.#\w-]*)\{[^{}]*?[\w-]+\s*:\s*[^{};]+;[^{}]*\}", _M),
    ),
    "shell": (
        re.compile(r"^#!\s*/(?:usr/)?bin/(?:env\s+)?(?:ba|z)?sh", _M),
        re.compile(r"^\s*echo\s", _M),
        re.compile(r"\$\(|\bgrep\b|\bchmod\b|\bsudo\b|\bls\s+-|\bawk\b|\bsed\s+-"),
    ),
    "php": (re.compile(r"<\?php"), re.compile(r"^\s*\$\w+\s*=.*;\s*$", _M)),
    "ruby": (re.compile(r"^\s*puts\s", _M), re.compile(r"\bdo\s*\|\w+(?:,\s*\w+)*\|")),
    "go": (re.compile(r"^package \w+", _M), re.compile(r"\bfmt\.Print"), re.compile(r"^func\s", _M)),
    "rust": (re.compile(r"\bfn\s+\w+\s*\("), re.compile(r"\blet\s+mut\b|println!\(")),
}

#: Every language the rules can tell apart; those not in CODE_LANGUAGES are
#: reported as "other". This order breaks ties.
_ALL_LANGUAGES = CODE_LANGUAGES[:-1] + tuple(l for l in _MENTIONS if l not in CODE_LANGUAGES)


def code_language(instruction: str, input: str = "", output: str = "") -> str:  # noqa: A002
    """Detects the programming language of a CodeAlpaca example.

    Args:
        instruction: The instruction text.
        input: The input/context text.
        output: The reference output.

    Returns:
        One of :data:`CODE_LANGUAGES` (see the module docstring for the rules).
    """
    mentions: dict[str, int] = {}  # language -> position of its last mention
    for lang, pat in _MENTIONS.items():
        for m in pat.finditer(instruction):
            mentions[lang] = max(mentions.get(lang, -1), m.start())

    def scores(text: str, langs: Sequence[str]) -> dict[str, int]:
        return {
            lang: sum(1 for p in _SIGNATURES.get(lang, ()) if p.search(text)) for lang in langs
        }

    if len(mentions) == 1:
        found = next(iter(mentions))
    elif mentions:
        # Several named: the one whose signatures best match the output (then
        # the input); ties go to the last mention.
        found = max(mentions, key=lambda l: mentions[l])
        for text in (output, input):
            sc = scores(text, list(mentions)) if text else {}
            top = max(sc.values(), default=0)
            if top > 0:
                found = max((l for l in mentions if sc[l] == top), key=lambda l: mentions[l])
                break
    else:
        found = "other"
        for text in (output, input):
            if not text:
                continue
            sc = scores(text, _ALL_LANGUAGES)
            top = max(sc.values())
            if top > 0:
                found = next(l for l in _ALL_LANGUAGES if sc[l] == top)
                break
    return found if found in CODE_LANGUAGES else "other"


def gsm8k_num_steps(answer: str) -> int:
    """Counts the non-empty solution lines before ``####`` in a GSM8K answer.

    Args:
        answer: The GSM8K ``answer`` text.

    Returns:
        The number of reasoning lines.
    """
    body = answer.split("####")[0]
    return sum(1 for line in body.splitlines() if line.strip())


def gsm8k_steps_label(answer: str) -> str:
    """Buckets :func:`gsm8k_num_steps` into ``steps<=2 | steps=3 | steps=4 | steps=5 | steps>=6``."""
    k = gsm8k_num_steps(answer)
    if k <= 2:
        return "steps<=2"
    if k >= 6:
        return "steps>=6"
    return f"steps={k}"


def gsm8k_answer_size(answer: str) -> str:
    """Buckets the final answer's integer digits: ``digits=1|2|3`` or ``digits>=4``.

    Args:
        answer: The GSM8K ``answer`` text (final value after ``####``).

    Returns:
        The bucket label (``"digits=1"`` when no number is found).
    """
    tail = answer.split("####")[-1].replace(",", "")
    m = re.search(r"\d+", tail)
    d = len(m.group(0).lstrip("0") or "0") if m else 1
    return f"digits={d}" if d < 4 else "digits>=4"


_WH = {"who", "whom", "whose", "when", "where", "which"}


def dolly_derived_label(instruction: str, context: str = "") -> str:
    """Derived Dolly label for rows without ``category`` (see module docstring).

    Args:
        instruction: The instruction text.
        context: The context (``input``) text.

    Returns:
        ``"with_context"``, ``"what"``, ``"who/when/where/which"``,
        ``"how/why"`` or ``"other"``.
    """
    if context and context.strip():
        return "with_context"
    words = instruction.strip().split()
    first = re.sub(r"[^\w]", "", words[0].lower()) if words else ""
    if first == "what":
        return "what"
    if first in _WH:
        return "who/when/where/which"
    if first in ("how", "why"):
        return "how/why"
    return "other"


def _col(records: Any, name: str) -> list[str]:
    if hasattr(records, "column_names"):
        if name not in records.column_names or len(records) == 0:
            return [""] * len(records)
        return [x or "" for x in records[:][name]]
    return [r.get(name, "") or "" for r in records]


def _has_col(records: Any, name: str) -> bool:
    if hasattr(records, "column_names"):
        return name in records.column_names
    return len(records) > 0 and all(r.get(name) for r in records)


def dolly_category_labels(records: Any) -> list[str]:
    if _has_col(records, "category"):
        return _col(records, "category")
    log.warning("dolly: no 'category' field; using the derived label (context / first word)")
    return dolly_derived_labels(records)


def dolly_derived_labels(records: Any) -> list[str]:
    return [dolly_derived_label(i, c) for i, c in zip(_col(records, "instruction"), _col(records, "input"))]


def dolly_context_labels(records: Any) -> list[str]:
    return ["with_context" if c.strip() else "no_context" for c in _col(records, "input")]


def code_language_labels(records: Any) -> list[str]:
    return [
        code_language(i, x, o)
        for i, x, o in zip(_col(records, "instruction"), _col(records, "input"), _col(records, "output"))
    ]


def gsm8k_steps_labels(records: Any) -> list[str]:
    return [gsm8k_steps_label(a) for a in _col(records, "output")]


def gsm8k_answer_size_labels(records: Any) -> list[str]:
    return [gsm8k_answer_size(a) for a in _col(records, "output")]


def dataset_labels(dataset: str, records: Any, kind: str | None = None) -> np.ndarray:
    """Computes one label per example with one of the dataset's label kinds.

    Args:
        dataset: A registered dataset name (``fedhl_jax.data.registry``).
        records: Normalised records (a ``datasets.Dataset`` or list of dicts
            with ``instruction``/``input``/``output`` [/``category``]).
        kind: One of the spec's ``label_kinds``; ``None`` for its default (the
            first). A dataset without label kinds labels every row ``"all"``.

    Returns:
        ``[N]`` array of label strings (dtype ``object``).

    Raises:
        DataError: Unknown dataset or label kind.
    """
    kinds = dataset_spec(dataset).label_kinds
    if not kinds and kind is None:
        return np.full(len(records), "all", dtype=object)
    if kind is None:
        kind = next(iter(kinds))
    if kind not in kinds:
        raise DataError(
            f"unknown label kind {kind!r} for dataset {dataset!r}; expected one of {list(kinds)}"
        )
    return np.asarray(kinds[kind](records), dtype=object)


def label_counts(labels: Sequence[str]) -> dict[str, int]:
    """Counts labels, most frequent first (ties by name)."""
    vals, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    order = sorted(range(len(vals)), key=lambda i: (-counts[i], vals[i]))
    return {str(vals[i]): int(counts[i]) for i in order}
