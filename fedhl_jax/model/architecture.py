"""Static model configuration for Llama-style decoders.

:class:`LlamaConfig` is a frozen (hashable) dataclass, so it can be passed as a
static argument to ``jax.jit``. It is built from a Hugging Face config (both the
transformers v4 ``rope_theta``/``rope_scaling`` fields and the v5
``rope_parameters`` dict are understood) of any registered model family
(:mod:`fedhl_jax.model.families`, looked up by ``model_type``) and can be turned
back into a Hugging Face ``config.json`` dict for export.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from fedhl_jax.model.families import ModelFamily, family_for_model_type, get_family
from fedhl_jax.model.hub import resolve_checkpoint

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ROPE_TYPES = ("default", "linear", "llama3")  # RoPE scaling types the forward pass implements
REMAT_POLICIES = ("none", "dots_saveable", "full")  # see fedhl_jax.model.llama.REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-style decoder of any registered family (static, hashable).

    Attributes:
      vocab_size: ``V``.
      hidden_size: model width ``D``.
      intermediate_size: SwiGLU width ``I``.
      num_layers: number of decoder blocks ``L``.
      num_heads: query heads ``H``.
      num_kv_heads: key/value heads ``K`` (``H % K == 0``; ``K < H`` is GQA).
      head_dim: per-head width ``hd``.
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      rope_scaling_factor: the RoPE scaling ``factor``: positions divided by it (``linear``), or the
        divisor of the low frequencies (``llama3``); 1.0 = none.
      rope_type: ``"default"``, ``"linear"`` or ``"llama3"`` (Llama-3.1's frequency-dependent
        scaling, as transformers' ``_compute_llama3_parameters``). A ``"default"`` with a factor
        other than 1 is read as ``"linear"``.
      rope_low_freq_factor: ``llama3``: wavelengths above ``original / low`` are divided by the factor.
      rope_high_freq_factor: ``llama3``: wavelengths below ``original / high`` are kept; those between
        are interpolated.
      rope_original_max_position_embeddings: ``llama3``: the pre-training context length.
      max_position_embeddings: longest supported sequence.
      tie_word_embeddings: whether the LM head reuses ``embed_tokens``.
      dtype: dtype of the base weights, ``"float32"`` or ``"bfloat16"``.
      compute_dtype: dtype of the activations (``None``: the same as ``dtype``).
        RMSNorm statistics, softmax, logits and the loss are always float32;
        LoRA factors keep their own dtype (float32) and are cast to the
        compute dtype inside each matmul.
      remat: rematerialisation policy of each scanned decoder block in the
        backward pass: ``"none"`` (keep every residual), ``"dots_saveable"``
        (keep the outputs of matmuls without batch dimensions, recompute the
        rest) or ``"full"`` (keep only each block's input, recompute the block).
        It changes memory and time, never the values.
      unroll_layers: models with at most this many layers unroll the layer scan
        (``lax.scan(..., unroll=L)``): on shallow models the scan's per-layer
        loop overhead costs more than the compile time it saves; deeper models
        keep one compiled block (0: always scan). A remat policy other than
        ``"none"`` keeps the scan for training (unrolled, XLA would undo the
        recomputation).
      bos_token_id: beginning-of-sequence id (or ``None``).
      eos_token_id: end-of-sequence id (or ``None``); the first one when the
        Hugging Face config lists several.
      pad_token_id: padding id (or ``None``).
      family: the model family (``fedhl_jax.model.families``): weight names, GGUF
        architecture and block details for loading and export.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    rope_type: str = "default"
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    compute_dtype: str | None = None
    remat: str = "none"
    unroll_layers: int = 8
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    family: str = "llama"

    def __post_init__(self):
        family = get_family(self.family)  # raises for an unknown family
        if self.rope_type == "default" and self.rope_scaling_factor != 1.0:
            object.__setattr__(self, "rope_type", "linear")
        if self.rope_type not in family.rope_types:
            raise ValueError(f"unsupported RoPE scaling type {self.rope_type!r} for model family {self.family!r}: "
                             f"supported are {list(family.rope_types)}")
        if not self.rope_scaling_factor > 0:
            raise ValueError(f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
        if self.rope_type == "llama3" and not (0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                                               and self.rope_original_max_position_embeddings > 0):
            raise ValueError(f"llama3 RoPE scaling needs 0 < low_freq_factor < high_freq_factor and a positive "
                             f"original_max_position_embeddings, got low_freq_factor={self.rope_low_freq_factor}, "
                             f"high_freq_factor={self.rope_high_freq_factor}, original_max_position_embeddings="
                             f"{self.rope_original_max_position_embeddings}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.compute_dtype is not None and self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {sorted(_DTYPES)}, "
                             f"got {self.compute_dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def model_family(self) -> ModelFamily:
        """The :class:`~fedhl_jax.model.families.ModelFamily` of :attr:`family`."""
        return get_family(self.family)

    @property
    def jnp_dtype(self):
        """The ``jnp`` dtype of the base weights (:attr:`dtype`)."""
        return _DTYPES[self.dtype]

    @property
    def jnp_compute_dtype(self):
        """The ``jnp`` dtype of the activations (:attr:`compute_dtype`, default :attr:`dtype`)."""
        return _DTYPES[self.compute_dtype or self.dtype]

    def replace(self, **changes) -> "LlamaConfig":
        """Returns a copy with some fields changed (e.g. ``dtype="bfloat16"``, ``remat="full"``)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, hf_config: Any, *, dtype: str = "float32") -> "LlamaConfig":
        """Builds a config from a ``transformers.LlamaConfig`` or a ``config.json`` dict.

        Args:
          hf_config: a ``transformers`` config object or the parsed ``config.json``.
          dtype: parameter/compute dtype for this library (``"float32"`` or
            ``"bfloat16"``); the checkpoint's own ``torch_dtype`` is ignored.

        Returns:
          The :class:`LlamaConfig`.

        Raises:
          ValueError: an unsupported ``model_type`` (family), architecture, activation, biases,
            sliding-window attention or RoPE scaling, naming the offending value.
        """
        d = dict(hf_config) if isinstance(hf_config, dict) else hf_config.to_dict()
        fam = family_for_model_type(d.get("model_type", "llama"))
        for arch in d.get("architectures") or []:
            if arch not in fam.architectures:
                raise ValueError(f"unsupported architecture {arch!r}: supported are "
                                 f"{list(fam.architectures)}")
        act = d.get("hidden_act", fam.hidden_act)
        if act != fam.hidden_act:
            raise ValueError(f"unsupported hidden_act {act!r}: only {fam.hidden_act!r} (SwiGLU) is supported")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag) and not (flag == "attention_bias" and fam.qkv_bias):
                raise ValueError(f"unsupported {flag}=True: linear layers have no bias")
        if d.get("pretraining_tp", 1) not in (1, None):
            raise ValueError(f"unsupported pretraining_tp={d['pretraining_tp']}: must be 1")
        if fam.sliding_window_key and d.get(fam.sliding_window_key):
            raise ValueError(f"unsupported {fam.sliding_window_key}=True: sliding-window attention is not implemented")
        layer_types = [t for t in d.get("layer_types") or [] if t != "full_attention"]
        if layer_types:
            raise ValueError(f"unsupported layer_types entry {layer_types[0]!r}: only 'full_attention' layers")
        rope = _rope_from_hf(d, fam.rope_types)
        key = fam.hf_key
        heads = int(d[key("num_heads")])
        head_dim = d.get(key("head_dim")) or int(d[key("hidden_size")]) // heads
        eos = d.get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        tied = {"always": True, "never": False}.get(fam.tied_embeddings,
                                                     bool(d.get(key("tie_word_embeddings"), False)))
        return cls(
            vocab_size=int(d[key("vocab_size")]),
            hidden_size=int(d[key("hidden_size")]),
            intermediate_size=int(d[key("intermediate_size")]),
            num_layers=int(d[key("num_layers")]),
            num_heads=heads,
            num_kv_heads=int(d.get(key("num_kv_heads")) or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get(key("rms_norm_eps"), 1e-6)),
            **rope,
            max_position_embeddings=int(d.get(key("max_position_embeddings"), 2048)),
            tie_word_embeddings=tied,
            dtype=dtype,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            family=fam.name,
        )

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, dtype: str = "float32") -> "LlamaConfig":
        """Reads ``config.json`` from a local folder or a Hugging Face Hub id.

        Args:
          path_or_id: checkpoint folder, or a Hub id (downloaded with
            ``huggingface_hub``).
          dtype: see :meth:`from_hf`.

        Returns:
          The :class:`LlamaConfig`.
        """
        folder = resolve_checkpoint(path_or_id)
        return cls.from_hf(read_config_json(folder), dtype=dtype)

    def to_hf_dict(self) -> dict:
        """The equivalent Hugging Face ``config.json`` contents (a plain dict)."""
        rope = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.rope_type != "default":
            rope["factor"] = self.rope_scaling_factor
        if self.rope_type == "llama3":
            rope.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                        original_max_position_embeddings=self.rope_original_max_position_embeddings)
        fam = self.model_family
        key = fam.hf_key
        extra = {fam.sliding_window_key: False} if fam.sliding_window_key else {}
        return {**extra,
            "architectures": [fam.architectures[0]],
            "model_type": fam.model_types[0],
            key("vocab_size"): self.vocab_size,
            key("hidden_size"): self.hidden_size,
            key("intermediate_size"): self.intermediate_size,
            key("num_layers"): self.num_layers,
            key("num_heads"): self.num_heads,
            key("num_kv_heads"): self.num_kv_heads,
            key("head_dim"): self.head_dim,
            "hidden_act": fam.hidden_act,
            key("max_position_embeddings"): self.max_position_embeddings,
            key("rms_norm_eps"): self.rms_norm_eps,
            "rope_parameters": rope,
            key("tie_word_embeddings"): self.tie_word_embeddings,
            "attention_bias": fam.qkv_bias,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.dtype,
        }

    # ----------------------------------------------------------------- presets
    @classmethod
    def llama2_7b(cls, *, dtype: str = "bfloat16") -> "LlamaConfig":
        """The Llama-2-7B shape (``meta-llama/Llama-2-7b-hf``), built in code."""
        return cls(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                   num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                   rope_theta=10000.0, max_position_embeddings=4096,
                   tie_word_embeddings=False, dtype=dtype, bos_token_id=1, eos_token_id=2)

    @classmethod
    def llama31_8b(cls, *, dtype: str = "bfloat16") -> "LlamaConfig":
        """The Llama-3.1-8B shape (``meta-llama/Llama-3.1-8B``: GQA 32/8, ``llama3`` RoPE), built in code."""
        return cls(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                   num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                   rope_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_position_embeddings=8192, max_position_embeddings=131072,
                   tie_word_embeddings=False, dtype=dtype, bos_token_id=128000, eos_token_id=128001)

    @classmethod
    def qwen25_7b(cls, *, dtype: str = "bfloat16") -> "LlamaConfig":
        """The Qwen2.5-7B shape (``Qwen/Qwen2.5-7B``: GQA 28/4, q/k/v biases), built in code."""
        return cls(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                   num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                   max_position_embeddings=131072, tie_word_embeddings=False, dtype=dtype,
                   bos_token_id=151643, eos_token_id=151643, family="qwen2")


def _rope_from_hf(d: dict, supported: tuple[str, ...]) -> dict:
    """The ``LlamaConfig`` RoPE fields (``rope_theta``, ``rope_type``, ``rope_scaling_factor`` and the
    ``llama3`` ones) of a v4 or v5 config dict (``supported``: the family's RoPE scaling types)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if params and not isinstance(params, dict):
        raise ValueError(f"unsupported rope_parameters {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"unsupported per-layer-type rope_parameters {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in supported:
        raise ValueError(f"unsupported RoPE scaling type {rope_type!r}: supported are {list(supported)}")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor={params['partial_rotary_factor']}")
    out = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type == "default":
        return out
    if "factor" not in params:
        raise ValueError(f"{rope_type} RoPE scaling without a factor: {params!r}")
    out["rope_scaling_factor"] = float(params["factor"])
    if rope_type == "llama3":
        original = params.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        for key, value in (("low_freq_factor", params.get("low_freq_factor")),
                           ("high_freq_factor", params.get("high_freq_factor")),
                           ("original_max_position_embeddings", original)):
            if value is None:
                raise ValueError(f"llama3 RoPE scaling lacks {key}: {params!r}")
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_position_embeddings=int(original))
    return out


def read_config_json(folder: str | os.PathLike) -> dict:
    """Reads ``folder/config.json``.

    Raises:
      FileNotFoundError: naming the missing file.
    """
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in checkpoint folder {folder}")
    with open(path) as f:
        return json.load(f)
