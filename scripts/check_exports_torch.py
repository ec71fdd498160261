"""Cross-checks our Hugging Face exports with transformers and peft (PyTorch).

Two steps, in two Python environments:

1. With the project's JAX environment, write the exports and the logits our
   JAX model expects for them::

       python scripts/check_exports_torch.py --write DIR

   ``DIR/merged`` is the tiny test model with a dense update merged
   (``export_merged``), ``DIR/base`` the unmodified tiny model, ``DIR/peft`` a
   rank-3 PEFT adapter truncated from a dense update (``export_peft``),
   ``DIR/stories_merged`` the stories260K model with a merged update and its
   tokenizer (when ``../shared`` is present), and ``DIR/expected.npz`` the logits.

2. With an environment that has torch, transformers and peft, load them and
   compare::

       python scripts/check_exports_torch.py DIR

   It loads ``DIR/merged`` with ``LlamaForCausalLM.from_pretrained``, the PEFT
   adapter with ``PeftModel.from_pretrained`` on ``DIR/base``, and exits
   non-zero if any max abs logit difference exceeds the tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny_llama"
STORIES = ROOT.parent / "shared" / "models" / "stories260K-hf"
TOLERANCE = 1e-4
STORIES_PROMPT = "Once upon a time"


def write(out: Path) -> None:
    """Writes the exports and expected logits with the JAX implementation."""
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp

    from fedhl_jax.model import (export_merged, export_peft, forward, load_pretrained,
                                 load_tokenizer, lora_targets, merge_delta, truncate_dense)

    rng = np.random.default_rng(0)
    cfg, params = load_pretrained(TINY)
    tokens = rng.integers(0, cfg.vocab_size, (2, 11))
    expected = {"tokens": tokens}

    delta = {n: jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32)
             for n, s in lora_targets(cfg, "all-linear").items()}
    export_merged(out / "merged", cfg, params, delta, TINY)
    export_merged(out / "base", cfg, params, None, TINY)
    expected["merged"] = np.asarray(forward(cfg, merge_delta(params, delta), tokens))

    G = {n: 0.1 * rng.standard_normal(s)
         for n, s in lora_targets(cfg, ("q_proj", "v_proj", "down_proj")).items()}
    export_peft(out / "peft", G, rank=3, alpha=16.0, base_model_name_or_path=str(out / "base"))
    truncated = {n: jnp.asarray(g, jnp.float32) for n, g in truncate_dense(G, 3).items()}
    expected["peft"] = np.asarray(forward(cfg, merge_delta(params, truncated), tokens))

    if STORIES.is_dir():
        s_cfg, s_params = load_pretrained(STORIES)
        s_delta = {n: jnp.asarray(0.02 * rng.standard_normal(s), jnp.float32)
                   for n, s in lora_targets(s_cfg, ("q_proj", "v_proj")).items()}
        export_merged(out / "stories_merged", s_cfg, s_params, s_delta, STORIES)
        s_tokens = np.array([load_tokenizer(STORIES)(STORIES_PROMPT).input_ids])
        expected["stories_tokens"] = s_tokens
        expected["stories"] = np.asarray(forward(s_cfg, merge_delta(s_params, s_delta), s_tokens))
    np.savez(out / "expected.npz", **expected)
    print(f"wrote exports and expected logits to {out} (jax {jax.__version__})")


def check(out: Path) -> bool:
    """Loads the exports with transformers/peft and compares logits; True if all pass."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    expected = np.load(out / "expected.npz")

    @torch.no_grad()
    def logits(model, tokens):
        return model.eval()(torch.tensor(tokens)).logits.float().numpy()

    results = []

    def report(name: str, got: np.ndarray, want: np.ndarray) -> None:
        diff = float(np.abs(got - want).max())
        results.append(diff <= TOLERANCE)
        print(f"{name:<44} max|Δlogit| = {diff:.3e}  {'OK' if diff <= TOLERANCE else 'FAIL'}")

    tokens = expected["tokens"]
    merged = LlamaForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    report("merged (LlamaForCausalLM.from_pretrained)", logits(merged, tokens), expected["merged"])
    base = LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "peft")
    report("peft (PeftModel.from_pretrained)", logits(peft_model, tokens), expected["peft"])
    merged_back = peft_model.merge_and_unload()
    report("peft merge_and_unload", logits(merged_back, tokens), expected["peft"])
    if (out / "stories_merged").is_dir():
        tok = AutoTokenizer.from_pretrained(out / "stories_merged")
        ids = tok(STORIES_PROMPT).input_ids
        ok = ids == expected["stories_tokens"][0].tolist()
        results.append(ok)
        print(f"{'stories_merged tokenizer':<44} {ids} {'OK' if ok else 'FAIL'}")
        model = LlamaForCausalLM.from_pretrained(out / "stories_merged", dtype=torch.float32)
        report("stories_merged (tied embeddings)", logits(model, expected["stories_tokens"]),
               expected["stories"])
    print(f"torch {torch.__version__}: {sum(results)}/{len(results)} checks passed")
    return all(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder with the exports")
    parser.add_argument("--write", action="store_true",
                        help="write the exports with the JAX implementation (JAX environment)")
    args = parser.parse_args()
    if args.write:
        args.dir.mkdir(parents=True, exist_ok=True)
        write(args.dir)
    elif not check(args.dir):
        sys.exit(1)


if __name__ == "__main__":
    main()
