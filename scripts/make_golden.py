"""Regenerates the PyTorch reference fixtures used by the JAX model tests.

Run with a separate Python environment that has torch, transformers, peft,
safetensors and numpy (not the project's JAX environment)::

    python scripts/make_golden.py

It writes, relative to the repository root:

1. ``tests/fixtures/tiny_llama/``: a seeded random ``LlamaForCausalLM``
   (2 layers, hidden 32 ≠ intermediate 48, 4 heads / 2 KV heads, untied
   embeddings, vocab 97), saved by transformers as safetensors.
2. ``tests/golden/tiny_llama_logits.npz``: its logits for fixed token batches,
   including a left-padded batch with ``attention_mask``/``position_ids``.
3. ``tests/golden/stories260K_logits.npz``: logits and greedy continuations of
   ``../shared/models/stories260K-hf`` (skipped when that folder is absent).
4. ``tests/fixtures/tiny_peft/``: a rank-4 LoRA adapter saved by peft for the
   tiny model (random non-zero ``lora_B``), and
   ``tests/golden/tiny_peft_logits.npz`` with the PEFT model's logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
TINY = Path("tests/fixtures/tiny_llama")  # relative: recorded in the PEFT config
PEFT_DIR = Path("tests/fixtures/tiny_peft")
GOLDEN = Path("tests/golden")
STORIES = ROOT.parent / "shared" / "models" / "stories260K-hf"
STORIES_PROMPTS = ([1, 403, 407, 261, 378], [1, 403], [1, 261, 376, 298, 315, 421, 395, 317])


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["LlamaForCausalLM"])


def left_padded_batch(rng: np.random.Generator, vocab: int, lengths, width: int):
    """Left-padded tokens, attention mask and HF-style position ids."""
    tokens = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(3, vocab, n)
        mask[i, width - n:] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


@torch.no_grad()
def logits_of(model, tokens, mask=None, positions=None) -> np.ndarray:
    kwargs = {}
    if mask is not None:
        kwargs = {"attention_mask": torch.tensor(mask), "position_ids": torch.tensor(positions)}
    return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


def make_tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm gains: around 1, not exactly 1
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25)
    model.save_pretrained(TINY, safe_serialization=True)
    return model


def tiny_golden(model) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, (2, 12))
    lp_tokens, lp_mask, lp_pos = left_padded_batch(rng, 97, (10, 7, 4), 10)
    np.savez_compressed(
        GOLDEN / "tiny_llama_logits.npz", tokens=tokens, logits=logits_of(model, tokens),
        padded_tokens=lp_tokens, padded_mask=lp_mask, padded_positions=lp_pos,
        padded_logits=logits_of(model, lp_tokens, lp_mask, lp_pos))


def tiny_peft() -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    # loaded from disk so that peft records base_model_name_or_path
    model = LlamaForCausalLM.from_pretrained(TINY).eval()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    peft_model = get_peft_model(model, config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(PEFT_DIR, safe_serialization=True)
    (PEFT_DIR / "README.md").unlink(missing_ok=True)  # peft's model-card template
    config_file = PEFT_DIR / "adapter_config.json"  # peft stores target_modules as a set
    config = json.loads(config_file.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    tokens = np.load(GOLDEN / "tiny_llama_logits.npz")["tokens"]
    np.savez_compressed(GOLDEN / "tiny_peft_logits.npz", tokens=tokens,
                        logits=logits_of(peft_model, tokens))
    # the saved adapter must reload to the same logits in peft itself
    base = LlamaForCausalLM.from_pretrained(TINY).eval()
    reloaded = PeftModel.from_pretrained(base, PEFT_DIR).eval()
    diff = np.abs(logits_of(reloaded, tokens) - logits_of(peft_model, tokens)).max()
    assert diff < 1e-5, diff


def stories_golden() -> None:
    if not STORIES.is_dir():
        print(f"skipping stories260K: {STORIES} not found")
        return
    model = LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    rng = np.random.default_rng(1)
    tokens = np.concatenate([np.array([[1, 403, 407, 261, 378, 432, 383, 286, 261, 376,
                                        298, 315, 421, 395, 317, 426]]),
                             rng.integers(3, 512, (1, 16))])
    generated = []
    with torch.no_grad():
        for prompt in STORIES_PROMPTS:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            generated.append(out[0, len(prompt):].numpy())
    prompts = np.zeros((len(STORIES_PROMPTS), max(map(len, STORIES_PROMPTS))), np.int64)
    for i, p in enumerate(STORIES_PROMPTS):
        prompts[i, : len(p)] = p
    np.savez_compressed(GOLDEN / "stories260K_logits.npz", tokens=tokens,
                        logits=logits_of(model, tokens), prompts=prompts,
                        prompt_lengths=np.array([len(p) for p in STORIES_PROMPTS]),
                        generated=np.stack(generated))


def main() -> None:
    os.chdir(ROOT)
    GOLDEN.mkdir(parents=True, exist_ok=True)
    model = make_tiny()
    tiny_golden(model)
    stories_golden()
    tiny_peft()
    for path in sorted([*TINY.iterdir(), *PEFT_DIR.iterdir(), *GOLDEN.iterdir()]):
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
