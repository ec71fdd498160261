"""The model-family registry: what differs between decoder families, one :class:`ModelFamily` each.

A family says how a Hugging Face checkpoint (``config.json``'s ``model_type`` and
``architectures``, its config keys, its weight names) and a GGUF file (``general.architecture``,
its tensor names, llama.cpp's q/k row order) map onto :class:`~fedhl_jax.model.architecture.LlamaConfig`
and the parameter paths of :mod:`fedhl_jax.model.llama`, and which block details it has (biases,
tied embeddings, per-head q/k norm, RoPE scaling types). The loaders and exporters look the family
up here (:func:`family_for_model_type`, :func:`family_for_gguf_arch`, :func:`get_family`); an
unsupported family or GGUF architecture is an error naming it and the supported ones.

Names are written once, as pairs of patterns in :class:`NameMap`: ``{L}`` stands for a layer
index and ``{a|b|c}`` for one of several words, and both sides hold the same placeholders in the
same order, so each map reads both ways (``blk.3.attn_q.weight`` ↔ ``layers.3.self_attn.q_proj``).

Registered: :data:`LLAMA` (Llama-2, TinyLlama, SmolLM/SmolLM2, stories260K, and Llama-3.x with its
``llama3`` RoPE scaling), :data:`QWEN2` (Qwen2 / Qwen2.5: q/k/v biases) and :data:`QWEN3` (per-head
RMSNorm of q and k).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
from typing import Mapping

__all__ = ["LLAMA", "QWEN2", "QWEN3", "ModelFamily", "NameMap", "families", "family_for_gguf_arch", "family_for_model_type",
           "get_family", "register_family", "unregister_family"]

_PLACEHOLDER = re.compile(r"\{(L|[^{}]+)\}")


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> tuple[re.Pattern, str, int]:
    """``pattern`` → (regex, ``re.sub`` template, number of groups)."""
    regex, template, last, n = [], [], 0, 0
    for m in _PLACEHOLDER.finditer(pattern):
        literal = pattern[last:m.start()]
        regex.append(re.escape(literal))
        template.append(literal.replace("\\", r"\\"))
        n += 1
        regex.append(r"(\d+)" if m.group(1) == "L" else "(" + "|".join(map(re.escape, m.group(1).split("|"))) + ")")
        template.append(f"\\g<{n}>")
        last = m.end()
    regex.append(re.escape(pattern[last:]))
    template.append(pattern[last:])
    return re.compile("".join(regex)), "".join(template), n


@dataclasses.dataclass(frozen=True)
class NameMap:
    """A two-way map between parameter paths and the tensor names of a file format.

    Attributes:
      pairs: ``(parameter path pattern, file name pattern)`` pairs (see the module docstring).
      ignored: regexes of file names that are not parameters (skipped on load).
    """

    pairs: tuple[tuple[str, str], ...]
    ignored: tuple[str, ...] = ()

    def __post_init__(self):
        for path, name in self.pairs:
            if _PLACEHOLDER.findall(path) != _PLACEHOLDER.findall(name):
                raise ValueError(f"name pair ({path!r}, {name!r}) has different placeholders on its two sides")

    @staticmethod
    def _map(pairs, src: int, key: str) -> str | None:
        for pair in pairs:
            m = _compile(pair[src])[0].fullmatch(key)
            if m:
                return m.expand(_compile(pair[1 - src])[1])
        return None

    def to_path(self, name: str) -> str | None:
        """The parameter path of a file tensor name, or None if no pair matches."""
        return self._map(self.pairs, 1, name)

    def to_name(self, path: str) -> str | None:
        """The file tensor name of a parameter path, or None if no pair matches."""
        return self._map(self.pairs, 0, path)

    def is_ignored(self, name: str) -> bool:
        """True for a file name that is not a parameter (e.g. an old ``rotary_emb.inv_freq``)."""
        return any(re.fullmatch(p, name) for p in self.ignored)


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """The family-specific pieces of a decoder.

    Attributes:
      name: the family's key (``LlamaConfig.family``).
      model_types: ``config.json`` ``model_type`` values it loads (the first is written on export).
      architectures: ``config.json`` ``architectures`` it loads (the first is written on export).
      gguf_arch: GGUF ``general.architecture`` (the prefix of its hyper-parameter keys).
      hf_config_keys: ``LlamaConfig`` field → ``config.json`` key, where the names differ.
      hf_names: parameter paths ↔ safetensors keys.
      gguf_names: parameter paths ↔ GGUF tensor names.
      gguf_permute_qk: llama.cpp's converter interleaves the rows of q/k within each head for this
        architecture (``gguf.permute_qk``), so loading undoes it and exporting redoes it.
      hidden_act: the MLP activation (``silu``: SwiGLU).
      qkv_bias: q/k/v projections carry biases.
      qk_norm: per-head RMSNorm of q and k before RoPE.
      tied_embeddings: ``"config"`` (``tie_word_embeddings`` of the checkpoint decides), ``"always"``
        or ``"never"``.
      rope_types: RoPE scaling types it supports (``config.json``'s ``rope_type``).
      sliding_window_key: the ``config.json`` flag that turns sliding-window attention on
        (``use_sliding_window``), refused when true; ``None`` where the family has none.
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    gguf_arch: str
    hf_config_keys: Mapping[str, str]
    hf_names: NameMap
    gguf_names: NameMap
    gguf_permute_qk: bool = True
    hidden_act: str = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False
    tied_embeddings: str = "config"
    rope_types: tuple[str, ...] = ("default",)
    sliding_window_key: str | None = None

    def __post_init__(self):
        if self.tied_embeddings not in ("config", "always", "never"):
            raise ValueError(f"family {self.name!r}: tied_embeddings must be config, always or never, "
                             f"got {self.tied_embeddings!r}")
        if not self.model_types or not self.architectures:
            raise ValueError(f"family {self.name!r} needs at least one model_type and one architecture")
        object.__setattr__(self, "hf_config_keys", types.MappingProxyType(dict(self.hf_config_keys)))

    def hf_key(self, field: str) -> str:
        """The ``config.json`` key of a ``LlamaConfig`` field."""
        return self.hf_config_keys.get(field, field)


_LLAMA_HF_NAMES = NameMap(
    pairs=(
        ("embed_tokens", "model.embed_tokens.weight"),
        ("layers.{L}.input_layernorm", "model.layers.{L}.input_layernorm.weight"),
        ("layers.{L}.self_attn.{q|k|v|o}_proj", "model.layers.{L}.self_attn.{q|k|v|o}_proj.weight"),
        ("layers.{L}.post_attention_layernorm", "model.layers.{L}.post_attention_layernorm.weight"),
        ("layers.{L}.mlp.{gate|up|down}_proj", "model.layers.{L}.mlp.{gate|up|down}_proj.weight"),
        ("norm", "model.norm.weight"),
        ("lm_head", "lm_head.weight"),
    ),
    # Keys some older checkpoints carry that are not parameters.
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)

_LLAMA_GGUF_NAMES = NameMap(pairs=(
    ("embed_tokens", "token_embd.weight"),
    ("layers.{L}.input_layernorm", "blk.{L}.attn_norm.weight"),
    ("layers.{L}.self_attn.{q|k|v}_proj", "blk.{L}.attn_{q|k|v}.weight"),
    ("layers.{L}.self_attn.o_proj", "blk.{L}.attn_output.weight"),
    ("layers.{L}.post_attention_layernorm", "blk.{L}.ffn_norm.weight"),
    ("layers.{L}.mlp.{gate|up|down}_proj", "blk.{L}.ffn_{gate|up|down}.weight"),
    ("norm", "output_norm.weight"),
    ("lm_head", "output.weight"),
),
    # Llama-3's RoPE frequency divisors: read into the config (``gguf.ROPE_FREQS``), not a parameter.
    ignored=(r"rope_freqs\.weight",),
)

#: The Llama layout: no biases, SwiGLU, RoPE (default, linear or Llama-3.x's ``llama3`` scaling),
#: optional tied embeddings (SmolLM2 and Llama-3.2 1B/3B tie them).
LLAMA = ModelFamily(
    name="llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    gguf_arch="llama",
    hf_config_keys={"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                    "num_kv_heads": "num_key_value_heads"},
    hf_names=_LLAMA_HF_NAMES,
    gguf_names=_LLAMA_GGUF_NAMES,
    gguf_permute_qk=True,
    rope_types=("default", "linear", "llama3"),
)

def _llama_variant(name: str, architecture: str, hf_pair: tuple[str, str], gguf_pair: tuple[str, str],
                   **details) -> ModelFamily:
    """A family with the Llama layout plus one more name pair per format, and its own block details.

    llama.cpp's converter keeps the q/k rows of these architectures in Hugging Face order, and their
    configs have a ``use_sliding_window`` switch.
    """
    return dataclasses.replace(
        LLAMA, name=name, model_types=(name,), architectures=(architecture,), gguf_arch=name,
        hf_names=NameMap(pairs=(*_LLAMA_HF_NAMES.pairs, hf_pair), ignored=_LLAMA_HF_NAMES.ignored),
        gguf_names=NameMap(pairs=(*_LLAMA_GGUF_NAMES.pairs, gguf_pair), ignored=_LLAMA_GGUF_NAMES.ignored),
        gguf_permute_qk=False, rope_types=("default",), sliding_window_key="use_sliding_window", **details)


#: Qwen2 / Qwen2.5: the Llama block with biases on q, k and v (frozen; LoRA adapts the linear part),
#: tied embeddings per config (0.5B-3B tie them).
QWEN2 = _llama_variant(
    "qwen2", "Qwen2ForCausalLM",
    ("layers.{L}.self_attn.{q|k|v}_proj_bias", "model.layers.{L}.self_attn.{q|k|v}_proj.bias"),
    ("layers.{L}.self_attn.{q|k|v}_proj_bias", "blk.{L}.attn_{q|k|v}.bias"),
    qkv_bias=True)

#: Qwen3 (dense): the Llama block with a per-head RMSNorm of q and of k before RoPE (weights ``[hd]``),
#: ``head_dim`` set in the config (128, not hidden/heads), no biases.
QWEN3 = _llama_variant(
    "qwen3", "Qwen3ForCausalLM",
    ("layers.{L}.self_attn.{q|k}_norm", "model.layers.{L}.self_attn.{q|k}_norm.weight"),
    ("layers.{L}.self_attn.{q|k}_norm", "blk.{L}.attn_{q|k}_norm.weight"),
    qk_norm=True)

_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Adds a family (its ``model_types`` and ``gguf_arch`` then load).

    Raises:
      ValueError: a family of that name, or one claiming the same ``model_type`` or GGUF
        architecture, is registered already (unless ``replace``).
    """
    if not replace:
        for key, other in _FAMILIES.items():
            if key == family.name or set(other.model_types) & set(family.model_types) \
                    or other.gguf_arch == family.gguf_arch:
                raise ValueError(f"model family {family.name!r} clashes with the registered family {key!r}")
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Removes a registered family (a no-op for an unknown name)."""
    _FAMILIES.pop(name, None)


def families() -> tuple[ModelFamily, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES.values())


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (``LlamaConfig.family``).

    Raises:
      ValueError: an unknown family, naming it and the registered ones.
    """
    if name not in _FAMILIES:
        raise ValueError(f"unsupported model family {name!r}: supported are {list(_FAMILIES)}")
    return _FAMILIES[name]


def family_for_model_type(model_type: str) -> ModelFamily:
    """The family that loads a ``config.json`` ``model_type``.

    Raises:
      ValueError: ``unsupported model_type 'gpt2': supported are ['llama', 'qwen2', 'qwen3']``.
    """
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = [t for f in _FAMILIES.values() for t in f.model_types]
    raise ValueError(f"unsupported model_type {model_type!r}: supported are {supported}")


def family_for_gguf_arch(arch: str) -> ModelFamily:
    """The family that loads a GGUF ``general.architecture``.

    Raises:
      ValueError: ``unsupported GGUF architecture 'gemma3': supported are ['llama', 'qwen2', 'qwen3']``.
    """
    for family in _FAMILIES.values():
        if arch == family.gguf_arch:
            return family
    raise ValueError(f"unsupported GGUF architecture {arch!r}: supported are "
                     f"{[f.gguf_arch for f in _FAMILIES.values()]}")


register_family(LLAMA)
register_family(QWEN2)
register_family(QWEN3)
