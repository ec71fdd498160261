"""Reference fixtures of the Qwen2, Qwen3 and Llama-3.2 families, and a check of our exports, from PyTorch.

Three modes, two Python environments:

1. With torch, transformers, peft and safetensors (not the project's JAX environment)::

       python scripts/make_golden_families.py

   For each family it writes, relative to the repository root, a seeded random tiny model
   (2 layers, vocab 97, hidden 32) saved by transformers as safetensors, and its reference outputs:

   * ``tests/fixtures/tiny_qwen2/``: ``Qwen2ForCausalLM``, q/k/v biases, tied embeddings.
   * ``tests/fixtures/tiny_qwen3/``: ``Qwen3ForCausalLM``, q/k norms, head_dim 16 ≠ 32/4, untied.
   * ``tests/fixtures/tiny_llama32/``: ``LlamaForCausalLM`` with Llama-3.2's ``llama3`` RoPE scaling
     (chosen so that some frequencies are kept, some interpolated and some divided) and tied
     embeddings.
   * ``tests/golden/families.npz``: per family (keys prefixed ``qwen2_``, ``qwen3_``, ``llama32_``)
     float32 logits of a batch and of a left-padded batch (with ``attention_mask``/``position_ids``),
     greedy continuations of prompts, and the logits of a PEFT LoRA adapter on every linear module
     (random factors) whose weights are stored in the npz as well (``<family>_peft_<module>_A|B``).

2. With the project's JAX environment, write our exports of each tiny model and the logits our
   model computes for them::

       python scripts/make_golden_families.py --write-exports DIR

   ``DIR/<family>/merged`` (``export_merged`` of the model plus a dense update), ``DIR/<family>/bare``
   (the model with a ``config.json`` written from our config alone), ``DIR/<family>/peft``
   (``export_peft`` of a dense update), ``DIR/<family>/model.gguf`` (``export_gguf``, F32) and
   ``DIR/expected.npz``.

3. Back in the torch environment, load them with transformers and peft and compare::

       python scripts/make_golden_families.py --check-exports DIR

   It loads ``merged`` with ``AutoModelForCausalLM.from_pretrained``, the PEFT adapter with
   ``PeftModel.from_pretrained`` on the fixture, the GGUF's tensors with transformers' GGUF loader
   (the hyper-parameters from the fixture's config: that loader reads neither ``rope_freqs`` nor
   qwen3's ``key_length``), and exits non-zero when a max abs logit difference exceeds 1e-4.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path("tests/fixtures")
GOLDEN = Path("tests/golden/families.npz")
FAMILIES = ("qwen2", "qwen3", "llama32")
VOCAB = 97
PROMPTS = ([5, 17, 33, 8], [40, 2, 71], [9, 9, 60, 12, 3, 88])
NEW_TOKENS = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOLERANCE = 1e-4


def fixture_dir(family: str) -> Path:
    return FIXTURES / f"tiny_{family}"


def hf_config(family: str):
    """The tiny transformers config of a family."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=True,
                           architectures=["Qwen2ForCausalLM"])
    if family == "qwen3":
        from transformers import Qwen3Config
        return Qwen3Config(**common, head_dim=16, rope_theta=10000.0, tie_word_embeddings=False,
                           attention_bias=False, architectures=["Qwen3ForCausalLM"])
    from transformers import LlamaConfig
    # head_dim 16, theta 1e4: wavelengths 6.3 .. 19869; with original 1024, low 1, high 8 the three
    # smallest are kept, the next two interpolated and the three largest divided by the factor.
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 8.0, "original_max_position_embeddings": 1024}
    common["max_position_embeddings"] = 2048  # above the original 1024, as in Llama-3.2
    return LlamaConfig(**common, head_dim=16, rope_parameters=rope, tie_word_embeddings=True,
                       architectures=["LlamaForCausalLM"])


def model_class(family: str):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
    return {"qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM, "llama32": LlamaForCausalLM}[family]


def left_padded_batch(rng: np.random.Generator, lengths, width: int):
    """Left-padded tokens, attention mask and HF-style position ids."""
    tokens = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(3, VOCAB, n)
        mask[i, width - n:] = 1
    return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def logits_of(model, tokens, mask=None, positions=None) -> np.ndarray:
    import torch

    kwargs = {}
    if mask is not None:
        kwargs = {"attention_mask": torch.tensor(mask), "position_ids": torch.tensor(positions)}
    with torch.no_grad():
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


def make_family(family: str, seed: int) -> dict[str, np.ndarray]:
    """Saves the tiny model of ``family`` and returns its reference outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = model_class(family)(hf_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm gains: around 1, not exactly 1
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.25)
    folder = fixture_dir(family)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").unlink(missing_ok=True)

    rng = np.random.default_rng(seed)
    out = {"tokens": rng.integers(0, VOCAB, (2, 12))}
    out["logits"] = logits_of(model, out["tokens"])
    out["padded_tokens"], out["padded_mask"], out["padded_positions"] = left_padded_batch(rng, (10, 7, 4), 10)
    out["padded_logits"] = logits_of(model, out["padded_tokens"], out["padded_mask"], out["padded_positions"])
    prompts = np.zeros((len(PROMPTS), max(map(len, PROMPTS))), np.int64)
    generated = []
    for i, p in enumerate(PROMPTS):
        prompts[i, :len(p)] = p
        with torch.no_grad():
            g = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        generated.append(g[0, len(p):].numpy())
    out.update(prompts=prompts, prompt_lengths=np.array([len(p) for p in PROMPTS]), generated=np.stack(generated))

    # A PEFT LoRA on every linear module, random factors; its weights travel in the npz.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                  target_modules=LORA_TARGETS)).eval()
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, 0.3)
                short = name.split("base_model.model.model.", 1)[1].replace(".default.weight", "")
                out[f"peft_{short}"] = p.detach().numpy().copy()
    out["peft_logits"] = logits_of(peft_model, out["tokens"])
    return out


def make_all() -> None:
    os.chdir(ROOT)
    golden = {}
    for seed, family in enumerate(FAMILIES):
        golden.update({f"{family}_{k}": v for k, v in make_family(family, seed).items()})
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(GOLDEN, **golden)
    for path in sorted([*(p for f in FAMILIES for p in fixture_dir(f).iterdir()), GOLDEN]):
        print(f"{path}: {path.stat().st_size} bytes")


# ------------------------------------------------------------------ exports (JAX, then torch)
def write_exports(out: Path) -> None:
    """Exports each tiny model with our code and records the logits our JAX model gives them."""
    sys.path.insert(0, str(ROOT))
    import jax.numpy as jnp

    from fedhl_jax import runtime
    from fedhl_jax.model import (export_gguf, export_merged, export_peft, forward, load_pretrained,
                                 lora_targets, merge_delta, truncate_dense)

    golden = np.load(ROOT / GOLDEN)
    expected = {}
    for family in FAMILIES:
        cfg, params = load_pretrained(ROOT / fixture_dir(family))
        fwd = runtime.jit(lambda p, t, cfg=cfg: forward(cfg, p, t), cpu_matmul="accurate")
        tokens = golden[f"{family}_tokens"]
        rng = np.random.default_rng(7)
        delta = {n: jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32)
                 for n, s in lora_targets(cfg, "all-linear").items()}
        export_merged(out / family / "merged", cfg, params, delta, ROOT / fixture_dir(family))
        expected[f"{family}_merged"] = np.asarray(fwd(merge_delta(params, delta), tokens))
        export_merged(out / family / "bare", cfg, params)  # config.json from LlamaConfig.to_hf_dict alone
        expected[f"{family}_bare"] = np.asarray(fwd(params, tokens))
        G = {n: 0.1 * rng.standard_normal(s) for n, s in lora_targets(cfg, ("q_proj", "v_proj", "down_proj")).items()}
        export_peft(out / family / "peft", G, rank=3, alpha=16.0, base_model_name_or_path=str(ROOT / fixture_dir(family)))
        truncated = {n: jnp.asarray(g, jnp.float32) for n, g in truncate_dense(G, 3).items()}
        expected[f"{family}_peft"] = np.asarray(fwd(merge_delta(params, truncated), tokens))
        export_gguf(out / family / "model.gguf", cfg, params, dtype="f32")
        expected[f"{family}_gguf"] = np.asarray(fwd(params, tokens))
        expected[f"{family}_tokens"] = tokens
    np.savez(out / "expected.npz", **expected)
    print(f"wrote exports and expected logits to {out}")


def check_exports(out: Path) -> bool:
    """Loads our exports with transformers and peft; True when every logit difference is within 1e-4."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    expected = np.load(out / "expected.npz")
    results = []

    def report(name: str, got: np.ndarray, want: np.ndarray) -> None:
        diff = float(np.abs(got - want).max())
        results.append(diff <= TOLERANCE)
        print(f"{name:<48} max|Δlogit| = {diff:.3e}  {'OK' if diff <= TOLERANCE else 'FAIL'}")

    for family in FAMILIES:
        tokens = expected[f"{family}_tokens"]
        merged = AutoModelForCausalLM.from_pretrained(out / family / "merged", dtype=torch.float32).eval()
        report(f"{family} merged ({type(merged).__name__})", logits_of(merged, tokens), expected[f"{family}_merged"])
        bare = AutoModelForCausalLM.from_pretrained(out / family / "bare", dtype=torch.float32).eval()
        report(f"{family} config.json from our config alone", logits_of(bare, tokens), expected[f"{family}_bare"])
        base = AutoModelForCausalLM.from_pretrained(ROOT / fixture_dir(family), dtype=torch.float32).eval()
        peft_model = PeftModel.from_pretrained(base, out / family / "peft").eval()
        report(f"{family} peft (PeftModel.from_pretrained)", logits_of(peft_model, tokens), expected[f"{family}_peft"])
        # transformers' GGUF loader reads neither rope_freqs (llama3 scaling) nor qwen3's key_length, so the
        # hyper-parameters come from the fixture's config; the tensors (names, q/k row order, biases, norms)
        # from the file.
        gguf_model = AutoModelForCausalLM.from_pretrained(out / family, gguf_file="model.gguf", dtype=torch.float32,
                                                          config=AutoConfig.from_pretrained(ROOT / fixture_dir(family)))
        report(f"{family} gguf (transformers gguf_file=)", logits_of(gguf_model.eval(), tokens),
               expected[f"{family}_gguf"])
    print(f"{sum(results)}/{len(results)} checks passed")
    return all(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-exports", type=Path, metavar="DIR", help="step 2 (JAX environment)")
    parser.add_argument("--check-exports", type=Path, metavar="DIR", help="step 3 (torch environment)")
    args = parser.parse_args()
    if args.write_exports:
        args.write_exports.mkdir(parents=True, exist_ok=True)
        write_exports(args.write_exports)
    elif args.check_exports:
        sys.exit(0 if check_exports(args.check_exports) else 1)
    else:
        make_all()


if __name__ == "__main__":
    main()
