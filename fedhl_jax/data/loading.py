"""Loading instruction-tuning datasets into a common (instruction, input, output) form.

Every registered dataset (:mod:`fedhl_jax.data.registry`; the shipped ones are
listed in :mod:`fedhl_jax.data.catalog`) loads from local JSON Lines / JSON files
or from the Hugging Face Hub. Both routes go through :func:`datasets.load_dataset`;
a :class:`DataSource` picks the route. Every dataset is normalised to the columns
``instruction``, ``input`` and ``output`` by its spec's field names (GSM8K:
``question -> instruction``, ``answer -> output``, ``input = ""``; Dolly:
``context -> input``, ``response -> output``); optional fields such as Dolly's
``category`` are kept when the source has them.

Local files are validated line by line *before* they are handed to
``datasets`` so that problems are reported with the file name, line number and
field name instead of an Arrow stack trace.

Where local files come from (:func:`resolve_data_files`): an explicit
``data_dir``, else ``$FEDHL_DATA_DIR``, else the copy embedded in the package
(datasets whose spec says ``embedded``: GSM8K), else ``<repo>/../shared/data``. A directory or file that is
missing is an error naming it and the ways to fix it; the Hub is used only when
``source="hub"`` is asked for, never as a fallback.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import datasets

from fedhl_jax.data.registry import DataError, DatasetSpec, dataset_spec

__all__ = [
    "DATA_DIR_ENV",
    "DataSource",
    "DataError",
    "DataFiles",
    "default_data_dir",
    "load_instruction_dataset",
    "resolve_data_dir",
    "resolve_data_files",
    "validate_json_file",
]

#: Environment variable that overrides the default data directory.
DATA_DIR_ENV = "FEDHL_DATA_DIR"

@dataclasses.dataclass(frozen=True)
class DataSource:
    """Which dataset to load and from where (the loader's view; a run's data settings are
    :class:`fedhl_jax.data.DataConfig`).

    Attributes:
        name: A registered dataset name (``"gsm8k"``, ``"codealpaca"``, ``"dolly"``, ...).
        source: ``"local"`` (JSON Lines / JSON files; ``"auto"`` is the same)
            or ``"hub"`` (a Hugging Face Hub dataset id; needs network access).
        split: For ``source="local"`` without ``path``: a key of
            the spec's ``local_files`` (e.g. ``"train"``, ``"test"``). For
            ``source="hub"``: the split name passed to ``load_dataset``.
        path: Local file, or tuple of files, to load instead of the default
            file of ``split``. Relative paths are resolved against the data
            directory; absolute paths are used as they are.
        data_dir: Data directory. ``None`` uses ``$FEDHL_DATA_DIR``, else the
            embedded copy (GSM8K), else ``<repo>/../shared/data`` (see
            :func:`resolve_data_files`; relative ``path`` values are resolved
            with :func:`resolve_data_dir`).
        hub_id: Hub dataset id; ``None`` uses the spec's ``hub_id``.
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
        spec = dataset_spec(self.name)  # raises for an unknown name
        if self.source not in ("local", "hub", "auto"):
            raise DataError(f"unknown data source {self.source!r}; expected 'local' or 'hub'")
        if self.max_examples is not None and self.max_examples < 1:
            raise DataError(f"max_examples must be >= 1, got {self.max_examples}")
        if self.source != "hub" and self.path is None and self.split not in spec.local_files:
            raise DataError(
                f"unknown local split {self.split!r} for dataset {self.name!r}; expected one of "
                f"{sorted(spec.local_files)} or an explicit path"
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
        raise DataError(f"data directory {str(chosen)!r} (from {origin}) does not exist; {_DATA_FIX}")
    return chosen


_DATA_FIX = (f"set data.data_dir (or ${DATA_DIR_ENV}) to a folder holding the dataset's files, "
             "or use data.source=hub to download it (needs network)")


@dataclasses.dataclass(frozen=True)
class DataFiles:
    """Where one split of a dataset comes from (see :func:`resolve_data_files`).

    Attributes:
        dataset: Dataset name.
        split: Split name (a key of the spec's ``local_files``, or the Hub split).
        source: ``"local"`` or ``"hub"``.
        files: Absolute local files (empty for the Hub).
        origin: ``"path"`` (an explicit file), ``"data_dir"``, ``"$FEDHL_DATA_DIR"``,
            ``"embedded"`` (the package's copy), ``"shared"`` (``<repo>/../shared/data``)
            or ``"hub"``.
        hub_id: Hub dataset id (``source="hub"``).
        hub_config: Hub config name (``source="hub"``).
    """

    dataset: str
    split: str
    source: str
    files: tuple[Path, ...] = ()
    origin: str = "path"
    hub_id: str | None = None
    hub_config: str | None = None

    @property
    def description(self) -> str:
        """One line for the run log, e.g. ``gsm8k/train from the embedded copy (.../train.jsonl)``."""
        what = f"{self.dataset}/{self.split}"
        if self.source == "hub":
            return f"{what} from Hugging Face Hub dataset {self.hub_id} ({self.hub_config or 'default'})"
        where = {"path": "the file", "data_dir": "data.data_dir", "embedded": "the embedded copy",
                 "shared": "../shared/data"}.get(self.origin, self.origin)
        return f"{what} from {where} ({', '.join(str(f) for f in self.files)})"

    def data_config(self, **kwargs: Any) -> DataSource:
        """A :class:`DataSource` that loads exactly these files (or this Hub dataset).

        ``kwargs`` go to :class:`DataSource` (e.g. ``max_examples``, ``cache_dir``).
        """
        if self.source == "hub":
            return DataSource(self.dataset, source="hub", split=self.split, hub_id=self.hub_id,
                              hub_config=self.hub_config, **kwargs)
        return DataSource(self.dataset, source="local", split=self.split,
                          path=tuple(str(f) for f in self.files), **kwargs)


def _dir_from(data_dir: str | os.PathLike[str] | None) -> tuple[Path, str] | None:
    """The explicitly chosen data directory (argument, then the env var), checked to exist."""
    if data_dir is not None:
        chosen, origin, label = Path(data_dir), "data_dir", "data.data_dir"
    elif os.environ.get(DATA_DIR_ENV):
        chosen, origin, label = Path(os.environ[DATA_DIR_ENV]), f"${DATA_DIR_ENV}", f"${DATA_DIR_ENV}"
    else:
        return None
    chosen = chosen.expanduser().resolve()
    if not chosen.is_dir():
        raise DataError(f"data directory {str(chosen)!r} (from {label}) does not exist; {_DATA_FIX}")
    return chosen, origin


def resolve_data_files(
    dataset: str,
    data_dir: str | os.PathLike[str] | None = None,
    source: str = "auto",
    split: str = "train",
) -> DataFiles:
    """Decides where one split of a dataset is read from, without reading it.

    Args:
        dataset: A registered dataset name (:mod:`fedhl_jax.data.registry`).
        data_dir: ``data.data_dir``; ``None`` for the default order below.
        source: ``"auto"`` or ``"local"``: local files, in this order: ``data_dir``,
            ``$FEDHL_DATA_DIR``, the embedded copy (GSM8K only),
            ``<repo>/../shared/data``. ``"hub"``: the Hugging Face Hub default id of
            the dataset (needs network). Anything else: the path of a JSON Lines /
            JSON file (relative paths: against ``data_dir`` / ``$FEDHL_DATA_DIR``
            when one is set, else the working directory).
        split: A key of the spec's ``local_files`` (``"train"``, ``"test"``, ...), or
            the Hub split name for ``source="hub"``. Ignored for a file path.

    Returns:
        A :class:`DataFiles`; ``.data_config()`` gives the :class:`DataSource` to load
        it with and ``.description`` a log line.

    Raises:
        DataError: unknown dataset or split; a ``data_dir`` / ``$FEDHL_DATA_DIR`` or file
            that does not exist; a dataset that is neither embedded nor in
            ``../shared/data``. Each message names the path and the ways to fix it
            (``data.data_dir``, ``$FEDHL_DATA_DIR``, ``data.source=hub``).
    """
    spec = dataset_spec(dataset)
    if source == "hub":
        hub_id, hub_config = _hub_id(spec)
        return DataFiles(dataset, split, "hub", origin="hub", hub_id=hub_id, hub_config=hub_config)
    if source not in ("auto", "local"):  # a file
        p = Path(source).expanduser()
        if not p.is_absolute():
            chosen = _dir_from(data_dir)
            p = (chosen[0] if chosen else Path.cwd()) / p
        if not p.is_file():
            raise DataError(f"data file not found: {str(p)!r} (from data.source); give an existing "
                            f"JSON Lines file, or data.source=auto for the default files, or "
                            f"data.source=hub (needs network)")
        return DataFiles(dataset, split, "local", (p.resolve(),), "path")
    if split not in spec.local_files:
        raise DataError(f"unknown local split {split!r} for dataset {dataset!r}; expected one of "
                        f"{sorted(spec.local_files)} or an explicit path")
    rel = spec.local_files[split]
    chosen = _dir_from(data_dir)
    if chosen is not None:
        base, origin = chosen
    else:
        from fedhl_jax.assets import embedded_data_dir

        if spec.embedded and all((embedded_data_dir() / r).is_file() for r in rel):
            base, origin = embedded_data_dir(), "embedded"
        else:
            base, origin = default_data_dir(), "shared"
            if not all((base / r).is_file() for r in rel):
                raise DataError(
                    f"{dataset} data not found: it is not embedded in the package and "
                    f"{', '.join(repr(str(base / r)) for r in rel)} does not exist; {_DATA_FIX}")
    files = tuple(base / r for r in rel)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        label = "data.data_dir" if origin == "data_dir" else origin
        raise DataError(f"data file not found: {missing[0]!r} (from {label}); {_DATA_FIX}")
    return DataFiles(dataset, split, "local", files, origin)


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
        DataError: Missing file, bytes that are not UTF-8 or malformed JSON (file and
            line number), a row that is not an object, a missing or non-string field (field name,
            file and line/row), or a file with no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {str(p)!r}")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{p}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start})") from None
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


def _local_files(config: DataSource) -> list[Path]:
    if config.path is None:
        return list(resolve_data_files(config.name, config.data_dir, "local", config.split).files)
    if isinstance(config.path, (str, os.PathLike)):
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


def _hub_id(spec: DatasetSpec) -> tuple[str, str | None]:
    if spec.hub_id is None:
        raise DataError(f"dataset {spec.name!r} has no Hugging Face Hub id; use data.source=auto with its "
                        "local files, or a file path")
    return spec.hub_id, spec.hub_config


def _normalise(columns: dict[str, list[Any]], schema: DatasetSpec, origin: str) -> datasets.Dataset:
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


def load_instruction_dataset(config: DataSource) -> datasets.Dataset:
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
    schema = dataset_spec(config.name)
    if config.source != "hub":
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
            hub_id, default_cfg = _hub_id(schema)
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
