"""Llama-style decoders in pure JAX with rank-masked LoRA, HF/GGUF checkpoints, generation and export.

The family-specific pieces (config keys, weight names, GGUF architecture, block details) are one
``ModelFamily`` each in :mod:`fedhl_jax.model.families`. See ``docs/model.md`` for the parameter
layout and conventions.
"""

from fedhl_jax.model.adapters import (adapter_delta, init_adapter, lora_targets, merge_delta,
                                      per_layer_adapter, resolve_targets, stacked_adapter)
from fedhl_jax.model.checkpoint import (hf_key_to_path, load_pretrained, load_tokenizer,
                                        path_to_hf_key, resolve_checkpoint)
from fedhl_jax.model.architecture import LlamaConfig
from fedhl_jax.model.families import (ModelFamily, family_for_gguf_arch, family_for_model_type, get_family,
                                      register_family)
from fedhl_jax.model.hub import ModelSource, resolve_model_source
from fedhl_jax.model.export import (export_merged, export_peft, load_peft,
                                    lora_factors_from_dense, truncate_dense)
from fedhl_jax.model.gguf import gguf_config, load_gguf
from fedhl_jax.model.gguf_export import export_gguf
from fedhl_jax.model.gguf_tokenizer import apply_chat_template, load_gguf_tokenizer
from fedhl_jax.model.generate import generate, left_pad, sample_logits, strip_after_eos
from fedhl_jax.model.llama import (LORA_MODULES, REMAT_POLICIES, flatten_params, forward,
                                   forward_cached, init_cache, init_params, layer_shapes, loss_fn,
                                   module_name, module_shapes, param_shapes, token_losses,
                                   unflatten_params)

__all__ = [
    "LORA_MODULES", "LlamaConfig", "ModelFamily", "ModelSource", "REMAT_POLICIES", "adapter_delta", "apply_chat_template",
    "export_gguf", "export_merged", "export_peft", "family_for_gguf_arch", "family_for_model_type",
    "get_family", "register_family", "resolve_model_source", "flatten_params", "forward", "forward_cached",
    "generate", "gguf_config", "hf_key_to_path", "init_adapter", "init_cache", "init_params",
    "layer_shapes", "left_pad", "load_gguf", "load_gguf_tokenizer", "load_peft", "load_pretrained",
    "load_tokenizer", "lora_factors_from_dense", "lora_targets", "loss_fn", "merge_delta",
    "module_name", "module_shapes", "param_shapes", "path_to_hf_key", "per_layer_adapter",
    "resolve_checkpoint", "resolve_targets", "sample_logits", "stacked_adapter", "strip_after_eos",
    "token_losses", "truncate_dense", "unflatten_params",
]
