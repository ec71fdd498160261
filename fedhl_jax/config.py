"""Run configuration: the whole schema of a run as frozen dataclasses of plain values.

YAML files and dotted ``key=value`` overrides are parsed by OmegaConf at the edge
(``load_config``); the result is checked against these dataclasses, so an unknown
key or a bad value fails before anything is loaded or compiled. Every field is checked
against its type (a boolean refuses ``3``, a float refuses ``.inf`` and ``.nan``), naming
the key. The config builds nothing: the algorithm is built from ``fed`` by
``fedhl_jax.build.build_algorithm``; parsing checks ``fed.options`` once through it and
stores the algorithm's full options as a plain dict.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedhl_jax.algorithms import ALGORITHMS
from fedhl_jax.build import checked_options
from fedhl_jax.data.partition import PARTITION_KINDS, RENAMED_PARTITIONS
from fedhl_jax.data.prompts import PROMPT_FORMATS
from fedhl_jax.data.registry import dataset_names, dataset_spec
from fedhl_jax.errors import ConfigError
from fedhl_jax.model.llama import REMAT_POLICIES
from fedhl_jax.runtime import CPU_MATMUL_MODES

RANK_DISTRIBUTIONS = ("list", "uniform", "heavy_tail_low", "heavy_tail_high", "homogeneous")
OPTIMIZERS = ("adamw", "sgd")
# Keys that moved; an old config naming one gets an error that says the new key.
MOVED_KEYS = {f"fed.{k}": f"fed.options.{k}" for k in
              ("eps", "eps_mode", "power", "weighting", "per_module", "split", "svd_method")}
MOVED_KEYS["fed.remat"] = "model.remat (none | dots_saveable | full)"


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_fields(obj, prefix: str) -> None:
    """Every field of the dataclass ``obj`` has its declared type (``coerce_value``'s rules: a
    boolean is ``True``/``False``, a float is finite, ...), or a ``ConfigError`` names ``prefix.field``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp) and tp is not dict:
            coerce_value(getattr(obj, f.name), tp, f"{prefix}{f.name}")


@dataclass(frozen=True)
class ModelConfig:
    """Base model and LoRA placement.

    ``name_or_path="auto"`` takes the embedded stories260K (shipped in the package).
    ``"random"`` takes a random-init tiny Llama (``random_*`` below); anything else is a local
    folder or GGUF file, or a Hugging Face Hub id (needs network). A path that does not exist is
    an error naming it.

    ``kind: nnx`` takes a Flax NNX model instead: ``factory`` (``package.module:function``) is called
    as ``function(vocab_size=V, seed=S)`` and returns ``(module, loss)`` with
    ``loss(module, tokens, loss_mask) -> []``; ``targets`` are then regular expressions over its
    module paths (``fedhl_jax.nnx_bridge``, docs/nnx.md).
    """

    kind: str = "llama"
    factory: str | None = None
    name_or_path: str = "auto"
    dtype: str = "float32"
    compute_dtype: str | None = None
    remat: str = "none"
    # CPU float32 matmuls: "fast" (XLA's defaults) or "accurate" (YNNPACK fusions off; logits to
    # 1e-4 of a float32 PyTorch reference, training about 20% slower on CPU). fedhl_jax.runtime.
    cpu_matmul: str = "fast"
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    alpha: float = 16.0
    rslora: bool = False
    # Random-init model (name_or_path: random).
    random_hidden_size: int = 64
    random_intermediate_size: int = 172
    random_num_layers: int = 5
    random_num_heads: int = 8
    random_num_kv_heads: int = 4
    random_vocab_size: int = 512

    def __post_init__(self):
        _check_fields(self, "model.")
        _require(self.dtype in ("float32", "bfloat16"), f"model.dtype must be float32 or bfloat16, got {self.dtype!r}")
        _require(self.compute_dtype in (None, "float32", "bfloat16"),
                 f"model.compute_dtype must be float32, bfloat16 or null (= model.dtype), got {self.compute_dtype!r}")
        _require(self.remat in REMAT_POLICIES, f"model.remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        _require(self.cpu_matmul in CPU_MATMUL_MODES,
                 f"model.cpu_matmul must be fast or accurate, got {self.cpu_matmul!r}")
        _require(len(self.targets) > 0, "model.targets must name at least one module")
        _require(self.kind in ("llama", "nnx"), f"model.kind must be llama or nnx, got {self.kind!r}")
        _require(self.kind == "llama" or re.fullmatch(r"[\w.]+:\w+", self.factory or "") is not None,
                 f"model.kind: nnx needs model.factory as package.module:function, got {self.factory!r}")
        _require(self.alpha > 0, f"model.alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True)
class DataConfig:
    """A run's data: which dataset, from where, tokenised how, split across clients how.

    Attributes:
      dataset: a registered dataset (``fedhl_jax.data.registry``: ``gsm8k``, ``codealpaca``,
        ``dolly`` ship with the package).
      source: ``auto`` or ``local`` (local files: ``data_dir``, else ``$FEDHL_DATA_DIR``, else the
        embedded copy for GSM8K, else ``../shared/data``), ``hub`` (the dataset's Hub id; needs
        network; never a silent fallback), or a path to a JSON Lines / JSON file of the dataset's
        fields.
      data_dir: data directory.
      seq_len: sequence length ``T`` of every example.
      max_train_examples: keep the first this many training rows.
      partition: one of ``data.partition.PARTITION_KINDS`` (``iid``, ``dirichlet``, ``meta``,
        ``quantity_skew``, ``rank_correlated``).
      dirichlet_alpha: concentration of ``dirichlet`` and ``quantity_skew``.
      label_kind: labels of label-based partitions, one of the dataset's label kinds (None: its
        default).
      eval_examples: held-out examples (0: none).
      validation_examples: training rows set aside as a validation split (0: none), for choosing
        hyperparameters without looking at the held-out (test) rows. The same rows for every seed
        (a fixed shuffle of the training file); no client trains on them.
      prompt_format: ``auto`` (the model's chat template when its tokenizer has one, else the
        Alpaca template), ``alpaca`` or ``chat`` (``data.prompts.resolve_prompt_format``).
    """

    dataset: str = "gsm8k"
    source: str = "auto"
    data_dir: str | None = None
    seq_len: int = 256
    max_train_examples: int | None = None
    partition: str = "iid"
    dirichlet_alpha: float = 0.3
    label_kind: str | None = None
    eval_examples: int = 128
    validation_examples: int = 0
    prompt_format: str = "auto"

    def __post_init__(self):
        _check_fields(self, "data.")
        _require(self.dataset in dataset_names(),
                 f"data.dataset must be one of {', '.join(dataset_names())}; got {self.dataset!r}")
        _require(self.seq_len >= 8, f"data.seq_len must be >= 8, got {self.seq_len}")
        _require(self.partition not in RENAMED_PARTITIONS,
                 f"data.partition {self.partition!r} is now called {RENAMED_PARTITIONS.get(self.partition)!r}")
        _require(self.partition in PARTITION_KINDS,
                 f"data.partition must be one of {PARTITION_KINDS}, got {self.partition!r}")
        _require(self.dirichlet_alpha > 0, f"data.dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        _require(self.max_train_examples is None or self.max_train_examples >= 1,
                 f"data.max_train_examples must be >= 1, got {self.max_train_examples}")
        _require(self.eval_examples >= 0, f"data.eval_examples must be >= 0, got {self.eval_examples}")
        _require(self.validation_examples >= 0,
                 f"data.validation_examples must be >= 0, got {self.validation_examples}")
        _require(self.prompt_format in PROMPT_FORMATS,
                 f"data.prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        kinds = list(dataset_spec(self.dataset).label_kinds)
        _require(self.label_kind is None or self.label_kind in kinds,
                 f"data.label_kind must be one of {kinds} for data.dataset={self.dataset!r} (or null), "
                 f"got {self.label_kind!r}")


@dataclass(frozen=True)
class FedConfig:
    """Federation: algorithm (and its own options), clients, ranks, participation.

    ``options`` holds the algorithm's options (``fed.options.eps`` for FedHL, ...; see the
    algorithm's options dataclass in ``fedhl_jax.algorithms``). Parsing (``from_dict``,
    ``load_config``) checks them once against the algorithm (``build.checked_options``: an option
    the algorithm does not have, or a value of the wrong type, is an error naming the key) and
    stores every option, defaults filled in. The algorithm itself is built by
    ``fedhl_jax.build.build_algorithm(fed)``.
    """

    algorithm: str = "fedhl"
    num_clients: int = 10
    participation: float = 1.0
    rounds: int = 5
    rank_distribution: str = "uniform"
    ranks: tuple[int, ...] = (2, 4, 8, 16)
    options: dict = field(default_factory=dict)
    # Memory (rematerialisation is model.remat).
    clients_per_chunk: int | None = None
    # Divergence: stop after this many rounds in a row in which every client update was excluded.
    stop_after_failed_rounds: int = 3

    def __post_init__(self):
        _check_fields(self, "fed.")
        _require(self.algorithm in ALGORITHMS, f"fed.algorithm must be one of {sorted(ALGORITHMS)}, got {self.algorithm!r}")
        _require(self.num_clients >= 1, f"fed.num_clients must be >= 1, got {self.num_clients}")
        _require(0 < self.participation <= 1, f"fed.participation must be in (0, 1], got {self.participation}")
        _require(self.rounds >= 1, f"fed.rounds must be >= 1, got {self.rounds}")
        _require(self.rank_distribution in RANK_DISTRIBUTIONS,
                 f"fed.rank_distribution must be one of {RANK_DISTRIBUTIONS}, got {self.rank_distribution!r}")
        _require(len(self.ranks) > 0, "fed.ranks must not be empty")
        bad = [r for r in self.ranks if r < 1]
        _require(not bad, f"fed.ranks must be >= 1, got rank {bad[0] if bad else ''} in {list(self.ranks)}")
        _require(self.clients_per_chunk is None or self.clients_per_chunk >= 1,
                 f"fed.clients_per_chunk must be >= 1 (or null), got {self.clients_per_chunk}")
        _require(self.stop_after_failed_rounds >= 1,
                 f"fed.stop_after_failed_rounds must be >= 1, got {self.stop_after_failed_rounds}")
        _require(isinstance(self.options, dict), f"fed.options must be a mapping, got {self.options!r}")

    @property
    def r_max(self) -> int:
        return max(self.ranks)

    @property
    def clients_per_round(self) -> int:
        return max(1, int(round(self.participation * self.num_clients)))


@dataclass(frozen=True)
class OptimConfig:
    """Client optimizer: ``local_steps`` steps of ``batch_size`` examples per round.

    Attributes:
      length_bucket: run each local step of the language model at the narrowest width
        ``w, 2w, ..., data.seq_len`` that holds the targets of its batch (of every client vmapped
        with it: ``fed.clients_per_chunk``), instead of ``data.seq_len``; the loss and gradient
        are the same up to float rounding. The round compiles one branch per width (at most
        ``seq_len / length_bucket``), chosen at run time. 0: every step at ``data.seq_len``.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_b: float | None = None
    weight_decay: float = 0.0
    momentum: float = 0.0
    grad_clip: float | None = 1.0
    local_steps: int = 5
    batch_size: int = 4
    length_bucket: int = 32

    def __post_init__(self):
        _check_fields(self, "optim.")
        _require(self.optimizer in OPTIMIZERS, f"optim.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.lr_b is None or self.lr_b > 0, f"optim.lr_b must be > 0, got {self.lr_b}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip must be > 0, got {self.grad_clip}")
        _require(self.local_steps >= 1, f"optim.local_steps must be >= 1, got {self.local_steps}")
        _require(self.batch_size >= 1, f"optim.batch_size must be >= 1, got {self.batch_size}")
        _require(self.length_bucket >= 0,
                 f"optim.length_bucket must be >= 0 (0: every step at data.seq_len), got {self.length_bucket}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of the global model every ``every`` rounds (and after the last).

    Attributes:
      every: evaluate after every ``every``-th round and after the last.
      batch_size: rows per held-out loss batch (and per generation batch, unless
        ``generate_batch_size`` is set).
      per_rank: also the loss of each rank's truncation of the global adapter.
      generate_examples: greedy answers to the first this many held-out prompts, scored with
        exact match (GSM8K) or ROUGE-L (0: no generation).
      max_new_tokens: generated tokens per answer.
      loss_examples: held-out loss on the first this many held-out rows (null: all of them), so a
        large generation set does not make every loss evaluation slow.
      generate_batch_size: prompts per generation batch (null: ``batch_size``); decoding reads
        every weight per token, so larger batches are cheaper per answer, while the held-out loss
        holds ``[batch, T, vocab]`` logits and wants smaller ones.
      generate_every: generate only after every ``generate_every``-th round and after the last
        (0: after the last round only; null: at every evaluation).
      zero_shot: before the first round of a fresh run, evaluate the starting global model (for
        FedHL and the peers, the base model) with generation, into ``zero_shot.json``.
      per_example: also report each held-out (and validation) example's mean token loss
        (``eval_loss_examples``, ``eval_val_loss_examples``), for paired comparisons over examples.
      length_bucket: batch the held-out (and validation) rows by length and cut each batch to its
        longest row, rounded up to a multiple of this many tokens (0: every batch ``data.seq_len``
        wide). The losses are those of the full width up to float rounding (the model is causal); the
        loss program compiles once per width (at most ``seq_len / length_bucket`` of them).
      validation: also the loss on the validation rows (``data.validation_examples``), as
        ``eval_val_loss``; false skips it (the rows stay out of the clients' data either way), for
        runs whose validation loss chooses nothing.
    """

    every: int = 1
    batch_size: int = 16
    per_rank: bool = False
    generate_examples: int = 0
    max_new_tokens: int = 48
    loss_examples: int | None = None
    generate_batch_size: int | None = None
    generate_every: int | None = None
    zero_shot: bool = False
    per_example: bool = False
    length_bucket: int = 64
    validation: bool = True

    def __post_init__(self):
        _check_fields(self, "eval.")
        _require(self.length_bucket >= 0,
                 f"eval.length_bucket must be >= 0 (0: no cut), got {self.length_bucket}")
        _require(self.every >= 1, f"eval.every must be >= 1, got {self.every}")
        _require(self.loss_examples is None or self.loss_examples >= 1,
                 f"eval.loss_examples must be >= 1 (or null: every held-out row), got {self.loss_examples}")
        _require(self.generate_batch_size is None or self.generate_batch_size >= 1,
                 f"eval.generate_batch_size must be >= 1 (or null: eval.batch_size), got {self.generate_batch_size}")
        _require(self.generate_every is None or self.generate_every >= 0,
                 f"eval.generate_every must be >= 0 (0: after the last round only; null: at every evaluation), "
                 f"got {self.generate_every}")
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(self.generate_examples >= 0, f"eval.generate_examples must be >= 0, got {self.generate_examples}")
        _require(self.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints of the server state every ``every`` rounds."""

    every: int = 1
    max_to_keep: int = 2

    def __post_init__(self):
        _check_fields(self, "checkpoint.")
        _require(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        _require(self.max_to_keep >= 1, f"checkpoint.max_to_keep must be >= 1, got {self.max_to_keep}")


@dataclass(frozen=True)
class MeshConfig:
    """The device mesh: ``clients`` (the vmapped client axis) × ``model`` (the frozen base weights
    are sharded over it, FSDP-style, when they do not fit one device).

    ``clients: null`` (the default) with ``model: 1`` keeps the automatic layout: every device on
    the client axis when the round's clients split evenly over them, else one device. Otherwise
    ``clients × model`` must equal the device count (of all processes), checked at start.
    """

    clients: int | None = None
    model: int = 1

    def __post_init__(self):
        _check_fields(self, "mesh.")
        _require(self.clients is None or self.clients >= 1, f"mesh.clients must be >= 1 (or null), got {self.clients}")
        _require(self.model >= 1, f"mesh.model must be >= 1, got {self.model}")

    @property
    def explicit(self) -> bool:
        """True when the config asks for a mesh shape (not the automatic client layout)."""
        return self.clients is not None or self.model != 1


@dataclass(frozen=True)
class TrainConfig:
    """A whole run."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    export_rank: int | None = None

    def __post_init__(self):
        _check_fields(self, "")
        _require(self.export_rank is None or self.export_rank >= 1, f"export_rank must be >= 1, got {self.export_rank}")
        _require(self.eval.generate_examples <= self.data.eval_examples,
                 f"eval.generate_examples={self.eval.generate_examples} is more than the "
                 f"data.eval_examples={self.data.eval_examples} held-out rows it draws from; raise data.eval_examples")


# --------------------------------------------------------------------------- dict <-> dataclass


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the config type ``tp`` (``int``, ``float``, ``bool``, ``str``, ``dict``,
    ``tuple[X, ...]``, ``X | None``).

    Raises:
      ConfigError: naming ``key``: a boolean that is not ``true``/``false`` (``3``, ``"yes"``), a
        non-integer for an integer, a non-number or a non-finite number (``.inf``, ``.nan``) for a
        float, a non-string for a string, a non-list for a list.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            if typing.get_args(tp)[0] is str and isinstance(value, str):
                return (value,)
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return tuple(coerce_value(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or float(value) != int(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Builds the frozen dataclass ``cls`` from a nested dict, naming any bad key or value."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if f"{prefix}{key}" in MOVED_KEYS:
            why = " (options belong to the algorithm that has them)" if "options" in MOVED_KEYS[prefix + key] else ""
            raise ConfigError(f"config key '{prefix}{key}' moved to '{MOVED_KEYS[prefix + key]}'{why}")
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; valid keys {where}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        tp = hints[name]
        if dataclasses.is_dataclass(tp):  # a missing section is parsed too (its defaults, checked)
            kwargs[name] = from_dict(tp, data.get(name), f"{prefix}{name}.")
        elif name not in data:
            continue
        else:
            kwargs[name] = coerce_value(data[name], tp, f"{prefix}{name}")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from e
    if cls is FedConfig:  # the algorithm's options, checked once and filled in
        obj = dataclasses.replace(obj, options=checked_options(obj, coerce_value))
    return obj


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) of a config, for YAML and comparisons."""

    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def _yaml_error_line(path: Path, e: Exception) -> str:
    """One line for a YAML syntax error: the file, line and column (1-based) and the problem."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None and cmark is not mark:
        problem += f" ({' '.join(context.split())} started at line {cmark.line + 1}, column {cmark.column + 1})"
    return f"{where}: invalid YAML: {problem}"


def _load_yaml_mapping(path: Path):
    """The YAML file as an OmegaConf mapping.

    Raises:
      ConfigError: not UTF-8, malformed YAML (one line with the file, line and column), an empty
        file, or a top level that is not a mapping.
    """
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error_line(path, e)) from None
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"):
        raise ConfigError(f"config file {path} is empty; write settings such as 'fed: {{rounds: 5}}', "
                          "or leave out --config for the defaults")
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else f"the value {node.value!r}"
        raise ConfigError(f"config file {path}: the top level must be a mapping of settings "
                          f"(e.g. 'fed: {{rounds: 5}}'), got {kind} at line {node.start_mark.line + 1}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:  # e.g. a duplicate key, found only when the mapping is built
        raise ConfigError(_yaml_error_line(path, e)) from None
    except Exception as e:
        raise ConfigError(f"config file {path}: {' '.join(str(e).split())}") from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"config file {path}: the top level must be a mapping of settings")
    return loaded


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML file (optional) and dotted ``key=value`` overrides into a ``TrainConfig``.

    Raises:
      ConfigError: unknown key (the valid ones are listed) or invalid value; a YAML file that is
        malformed (one line naming the file, line and column), empty, or whose top level is not
        a mapping.
      FileNotFoundError: the YAML file does not exist.
    """
    base = OmegaConf.create({})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        base = _load_yaml_mapping(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except Exception as e:  # OmegaConf parse errors
        raise ConfigError(f"cannot parse config: {e}") from e
    return from_dict(TrainConfig, data)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML (atomically: a temporary file renamed into place)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``["key: old -> new", ...]`` for every differing leaf of two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
