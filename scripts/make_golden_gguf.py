"""Regenerates the PyTorch reference for the SmolLM2-135M-Instruct GGUF.

Run with a separate Python environment that has torch, transformers, gguf and
numpy (not the project's JAX environment)::

    python scripts/make_golden_gguf.py [--gguf FILE]

It loads ``../shared/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf``
(override with ``--gguf``) with transformers' own GGUF support
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, dequantised to
float32, and ``AutoTokenizer`` with ``gguf_file``) and writes
``tests/golden/smollm2_gguf.npz`` (about 200 KB):

* ``texts``/``ids``/``lengths``: a few prompts (plain text, code, a GSM8K-style
  question with numbers, and a ChatML conversation rendered by the file's chat
  template) and their token ids (right-padded with -1);
* ``chat_messages_json``: the conversation, ``chat_text`` its rendering;
* ``logits_slice``: logits of prompts 0 and 3 at every position for the first
  ``V_SLICE`` vocabulary ids; ``logit_max``/``logit_argmax``/``logit_lse``: the
  maximum, its id and the log-sum-exp over the full vocabulary at every
  position of every prompt; ``top_ids``/``top_logits``: the 8 largest logits;
* ``greedy``: 16 greedy (argmax) tokens after each prompt, never stopping at EOS;
* ``weight_names``/``weight_index``/``weight_values``/``weight_sums``: for every
  tensor of transformers' dequantised state dict, ``N_SAMPLES`` values at
  fixed flat indices and the float64 sum, to check the dequantisation and the
  q/k row order value by value.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
GGUF = (ROOT.parent / "shared" / "models" / "smollm2-135m-instruct-gguf"
        / "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = ROOT / "tests" / "golden" / "smollm2_gguf.npz"
V_SLICE = 1024
N_NEW = 16
TOP = 8
N_SAMPLES = 48
TEXTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
)
CHAT = [{"role": "user", "content": "What is 12 + 30? Answer with just the number."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, default=GGUF)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    folder, name = str(args.gguf.parent), args.gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 dtype=torch.float32).eval()

    chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    texts = [*TEXTS, chat_text]
    ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    width = max(map(len, ids))
    padded = np.full((len(ids), width), -1, np.int64)
    for i, row in enumerate(ids):
        padded[i, : len(row)] = row

    stats = {k: np.full((len(ids), width), np.nan if k != "logit_argmax" else -1,
                        np.float32 if k != "logit_argmax" else np.int64)
             for k in ("logit_max", "logit_argmax", "logit_lse")}
    top_ids = np.full((len(ids), width, TOP), -1, np.int64)
    top_logits = np.full((len(ids), width, TOP), np.nan, np.float32)
    slices, greedy = {}, []
    with torch.no_grad():
        for i, row in enumerate(ids):
            logits = model(torch.tensor([row])).logits[0].float()  # [T, V]
            n = len(row)
            stats["logit_max"][i, :n] = logits.max(-1).values.numpy()
            stats["logit_argmax"][i, :n] = logits.argmax(-1).numpy()
            stats["logit_lse"][i, :n] = torch.logsumexp(logits, -1).numpy()
            values, indices = logits.topk(TOP, dim=-1)
            top_ids[i, :n], top_logits[i, :n] = indices.numpy(), values.numpy()
            if i in (0, len(ids) - 1):
                slices[i] = logits[:, :V_SLICE].numpy()
            out = model.generate(torch.tensor([row]), max_new_tokens=N_NEW, do_sample=False,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id,
                                 attention_mask=torch.ones(1, n, dtype=torch.long))
            greedy.append(out[0, n:].numpy())
            print(f"prompt {i}: {n} tokens -> {tok.decode(greedy[-1])!r}")

    names, index, values, sums = [], [], [], []
    rng = np.random.default_rng(0)
    for name, tensor in sorted(model.state_dict().items()):
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        flat = tensor.detach().float().numpy().reshape(-1)
        idx = rng.integers(0, flat.size, N_SAMPLES)
        names.append(name)
        index.append(idx)
        values.append(flat[idx])
        sums.append(flat.astype(np.float64).sum())

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, texts=np.array(texts), ids=padded, lengths=np.array([len(r) for r in ids]),
        chat_messages_json=np.array(json.dumps(CHAT)), chat_text=np.array(chat_text),
        slice_prompts=np.array(sorted(slices)), v_slice=np.array(V_SLICE),
        logits_slice_0=slices[0], logits_slice_chat=slices[len(ids) - 1],
        top_ids=top_ids, top_logits=top_logits, greedy=np.stack(greedy),
        special_ids=np.array([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]),
        weight_names=np.array(names), weight_index=np.stack(index), weight_values=np.stack(values),
        weight_sums=np.array(sums), **stats)
    print(f"{args.out}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
