"""Throughput of a federated-LoRA round run the usual PyTorch way: a Python loop over clients.

This is the baseline that PyTorch federated-LoRA code bases (FlexLoRA, FLoRA, OpenFedLLM) follow
when they simulate a round on one machine: for each client, load its starting LoRA factors into a
PEFT model, train ``K`` local steps with AdamW, and read the trained factors back for the server.

The base ``LlamaForCausalLM`` is built once. One LoRA adapter per *distinct* rank is attached to
it with ``PeftModel.add_adapter`` (so all ranks share the same frozen base weights in memory);
per client the adapter of its rank is activated with ``set_adapter``, its ``lora_A``/``lora_B``
weights are overwritten from the client's numpy factors, a fresh ``torch.optim.AdamW`` is created
(clients never share optimizer state) and ``K`` steps run on next-token cross-entropy.

Example::

    python benchmarks/torch_peft_loop.py --model stories260K \\
        --model-path ../shared/models/stories260K-hf --clients 100 --ranks 2,4,8,16 \\
        --local-steps 5 --batch 4 --seq 128 --rounds 1 --threads 2 --json out.json

The JSON written holds tokens/s (clients x K x batch x seq per round, divided by the mean
seconds per timed round), the per-phase split of a round, a forward+backward FLOP estimate per
token, the float32 matmul rate the machine reaches with torch under the same thread count, and
the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

MEDIUM_CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=8, vocab_size=4096,
                     max_position_embeddings=1024, tie_word_embeddings=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("stories260K", "smollm2", "medium"), default="stories260K")
    p.add_argument("--model-path", default=None,
                   help="Hugging Face model folder (stories260K), or a GGUF file or a folder holding "
                        "one (smollm2: transformers dequantises it to float32); unused for medium")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--ranks", default="2,4,8,16", help="comma-separated ranks, cycled over clients")
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated LoRA target modules")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=1, help="timed rounds (after the warm-up rounds)")
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--warmup-clients", type=int, default=None,
                   help="clients in each warm-up round (default: all; at least one per distinct "
                        "rank is enough to warm every adapter up)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads (default: all cores)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers attention implementation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matmul-sizes", default="1024,2048",
                   help="sides of the square float32 matmuls used to measure the machine's peak")
    p.add_argument("--matmul-seconds", type=float, default=2.0,
                   help="how long to repeat each matmul size when measuring the peak")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Model


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.model == "stories260K":
        if not args.model_path:
            raise SystemExit("--model-path is required for --model stories260K")
        model = LlamaForCausalLM.from_pretrained(args.model_path, dtype=torch.float32, use_safetensors=True,
                                                 attn_implementation=args.attn)
    elif args.model == "smollm2":
        if not args.model_path:
            raise SystemExit("--model-path (a .gguf file or its folder) is required for --model smollm2")
        folder, name = gguf_location(args.model_path)
        model = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation=args.attn)
    else:
        torch.manual_seed(args.seed)
        cfg = LlamaConfig(**MEDIUM_CONFIG, attn_implementation=args.attn)
        model = LlamaForCausalLM(cfg).to(torch.float32)
    model.config.use_cache = False
    return model


def gguf_location(path: str) -> tuple[str, str]:
    """``(folder, file name)`` of a GGUF file given as the file or as a folder holding one."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if not names:
            raise SystemExit(f"no .gguf file in {path}")
        return path, names[0]
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def attach_adapters(base, ranks: list[int], alpha: float, targets: list[str]):
    """One PEFT adapter per distinct rank, all on the same base model."""
    from peft import LoraConfig, get_peft_model

    def cfg(r):
        return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM")

    distinct = sorted(set(ranks))
    model = get_peft_model(base, cfg(distinct[0]), adapter_name=f"r{distinct[0]}")
    for r in distinct[1:]:
        model.add_adapter(f"r{r}", cfg(r))
    # name -> [(module name, lora_A weight, lora_B weight)] in a fixed order
    factors = {}
    for r in distinct:
        name = f"r{r}"
        mods = []
        for mname, mod in model.named_modules():
            if hasattr(mod, "lora_A") and name in getattr(mod, "lora_A", {}):
                mods.append((mname, mod.lora_A[name].weight, mod.lora_B[name].weight))
        factors[name] = mods
    return model, factors


def matmul_params(base) -> int:
    """Parameters in matmuls per token: every linear layer incl. the LM head, not the embedding."""
    n = 0
    for mod in base.modules():
        if isinstance(mod, torch.nn.Linear):
            n += mod.weight.numel()
    return n


# --------------------------------------------------------------------------------------------
# Benchmark


def matmul_peak(sizes: list[int], seconds: float, window: float = 0.2) -> dict:
    """float32 GFLOP/s of square ``n x n @ n x n`` torch matmuls.

    Each size is repeated for about ``seconds``, timed in windows of about ``window`` seconds.
    The peak is the best window over all sizes (on a shared machine the median is pulled down by
    other processes; both are returned).
    """
    g = torch.Generator().manual_seed(0)
    by_size = {}
    for n in sizes:
        a = torch.randn(n, n, generator=g)
        b = torch.randn(n, n, generator=g)
        c = torch.empty(n, n)
        for _ in range(3):
            torch.mm(a, b, out=c)
        rates, t_start = [], time.perf_counter()
        while time.perf_counter() - t_start < seconds or len(rates) < 3:
            reps, t0 = 0, time.perf_counter()
            while True:
                torch.mm(a, b, out=c)
                reps += 1
                dt = time.perf_counter() - t0
                if dt >= window:
                    break
            rates.append(2.0 * n ** 3 * reps / dt / 1e9)
        by_size[str(n)] = {"best": max(rates), "median": float(np.median(rates))}
    best_n = max(by_size, key=lambda k: by_size[k]["best"])
    return {"peak": by_size[best_n]["best"], "peak_size": int(best_n), "by_size": by_size}


def starting_factors(factors, rng):
    """Per-rank server factors (numpy, PEFT layout: A [r, d_in], B [d_out, r])."""
    out = {}
    for name, mods in factors.items():
        out[name] = [(rng.normal(0, 0.02, size=tuple(a.shape)).astype(np.float32),
                      rng.normal(0, 0.02, size=tuple(b.shape)).astype(np.float32))
                     for _, a, b in mods]
    return out


def run_client(model, mods, start, tokens, lr, timing):
    """One client: load factors, K AdamW steps, read factors back. Returns (factors, last loss)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for (_, a, b), (a_np, b_np) in zip(mods, start):
            a.copy_(torch.from_numpy(a_np))
            b.copy_(torch.from_numpy(b_np))
    params = [p for _, a, b in mods for p in (a, b)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t1 = time.perf_counter()
    loss = None
    for k in range(tokens.shape[0]):
        batch = tokens[k]
        out = model(input_ids=batch, labels=batch)  # HF shifts labels: every next token is a target
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    t2 = time.perf_counter()
    trained = [(a.detach().numpy().copy(), b.detach().numpy().copy()) for _, a, b in mods]
    t3 = time.perf_counter()
    timing["load"] += t1 - t0
    timing["train"] += t2 - t1
    timing["readback"] += t3 - t2
    return trained, float(loss.detach())


def run_round(model, factors, starts, client_ranks, tokens_np, lr, timing):
    losses = []
    for i, r in enumerate(client_ranks):
        name = f"r{r}"
        t0 = time.perf_counter()
        model.set_adapter(name)
        timing["set_adapter"] += time.perf_counter() - t0
        tokens = torch.from_numpy(tokens_np[i])
        _, loss = run_client(model, factors[name], starts[name], tokens, lr, timing)
        losses.append(loss)
    return losses


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    targets = [t for t in args.targets.split(",") if t]
    client_ranks = [ranks[i % len(ranks)] for i in range(args.clients)]

    mm = matmul_peak([int(n) for n in args.matmul_sizes.split(",") if n], args.matmul_seconds)
    peak = mm["peak"]
    print(f"float32 matmul peak, {args.threads} threads: {peak:.1f} GFLOP/s (n={mm['peak_size']}; "
          + ", ".join(f"n={n} median {v['median']:.1f}" for n, v in mm["by_size"].items()) + ")",
          flush=True)

    torch.manual_seed(args.seed)
    base = build_base(args)
    cfg = base.config
    n_params_base = sum(p.numel() for p in base.parameters())
    n_matmul = matmul_params(base)
    model, factors = attach_adapters(base, client_ranks, args.alpha, targets)
    model.train()
    n_lora = {name: sum(a.numel() + b.numel() for _, a, b in mods)
              for name, mods in factors.items()}

    rng = np.random.default_rng(args.seed)
    starts = starting_factors(factors, rng)
    shape = (args.clients, args.local_steps, args.batch, args.seq)

    def tokens():
        return rng.integers(0, cfg.vocab_size, size=shape, dtype=np.int64)

    n_warm = args.clients if args.warmup_clients is None else min(args.warmup_clients,
                                                                   args.clients)
    load_before = os.getloadavg()
    for w in range(args.warmup_rounds):
        t0 = time.perf_counter()
        run_round(model, factors, starts, client_ranks[:n_warm], tokens()[:n_warm], args.lr,
                  {"set_adapter": 0.0, "load": 0.0, "train": 0.0, "readback": 0.0})
        print(f"warm-up round {w}: {time.perf_counter() - t0:.2f} s", flush=True)

    timing = {"set_adapter": 0.0, "load": 0.0, "train": 0.0, "readback": 0.0}
    round_seconds, losses = [], []
    for rnd in range(args.rounds):
        tok = tokens()  # drawn before the clock starts
        t0 = time.perf_counter()
        losses = run_round(model, factors, starts, client_ranks, tok, args.lr, timing)
        dt = time.perf_counter() - t0
        round_seconds.append(dt)
        print(f"round {rnd}: {dt:.2f} s, mean last-step loss {np.mean(losses):.4f}", flush=True)

    load_after = os.getloadavg()
    sec = float(np.mean(round_seconds))
    tokens_per_round = args.clients * args.local_steps * args.batch * args.seq
    # Forward+backward estimate per token: 6 x (parameters in matmuls, incl. the LM head; the
    # embedding lookup is not a matmul) + 6 x layers x seq x hidden for the attention scores and
    # mixing (Kaplan et al. 2020 counting). LoRA factors add <1% and are left out. This is the
    # usual convention and is what ``train_flops_per_token_estimate`` reports. With a frozen base
    # the backward pass computes activation gradients but no base-weight gradients, so the work
    # actually done is closer to 4 x params (+ the same attention term): reported alongside.
    attn_tok = 6 * cfg.num_hidden_layers * args.seq * cfg.hidden_size
    flops_tok = 6 * n_matmul + attn_tok
    flops_tok_frozen = 4 * n_matmul + attn_tok
    tps = tokens_per_round / sec
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    result = {
        "tokens_per_s": tps,
        "seconds_per_round": sec,
        "round_seconds": round_seconds,
        "seconds_per_round_median": float(np.median(round_seconds)),
        "tokens_per_s_best_round": tokens_per_round / min(round_seconds),
        "clients": args.clients,
        "ranks": ranks,
        "local_steps": args.local_steps,
        "batch": args.batch,
        "seq": args.seq,
        "alpha": args.alpha,
        "targets": targets,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "warmup_clients": n_warm,
        "model": args.model,
        "attn_implementation": args.attn,
        "model_params": n_params_base,
        "model_matmul_params": n_matmul,
        "lora_params_per_rank": {k[1:]: v for k, v in n_lora.items()},
        "torch_version": torch.__version__,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "loadavg_1min_before_after": [load_before[0], load_after[0]],
        "train_flops_per_token_estimate": flops_tok,
        "train_flops_estimate_note": "6*matmul_params (linear layers incl. LM head) "
                                     "+ 6*layers*seq*hidden (attention); forward+backward",
        "train_flops_per_token_frozen_base": flops_tok_frozen,
        "achieved_gflops_estimate": tps * flops_tok / 1e9,
        "achieved_gflops_frozen_base": tps * flops_tok_frozen / 1e9,
        "matmul_peak_gflops": peak,
        "matmul_peak_size": mm["peak_size"],
        "matmul_gflops_by_size": mm["by_size"],
        "fraction_of_matmul_peak": tps * flops_tok / 1e9 / peak,
        "fraction_of_matmul_peak_frozen_base": tps * flops_tok_frozen / 1e9 / peak,
        "phase_seconds_per_round": {k: v / args.rounds for k, v in timing.items()},
        "mean_final_loss": float(np.mean(losses)) if losses else None,
        "peak_rss_mb": peak_rss_mb,
        "base_reuse": "one LlamaForCausalLM; one PEFT adapter per distinct rank via add_adapter; "
                      "set_adapter + in-place copy of lora_A/lora_B per client; "
                      "fresh AdamW per client",
        "python": platform.python_version(),
    }
    try:
        import peft
        import transformers
        result["peft_version"] = peft.__version__
        result["transformers_version"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass

    print(f"{args.model}: {tps:.1f} tokens/s, {sec:.2f} s/round, "
          f"~{result['achieved_gflops_frozen_base']:.1f} GFLOP/s at 4N "
          f"({100 * result['fraction_of_matmul_peak_frozen_base']:.1f}% of matmul peak; "
          f"{100 * result['fraction_of_matmul_peak']:.1f}% at 6N), "
          f"peak RSS {peak_rss_mb:.0f} MB", flush=True)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
