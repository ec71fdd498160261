"""Cross-checks our GGUF exports with transformers' GGUF loader (PyTorch).

Two steps, in two Python environments:

1. With the project's JAX environment, export SmolLM2-135M-Instruct (from
   ``../shared``, or ``--gguf``) with a random dense update merged into every
   q/k/v/o projection of the first two blocks, as F16 and as Q8_0, and write the
   logits our JAX model computes on each exported file::

       python scripts/check_gguf_export_torch.py --write DIR

   ``DIR/merged-f16.gguf``, ``DIR/merged-q8_0.gguf``, ``DIR/expected.npz``.

2. With an environment that has torch, transformers and gguf, load each file
   with ``AutoModelForCausalLM.from_pretrained(DIR, gguf_file=...)`` and compare::

       python scripts/check_gguf_export_torch.py DIR

   It prints the max abs logit difference per file (and against the merged
   float32 model before export) and exits non-zero if transformers' logits on
   an exported file differ from ours on the same file by more than
   ``REL_TOLERANCE`` of the largest logit, or if its tokenizer disagrees.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GGUF = (ROOT.parent / "shared" / "models" / "smollm2-135m-instruct-gguf"
        / "SmolLM2-135M-Instruct.Q4_1.gguf")
DTYPES = ("f16", "q8_0")
REL_TOLERANCE = 1e-5
PROMPT = [{"role": "user", "content": "Write a Python function that returns the square of x."}]


def write(out: Path, source: Path, cpu_matmul: str = "accurate") -> None:
    """Exports the merged model and writes the logits our JAX implementation expects."""
    sys.path.insert(0, str(ROOT))
    import jax.numpy as jnp

    from fedhl_jax import runtime

    from fedhl_jax.model import (apply_chat_template, export_gguf, forward, load_pretrained,
                                 load_tokenizer, merge_delta, module_name, module_shapes)

    cfg, params = load_pretrained(source)
    tok = load_tokenizer(source)
    tokens = np.array([apply_chat_template(tok, PROMPT, tokenize=True)])
    rng = np.random.default_rng(0)
    delta = {module_name(layer, short): jnp.asarray(0.01 * rng.standard_normal(shape), jnp.float32)
             for layer in (0, 1) for short, shape in module_shapes(cfg).items()
             if short.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))}
    fwd = runtime.jit(lambda p, t: forward(cfg, p, t), cpu_matmul=cpu_matmul)
    expected = {"tokens": tokens, "merged_f32": np.asarray(fwd(merge_delta(params, delta), tokens))}
    out.mkdir(parents=True, exist_ok=True)
    for dtype in DTYPES:
        file = export_gguf(out / f"merged-{dtype}.gguf", cfg, params, delta, dtype=dtype,
                           gguf_source=source)
        _, reloaded = load_pretrained(file)
        expected[dtype] = np.asarray(fwd(reloaded, tokens))
        print(f"{file}: {file.stat().st_size} bytes; ours on it vs merged float32: "
              f"{np.abs(expected[dtype] - expected['merged_f32']).max():.3g}")
    np.savez(out / "expected.npz", **expected)


def check(folder: Path) -> int:
    """Loads the exported files in transformers and compares logits and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = np.load(folder / "expected.npz")
    tokens = expected["tokens"]
    failed = 0
    for dtype in DTYPES:
        name = f"merged-{dtype}.gguf"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        with torch.no_grad():
            logits = model(torch.tensor(tokens)).logits.float().numpy()
        ours = expected[dtype]
        diff = float(np.abs(logits - ours).max())
        scale = float(np.abs(ours).max())
        vs_f32 = float(np.abs(logits - expected["merged_f32"]).max())
        chat = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
        same_ids = tok(chat, add_special_tokens=False)["input_ids"] == tokens[0].tolist()
        ok = diff <= REL_TOLERANCE * scale and same_ids
        failed += not ok
        print(f"{name}: transformers vs ours on the file: max abs {diff:.3g} (largest logit "
              f"{scale:.3g}); transformers vs merged float32 before export: {vs_f32:.3g}; "
              f"argmax agreement {np.mean(logits.argmax(-1) == ours.argmax(-1)):.3f}; "
              f"tokenizer ids identical: {same_ids} -> {'OK' if ok else 'FAIL'}")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--write", action="store_true", help="step 1 (JAX environment)")
    parser.add_argument("--gguf", type=Path, default=GGUF, help="source GGUF for --write")
    parser.add_argument("--cpu-matmul", default="accurate", choices=["fast", "accurate"],
                        help="fedhl_jax.runtime mode of our logits (--write; default: accurate)")
    args = parser.parse_args()
    if args.write:
        write(args.dir, args.gguf, args.cpu_matmul)
    else:
        sys.exit(check(args.dir))


if __name__ == "__main__":
    main()
