#!/usr/bin/env python3
"""Benchmark suite: local-training throughput against per-client loops, MFU, compile time,
server scaling, randomized SVD, and memory against the number of clients.

  python benchmarks/run.py --quick        # < 5 minutes on 2 CPU cores
  python benchmarks/run.py --full         # the sizes reported in docs/performance.md
  python benchmarks/run.py --gpu          # accelerator round: SmolLM2-shaped x 100 clients, Llama-2-7B- and Qwen2.5-7B-shaped
  python benchmarks/run.py --gpu --quick  # the same code on small shapes (CPU smoke run, < 1 minute)

Results go to stdout and, with --out, to a JSON file; --markdown writes docs/performance.md.
Every comparison is a ratio of two measurements taken in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedhl_jax import model as M
from fedhl_jax.assets import embedded_model_dir
from fedhl_jax.local import make_clients_train, make_local_train, make_optimizer
from fedhl_jax.lora import Adapter, lora_scale, rank_mask

REPO = Path(__file__).resolve().parents[1]

STORIES = embedded_model_dir()  # the embedded stories260K (HF folder)
# SmolLM2-135M-Instruct as a GGUF file (or a folder holding one): README, "A real instruction model".
SMOLLM2 = Path(os.environ.get("FEDHL_SMOLLM2", REPO.parent / "shared" / "models" / "smollm2-135m-instruct-gguf"))
TORCH_PYTHON = os.environ.get("FEDHL_TORCH_PYTHON", str(REPO / ".venv-torch" / "bin" / "python"))
MEDIUM = dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
              num_kv_heads=8, head_dim=64, max_position_embeddings=1024)


def timed(fn, repeat=1):
    """Best wall time of ``repeat`` calls of ``fn`` (results blocked)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def load_model(name):
    if name == "stories260K":
        return M.load_pretrained(STORIES)
    if name == "smollm2":
        if not SMOLLM2.exists():
            raise SystemExit(f"no SmolLM2 GGUF at {SMOLLM2} (set FEDHL_SMOLLM2; README: A real instruction model)")
        return M.load_pretrained(SMOLLM2)
    cfg = M.LlamaConfig(**MEDIUM)
    return cfg, M.init_params(cfg, jax.random.PRNGKey(0))


def matmul_peak(n=2048, repeat=5):
    """Measured float32 matmul FLOP/s of this machine under JAX (the MFU denominator)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    return 2 * n**3 / timed(lambda: f(a), repeat)


# --------------------------------------------------------------------------- 1-3: local training


def make_workload(cfg, clients, ranks, steps, batch, seq, r_max=16, seed=0):
    ranks = np.resize(np.asarray(ranks), clients)
    mask = rank_mask(ranks, r_max)
    scale = lora_scale(ranks, 16.0)
    keys = jax.random.split(jax.random.PRNGKey(seed), clients)
    ad = jax.vmap(lambda k: M.init_adapter(cfg, ("q_proj", "v_proj"), r_max, k))(keys)
    ad = Adapter({k: b * mask[:, None, :] for k, b in ad.B.items()}, {k: a * mask[:, :, None] for k, a in ad.A.items()},
                 mask, scale)
    ad = M.stacked_adapter(cfg, ad)  # the layout the engine trains in (one array per module type)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(clients, steps, batch, seq)), jnp.int32)
    loss_mask = jnp.ones(tokens.shape, jnp.float32)
    return ad, tokens, loss_mask


def bench_local(name, clients, steps, batch, seq, ranks=(2, 4, 8, 16), repeat=2, chunk=None):
    """Tokens/s of the vmapped engine and of a per-client loop over the same jitted local_train."""
    cfg, params = load_model(name)
    ad, tokens, loss_mask = make_workload(cfg, clients, ranks, steps, batch, seq)
    loss = lambda p, a, t, m: M.loss_fn(cfg, p, a, t, m)
    local = make_local_train(loss, make_optimizer("adamw", 1e-3))
    engine = jax.jit(make_clients_train(local, clients_per_chunk=chunk))
    t0 = time.perf_counter()
    engine.lower(params, ad, tokens, loss_mask).compile()
    compile_s = time.perf_counter() - t0
    # FLOPs of the whole call from XLA's cost analysis of the unchunked program. XLA counts a loop
    # body once (a lax.map chunk, and the lax.scan over the K local steps), so multiply by K.
    cost = jax.jit(make_clients_train(local)).lower(params, ad, tokens, loss_mask).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = steps * float(cost.get("flops", float("nan"))) if cost else float("nan")
    first = timed(lambda: engine(params, ad, tokens, loss_mask))  # includes jit dispatch + cache hit
    vm = timed(lambda: engine(params, ad, tokens, loss_mask), repeat)
    # The same with different ranks: must hit the compile cache.
    ad2 = ad._replace(mask=ad.mask[::-1], scale=ad.scale[::-1])
    engine(params, ad2, tokens, loss_mask)
    one = jax.jit(local)
    jax.block_until_ready(one(params, jax.tree.map(lambda x: x[0], ad), tokens[0], loss_mask[0]))

    def loop():
        outs = []
        for i in range(clients):
            outs.append(one(params, jax.tree.map(lambda x: x[i], ad), tokens[i], loss_mask[i]))
            jax.tree.map(np.asarray, outs[-1][0].B)  # factors read back per client, as a server would
        return outs[-1][1]

    lp = timed(loop, max(1, repeat - 1))
    toks = clients * steps * batch * seq
    return {"model": name, "clients": clients, "local_steps": steps, "batch": batch, "seq": seq, "chunk": chunk,
            "tokens": toks, "vmap_s": vm, "loop_s": lp, "vmap_tok_s": toks / vm, "loop_tok_s": toks / lp,
            "compile_s": compile_s, "first_call_s": first, "compiles_after_rank_change": engine._cache_size(),
            "xla_flops": flops, "params": int(sum(x.size for x in jax.tree.leaves(params)))}


def bench_torch(name, clients, steps, batch, seq, ranks=(2, 4, 8, 16), threads=None):
    """The PyTorch peers' way (Python loop of PEFT clients), in a separate Python with torch."""
    if not Path(TORCH_PYTHON).exists():
        return {"skipped": f"no torch interpreter at {TORCH_PYTHON} (set FEDHL_TORCH_PYTHON)"}
    out = Path("/tmp") / f"fedhl_torch_{name}_{os.getpid()}.json"
    cmd = [TORCH_PYTHON, str(REPO / "benchmarks" / "torch_peft_loop.py"), "--model", name,
           "--clients", str(clients), "--ranks", ",".join(map(str, ranks)), "--local-steps", str(steps),
           "--batch", str(batch), "--seq", str(seq), "--rounds", "1", "--threads", str(threads or os.cpu_count()),
           "--json", str(out)]
    if name in ("stories260K", "smollm2"):
        cmd += ["--model-path", str(STORIES if name == "stories260K" else SMOLLM2)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        return {"skipped": f"torch benchmark failed: {res.stderr[-500:]}"}
    return json.loads(out.read_text())


# The engine against the PyTorch + PEFT loop, same workload, one run (clients, K, batch, seq).
PEFT_CASES = {"stories260K": ("stories260K", 100, 5, 4, 128),  # the embedded 5-layer model
              "smollm2": ("smollm2", 8, 1, 2, 128)}            # SmolLM2-135M-Instruct GGUF, 2,048 tokens


def bench_peft(models=("stories260K", "smollm2"), no_torch=False):
    """Tokens/s of the engine (one vmap, and chunks of 2) against the PEFT per-client loop.

    SmolLM2 is the GGUF file dequantised to float32 by each side (``M.load_pretrained`` here;
    transformers' ``from_pretrained(..., gguf_file=)`` in the torch Python)."""
    rows = []
    for name in models:
        if name == "smollm2" and not SMOLLM2.exists():
            print(f"skipping smollm2: no GGUF at {SMOLLM2} (set FEDHL_SMOLLM2)", flush=True)
            continue
        case = PEFT_CASES[name]
        torch_row = {"skipped": "--no-torch"} if no_torch else bench_torch(*case)
        for chunk in (None, 2):
            row = bench_local(*case, chunk=chunk, repeat=2)
            row["torch"] = torch_row
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"rows": rows, "date": date.today().isoformat(), "peak_flops": matmul_peak(),
            "smollm2_file": SMOLLM2.name}


def bench_cpu_matmul(rounds=6):
    """The two CPU float32 matmul modes (``fedhl_jax.runtime``) on SmolLM2: speed and parity.

    Interleaved calls (fast, accurate, fast, ...) of the same three workloads, median of each:
    local training (the SmolLM2 row of the PEFT comparison, chunks of 2), one held-out loss pass
    (8 × 320 tokens) and batched greedy generation (100 prompts of 192 tokens, 16 new tokens).
    Parity: the largest difference of our logits from transformers' golden ones
    (``tests/golden/smollm2_gguf.npz``: maxima, log-sum-exp and top-8 of every position).
    """
    import importlib

    from fedhl_jax import runtime

    gen = importlib.import_module("fedhl_jax.model.generate")
    if not SMOLLM2.exists():
        return {"skipped": f"no GGUF at {SMOLLM2} (set FEDHL_SMOLLM2)"}
    cfg, params = load_model("smollm2")
    name, clients, steps, batch, seq = PEFT_CASES["smollm2"]
    ad, tokens, loss_mask = make_workload(cfg, clients, (2, 4, 8, 16), steps, batch, seq)
    local = make_local_train(lambda p, a, t, m: M.loss_fn(cfg, p, a, t, m), make_optimizer("adamw", 1e-3))
    rng = np.random.default_rng(0)
    ev_tok = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(8, 320)), jnp.int32)
    ev_mask = jnp.ones(ev_tok.shape, jnp.float32)
    prompts = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(100, 192)), jnp.int32)
    pmask = jnp.ones(prompts.shape, jnp.int32)
    gkw = dict(max_new_tokens=16, temperature=0.0, top_k=None, top_p=None, eos_id=None, pad_id=cfg.pad_token_id)
    raw_generate = gen._generate_padded.__wrapped__
    calls = {}
    for mode in runtime.CPU_MATMUL_MODES:
        train = runtime.jit(make_clients_train(local, clients_per_chunk=2), cpu_matmul=mode)
        ev = runtime.jit(lambda p, t, m: M.token_losses(cfg, p, None, t, m), cpu_matmul=mode)
        g = runtime.jit(raw_generate, cpu_matmul=mode, static_argnames=("cfg", *gkw))
        calls[mode] = {
            "train": lambda f=train: f(params, ad, tokens, loss_mask),
            "eval": lambda f=ev: f(params, ev_tok, ev_mask),
            "generate": lambda f=g: f(cfg, params, prompts, pmask, None, jax.random.PRNGKey(0), **gkw)}
        for fn in calls[mode].values():
            jax.block_until_ready(fn())  # compile
    times = {m: {k: [] for k in calls[m]} for m in calls}
    for i in range(rounds):
        for mode in runtime.CPU_MATMUL_MODES:
            for k, fn in calls[mode].items():
                if k != "generate" or i < 2:  # generation is long: 2 calls per mode
                    times[mode][k].append(timed(fn))
    golden = REPO / "tests" / "golden" / "smollm2_gguf.npz"
    parity = {}
    if golden.exists():
        g = np.load(golden)
        for mode in runtime.CPU_MATMUL_MODES:
            fwd = runtime.jit(lambda p, t: M.forward(cfg, p, t), cpu_matmul=mode)
            worst = 0.0
            for i, (row, n) in enumerate(zip(g["ids"], g["lengths"])):
                lg = np.asarray(fwd(params, row[None, :n]))[0].astype(np.float64)
                lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
                top = np.take_along_axis(lg, g["top_ids"][i, :n], -1)
                worst = max(worst, np.abs(lg.max(-1) - g["logit_max"][i, :n]).max(),
                            np.abs(lse - g["logit_lse"][i, :n]).max(), np.abs(top - g["top_logits"][i, :n]).max())
            parity[mode] = float(worst)
    med = {m: {k: float(np.median(v)) for k, v in times[m].items()} for m in times}
    return {"date": date.today().isoformat(), "train_tokens": clients * steps * batch * seq,
            "median_s": med, "all_s": times, "parity_max_abs": parity, "rounds": rounds}


# --------------------------------------------------------------------------- 4: server


def bench_server(client_counts, d=1024, modules=4, r_max=16, repeat=5):
    """Truncation (one SVD per module + slicing for n clients) and aggregation time against n."""
    import fedhl_jax as F

    rng = np.random.default_rng(0)
    shapes = {f"m{i}": (d, d) for i in range(modules)}
    alg = F.fedhl(r_max)
    state = alg.init(shapes)
    G = {k: jnp.asarray(rng.normal(size=s) * (0.97 ** np.arange(s[1])), jnp.float32) for k, s in shapes.items()}
    state = state.replace(G=G)
    decompose = jax.jit(lambda G: {k: F.svd(g, r_max) for k, g in G.items()})
    bcast = jax.jit(alg.broadcast)
    # The server's truncation as the engine runs it: one SVD per module and every client's O(r_max)
    # coefficients (alg.plan). Each client builds its own factors from its slice inside the
    # vmapped client step (alg.materialize); that is timed apart as "slices built".
    truncate_all = jax.jit(lambda st, m, s, k: alg.plan(st.replace(dec={n: F.svd(g, r_max) for n, g in st.G.items()}), m, s, k))
    agg = jax.jit(alg.aggregate)
    st = state.replace(dec=decompose(state.G))
    key = jax.random.PRNGKey(0)
    inputs = {}
    for n in client_counts:
        ranks = np.resize([2, 4, 8, 16], n)
        mask, scale = rank_mask(ranks, r_max), lora_scale(ranks, 16.0)
        start = bcast(st, mask, scale, key)
        inputs[n] = (mask, scale, start.B, start.A)
        jax.block_until_ready(truncate_all(state, mask, scale, key))
        jax.block_until_ready(agg(st, start.B, start.A, mask, scale, jnp.ones(n)))
    # Round-robin over the client counts, best of `repeat`: slow drifts of this shared machine hit
    # every count alike.
    best = {n: {"truncation_s": np.inf, "svd_s": np.inf, "slicing_s": np.inf, "aggregation_s": np.inf}
            for n in client_counts}
    for _ in range(repeat):
        for n in client_counts:
            mask, scale, B, A = inputs[n]
            for name, fn in (("truncation_s", lambda: truncate_all(state, mask, scale, key)),
                             ("svd_s", lambda: decompose(state.G)),
                             ("slicing_s", lambda: bcast(st, mask, scale, key)),
                             ("aggregation_s", lambda: agg(st, B, A, mask, scale, jnp.ones(n)))):
                best[n][name] = min(best[n][name], timed(fn))
    rows = [{"clients": n, **best[n], "slice_bytes": int(4 * n * r_max * sum(a + b for a, b in shapes.values()))}
            for n in client_counts]
    return {"module_shape": [d, d], "modules": modules, "r_max": r_max, "rows": rows}


def bench_rsvd(d=4096, r_max=64, repeat=1):
    """Randomized against exact SVD at [d, d]: time and deviation of the truncation errors."""
    import fedhl_jax as F

    rng = np.random.default_rng(1)
    U, _ = np.linalg.qr(rng.normal(size=(d, 256)))
    V, _ = np.linalg.qr(rng.normal(size=(d, 256)))
    # A LoRA-like spectrum: a decaying head plus a small full-rank noise floor.
    G = jnp.asarray((U * (0.96 ** np.arange(256))) @ V.T + 1e-3 * rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32)
    exact = jax.jit(lambda g: F.svd(g, r_max))
    rand = jax.jit(lambda g: F.svd(g, r_max, method="randomized", key=jax.random.PRNGKey(0)))
    jax.block_until_ready(rand(G))
    t_rand = timed(lambda: rand(G), max(repeat, 3))
    t0 = time.perf_counter()
    e = jax.block_until_ready(exact(G))
    t_exact_first = time.perf_counter() - t0  # includes compile; the SVD dominates
    t_exact = timed(lambda: exact(G), repeat)
    r = jax.block_until_ready(rand(G))
    ranks = np.array([1, 2, 4, 8, 16, 32, 64])
    rel = np.abs(np.asarray(r.tail)[ranks] - np.asarray(e.tail)[ranks]) / np.asarray(e.tail)[ranks]
    return {"shape": [d, d], "r_max": r_max, "exact_s": t_exact, "exact_first_s": t_exact_first,
            "randomized_s": t_rand, "speedup": t_exact / t_rand, "max_rel_tail_error": float(rel.max()),
            "ranks": ranks.tolist()}


# --------------------------------------------------------------------------- 5: memory


def bench_memory(client_counts, chunk, steps=2, batch=4, seq=128):
    """Peak RSS of one local-training call, each in a fresh process."""
    rows = []
    for n in client_counts:
        for c in (None, chunk):
            # VmHWM (peak RSS of this process's address space): unlike ru_maxrss it is not
            # inherited from the (large) parent across fork/exec.
            code = (f"import sys; sys.argv=['x'];"  # run from REPO, so that benchmarks.run imports
                    f"from benchmarks.run import bench_local;"
                    f"r = bench_local('stories260K', {n}, {steps}, {batch}, {seq}, repeat=1, chunk={c});"
                    f"import json, re; hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1));"
                    f"print(json.dumps({{'s': r['vmap_s'], 'rss': hwm}}))")
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                                 cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
            if res.returncode != 0:
                rows.append({"clients": n, "chunk": c, "error": res.stderr[-300:]})
                continue
            data = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append({"clients": n, "chunk": c, "peak_rss_mb": data["rss"] / 1024, "seconds": data["s"]})
    return rows


# --------------------------------------------------------------------------- depth and accelerators

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
            num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rope_theta=100000.0)
# Dense bfloat16 peak FLOP/s of known accelerators (the MFU denominator); others are measured.
DEVICE_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def bench_rounds(rounds=4, clients=10):
    """Whole federated rounds through the engine's loop (``Simulation.run`` → ``engine.run_rounds``) on
    the quickstart configuration: seconds of the first round (compiles) and of the others, and the
    number of compilations after rounds with different sampled clients and ranks."""
    from fedhl_jax.config import load_config
    from fedhl_jax.simulation import Simulation

    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      [f"fed.rounds={rounds}", f"fed.num_clients={clients * 2}", "fed.participation=0.5",
                       "fed.rank_distribution=uniform", "eval.per_rank=false", "eval.generate_examples=0"])
    sim = Simulation(cfg, log=lambda *_: None)
    seconds = []
    sim.run(sim.init_state(), range(rounds), [lambda r: seconds.append(r.metrics["seconds"])])
    tokens = cfg.fed.clients_per_round * cfg.optim.local_steps * cfg.optim.batch_size * cfg.data.seq_len
    return {"config": "configs/quickstart.yaml", "clients_per_round": cfg.fed.clients_per_round,
            "tokens_per_round": tokens, "first_round_s": seconds[0], "round_s": float(np.mean(seconds[1:])),
            "compilations": sim.round_fn._cache_size()}


def compile_depth(layers=(5, 30), clients=2, seq=32, r_max=8, stacked=True):
    """First-call (compile) time of a jitted 2-client local-training step of a SmolLM2-shaped random
    model at several depths, compiled from shapes; ``stacked``: the factors in the stacked form."""
    out = {}
    for n in layers:
        cfg = M.LlamaConfig(**{**SMOL, "num_layers": n})
        params = jax.eval_shape(lambda k: M.init_params(cfg, k), jax.random.key(0))  # noqa: B023

        def adapters(k, cfg=cfg):
            ad = jax.vmap(lambda kk: M.init_adapter(cfg, ("q_proj", "v_proj"), r_max, kk))(jax.random.split(k, clients))
            return M.stacked_adapter(cfg, ad) if stacked else ad

        ad = jax.eval_shape(adapters, jax.random.key(0))
        tokens = jax.ShapeDtypeStruct((clients, 1, 1, seq), jnp.int32)
        mask = jax.ShapeDtypeStruct(tokens.shape, jnp.float32)
        local = make_local_train(lambda p, a, t, m, cfg=cfg: M.loss_fn(cfg, p, a, t, m), make_optimizer("adamw", 1e-3))
        t0 = time.perf_counter()
        jax.jit(make_clients_train(local)).lower(params, ad, tokens, mask).compile()
        out[n] = time.perf_counter() - t0
    return {"layers": list(layers), "compile_s": [out[n] for n in layers], "stacked_factors": stacked,
            "ratio": out[layers[-1]] / out[layers[0]]}


def device_peak_flops(dtype=jnp.bfloat16, n=4096):
    """Dense peak FLOP/s: the table above for known accelerators, else a measured matmul."""
    kind = jax.devices()[0].device_kind
    for name, peak in DEVICE_PEAK.items():
        if name in kind:
            return peak, f"{kind} (spec, bf16 dense)"
    n = n if jax.default_backend() != "cpu" else 1024
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    return 2 * n**3 / timed(lambda: f(a), 5), f"{kind} (measured {jnp.dtype(dtype).name} matmul)"


def peak_device_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def lora_round(cfg, clients, chunk, steps, batch, seq, ranks, r_max, repeat=2, seed=0):
    """Times one vmapped local-training round (AdamW, LoRA on all linear layers, factors stacked)."""
    params = jax.jit(lambda k: M.init_params(cfg, k))(jax.random.PRNGKey(seed))
    ranks = np.resize(np.asarray(ranks), clients)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), clients)
    ad = jax.vmap(lambda k, r: M.init_adapter(cfg, "all-linear", r_max, k, rank=r))(keys, jnp.asarray(ranks))
    ad = M.stacked_adapter(cfg, ad)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(clients, steps, batch, seq + 1)), jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.float32)
    local = make_local_train(lambda p, a, t, m: M.loss_fn(cfg, p, a, t, m), make_optimizer("adamw", 1e-4))
    fn = jax.jit(make_clients_train(local, clients_per_chunk=chunk))
    t0 = time.perf_counter()
    compiled = fn.lower(params, ad, tokens, mask).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, ad, tokens, mask))
    seconds = timed(lambda: compiled(params, ad, tokens, mask), repeat)
    ma = compiled.memory_analysis()
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    del params
    toks = clients * steps * batch * seq
    return {"clients": clients, "chunk": chunk, "steps": steps, "batch": batch, "seq": seq, "r_max": r_max,
            "remat": cfg.remat, "dtype": cfg.dtype, "seconds": seconds, "tokens_per_s": toks / seconds,
            "compile_s": compile_s, "params": n_params, "peak_device_bytes": peak_device_bytes(),
            "xla_bytes": ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes}


def gpu_case(name, cfg, clients, chunks, steps, batch, seq, ranks, r_max, peak):
    """A chunk sweep of the federated round and one centralised LoRA at the same total batch."""
    rows = []
    for chunk in chunks:  # increasing: device peak memory only grows
        try:
            rows.append(lora_round(cfg, clients, chunk, steps, batch, seq, ranks, r_max))
        except Exception as e:  # out of memory: larger chunks will not fit either
            rows.append({"clients": clients, "chunk": chunk, "error": str(e).splitlines()[0][:200]})
            break
        print(json.dumps({"case": name, **rows[-1]}), flush=True)
    for row in rows:
        if "error" not in row:
            for label, k in (("mfu_4n", 4), ("mfu_6n", 6)):
                row[label] = row["tokens_per_s"] * k * row["params"] / peak
    ok = [r for r in rows if "error" not in r]
    best = max(ok, key=lambda r: r["tokens_per_s"]) if ok else None
    try:  # the same code training one LoRA (rank r_max) on every client's sequences at once
        central = lora_round(cfg, 1, None, steps, clients * batch, seq, [r_max], r_max)
        central["mfu_4n"] = central["tokens_per_s"] * 4 * central["params"] / peak
    except Exception as e:
        central = {"error": str(e).splitlines()[0][:200]}
    print(json.dumps({"case": name, "centralised": central}), flush=True)
    ratio = best["tokens_per_s"] / central["tokens_per_s"] if best and "error" not in central else None
    return {"name": name, "rows": rows, "best_chunk": best and best["chunk"], "centralised": central,
            "federated_over_centralised": ratio}


def bench_gpu(quick):
    """Accelerator round: SmolLM2-shaped (100 clients), Llama-2-7B- and Qwen2.5-7B-shaped bf16 random models."""
    peak, peak_source = device_peak_flops()
    res = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "peak_flops": peak,
           "peak_source": peak_source, "cases": []}
    if quick:  # small shapes for a CPU smoke run
        smol = M.LlamaConfig(**{**SMOL, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                                "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16},
                             dtype="bfloat16", remat="dots_saveable")
        seven = M.LlamaConfig.llama2_7b().replace(vocab_size=512, hidden_size=128, intermediate_size=344,
                                                 num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
                                                 remat="full")
        qwen = M.LlamaConfig.qwen25_7b().replace(vocab_size=512, hidden_size=128, intermediate_size=344,
                                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                                                 remat="full")
        cases = [("SmolLM2-shaped (small)", smol, 8, (2, 8), 1, 2, 32, (8, 16), 16),
                 ("Llama-2-7B-shaped (small)", seven, 2, (1, 2), 1, 2, 32, (8, 16), 16),
                 ("Qwen2.5-7B-shaped (small)", qwen, 2, (1, 2), 1, 2, 32, (8, 16), 16)]
    else:
        smol = M.LlamaConfig(**SMOL, dtype="bfloat16", remat="dots_saveable")
        seven = M.LlamaConfig.llama2_7b().replace(remat="full")
        cases = [("SmolLM2-135M-shaped", smol, 100, (5, 10, 25, 50, 100), 1, 4, 512, (8, 16, 32, 64), 64),
                 ("Llama-2-7B-shaped", seven, 10, (1, 2, 5, 10), 1, 4, 512, (8, 16, 32, 64), 64),
                 # configs/qwen25_7b_gsm8k_cross_silo.yaml's model (q/k/v biases, GQA 28/4, 152k vocabulary)
                 ("Qwen2.5-7B-shaped", M.LlamaConfig.qwen25_7b().replace(remat="full"), 10, (1, 2, 5), 1, 4, 512,
                  (8, 16, 32, 64), 64)]
    for args in cases:
        res["cases"].append(gpu_case(*args, peak))
    res["compile_depth"] = compile_depth()
    return res


def markdown_gpu(res) -> str:
    L = ["# Accelerator benchmark", "",
         f"Device: {res['device']} ({res['backend']}); peak {res['peak_flops'] / 1e9:,.0f} GFLOP/s "
         f"({res['peak_source']}).", "",
         "| case | clients_per_chunk | tok/s | MFU (4N) | MFU (6N) | peak device memory (GiB) | XLA bytes (GiB) | compile (s) |",
         "|---|---|---|---|---|---|---|---|"]
    for case in res["cases"]:
        for r in case["rows"]:
            if "error" in r:
                L.append(f"| {case['name']} | {r['chunk']} | {r['error']} | | | | | |")
                continue
            pk = r["peak_device_bytes"]
            L.append(f"| {case['name']} | {r['chunk'] or 'all'} | {r['tokens_per_s']:,.0f} | {r['mfu_4n']:.1%} | "
                     f"{r['mfu_6n']:.1%} | {pk / 2**30 if pk else float('nan'):.1f} | {r['xla_bytes'] / 2**30:.1f} | "
                     f"{r['compile_s']:.1f} |")
        c = case["centralised"]
        ratio = case["federated_over_centralised"]
        L.append(f"| {case['name']}: centralised LoRA, same total batch | - | "
                 f"{c.get('tokens_per_s', float('nan')):,.0f} | {c.get('mfu_4n', float('nan')):.1%} | | | | "
                 f"{c.get('compile_s', float('nan')):.1f} |")
        L.append(f"| {case['name']}: best federated / centralised | {case['best_chunk']} | "
                 f"{f'{ratio:.2f}×' if ratio else 'n/a'} | | | | | |")
    d = res["compile_depth"]
    L += ["", f"Compile time of a 2-client local-training step, SmolLM2 shape: {d['layers'][0]} layers "
          f"{d['compile_s'][0]:.1f} s, {d['layers'][1]} layers {d['compile_s'][1]:.1f} s (ratio {d['ratio']:.2f})."]
    return "\n".join(L) + "\n"


# --------------------------------------------------------------------------- report


def markdown(res) -> str:
    L = ["# Performance", "",
         f"Machine: {res['machine']}; JAX {res['jax']} ({res['backend']}); {res['date']}; mode `{res['mode']}`.",
         f"Regenerate: `make bench-full` (`python benchmarks/run.py --{res['mode']} --markdown docs/performance.md`) "
         f"({res['seconds']:.0f} s).", "",
         f"Measured float32 matmul peak (JAX, 2048×2048): **{res['peak_flops'] / 1e9:.1f} GFLOP/s**.", "",
         *(["Sections rerun later on the same machine (`--only ... --update`): "
            + "; ".join(f"{', '.join(r['sections'])} ({r['date']})" for r in res["reruns"]), ""]
           if res.get("reruns") else []),
         "## 1-3. Local training: vmapped engine vs per-client loops", "",
         "All sampled clients train K local AdamW steps on rank-masked LoRA (q, v; ranks 2/4/8/16, "
         "r_max 16). *loop* runs the same jitted `local_train` one client at a time and reads the "
         "factors back after each; *PEFT* is the PyTorch peers' way (a Python loop of PEFT LoRA models, "
         "transformers `LlamaForCausalLM`, AdamW, factors read back), in a separate Python with torch.", "",
         "| model | clients × K × b × T | engine (clients_per_chunk) | engine tok/s | loop tok/s | PEFT tok/s | engine / loop | engine / PEFT | compile (s) | compiles after rank change | MFU |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in res["local"]:
        t = row.get("torch", {})
        ttok = t.get("tokens_per_s")
        mfu = row["xla_flops"] / row["vmap_s"] / res["peak_flops"]
        L.append(f"| {row['model']} | {row['clients']}×{row['local_steps']}×{row['batch']}×{row['seq']} | "
                 f"{row['chunk'] or 'all'} | "
                 f"{row['vmap_tok_s']:,.0f} | {row['loop_tok_s']:,.0f} | "
                 f"{f'{ttok:,.0f}' if ttok else 'n/a'} | {row['vmap_tok_s'] / row['loop_tok_s']:.2f}× | "
                 f"{f'{row['vmap_tok_s'] / ttok:.2f}×' if ttok else 'n/a'} | {row['compile_s']:.1f} | "
                 f"{row['compiles_after_rank_change']} | {mfu:.1%} |")
    L += ["", "MFU = FLOPs of the call (XLA's `cost_analysis` of the unchunked program, × K because XLA counts "
          "the body of the K-step `lax.scan` once) / its time / the matmul peak measured in the same run.",
          "*compiles after rank change*: the jit cache size after calling again with other ranks (1 = no recompilation).", "",
          "## 4. Server: truncation and aggregation against the number of clients", ""]
    s = res["server"]
    L += [f"{s['modules']} modules of shape {s['module_shape']}, r_max {s['r_max']}. *Server truncation* = one SVD "
          "per module + every client's `O(r_max)` coefficients (`Algorithm.plan`, one compiled call); *slices built* = "
          "materialising every client's padded factors from them (`Algorithm.broadcast`; in the engine each client does "
          "this for itself inside the vmapped client step); aggregation = FedHL's weighted sum and the SVD of the new G.", "",
          "| clients | server truncation (s) | SVD alone (s) | slices built (s) | slices (MB) | aggregation (s) |",
          "|---|---|---|---|---|---|"]
    for row in s["rows"]:
        L.append(f"| {row['clients']} | {row['truncation_s']:.3f} | {row['svd_s']:.3f} | {row['slicing_s']:.3f} | "
                 f"{row['slice_bytes'] / 2**20:,.0f} | {row['aggregation_s']:.3f} |")
    first, last = s["rows"][0], s["rows"][-1]
    L += ["", f"Server truncation at {last['clients']} clients / at {first['clients']}: "
          f"**{last['truncation_s'] / first['truncation_s']:.2f}×**; aggregation: "
          f"{last['aggregation_s'] / first['aggregation_s']:.1f}× for {last['clients'] // first['clients']}× the clients.", ""]
    r = res["rsvd"]
    L += ["## Randomized SVD", "",
          f"At {r['shape'][0]}×{r['shape'][1]}, r_max {r['r_max']}: exact {r['exact_s']:.2f} s, randomized "
          f"{r['randomized_s']:.3f} s (**{r['speedup']:.1f}×**); largest relative deviation of the truncation errors "
          f"over ranks {r['ranks']}: **{r['max_rel_tail_error']:.2e}**.", "",
          "## 5. Peak memory against the number of clients", "",
          "One local-training call of stories260K (K=2, b=4, T=128), each in a fresh process.", "",
          "| clients | clients_per_chunk | peak RSS (MB) | seconds |", "|---|---|---|---|"]
    for row in res["memory"]:
        if "error" in row:
            L.append(f"| {row['clients']} | {row['chunk']} | error | |")
        else:
            L.append(f"| {row['clients']} | {row['chunk'] or 'all (one vmap)'} | {row['peak_rss_mb']:,.0f} | {row['seconds']:.2f} |")
    if "peft" in res:
        pe = res["peft"]
        L += ["", "## The engine against the PEFT loop (stories260K and SmolLM2-135M-Instruct)", "",
              f"One run on {pe['date']} (matmul peak in the run {pe['peak_flops'] / 1e9:.0f} GFLOP/s): "
              "`python benchmarks/run.py --only peft --update docs/results/performance.json --markdown docs/performance.md`. "
              "LoRA on q and v, ranks 2/4/8/16 (r_max 16), AdamW, random tokens. SmolLM2 is "
              f"`{pe['smollm2_file']}` (30 layers, hidden 576, vocabulary 49,152) dequantised to float32 by each "
              "side: `M.load_pretrained` here, transformers' `from_pretrained(..., gguf_file=)` under PEFT in a "
              "separate torch Python.", "",
              "| model | clients × K × b × T | engine (clients_per_chunk) | engine tok/s | loop tok/s | PEFT tok/s | engine / PEFT | compile (s) |",
              "|---|---|---|---|---|---|---|---|"]
        for row in pe["rows"]:
            ttok = row.get("torch", {}).get("tokens_per_s")
            L.append(f"| {row['model']} | {row['clients']}×{row['local_steps']}×{row['batch']}×{row['seq']} | "
                     f"{row['chunk'] or 'all'} | {row['vmap_tok_s']:,.0f} | {row['loop_tok_s']:,.0f} | "
                     f"{f'{ttok:,.0f}' if ttok else 'n/a'} | {f'{row['vmap_tok_s'] / ttok:.2f}×' if ttok else 'n/a'} | "
                     f"{row['compile_s']:.1f} |")
    if "cpu_matmul" in res and "median_s" in res["cpu_matmul"]:
        c = res["cpu_matmul"]
        f, a = c["median_s"]["fast"], c["median_s"]["accurate"]
        par = c.get("parity_max_abs", {})
        L += ["", "## CPU float32 matmul modes (`model.cpu_matmul`, `fedhl_jax.runtime`)", "",
              f"One run on {c['date']}: `python benchmarks/run.py --only cpu_matmul --update docs/results/performance.json "
              "--markdown docs/performance.md`. SmolLM2-135M-Instruct; *fast* = XLA's defaults (float32 dots, "
              "reductions and elementwise fusions handed to YNNPACK), *accurate* = YNNPACK fusions off. Calls "
              f"interleaved, medians of {c['rounds']} (generation: 2). Parity: largest difference of the logits "
              "from transformers' float32 ones on the 4 golden prompts (`tests/golden/smollm2_gguf.npz`).", "",
              "| workload | fast | accurate | accurate / fast (time) |", "|---|---|---|---|",
              f"| local training, 8 clients × 1 step × 2 × 128, chunks of 2 | {c['train_tokens'] / f['train']:,.0f} tok/s | "
              f"{c['train_tokens'] / a['train']:,.0f} tok/s | {a['train'] / f['train']:.2f}× |",
              f"| held-out loss, 8 × 320 tokens | {f['eval']:.2f} s | {a['eval']:.2f} s | {a['eval'] / f['eval']:.2f}× |",
              f"| greedy generation, 100 prompts × 192 tokens + 16 new | {f['generate']:.1f} s | {a['generate']:.1f} s | "
              f"{a['generate'] / f['generate']:.2f}× |"]
        if par:
            L.append(f"| logits vs transformers, max abs | {par['fast']:.2e} | {par['accurate']:.2e} | |")
    if "compile_depth" in res:
        d = res["compile_depth"]
        L += ["", "## Compile time against depth", "",
              f"First call (compile) of a jitted, vmapped 2-client local-training step on a SmolLM2-135M-shaped "
              f"model (layers under `lax.scan`, factors stacked as the engine trains them): {d['layers'][0]} layers "
              f"{d['compile_s'][0]:.1f} s, {d['layers'][1]} layers {d['compile_s'][1]:.1f} s "
              f"(**{d['ratio']:.2f}×**; target ≤ 1.5×)."]
    if "rounds" in res:
        r = res["rounds"]
        L += ["", "## Whole rounds through the engine's loop", "",
              f"`Simulation.run` → `engine.run_rounds` on `{r['config']}` ({r['clients_per_round']} sampled clients "
              f"of mixed ranks per round, {r['tokens_per_round']:,} tokens per round): first round "
              f"{r['first_round_s']:.1f} s (compiles), then {r['round_s']:.2f} s per round "
              f"({r['tokens_per_round'] / r['round_s']:,.0f} tokens/s); compilations over the rounds: "
              f"{r['compilations']}."]
    notes = Path(__file__).with_name("performance_notes.md")
    L += ["", res.get("notes") or (notes.read_text() if notes.exists() else "")]
    return "\n".join(L)


def rerun_sections(args) -> int:
    """Reruns some sections with the mode of an existing results file and re-renders it."""
    res = json.loads(args.update.read_text())
    full = res["mode"] == "full"
    t0 = time.perf_counter()
    if "server" in args.only:
        res["server"] = bench_server([10, 100, 1000], d=1024 if full else 512, modules=4 if full else 2)
    if "rsvd" in args.only:
        res["rsvd"] = bench_rsvd(4096 if full else 2048, 64)
    if "memory" in args.only:
        res["memory"] = bench_memory([10, 100, 300] if full else [10, 50], chunk=10 if full else 5,
                                     seq=128 if full else 64)
    if "local" in args.only:
        raise SystemExit("rerun the local-training section with a whole run (its ratios need the same run)")
    if "peft" in args.only:
        res["peft"] = bench_peft(no_torch=args.no_torch)
    if "compile_depth" in args.only:
        res["compile_depth"] = compile_depth()
    if "cpu_matmul" in args.only:
        res["cpu_matmul"] = bench_cpu_matmul()
    res["seconds_rerun"] = time.perf_counter() - t0
    res.setdefault("reruns", []).append({"sections": args.only, "date": date.today().isoformat()})
    args.update.write_text(json.dumps(res, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(res))
    print(json.dumps({k: res[k] for k in args.only}), flush=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small sizes, < 5 minutes (default)")
    mode.add_argument("--full", action="store_true", help="the reported sizes")
    p.add_argument("--gpu", action="store_true", help="accelerator round benchmark (with --quick: small shapes)")
    p.add_argument("--out", type=Path, help="JSON results")
    p.add_argument("--markdown", type=Path, help="write the report (e.g. docs/performance.md)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch/PEFT baseline")
    p.add_argument("--only", nargs="+", choices=["local", "server", "rsvd", "memory", "peft", "compile_depth", "cpu_matmul"],
                   help="rerun these sections only, keeping the others from --update")
    p.add_argument("--update", type=Path, help="results JSON whose other sections are kept (with --only)")
    args = p.parse_args(argv)
    if args.only:
        if not args.update or not args.update.exists():
            p.error("--only needs --update with an existing results JSON")
        return rerun_sections(args)
    if args.gpu:
        t0 = time.perf_counter()
        res = bench_gpu(quick=args.quick)
        res["seconds"] = time.perf_counter() - t0
        print(markdown_gpu(res))
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
        if args.markdown:
            args.markdown.write_text(markdown_gpu(res))
        print(f"done in {res['seconds']:.0f} s")
        return 0
    full = args.full
    t0 = time.perf_counter()
    res = {"mode": "full" if full else "quick", "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
           f"{platform.processor() or platform.platform()}", "jax": jax.__version__,
           "backend": jax.default_backend(), "date": date.today().isoformat()}
    res["peak_flops"] = matmul_peak()
    print(f"matmul peak {res['peak_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    local_cases = ([("stories260K", 100, 5, 4, 128), ("medium", 10, 2, 4, 128)] if full
                   else [("stories260K", 20, 2, 4, 64), ("medium", 4, 1, 2, 64)])
    res["local"] = []
    for case in local_cases:
        torch_row = {"skipped": "--no-torch"} if args.no_torch else bench_torch(*case)
        for chunk in (None, 2):  # one vmap over all clients, and chunks of 2 vmapped clients
            row = bench_local(*case, chunk=chunk)
            row["torch"] = torch_row
            res["local"].append(row)
            print(json.dumps(row), flush=True)
    res["server"] = bench_server([10, 100, 1000] if full else [10, 100, 1000], d=1024 if full else 512,
                                 modules=4 if full else 2)
    print(json.dumps(res["server"]), flush=True)
    res["rsvd"] = bench_rsvd(4096 if full else 2048, 64)
    print(json.dumps(res["rsvd"]), flush=True)
    res["memory"] = bench_memory([10, 100, 300] if full else [10, 50], chunk=10 if full else 5,
                                 seq=128 if full else 64)
    print(json.dumps(res["memory"]), flush=True)
    res["compile_depth"] = compile_depth()
    print(json.dumps({"compile_depth": res["compile_depth"]}), flush=True)
    res["rounds"] = bench_rounds()
    print(json.dumps({"rounds": res["rounds"]}), flush=True)
    res["seconds"] = time.perf_counter() - t0
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(res))
    print(f"done in {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------- NNX bridge


def bench_nnx(clients=20, steps=2, batch=4, seq=64, ranks=(2, 4, 8, 16), r_max=16, repeat=5):
    """Tokens/s of one FedHL round of stories260K (LoRA on q/v, AdamW, the clients vmapped): the
    project's Llama against the same weights as an NNX Llama (``tests/test_nnx_bridge.py``'s
    ``NnxLlama``) through ``fedhl_jax.nnx_bridge``, in one process. Each is compiled first, then
    they are timed alternately ``repeat`` times; ``ratio`` is NNX tokens/s over the Llama's (best
    and median of the repeats, and the median of the per-repeat ratios with its bootstrap interval). Run: ``python -c "import json; from benchmarks.run import bench_nnx;
    print(json.dumps(bench_nnx()))"``."""
    from fedhl_jax import algorithms, engine
    from fedhl_jax.nnx_bridge import nnx_lora
    from tests.test_nnx_bridge import lm_loss, nnx_llama_from_params

    cfg, params = load_model("stories260K")
    alg = algorithms.fedhl(r_max)
    opt = make_optimizer("adamw", 1e-3, trainable=alg.trainable)
    bridge = nnx_lora(nnx_llama_from_params(cfg, params), lm_loss, [r"layers\.\d+\.self_attn\.(q|v)_proj"], r_max)
    shapes = M.lora_targets(cfg, ("q_proj", "v_proj"))
    assert bridge.shapes == shapes
    state = alg.init(shapes, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    rk = np.resize(np.asarray(ranks), clients)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(clients, steps, batch, seq + 1)), jnp.int32)
    inputs = engine.RoundInputs(rank_mask(rk, r_max), lora_scale(rk, 16.0), jnp.ones((clients,)),
                                (tokens, jnp.ones(tokens.shape, jnp.float32)), jax.random.PRNGKey(1))
    llama = jax.jit(engine.make_round_step(
        alg, lambda p, a, t, m: M.loss_fn(cfg, p, a, t, m), opt, merge_delta=M.merge_delta,
        to_client=lambda a: M.stacked_adapter(cfg, a), from_client=lambda a: M.per_layer_adapter(cfg, a)))
    nnx_round = jax.jit(engine.make_round_step(alg, bridge.loss, opt, merge_delta=bridge.merge_delta))
    cases = {"llama": (llama, params), "nnx": (nnx_round, bridge.base)}
    compile_s, seconds = {}, {name: [] for name in cases}
    for name, (fn, base) in cases.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(state, base, inputs))
        compile_s[name] = time.perf_counter() - t0
    for _ in range(repeat):
        for name, (fn, base) in cases.items():
            seconds[name].append(timed(lambda fn=fn, base=base: fn(state, base, inputs)))
    toks = clients * steps * batch * seq
    best = {name: min(s) for name, s in seconds.items()}
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    return {"model": "stories260K", "clients": clients, "local_steps": steps, "batch": batch, "seq": seq,
            "r_max": r_max, "repeat": repeat, "device": jax.devices()[0].device_kind, "tokens": toks,
            "seconds": seconds, "compile_s": compile_s,
            "tok_s": {name: toks / best[name] for name in cases},
            "ratio_best": best["llama"] / best["nnx"], "ratio_median": median["llama"] / median["nnx"],
            **paired_ratio(seconds["llama"], seconds["nnx"])}


def paired_ratio(base_s, other_s, *, resamples=10_000, seed=0) -> dict:
    """The median over repeats of ``base_s[k] / other_s[k]`` (adjacent timings, so a load change
    between repeats cancels) with a 95% bootstrap interval over the repeats."""
    r = np.asarray(base_s, np.float64) / np.asarray(other_s, np.float64)
    idx = np.random.default_rng(seed).integers(0, r.size, size=(resamples, r.size))
    boot = np.median(r[idx], axis=1)
    return {"ratio_paired_median": float(np.median(r)),
            "ratio_paired_ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}


# --------------------------------------------------------------------------- held-out loss cut to length


def bench_eval_buckets(datasets=("gsm8k", "codealpaca"), rows=96, repeat=3, bucket=64,
                       config="configs/results_smollm2.yaml"):
    """Seconds of one held-out loss pass (the evaluator's ``loss``) of SmolLM2-135M-Instruct over the first
    ``rows`` held-out answers of each dataset, as the evidence suite evaluates them (``config``'s base:
    320 tokens, batches of 8, float32), with every batch ``seq_len`` wide (``eval.length_bucket: 0``)
    against batches cut to length (``bucket``). Both programs compile first; then they run alternately
    ``repeat`` times, and ``ratio`` is full / cut per repeat (median and 95% bootstrap interval).
    ``max_rel_diff``: the largest relative difference of the per-answer losses between the two. Needs
    ``../shared/models``. Run: ``python -c "import json; from benchmarks.run import bench_eval_buckets;
    print(json.dumps(bench_eval_buckets()))"``."""
    import yaml

    from fedhl_jax import metrics
    from fedhl_jax.config import TrainConfig, from_dict
    from fedhl_jax.experiments import results_suite as R
    from fedhl_jax.simulation import Simulation

    base = yaml.safe_load(Path(config).read_text())["base"]
    out = {"config": config, "rows": rows, "repeat": repeat, "bucket": bucket, "date": date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "datasets": {}}
    for name in datasets:
        ov = {"fed.rounds": 1, "seed": 0, "data.dataset": name, "eval.loss_examples": rows}
        if name != "gsm8k":
            ov["data.label_kind"] = None
        sim = Simulation(from_dict(TrainConfig, R.merge_overrides(base, ov)), log=lambda *a, **k: None)
        ev = sim.evaluator
        delta = sim.algorithm.global_delta(sim.init_state())
        tokens, mask = ev.loss_tokens, ev.loss_mask

        def run(w):
            return metrics.heldout_loss(lambda t, m: ev.loss_fn(ev.params, delta, t, m), tokens, mask,
                                        ev.cfg.batch_size, length_bucket=w)

        first = {w: run(w) for w in (0, bucket)}  # compiles (one width, and one per bucket width)
        seconds = {0: [], bucket: []}
        for _ in range(repeat):
            for w in (0, bucket):
                t0 = time.perf_counter()
                run(w)
                seconds[w].append(time.perf_counter() - t0)
        full, cut = first[0]["per_example"], first[bucket]["per_example"]
        ends = metrics.length_bucket_ends(mask)
        out["datasets"][name] = {
            "seq_len": int(tokens.shape[1]), "mean_end": float(ends.mean()),
            "seconds_full": seconds[0], "seconds_cut": seconds[bucket],
            "max_rel_diff": float(np.nanmax(np.abs(cut - full) / np.abs(full))),
            **paired_ratio(seconds[0], seconds[bucket])}
        print(json.dumps({name: out["datasets"][name]}), flush=True)
    return out


def bench_train_buckets(datasets=("gsm8k", "codealpaca"), modes=((0, 1), (64, 2), (64, 1), (32, 1)), repeat=3,
                        config="configs/results_smollm2.yaml", baseline=(0, 2)):
    """Seconds of one training round of SmolLM2-135M-Instruct as the evidence suite runs it (``config``'s
    base: 10 clients × 2 local steps of one 320-token sequence, AdamW, float32) with every local step
    ``seq_len`` wide in chunks of 2 vmapped clients (``baseline``: ``(length_bucket, clients_per_chunk)``,
    as the suite's runs until 2026-12-07) against steps cut to length: each ``(bucket, clients_per_chunk)`` of ``modes`` runs each chunk's step at the narrowest
    multiple of ``bucket`` that holds its clients' targets. Every program compiles first (``compile_s``:
    the first round's seconds); then the modes run alternately ``repeat`` times on rounds
    ``0..repeat-1`` from the initial state, and ``ratio`` is full / cut per repeat (median and 95%
    bootstrap interval). ``max_rel_diff``: the largest difference of the new global adapter against
    the full width, relative to its largest entry; ``fro_rel_diff``: the Frobenius norm of the difference
    relative to the adapter's (over every module). Mode ``(0, 1)``, the full width one client at a time,
    is a change of layout only: its differences are the float-rounding floor (AdamW's first step
    divides each gradient entry by its own size, so entries near 0 move by up to the learning rate
    either way). ``width_fraction``: the mean of (chosen width /
    ``seq_len``) over the timed steps. Needs ``../shared/models``. Run: ``python -c "import json;
    from benchmarks.run import bench_train_buckets; print(json.dumps(bench_train_buckets()))"``."""
    import yaml

    from fedhl_jax.config import TrainConfig, from_dict
    from fedhl_jax.experiments import results_suite as R
    from fedhl_jax.local import bucket_widths, step_widths
    from fedhl_jax.simulation import Simulation

    base = yaml.safe_load(Path(config).read_text())["base"]
    out = {"config": config, "modes": [list(m) for m in modes], "repeat": repeat, "date": date.today().isoformat(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "datasets": {}}
    full_mode = tuple(baseline)
    modes = (full_mode,) + tuple(tuple(m) for m in modes if tuple(m) != full_mode)
    key = lambda m: f"bucket{m[0]}_chunk{m[1]}"  # noqa: E731
    for name in datasets:
        sims = {}
        for w, c in modes:
            ov = {"fed.rounds": repeat, "seed": 0, "data.dataset": name, "optim.length_bucket": w,
                  "fed.clients_per_chunk": c}
            if name != "gsm8k":
                ov["data.label_kind"] = None
            sims[w, c] = Simulation(from_dict(TrainConfig, R.merge_overrides(base, ov)), log=lambda *a, **k: None)

        def run(m, t):
            sim = sims[m]
            inputs, _ = sim.schedule(t)
            t0 = time.perf_counter()
            state, _ = sim.round_fn(sim.init_state(), sim.base, inputs)
            jax.block_until_ready(state)
            return time.perf_counter() - t0, state

        compile_s = {key(m): run(m, 0)[0] for m in modes}
        seconds, states = {m: [] for m in modes}, {m: [] for m in modes}
        for t in range(repeat):
            for m in modes:
                s, state = run(m, t)
                seconds[m].append(s)
                states[m].append(sims[m].algorithm.global_delta(state))
        row = {"compile_s": compile_s, "seconds": {key(m): v for m, v in seconds.items()}}
        for m in modes[1:]:
            (w, c), diffs, fros, fracs = m, [], [], []
            for t, (cut, full) in enumerate(zip(states[m], states[full_mode])):
                pairs = list(zip(jax.tree.leaves(cut), jax.tree.leaves(full)))
                diffs.append(max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in pairs))
                fros.append(float(np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in pairs)
                                          / sum(float(jnp.sum(b ** 2)) for _, b in pairs))))
                mask = sims[m].schedule(t)[0].batch[-1]  # [n, K, b, T]
                idx = np.asarray(step_widths(mask, w, axes=2)) if w else np.full(mask.shape[:2], -1)  # [n, K]
                chunk_idx = np.stack([idx[i:i + c].max(0) for i in range(0, idx.shape[0], c)])
                fracs.append(float(np.mean(np.asarray(bucket_widths(mask.shape[-1], w))[chunk_idx]) / mask.shape[-1]))
            row[key(m)] = {"max_rel_diff": max(diffs), "fro_rel_diff": max(fros), "width_fraction": float(np.mean(fracs)),
                           **paired_ratio(seconds[full_mode], seconds[m])}
        out["datasets"][name] = row
        print(json.dumps({name: row}), flush=True)
    return out


def _cached_suite(config: str, cache: str):
    """``(spec, by_config, tuned rates)`` of an evidence suite's config and its committed run cache."""
    import yaml

    from fedhl_jax.experiments import evidence_suite as E
    from fedhl_jax.experiments import results_suite as R

    spec = yaml.safe_load(Path(config).read_text())
    by_config = {row["config"]: row["rec"] for row in R.read_cache(Path(cache))}
    return spec, by_config, E.tuned(spec, by_config)


def _suite_rerun(spec: dict, best: dict, setting: str, method: str, seed: int, extra):
    """A suite run of ``method`` at its tuned rate in ``setting``, with ``extra`` overrides on top, without
    the validation loss (``evidence_suite.Run``, stage 2: the settings' seeds)."""
    from fedhl_jax.experiments import evidence_suite as E
    from fedhl_jax.experiments import results_suite as R

    ov = dict(E.overrides(spec, setting, method, best[method]), **dict(extra))
    return E.Run(E.run_id(setting, method, best[method]), ov, seed, R.config_digest(spec["base"], ov, seed), 2, False)


def bench_suite_runs(runs=(("cross_silo", "fedhl_data_size", 0, True), ("cross_silo", "fedhl_data_size", 1, False),
                           ("codealpaca", "fedhl_data_size", 1, False)),
                     config="configs/results_smollm2.yaml", cache="docs/results/results_smollm2.jsonl"):
    """Whole runs of the evidence suite with the current code, against the records the cache holds for the
    same configs (the same digest): wall seconds (``results_suite.run_cell``, load to last evaluation)
    and the change in the final held-out (and validation) loss and its per-answer values. Each run is
    ``(setting, method, seed, validation)`` at the method's tuned rate; ``validation`` as the suite
    runs it (the tuning runs only); a fifth element, a dict of overrides, runs it otherwise (for
    example as the cached runs were made: ``{"optim.length_bucket": 0, "eval.length_bucket": 0,
    "fed.clients_per_chunk": 2}``), still against the same cached record. Needs ``../shared``. Run: ``python -c "import json; from
    benchmarks.run import bench_suite_runs; print(json.dumps(bench_suite_runs()))"``."""
    from fedhl_jax.experiments import evidence_suite as E
    from fedhl_jax.experiments import results_suite as R

    spec, by_config, best = _cached_suite(config, cache)
    out = {"config": config, "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "runs": []}
    for setting, m, seed, validation, *extra in runs:
        ov = dict(E.overrides(spec, setting, m, best[m]), **(extra[0] if extra else {}))
        old = by_config[E.digest(spec, setting, m, best[m], seed)]
        t0 = time.perf_counter()
        rec = R.run_cell(spec["base"], ov if validation else dict(ov, **{"eval.validation": False}), seed)
        row = {"setting": setting, "method": m, "lr": best[m], "seed": seed, "validation": validation,
               "overrides": extra[0] if extra else {},
               "seconds": time.perf_counter() - t0, "seconds_cached": old.get("seconds"),
               "final_eval_loss": rec["final_eval_loss"], "final_eval_loss_cached": old["final_eval_loss"],
               "max_abs_diff_examples": float(np.nanmax(np.abs(np.asarray(rec["eval_loss_examples"], float)
                                                               - np.asarray(old["eval_loss_examples"], float))))}
        if validation:
            row.update(final_val_loss=rec["final_val_loss"], final_val_loss_cached=old["final_val_loss"])
        for k in ("eval_rouge_l", "eval_exact_match"):
            if k in rec:
                row.update({k: rec[k], f"{k}_cached": old.get(k)})
        out["runs"].append(row)
        print(json.dumps(row), flush=True)
    return out


# --------------------------------------------------------------------------- suite runs in two workers


def bench_suite_workers(runs=(("cross_silo", "fedhl_data_size", 1), ("cross_silo", "flexlora", 1)), workers=2,
                        extra=(("optim.length_bucket", 32), ("fed.clients_per_chunk", 1)),
                        config="configs/results_smollm2.yaml", cache="docs/results/results_smollm2.jsonl"):
    """Wall seconds of whole evidence-suite runs one after another in this process (on every core) against
    the same runs at once in ``workers`` worker processes, each pinned to its share of the cores
    (``fedhl_jax.experiments.workers``, as ``fedhl-results --workers`` runs them). Each run is ``(setting,
    method, seed)`` at the method's tuned rate in ``cache`` without the validation loss, with ``extra``
    overrides (default: the settings a suite from an empty cache trains with, steps cut to length, one
    client per chunk). Each mode starts from its own empty persistent compilation cache, so both compile
    every program (the sequential mode reuses the evaluation programs across its runs; the workers
    compile them at the same time). ``speedup``: sequential / parallel wall seconds; ``same_losses``:
    whether each run's per-answer held-out losses are equal in both modes (a run on one core against the
    same run on two). Needs ``../shared``. Run: ``python -c "import json; from benchmarks.run import
    bench_suite_workers; print(json.dumps(bench_suite_workers()))"``."""
    import tempfile

    from fedhl_jax.experiments import evidence_suite as E
    from fedhl_jax.experiments.workers import pool

    spec, by_config, best = _cached_suite(config, cache)
    todo = [_suite_rerun(spec, best, setting, m, seed, extra) for setting, m, seed in runs]
    out = {"config": config, "runs": [list(r) for r in runs], "extra": dict(extra), "workers": workers,
           "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    old = jax.config.jax_compilation_cache_dir
    recs = {}
    try:
        with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
            jax.config.update("jax_compilation_cache_dir", d1)
            t0 = time.perf_counter()
            recs["sequential"] = [E.execute(r, spec["base"]) for r in todo]
            out["sequential_s"] = time.perf_counter() - t0
            print(json.dumps({"sequential_s": out["sequential_s"]}), flush=True)
            jax.config.update("jax_compilation_cache_dir", d2)
            t0 = time.perf_counter()
            with pool(workers) as ex:
                recs["parallel"] = [f.result() for f in [ex.submit(E.execute, r, spec["base"]) for r in todo]]
            out["parallel_s"] = time.perf_counter() - t0
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
    out["speedup"] = out["sequential_s"] / out["parallel_s"]
    out["run_seconds"] = {mode: [r["seconds"] for r in rs] for mode, rs in recs.items()}
    out["final_eval_loss"] = {mode: [r["final_eval_loss"] for r in rs] for mode, rs in recs.items()}
    out["same_losses"] = all(a["eval_loss_examples"] == b["eval_loss_examples"]
                             for a, b in zip(recs["sequential"], recs["parallel"]))
    out["max_abs_diff_examples"] = max(float(np.nanmax(np.abs(np.asarray(a["eval_loss_examples"], float)
                                                              - np.asarray(b["eval_loss_examples"], float))))
                                       for a, b in zip(recs["sequential"], recs["parallel"]))
    print(json.dumps(out), flush=True)
    return out


def bench_compile_cache(runs=(("cross_silo", "fedhl_data_size", 1), ("cross_silo", "fedhl_data_size", 2)),
                        extra=(("optim.length_bucket", 32), ("fed.clients_per_chunk", 1)),
                        config="configs/results_smollm2.yaml", cache="docs/results/results_smollm2.jsonl"):
    """Whole evidence-suite runs in one process from an empty persistent compilation cache (as
    ``fedhl-results`` keeps one), then the suite's zero-shot pass: per run, wall seconds and JAX's
    compile events (``jax.monitoring``: tracing, lowering, XLA's backend compile, and the seconds the
    persistent cache saved). The default runs are two seeds of one method at its tuned rate in
    ``cache`` (one program: the second loads it from the cache), without the validation loss, with
    ``extra`` overrides (the settings of a suite from an empty cache). Needs ``../shared``. Run:
    ``python -c "import json; from benchmarks.run import bench_compile_cache; print(json.dumps(bench_compile_cache()))"``."""
    import tempfile

    from jax import monitoring

    from fedhl_jax.experiments import evidence_suite as E

    events = {}
    monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: events.__setitem__(
        name, events.get(name, 0.0) + secs))
    spec, _, best = _cached_suite(config, cache)
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    out = []
    try:
        with tempfile.TemporaryDirectory() as d:
            jax.config.update("jax_compilation_cache_dir", d)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # as fedhl-results
            todo = [_suite_rerun(spec, best, s, m, seed, extra) for s, m, seed in runs]
            todo.append(E.Run(E.ZERO_SHOT, dict(spec.get("zero_shot_overrides") or {}), spec["tune"]["seed"], "-", 0))
            for r in todo:
                events.clear()
                t0 = time.perf_counter()
                rec = E.execute(r, spec["base"])
                row = {"run": r.rid, "seed": r.seed, "seconds": time.perf_counter() - t0,
                       "eval_loss": rec.get("final_eval_loss", rec.get("eval_loss")),
                       "events": {k: v for k, v in events.items() if "compil" in k or "cache" in k}}
                out.append(row)
                print(json.dumps(row), flush=True)
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    return {"config": config, "extra": dict(extra), "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": out}


def bench_cut_pairs(seeds=(1, 2), setting="cross_silo", methods=None, workers=2,
                    extra=(("optim.length_bucket", 32), ("fed.clients_per_chunk", 1)),
                    out="docs/results/cut_pairs.jsonl", config="configs/results_smollm2.yaml",
                    cache="docs/results/results_smollm2.jsonl"):
    """Does training cut to length (the defaults, ``extra``) shift a suite's results? Reruns cached suite
    runs (``setting``, each method of the spec at its tuned rate, each of ``seeds``; no validation loss)
    with ``extra`` in ``workers`` worker processes and appends each, as it finishes, to the JSONL ``out``
    beside its cached record's numbers (resumable: runs already in ``out`` are skipped). A row holds the
    final held-out loss as the page defines it (the mean over answers) of both, and the cut run's
    per-answer losses. ``cut_pairs_summary`` reads it. Needs ``../shared``. Run: ``python -c "from
    benchmarks.run import bench_cut_pairs; bench_cut_pairs()"``."""
    from concurrent.futures import as_completed

    from fedhl_jax.experiments import evidence_suite as E
    from fedhl_jax.experiments.workers import pool

    spec, by_config, best = _cached_suite(config, cache)
    path = Path(out)
    have = {(r["method"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())} if path.exists() else set()
    todo = [(m, s) for s in seeds for m in (methods or spec["methods"]) if (m, s) not in have]
    with pool(workers) as ex:
        futures = {}
        for m, s in todo:
            futures[ex.submit(E.execute, _suite_rerun(spec, best, setting, m, s, extra), spec["base"])] = (m, s)
        for f in as_completed(futures):
            m, s = futures[f]
            rec, old = f.result(), by_config[E.digest(spec, setting, m, best[m], s)]
            row = {"setting": setting, "method": m, "seed": s, "lr": best[m], "extra": dict(extra),
                   "answer_mean": E.answer_mean(rec), "answer_mean_cached": E.answer_mean(old),
                   "final_eval_loss": rec["final_eval_loss"], "final_eval_loss_cached": old["final_eval_loss"],
                   "seconds": rec["seconds"], "eval_loss_examples": rec["eval_loss_examples"]}
            with open(path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if k != "eval_loss_examples"}), flush=True)


BF16_EXTRA = (("optim.length_bucket", 32), ("fed.clients_per_chunk", 1), ("model.compute_dtype", "bfloat16"))


def bench_bf16_pairs(out="docs/results/bf16_pairs.jsonl"):
    """The reruns of ``bench_cut_pairs`` (every method's cross-silo seed 1, FlexLoRA's and FedHL's seed 2) once
    more with bfloat16 compute: does it keep the suite's results? Compare with
    ``cut_pairs_summary(out, baseline="docs/results/cut_pairs.jsonl")``. Resumable. Needs ``../shared``. Run:
    ``python -c "from benchmarks.run import bench_bf16_pairs; bench_bf16_pairs()"``."""
    bench_cut_pairs(seeds=(1,), extra=BF16_EXTRA, out=out)
    bench_cut_pairs(seeds=(2,), methods=["flexlora", "fedhl"], extra=BF16_EXTRA, out=out)


def bench_compute_dtype(variants=("float32", "bfloat16"), rounds=3, lr=0.004, config="configs/results_smollm2.yaml"):
    """Seconds per round and of the held-out (and validation) pass of the evidence suite's GSM8K run at the
    defaults (cut to length, one client per chunk), by ``model.compute_dtype``, in one process on both cores;
    the first round includes compiling. Needs ``../shared``. Run: ``python -c "import json; from
    benchmarks.run import bench_compute_dtype; print(json.dumps(bench_compute_dtype()))"``."""
    import yaml

    from fedhl_jax.config import TrainConfig, from_dict
    from fedhl_jax.experiments.results_suite import merge_overrides
    from fedhl_jax.simulation import Simulation

    spec = yaml.safe_load(Path(config).read_text())
    out = []
    for variant in variants:
        ov = {"optim.length_bucket": 32, "fed.clients_per_chunk": 1, "optim.lr": lr, "fed.rounds": rounds,
              "model.compute_dtype": variant}
        sim = Simulation(from_dict(TrainConfig, merge_overrides(spec["base"], ov)), log=lambda *a: None)
        state, times, losses = sim.init_state(), [], []
        sim.start(0)
        for t in range(rounds):
            t0 = time.perf_counter()
            rec = sim.run_round(state, t)
            state = jax.block_until_ready(rec.state)
            times.append(time.perf_counter() - t0)
            losses.append(rec.metrics.get("train_loss"))
        t0 = time.perf_counter()
        ev = sim.evaluate(state, rounds - 1)
        row = {"compute_dtype": variant, "round_seconds": times, "eval_seconds": time.perf_counter() - t0,
               "train_loss": losses, "eval_loss": ev.get("eval_loss")}
        out.append(row)
        print(json.dumps(row), flush=True)
        del sim, state
    return {"config": config, "rounds": rounds, "lr": lr, "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": out}


def cut_pairs_summary(path="docs/results/cut_pairs.jsonl", baseline=None) -> dict:
    """The mean over runs of (rerun − cached record) held-out loss, with its 95% t interval over runs
    and the paired t-test's p (``fedhl_jax.experiments.stats``), and the mean absolute difference.

    ``baseline``: another such JSONL (e.g. ``cut_pairs.jsonl``); each row is then compared with the baseline's
    rerun of the same setting, method and seed instead of the cached record (rows it lacks are left out), and
    ``seconds_ratio`` is the mean over runs of (rerun seconds / baseline seconds)."""
    from fedhl_jax.experiments import stats as S

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    if baseline is not None:
        base = {(r["setting"], r["method"], r["seed"]): r for r in map(json.loads, Path(baseline).read_text().splitlines())}
        rows = [dict(r, answer_mean_cached=base[k]["answer_mean"], seconds_base=base[k]["seconds"])
                for r in rows if (k := (r["setting"], r["method"], r["seed"])) in base]
    a = np.asarray([[r["answer_mean"]] for r in rows])  # [runs, 1]
    b = np.asarray([[r["answer_mean_cached"]] for r in rows])
    d = a[:, 0] - b[:, 0]
    t = S.paired_t_test(a, b) if len(rows) >= 2 else None
    ci = S.t_interval(d) if len(rows) >= 2 else None
    out = {"runs": len(rows), "mean_diff": float(d.mean()), "ci95": [ci.low, ci.high] if ci else None,
           "p": t.p if t else None, "mean_abs_diff": float(np.abs(d).mean()), "max_abs_diff": float(np.abs(d).max()),
           "sd_diff": float(d.std(ddof=1)) if len(rows) >= 2 else None}
    if baseline is not None:
        out["seconds_ratio"] = float(np.mean([r["seconds"] / r["seconds_base"] for r in rows]))
    return out
