"""Loading instruction-tuning datasets into a common (instruction, input, output) form.

Three datasets are supported, each from a local JSON Lines / JSON file or from
the Hugging Face Hub. Both routes go through :func:`datasets.load_dataset`; a
:class:`DataConfig` picks the route:

=============  ==========================  ===================================
name           local schema                Hub default (id, config)
=============  ==========================  ===================================
``gsm8k``      question, answer            ``openai/gsm8k``, ``main``
``codealpaca`` instruction, input, output  ``sahil2801/CodeAlpaca-20k``
``dolly``      instruction, context,       ``databricks/databricks-dolly-15k``
               response [, category]
=============  ==========================  ===================================

Every dataset is normalised to the columns ``instruction``, ``input`` and
``output`` (GSM8K: ``question -> instruction``, ``answer -> output``,
``input = ""``; Dolly: ``context -> input``, ``response -> output``). A Dolly
``category`` column is kept when the source has one.

Local files are validated line by line *before* they are handed to
``datasets`` so that problems are reported with the file name, line number and
field name instead of an Arrow stack trace.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import datasets

from fedhl_jax.errors import ConfigError

__all__ = [
    "DATASET_NAMES",
    "DATA_DIR_ENV",
    "DataConfig",
    "DataError",
    "HUB_DEFAULTS",
    "LOCAL_FILES",
    "SCHEMAS",
    "default_data_dir",
    "load_instruction_dataset",
    "resolve_data_dir",
    "validate_json_file",
]

#: Environment variable that overrides the default data directory.
DATA_DIR_ENV = "FEDHL_DATA_DIR"

#: Supported dataset names.
DATASET_NAMES = ("gsm8k", "codealpaca", "dolly")


@dataclasses.dataclass(frozen=True)
class _Schema:
    """Source field names of one dataset and how they map to the common form."""

    instruction: str
    output: str
    input: str | None  # None: the dataset has no input field (input = "")
    optional: tuple[str, ...] = ()  # fields kept when present (e.g. category)

    @property
    def required(self) -> tuple[str, ...]:
        return (self.instruction, self.output)

    @property
    def optional_text(self) -> tuple[str, ...]:
        """Optional text fields; missing or null values become ``""``."""
        return ((self.input,) if self.input else ()) + self.optional


#: Field names of each dataset in its source form.
SCHEMAS: dict[str, _Schema] = {
    "gsm8k": _Schema(instruction="question", output="answer", input=None),
    "codealpaca": _Schema(instruction="instruction", output="output", input="input"),
    "dolly": _Schema(
        instruction="instruction", output="response", input="context", optional=("category",)
    ),
}

#: Default files (relative to the data directory) for ``source="local"``,
#: keyed by dataset name and then by ``DataConfig.split``.
LOCAL_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "gsm8k": {"train": ("gsm8k/train.jsonl",), "test": ("gsm8k/test.jsonl",)},
    "codealpaca": {
        "train": ("codealpaca/code_alpaca_2k.jsonl",),
        "new": ("codealpaca/new_codealpaca.jsonl",),
        "all": ("codealpaca/code_alpaca_2k.jsonl", "codealpaca/new_codealpaca.jsonl"),
    },
    "dolly": {"train": ("dolly/dolly_subset_151.jsonl",)},
}

#: Default Hub ``(dataset id, config name)`` for ``source="hub"``.
HUB_DEFAULTS: dict[str, tuple[str, str | None]] = {
    "gsm8k": ("openai/gsm8k", "main"),
    "codealpaca": ("sahil2801/CodeAlpaca-20k", None),
    "dolly": ("databricks/databricks-dolly-15k", None),
}


class DataError(ConfigError):
    """Raised for bad data or a bad data configuration (with a precise message)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset to load and from where.

    Attributes:
        name: One of ``"gsm8k"``, ``"codealpaca"``, ``"dolly"``.
        source: ``"local"`` (JSON Lines / JSON files) or ``"hub"`` (a Hugging
            Face Hub dataset id; needs network access).
        split: For ``source="local"`` without ``path``: a key of
            ``LOCAL_FILES[name]`` (e.g. ``"train"``, ``"test"``). For
            ``source="hub"``: the split name passed to ``load_dataset``.
        path: Local file, or tuple of files, to load instead of the default
            file of ``split``. Relative paths are resolved against the data
            directory; absolute paths are used as they are.
        data_dir: Data directory. ``None`` uses ``$FEDHL_DATA_DIR`` or else
            ``<repo>/../shared/data`` (see :func:`resolve_data_dir`).
        hub_id: Hub dataset id; ``None`` uses ``HUB_DEFAULTS[name]``.
        hub_config: Hub config name; ``None`` uses the default of ``name``
            (``"main"`` for GSM8K) when ``hub_id`` is also ``None``.
        max_examples: Keep only the first ``max_examples`` rows (after
            validation); ``None`` keeps all.
        cache_dir: Optional ``datasets`` cache directory.
    """

    name: str
    source: str = "local"
    split: str = "train"
    path: str | tuple[str, ...] | None = None
    data_dir: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    max_examples: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            raise DataError(
                f"unknown dataset name {self.name!r}; expected one of {list(DATASET_NAMES)}"
            )
        if self.source not in ("local", "hub"):
            raise DataError(f"unknown data source {self.source!r}; expected 'local' or 'hub'")
        if self.max_examples is not None and self.max_examples < 1:
            raise DataError(f"max_examples must be >= 1, got {self.max_examples}")
        if self.source == "local" and self.path is None and self.split not in LOCAL_FILES[self.name]:
            raise DataError(
                f"unknown local split {self.split!r} for dataset {self.name!r}; expected one of "
                f"{sorted(LOCAL_FILES[self.name])} or an explicit path"
            )


def default_data_dir() -> Path:
    """Returns ``<repo>/../shared/data`` where ``<repo>`` holds this package."""
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Resolves the data directory.

    Order: the ``data_dir`` argument, then ``$FEDHL_DATA_DIR``, then
    ``<repo>/../shared/data``.

    Args:
        data_dir: Explicit directory, or ``None``.

    Returns:
        The directory as an absolute :class:`~pathlib.Path`.

    Raises:
        DataError: If the chosen directory does not exist.
    """
    if data_dir is not None:
        chosen, origin = Path(data_dir), "data_dir argument"
    elif os.environ.get(DATA_DIR_ENV):
        chosen, origin = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}"
    else:
        chosen, origin = default_data_dir(), "default <repo>/../shared/data"
    chosen = chosen.expanduser().resolve()
    if not chosen.is_dir():
        raise DataError(
            f"data directory {str(chosen)!r} (from {origin}) does not exist; pass data_dir=... "
            f"or set ${DATA_DIR_ENV}"
        )
    return chosen


def _check_row(
    row: Any, where: str, required: Sequence[str], optional: Sequence[str]
) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in required:
        if field not in row:
            raise DataError(f"{where}: missing required field {field!r} (fields present: {sorted(row)})")
        if not isinstance(row[field], str):
            raise DataError(
                f"{where}: field {field!r} must be a string, got {type(row[field]).__name__}"
            )
    for field in optional:
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            raise DataError(
                f"{where}: field {field!r} must be a string or null, got {type(value).__name__}"
            )


def validate_json_file(
    path: str | os.PathLike[str],
    required: Sequence[str],
    optional: Sequence[str] = (),
) -> int:
    """Checks a JSON Lines (or JSON array) file before it is loaded.

    ``.json`` files holding a top-level array are read as an array of rows;
    anything else is read as JSON Lines (one object per line, blank lines
    ignored).

    Args:
        path: The file.
        required: Fields every row must have, with string values.
        optional: Fields that, when present and not null, must be strings.

    Returns:
        The number of rows.

    Raises:
        DataError: Missing file, malformed JSON (file and line number), a row
            that is not an object, a missing or non-string field (field name,
            file and line/row), or a file with no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {str(p)!r}")
    text = p.read_text(encoding="utf-8")
    n_rows = 0
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {e.lineno}: malformed JSON ({e.msg})") from None
        for i, row in enumerate(rows):
            _check_row(row, f"{p}: row {i}", required, optional)
        n_rows = len(rows)
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {lineno}: malformed JSON ({e.msg})") from None
            _check_row(row, f"{p}: line {lineno}", required, optional)
            n_rows += 1
    if n_rows == 0:
        raise DataError(f"{p}: empty dataset (no rows)")
    return n_rows


def _local_files(config: DataConfig) -> list[Path]:
    if config.path is None:
        rel: Sequence[str] = LOCAL_FILES[config.name][config.split]
    elif isinstance(config.path, (str, os.PathLike)):
        rel = (config.path,)
    else:
        rel = tuple(config.path)
    files = []
    need_dir = any(not Path(r).is_absolute() for r in rel)
    base = resolve_data_dir(config.data_dir) if need_dir else None
    for r in rel:
        p = Path(r)
        files.append(p if p.is_absolute() else base / p)  # type: ignore[operator]
    return files


def _normalise(columns: dict[str, list[Any]], schema: _Schema, origin: str) -> datasets.Dataset:
    n = len(columns[schema.instruction])
    for field in schema.required:
        values = columns[field]
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise DataError(
                    f"{origin}: row {i}: field {field!r} must be a string, got {type(v).__name__}"
                )
    out: dict[str, list[str]] = {
        "instruction": list(columns[schema.instruction]),
        "input": (
            [v or "" for v in columns[schema.input]]
            if schema.input and schema.input in columns
            else [""] * n
        ),
        "output": list(columns[schema.output]),
    }
    for field in schema.optional:
        if field in columns and all(isinstance(v, str) and v for v in columns[field]):
            out[field] = list(columns[field])
    return datasets.Dataset.from_dict(out)


def load_instruction_dataset(config: DataConfig) -> datasets.Dataset:
    """Loads one dataset and normalises it to instruction/input/output.

    Args:
        config: What to load and from where.

    Returns:
        A :class:`datasets.Dataset` with string columns ``instruction``,
        ``input`` (``""`` when absent) and ``output``, plus ``category`` when
        the source has a non-empty category for every row (Dolly from the Hub).

    Raises:
        DataError: Missing data directory or file, malformed JSON, missing or
            mistyped fields, or an empty dataset (see
            :func:`validate_json_file`); for Hub data, missing columns.
    """
    schema = SCHEMAS[config.name]
    if config.source == "local":
        files = _local_files(config)
        for f in files:
            validate_json_file(f, schema.required, schema.optional_text)
        raw = datasets.load_dataset(
            "json",
            data_files=[str(f) for f in files],
            split="train",
            cache_dir=config.cache_dir,
        )
        origin = ", ".join(str(f) for f in files)
    else:
        hub_id, hub_config = config.hub_id, config.hub_config
        if hub_id is None:
            hub_id, default_cfg = HUB_DEFAULTS[config.name]
            hub_config = hub_config if hub_config is not None else default_cfg
        raw = datasets.load_dataset(
            hub_id, hub_config, split=config.split, cache_dir=config.cache_dir
        )
        origin = f"hub dataset {hub_id!r} ({hub_config or 'default'}, split {config.split!r})"
        missing = [f for f in schema.required if f not in raw.column_names]
        if missing:
            raise DataError(
                f"{origin}: missing required field(s) {missing} (columns: {raw.column_names})"
            )
        if len(raw) == 0:
            raise DataError(f"{origin}: empty dataset (no rows)")
    if config.max_examples is not None and config.max_examples < len(raw):
        raw = raw.select(range(config.max_examples))
    wanted = [c for c in (*schema.required, *schema.optional_text) if c in raw.column_names]
    columns = {c: list(raw[c]) for c in wanted}
    return _normalise(columns, schema, origin)
