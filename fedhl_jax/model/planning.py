"""Memory planning for Llama-2-7B and SmolLM2-135M from shapes (no weights are allocated).

Regenerate ``docs/memory_planning.md`` with::

    python -m fedhl_jax.model.planning            # writes docs/memory_planning.md
    python -m fedhl_jax.model.planning --stdout   # prints the table instead
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from fedhl_jax.model.adapters import init_adapter, lora_targets
from fedhl_jax.model.architecture import LlamaConfig
from fedhl_jax.model.llama import init_params, param_shapes

DEFAULT_RANKS = (4, 8, 16, 32, 64)
TARGET_SETS = {"q,v": ("q_proj", "v_proj"), "all-linear": "all-linear"}
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "memory_planning.md"
GIB, MIB = 2.0**30, 2.0**20


def _size(tree) -> tuple[int, int]:
    """``(elements, bytes)`` of a pytree of ``ShapeDtypeStruct``."""
    leaves = jax.tree.leaves(tree)
    return (sum(int(np.prod(x.shape)) for x in leaves),
            sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves))


def memory_plan(cfg: LlamaConfig | None = None, ranks: Sequence[int] = DEFAULT_RANKS) -> dict:
    """Parameter and adapter sizes of a model, from shapes only.

    Args:
      cfg: model config (default: :meth:`LlamaConfig.llama2_7b`).
      ranks: LoRA ranks to tabulate.

    Returns:
      ``{"params": n, "param_bytes": {"float32": .., "bfloat16": ..},
      "lora": {target_set: {rank: (elements, float32 bytes)}},
      "dense": {target_set: (elements, float32 bytes)}}``. LoRA sizes count the
      factors ``A`` and ``B`` of one client at exactly that rank.
    """
    cfg = cfg or LlamaConfig.llama2_7b()
    key = jax.random.key(0)
    n_params, _ = _size(jax.eval_shape(lambda k: init_params(cfg, k), key))
    lora, dense = {}, {}
    for label, targets in TARGET_SETS.items():
        lora[label] = {}
        for r in ranks:
            shapes = jax.eval_shape(lambda k: init_adapter(cfg, targets, r, k), key)  # noqa: B023
            lora[label][r] = _size((shapes.A, shapes.B))
        dense[label] = _size({n: jax.ShapeDtypeStruct(s, jnp.float32)
                              for n, s in lora_targets(cfg, targets).items()})
    return {"params": n_params, "param_bytes": {"float32": 4 * n_params, "bfloat16": 2 * n_params},
            "lora": lora, "dense": dense}


# --------------------------------------------------------------------------- training memory
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "u32": 4, "i8": 1,
                "u8": 1, "bool": 1, "s32": 4, "u64": 8}
_RESIDUAL = re.compile(r"^(\w+)\[([\d,]*)\] (.*)$")


def saved_residual_bytes(fn, *args) -> int:
    """Bytes the backward pass of ``fn(*args)`` keeps, from ``jax.ad_checkpoint.print_saved_residuals``.

    Arguments, constants and ``stop_gradient`` outputs (the frozen weights) are
    not counted; only activations. ``args`` may be ``jax.ShapeDtypeStruct`` (nothing is computed).
    """
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(fn, *args)
    total = 0
    for line in buf.getvalue().splitlines():
        m = _RESIDUAL.match(line.strip())
        if not m or any(w in m.group(3) for w in ("from a constant", "from the argument",
                                                   "output of stop_gradient")):
            continue  # inputs: not activations (the frozen weights pass through stop_gradient)
        dims = [int(x) for x in m.group(2).split(",") if x]
        total += int(np.prod(dims, dtype=np.int64)) * _DTYPE_BYTES.get(m.group(1), 4)
    return total


def activation_bytes(cfg: LlamaConfig, *, batch: int, seq: int, targets="all-linear", r_max: int = 16,
                     remat: str | None = None) -> dict:
    """Activation memory of one client's training step (``batch`` sequences of ``seq`` tokens).

    Traced, not allocated: the residuals that ``jax.grad`` of the loss keeps are
    counted (:func:`saved_residual_bytes`) on 1- and 2-layer cuts of ``cfg``; their
    difference is one scanned block's share, the rest the embedding/head/loss share.

    Returns:
      ``{"per_layer": bytes kept per block, "head": bytes outside the blocks,
      "block_working": what the block being differentiated holds on top: its
      residuals without remat (when a policy recomputes them) plus one copy of its
      weights in the compute dtype (XLA on CPU re-lays the weights out for the
      backward matmuls; a GPU may not need it, so this errs high), "total":
      num_layers · per_layer + head + block_working}``.
    """
    from fedhl_jax.model.adapters import stacked_adapter
    from fedhl_jax.model.llama import loss_fn

    remat = cfg.remat if remat is None else remat
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq + 1), jnp.float32)

    def kept(layers, policy):
        c = cfg.replace(num_layers=layers, remat=policy)
        params = jax.eval_shape(lambda k: init_params(c, k), jax.random.key(0))
        ad = jax.eval_shape(lambda k: stacked_adapter(c, init_adapter(c, targets, r_max, k)),
                            jax.random.key(0))
        # the base weights are frozen inputs of the loss, as in local training
        return saved_residual_bytes(
            lambda a, p, t, m: loss_fn(c, jax.lax.stop_gradient(p), a, t, m), ad, params, tokens, mask)

    one, two = kept(1, remat), kept(2, remat)
    per_layer, head = two - one, 2 * one - two
    working = kept(2, "none") - kept(1, "none") if remat != "none" else 0
    block = {k: v for k, v in param_shapes(cfg).items() if k.startswith("layers.0.")}
    working += sum(int(np.prod(s)) for s in block.values()) * np.dtype(cfg.jnp_compute_dtype).itemsize
    return {"per_layer": per_layer, "head": head, "block_working": working,
            "total": cfg.num_layers * per_layer + head + working}


def training_plan(cfg: LlamaConfig, *, clients: int, clients_per_chunk: int | None, batch: int,
                  seq: int, local_steps: int = 1, targets="all-linear", r_max: int = 16,
                  remat: str | None = None, activations: dict | None = None) -> dict:
    """Device bytes of one vmapped local-training round (``make_clients_train`` + AdamW).

    Terms: the base weights (``cfg.dtype``); every client's float32 factors in and
    out of the round and its tokens; per chunk of clients being trained, the
    factors' training state (factors, gradients, two Adam moments, updates: 5×
    the factors) and the activations of :func:`activation_bytes`.

    Returns:
      ``{"base", "factors_per_client", "clients_io", "chunk_state", "activations_per_client",
      "chunk_activations", "total"}`` in bytes.
    """
    chunk = clients if clients_per_chunk is None else min(clients_per_chunk, clients)
    base = _size(jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0)))[1]
    ad = jax.eval_shape(lambda k: init_adapter(cfg, targets, r_max, k), jax.random.key(0))
    factors = _size((ad.A, ad.B))[1]
    acts = activations or activation_bytes(cfg, batch=batch, seq=seq, targets=targets, r_max=r_max,
                                           remat=remat)
    tokens = 2 * 4 * local_steps * batch * (seq + 1)  # int32 tokens + float32 loss mask
    plan = {"base": base, "factors_per_client": factors,
            "clients_io": clients * (2 * factors + tokens),
            "chunk_state": chunk * 5 * factors,
            "activations_per_client": acts["total"],
            "chunk_activations": chunk * acts["total"]}
    plan["total"] = plan["base"] + plan["clients_io"] + plan["chunk_state"] + plan["chunk_activations"]
    return plan


def largest_chunk(cfg: LlamaConfig, budget_bytes: float, *, clients: int, batch: int, seq: int,
                  targets="all-linear", r_max: int = 16, remat: str | None = None,
                  activations: dict | None = None) -> int:
    """Largest ``clients_per_chunk`` whose :func:`training_plan` total fits ``budget_bytes`` (0: none)."""
    acts = activations or activation_bytes(cfg, batch=batch, seq=seq, targets=targets, r_max=r_max,
                                           remat=remat)
    plan = training_plan(cfg, clients=clients, clients_per_chunk=1, batch=batch, seq=seq,
                         targets=targets, r_max=r_max, activations=acts)
    fixed = plan["base"] + plan["clients_io"]
    per_client = 5 * plan["factors_per_client"] + acts["total"]
    return int(max(0, min(clients, (budget_bytes - fixed) // per_client)))


def round_program(cfg: LlamaConfig, *, clients: int, clients_per_chunk: int | None, batch: int, seq: int,
                  local_steps: int = 1, targets="all-linear", r_max: int = 16):
    """The jitted ``make_clients_train`` program of a round and its argument shapes (nothing allocated).

    The layers stay under ``lax.scan`` whatever the depth (``unroll_layers=0``): the plan models the
    scanned program that deep models run, and the few-layer cuts checked here stand in for them.
    """
    from fedhl_jax.local import make_clients_train, make_local_train, make_optimizer
    from fedhl_jax.model.adapters import stacked_adapter
    from fedhl_jax.model.llama import loss_fn

    cfg = cfg.replace(unroll_layers=0)

    params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    ad = jax.eval_shape(lambda k: stacked_adapter(cfg, jax.vmap(
        lambda kk: init_adapter(cfg, targets, r_max, kk))(jax.random.split(k, clients))),
        jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((clients, local_steps, batch, seq + 1), jnp.int32)
    mask = jax.ShapeDtypeStruct(tokens.shape, jnp.float32)
    local = make_local_train(lambda p, a, t, m: loss_fn(cfg, p, a, t, m), make_optimizer("adamw", 1e-4))
    return jax.jit(make_clients_train(local, clients_per_chunk=clients_per_chunk)), (params, ad, tokens, mask)


def measured_bytes(cfg: LlamaConfig, *, clients: int, clients_per_chunk: int | None, batch: int,
                   seq: int, local_steps: int = 1, targets="all-linear", r_max: int = 16) -> dict:
    """XLA's own figure for the same round: ``compiled.memory_analysis()`` of the jitted
    ``make_clients_train`` program, compiled from shapes (nothing is allocated).

    Returns:
      ``{"argument", "output", "temp", "alias", "total"}`` bytes, ``total =
      argument + output + temp - alias`` (the program's peak on this backend).
    """
    fn, shapes = round_program(cfg, clients=clients, clients_per_chunk=clients_per_chunk, batch=batch, seq=seq,
                               local_steps=local_steps, targets=targets, r_max=r_max)
    params, ad, tokens, mask = shapes
    ma = fn.lower(params, ad, tokens, mask).compile().memory_analysis()
    out = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
           "temp": ma.temp_size_in_bytes, "alias": ma.alias_size_in_bytes}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


_RSS_SCRIPT = """
import json, sys, jax, jax.numpy as jnp
from fedhl_jax.model import planning as P
from fedhl_jax.model.architecture import LlamaConfig
cfg = LlamaConfig(**json.loads(sys.argv[1])); kw = json.loads(sys.argv[2])
fn, shapes = P.round_program(cfg, **kw)
compiled = fn.lower(*shapes).compile()
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS (drops the compiler's peak)
base = status("VmRSS:")
args = [jnp.zeros(s.shape, s.dtype) for s in jax.tree.leaves(shapes)]
args = jax.tree.unflatten(jax.tree.structure(shapes), args)
jax.block_until_ready(compiled(*args))
print(json.dumps({"peak": status("VmHWM:") - base}))
"""


def measured_rss_bytes(cfg: LlamaConfig, **kw) -> int:
    """Peak resident memory of one run of the same program on the CPU, in a fresh process: the peak
    RSS while its inputs are allocated and it runs, minus the RSS just before (after compiling,
    with the compiler's own peak reset through ``/proc/self/clear_refs``). Linux only."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, json.dumps(dataclasses.asdict(cfg)), json.dumps(kw)],
                         capture_output=True, text=True, env=env, timeout=1800, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak"]


SMOLLM2_135M = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                           num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True,
                           rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192)


#: Published shapes (``config.json`` of each model on the Hugging Face Hub), for planning without the
#: weights: the :class:`LlamaConfig` presets, with Llama-3.1-8B's ``llama3`` RoPE scaling and
#: Qwen2.5-7B's q/k/v biases (family ``qwen2``).
MODEL_SHAPES = {
    "llama2-7b": LlamaConfig.llama2_7b(),
    "llama31-8b": LlamaConfig.llama31_8b(),
    "qwen25-7b": LlamaConfig.qwen25_7b(),
    "smollm2-135m": SMOLLM2_135M,
}
BUDGET = 80e9  # bytes of an 80 GB accelerator
# (label, model, clients in the round, batch, seq, r_max) of the round tables
ROUNDS = (("Llama-2-7B (bfloat16 base)", LlamaConfig.llama2_7b(), 10, 4, 512, 64),
          ("SmolLM2-135M (bfloat16 base)", SMOLLM2_135M.replace(dtype="bfloat16"), 100, 4, 512, 64))
# (label, model, clients, clients_per_chunk, batch, seq, r_max) checked against XLA
CHECKS = (("SmolLM2-135M, float32", SMOLLM2_135M, 4, 2, 2, 128, 16),
          ("7B-shaped, 2 layers, float32", LlamaConfig.llama2_7b(dtype="float32").replace(num_layers=2),
           2, 1, 1, 128, 16))


def round_rows() -> list[dict]:
    """Planner rows of :data:`ROUNDS` for every remat policy (all-linear LoRA, AdamW)."""
    rows = []
    for label, cfg, clients, batch, seq, r_max in ROUNDS:
        for remat in ("none", "dots_saveable", "full"):
            c = cfg.replace(remat=remat)
            acts = activation_bytes(c, batch=batch, seq=seq, r_max=r_max)
            plan = training_plan(c, clients=clients, clients_per_chunk=1, batch=batch, seq=seq,
                                 r_max=r_max, activations=acts)
            rows.append({"model": label, "remat": remat, "clients": clients, "batch": batch, "seq": seq,
                         "r_max": r_max, **plan, "acts": acts,
                         "fits": largest_chunk(c, BUDGET, clients=clients, batch=batch, seq=seq,
                                               r_max=r_max, activations=acts)})
    return rows


def check_rows(checks=CHECKS) -> list[dict]:
    """Planner total against ``compiled.memory_analysis()`` for :data:`CHECKS` and every policy."""
    rows = []
    for label, cfg, clients, chunk, batch, seq, r_max in checks:
        for remat in ("none", "dots_saveable", "full"):
            c = cfg.replace(remat=remat)
            kw = dict(clients=clients, clients_per_chunk=chunk, batch=batch, seq=seq, r_max=r_max)
            plan, meas = training_plan(c, **kw), measured_bytes(c, **kw)
            rows.append({"model": label, "remat": remat, **kw, "planned": plan["total"],
                         "measured": meas["total"], "measured_temp": meas["temp"],
                         "ratio": plan["total"] / meas["total"]})
    return rows


def render_markdown(plan: dict, cfg: LlamaConfig | None = None, rounds: list | None = None,
                    checks: list | None = None, rss: list | None = None) -> str:
    """The planning tables of :func:`memory_plan` as Markdown."""
    cfg = cfg or LlamaConfig.llama2_7b()
    lines = [
        "# Memory planning (Llama-2-7B, SmolLM2-135M)",
        "",
        "Generated by `python -m fedhl_jax.model.planning` from `jax.eval_shape` on the",
        f"Llama-2-7B shape (hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
        f"{cfg.num_layers} layers, {cfg.num_heads} heads, vocab {cfg.vocab_size}); nothing is "
        "allocated.",
        "",
        "## Base model",
        "",
        "| quantity | value |",
        "| --- | ---: |",
        f"| parameters | {plan['params']:,} ({plan['params'] / 1e9:.2f}e9) |",
        f"| weights, float32 | {plan['param_bytes']['float32'] / GIB:.2f} GiB |",
        f"| weights, bfloat16 | {plan['param_bytes']['bfloat16'] / GIB:.2f} GiB |",
        "",
        "## LoRA factors of one client (float32 `A` and `B`)",
        "",
        "Adam keeps two more float32 moments per factor, so a client's trainable state is",
        "about 3x these numbers (plus gradients during a step). With heterogeneous ranks",
        "every client's factors are padded to `r_max` (rank-masked), so read the `r_max` row.",
        "",
        "| rank | q,v parameters | q,v MiB | all-linear parameters | all-linear MiB |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    qv, al = plan["lora"]["q,v"], plan["lora"]["all-linear"]
    for r in qv:
        lines.append(f"| {r} | {qv[r][0]:,} | {qv[r][1] / MIB:.1f} | {al[r][0]:,} | "
                     f"{al[r][1] / MIB:.1f} |")
    lines += [
        "",
        "## Dense server adapter (float32 `{module: [d_out, d_in]}`)",
        "",
        "The server's dense global update has one full matrix per adapted module,",
        "independent of the clients' ranks.",
        "",
        "| targets | elements | GiB |",
        "| --- | ---: | ---: |",
    ]
    for label, (n, nbytes) in plan["dense"].items():
        lines.append(f"| {label} | {n:,} | {nbytes / GIB:.2f} |")
    if rounds:
        lines += [
            "",
            "## A local-training round on an 80 GB accelerator",
            "",
            "`training_plan` / `largest_chunk`: one round of `make_clients_train` with AdamW,",
            "LoRA on all linear layers, float32 factors, bfloat16 base weights and activations",
            "(`LlamaConfig(dtype=\"bfloat16\")`), one local step of `batch` sequences of `seq`",
            "tokens per client. Terms:",
            "",
            "* *base*: the frozen weights, shared by every client;",
            "* *round I/O*: every client's factors in and out of the round, and its tokens;",
            "* *state / client*: a training client's factors, gradients, two Adam moments and",
            "  updates (5x the factors);",
            "* *activations / client*: what the backward pass keeps, counted from",
            "  `print_saved_residuals` on 1- and 2-layer cuts (per block x layers + embedding,",
            "  head and loss), plus the working set of the block being differentiated;",
            "* *fits*: the largest `clients_per_chunk` whose total stays under 80 GB (80e9 bytes).",
            "  JAX preallocates 75% of the device by default: run with",
            "  `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` (or `XLA_PYTHON_CLIENT_PREALLOCATE=false`).",
            "",
            "| model | remat | clients | b x T | r_max | base GiB | round I/O GiB | state / client MiB "
            "| kept per block MiB | activations / client GiB | fits (clients_per_chunk) |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in rounds:
            lines.append(f"| {r['model']} | `{r['remat']}` | {r['clients']} | {r['batch']} x {r['seq']} | "
                         f"{r['r_max']} | {r['base'] / GIB:.2f} | {r['clients_io'] / GIB:.2f} | "
                         f"{5 * r['factors_per_client'] / MIB:.0f} | {r['acts']['per_layer'] / MIB:.1f} | "
                         f"{r['activations_per_client'] / GIB:.2f} | {r['fits']} |")
    if checks:
        lines += [
            "",
            "## Planner against XLA (CPU)",
            "",
            "`training_plan` against `compiled.memory_analysis()` (argument + output + temp",
            "bytes) of the same jitted `make_clients_train` program, compiled from shapes on the",
            "CPU backend (`check_rows`; `tests/test_depth.py` checks a small shape). float32,",
            "because XLA's CPU backend computes bfloat16 matmuls through float32 copies.",
            "",
            "| model | remat | clients / per chunk | b x T | planned MiB | measured MiB | planned / measured |",
            "| --- | --- | --- | --- | ---: | ---: | ---: |",
        ]
        for r in checks:
            lines.append(f"| {r['model']} | `{r['remat']}` | {r['clients']} / {r['clients_per_chunk']} | "
                         f"{r['batch']} x {r['seq']} | {r['planned'] / MIB:,.0f} | "
                         f"{r['measured'] / MIB:,.0f} | {r['ratio']:.2f} |")
    if rss:
        lines += [
            "",
            "### Planner against measured peak memory (CPU)",
            "",
            "The same programs run once on the CPU in a fresh process (`planning.measured_rss_bytes`): the",
            "peak resident memory while the inputs are allocated and the round runs, minus the resident memory",
            "just before (after compiling; the compiler's own peak is reset through `/proc/self/clear_refs`).",
            "",
            "| model | remat | clients / per chunk | planned MiB | measured peak RSS MiB | planned / measured |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for r in rss:
            lines.append(f"| {r['model']} | `{r['remat']}` | {r['clients']} / {r['clients_per_chunk']}, "
                         f"{r['batch']} x {r['seq']} | {r['planned'] / MIB:,.0f} | {r['measured'] / MIB:,.0f} | "
                         f"{r['ratio']:.2f} |")
        worst = max(abs(r["ratio"] - 1) for r in rss)
        lines += ["", f"Both cases are within {worst:.0%} (the target is 20%)."]
    return "\n".join(lines) + "\n"


def rss_rows(checks=CHECKS, policies=("none", "full")) -> list[dict]:
    """Planner total against the measured peak RSS (``measured_rss_bytes``) for :data:`CHECKS`."""
    rows = []
    for label, cfg, clients, chunk, batch, seq, r_max in checks:
        for remat in policies:
            c = cfg.replace(remat=remat)
            kw = dict(clients=clients, clients_per_chunk=chunk, batch=batch, seq=seq, r_max=r_max)
            plan, meas = training_plan(c, **kw)["total"], measured_rss_bytes(c, **kw)
            rows.append({"model": label, "remat": remat, **kw, "planned": plan, "measured": meas,
                         "ratio": plan / meas})
    return rows


SLICE_BEGIN, SLICE_END = "<!-- plan_tpu:begin -->", "<!-- plan_tpu:end -->"


def keep_slice_section(old: str, new: str) -> str:
    """``new`` with the TPU-slice section of ``old`` (``scripts/plan_table.py render`` writes it
    between ``SLICE_BEGIN`` and ``SLICE_END``) kept, before the "Planner against XLA" section."""
    if SLICE_BEGIN not in old or SLICE_END not in old:
        return new
    block = SLICE_BEGIN + old.split(SLICE_BEGIN, 1)[1].split(SLICE_END, 1)[0] + SLICE_END + "\n\n"
    anchor = "## Planner against XLA (CPU)"
    if anchor not in new:
        return new.rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n"
    head, rest = new.split(anchor, 1)
    return head + block + anchor + rest


def main(argv: Sequence[str] | None = None) -> None:
    """Writes (or prints) the Llama-2-7B memory planning tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOC_PATH, help="Markdown file to write")
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args(argv)
    text = render_markdown(memory_plan(), rounds=round_rows(), checks=check_rows(), rss=rss_rows())
    text = keep_slice_section(args.out.read_text() if args.out.exists() else "", text)
    if args.stdout:
        print(text, end="")
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
