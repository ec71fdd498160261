"""The dataset registry: one :class:`DatasetSpec` per dataset, everything else derived from it.

A spec says what a dataset is: its source fields and how they map to the common
``instruction`` / ``input`` / ``output`` form, its local files per split, its Hugging Face Hub
id, its label kinds (for label-based partitions), its held-out split and its generation metric.
Loading (``loading.py``), labels (``labels.py``), the held-out rows (``federated.py``), the
evaluation metric and the config's ``data.dataset`` / ``data.label_kind`` checks all read it.

Adding a dataset is one :func:`register_dataset` call (docs/data.md, "Adding a dataset")::

    register_dataset(DatasetSpec(
        name="toy", instruction="prompt", output="reply",
        local_files={"train": ("toy/train.jsonl",)}))

The datasets that ship with the package are registered by ``fedhl_jax.data.catalog``.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

from fedhl_jax.errors import ConfigError
from fedhl_jax.metrics import METRICS

__all__ = ["DataError", "DatasetSpec", "dataset_names", "dataset_spec", "register_dataset",
           "unregister_dataset"]

#: A label kind: normalised records → one label string per row.
LabelFn = Callable[[Any], list]


class DataError(ConfigError):
    """Raised for bad data or a bad data configuration (with a precise message)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What one dataset is.

    Attributes:
      name: the ``data.dataset`` name.
      instruction: source field that becomes ``instruction`` (required, a string in every row).
      output: source field that becomes ``output`` (required, a string in every row).
      input: source field that becomes ``input`` (optional per row; missing or null is ``""``);
        None when the dataset has no such field.
      optional: further text fields kept when every row has a non-empty value (e.g. ``category``).
      local_files: split name → files relative to the data directory (``data.data_dir``,
        ``$FEDHL_DATA_DIR``, the embedded copy, ``../shared/data``); must have ``"train"``.
      hub_id: Hugging Face Hub dataset id for ``data.source=hub`` (None: not on the Hub).
      hub_config: the Hub config name (None: the default).
      label_kinds: label kind → function of the normalised records giving one label per row;
        the first kind is the default. Empty: every row has the label ``"all"``.
      eval_split: a split of ``local_files`` (and of the Hub dataset) that holds the held-out
        rows; None holds out a seeded slice of the training rows.
      metric: generation metric, a key of ``metrics.METRICS`` (``exact_match``, ``rouge_l``).
      embedded: the files ship inside the package (``fedhl_jax.assets``).
    """

    name: str
    instruction: str
    output: str
    input: str | None = None
    optional: tuple[str, ...] = ()
    local_files: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    hub_id: str | None = None
    hub_config: str | None = None
    label_kinds: Mapping[str, LabelFn] = dataclasses.field(default_factory=dict)
    eval_split: str | None = None
    metric: str = "rouge_l"
    embedded: bool = False

    def __post_init__(self):
        def require(cond, msg):
            if not cond:
                raise DataError(f"dataset spec {self.name!r}: {msg}")

        require(isinstance(self.name, str) and self.name.isidentifier(),
                f"name must be an identifier, got {self.name!r}")
        for role in ("instruction", "output"):
            require(isinstance(getattr(self, role), str) and getattr(self, role),
                    f"{role} must name a source field, got {getattr(self, role)!r}")
        fields = [self.instruction, self.output, *([self.input] if self.input else []), *self.optional]
        require(len(set(fields)) == len(fields), f"a source field is used twice: {fields}")
        require("train" in self.local_files or self.hub_id is not None,
                f"needs local_files['train'] or a hub_id, got local splits {sorted(self.local_files)}")
        for split, files in self.local_files.items():
            require(isinstance(files, tuple) and files and all(isinstance(f, str) for f in files),
                    f"local_files[{split!r}] must be a non-empty tuple of relative paths, got {files!r}")
        require(self.eval_split is None or self.eval_split in self.local_files or self.hub_id is not None,
                f"eval_split {self.eval_split!r} is not one of its local splits {sorted(self.local_files)}")
        require(self.metric in METRICS, f"metric must be one of {sorted(METRICS)}, got {self.metric!r}")
        for kind, fn in self.label_kinds.items():
            require(callable(fn), f"label kind {kind!r} must be a function of the records, got {fn!r}")
        # Read-only views, so a registered spec cannot be changed behind the registry's back.
        object.__setattr__(self, "local_files", types.MappingProxyType(dict(self.local_files)))
        object.__setattr__(self, "label_kinds", types.MappingProxyType(dict(self.label_kinds)))

    @property
    def required(self) -> tuple[str, ...]:
        """Source fields every row must have, as strings."""
        return (self.instruction, self.output)

    @property
    def optional_text(self) -> tuple[str, ...]:
        """Optional source text fields; missing or null values become ``""``."""
        return ((self.input,) if self.input else ()) + self.optional

    @property
    def default_label_kind(self) -> str | None:
        """The first label kind (None when the dataset has none)."""
        return next(iter(self.label_kinds), None)

    @property
    def metric_name(self) -> str:
        """The metric as shown in tables (``exact match``, ``ROUGE-L``)."""
        return METRICS[self.metric][0]


_SPECS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Adds ``spec`` to the registry (``data.dataset=<spec.name>`` then names it).

    Raises:
      DataError: a dataset of that name is registered already (unless ``replace``).
    """
    if not isinstance(spec, DatasetSpec):
        raise DataError(f"register_dataset takes a DatasetSpec, got {type(spec).__name__}")
    if _SPECS.get(spec.name) is not None and not replace:
        raise DataError(f"dataset {spec.name!r} is registered already (replace=True to redefine it)")
    _SPECS[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> None:
    """Removes a registered dataset (a no-op for an unknown name)."""
    _SPECS.pop(name, None)


def dataset_names() -> tuple[str, ...]:
    """Registered dataset names, in registration order."""
    return tuple(_SPECS)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a registered dataset.

    Raises:
      DataError: an unknown name (the message lists the registered ones).
    """
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset name {name!r}; expected one of {list(_SPECS)}") from None
