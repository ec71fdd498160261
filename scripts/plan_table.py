#!/usr/bin/env python3
"""The TPU-slice table of docs/memory_planning.md: ``fedhl-plan`` over 7-8B models, LoRA targets, remat and clients.

    python scripts/plan_table.py run [--until 18:05] [--limit N]   # compiles pending rows, cached one by one
    python scripts/plan_table.py run --redo                         # also rows compiled by an older program
    python scripts/plan_table.py check                              # a direct memory_analysis() of one row
    python scripts/plan_table.py render                             # rewrites the section of the page
    python scripts/plan_table.py commands                           # the fedhl-plan command of each pending row

Each finished compile appends one JSON line to docs/results/plan_tpu.jsonl (rows already there are
never compiled again); ``render`` writes the table from that file, listing the rows still pending
with the command that fills them. Needs libtpu (``pip install -e '.[tpu-plan]'``); every row runs
``python -m fedhl_jax.plan_cli`` in its own process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's fedhl_jax, whatever is installed
CACHE = REPO / "docs" / "results" / "plan_tpu.jsonl"
PAGE = REPO / "docs" / "memory_planning.md"
BEGIN, END = "<!-- plan_tpu:begin -->", "<!-- plan_tpu:end -->"
ANCHOR = "## Planner against XLA (CPU)"
GIB = 2.0**30

MODELS = {"llama2-7b": "Llama-2-7B", "llama31-8b": "Llama-3.1-8B", "qwen25-7b": "Qwen2.5-7B"}
TARGETS = {"q,v": "[q_proj,v_proj]", "all-linear": "all-linear"}
REMATS = ("full", "none")
CLIENTS = (10, 100)
SLICES = {"v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1", "v6e-8": "v6e:2x4"}
#: The round every row shares (the rest are the config defaults: FedHL, ranks 2-16, AdamW, 5 local steps).
COMMON = ("model.dtype=bfloat16", "data.seq_len=512", "optim.batch_size=4", "optim.local_steps=5",
          "fed.options.svd_method=randomized")


def rows() -> list[dict]:
    """Every row, in the order they are compiled: Llama-2-7B q+v remat full 10 clients on each slice
    first, then the other models the same way, then every q+v row (minutes each), then the
    all-linear rows (up to 40 minutes each)."""
    grid = [dict(model=m, targets=t, remat=r, clients=c, slice=s)
            for m in MODELS for t in TARGETS for r in REMATS for c in CLIENTS for s in SLICES]

    def priority(row):
        lead = row["targets"] == "q,v" and row["remat"] == "full" and row["clients"] == 10
        return (not lead, list(TARGETS).index(row["targets"]), list(MODELS).index(row["model"]),
                REMATS.index(row["remat"]), CLIENTS.index(row["clients"]))  # then SLICES order (stable)

    return sorted(grid, key=priority)


def key(row: dict) -> str:
    return f"{row['model']}|{row['targets']}|remat={row['remat']}|clients={row['clients']}|{row['slice']}"


def base_bytes(model: str) -> int:
    """bfloat16 bytes of the model's base weights (from shapes)."""
    from fedhl_jax.model.llama import param_shapes
    from fedhl_jax.model.planning import MODEL_SHAPES

    return 2 * sum(math.prod(s) for s in param_shapes(MODEL_SHAPES[model]).values())


def mesh_for(row: dict) -> tuple[int, int]:
    """``(clients, model)`` for a row: the largest ``clients`` axis that divides both the round's
    clients and the chips while the base's shard (``1/model`` of it) takes at most half a chip's HBM."""
    from fedhl_jax.slice_plan import parse_topology

    topo = parse_topology(SLICES[row["slice"]])
    axes = [c for c in range(math.gcd(row["clients"], topo.chips), 0, -1)
            if row["clients"] % c == 0 and topo.chips % c == 0]
    for c in axes:
        if base_bytes(row["model"]) / (topo.chips // c) <= topo.hbm_bytes / 2:
            return c, topo.chips // c
    return 1, topo.chips


def command(row: dict) -> list[str]:
    """The ``fedhl-plan`` command line of a row (one compile, at ``clients_per_chunk`` = the ``clients`` axis)."""
    clients, model = mesh_for(row)
    return ["fedhl-plan", "--topology", SLICES[row["slice"]], "--model-shape", row["model"], "--max-compiles", "1",
            "--json", *COMMON, f"model.targets={TARGETS[row['targets']]}", f"model.remat={row['remat']}",
            f"fed.num_clients={row['clients']}", f"mesh.clients={clients}", f"mesh.model={model}",
            f"fed.clients_per_chunk={clients}"]


#: The server SVD of today's rows (``plan_cli.server_svd``: ``"batched"``, one randomized factorization per
#: module shape). Rows cached before it was batched have no such field: one factorization per module and layer.
PROGRAM = "batched"


def program(rec: dict) -> str:
    """The server SVD a cached row was compiled with."""
    return rec["plan"]["round"].get("server_svd", "per-module")


def _records() -> list[dict]:
    if not CACHE.exists():
        return []
    return [json.loads(line) for line in CACHE.read_text().splitlines() if line.strip()]


def load_cache() -> dict[str, dict]:
    """The latest record of each row (``key``) and of each check (``check|key``)."""
    return {rec["key"] if rec.get("kind", "row") == "row" else f"check|{rec['key']}": rec for rec in _records()}


def superseded() -> dict[str, list[dict]]:
    """``{key: [earlier records]}`` of rows compiled again (``run --redo``), oldest first."""
    seen: dict[str, list[dict]] = {}
    for rec in _records():
        if rec.get("kind", "row") == "row":
            seen.setdefault(rec["key"], []).append(rec)
    return {k: recs[:-1] for k, recs in seen.items() if len(recs) > 1}


CLAIMS = Path(os.environ.get("TMPDIR", "/tmp")) / "fedhl_plan_tpu_claims"


def claim(row: dict, prefix: str = "") -> bool:
    """Takes a row for this runner (a file created exclusively), so several runners share the rows."""
    CLAIMS.mkdir(parents=True, exist_ok=True)
    try:
        (CLAIMS / (prefix + key(row).replace("|", "_").replace("=", ""))).open("x").close()
        return True
    except FileExistsError:
        return False


def run(until: str | None, limit: int | None, redo: bool = False, match: str | None = None) -> None:
    """Compiles the rows missing from the cache, in :func:`rows` order; appends each as it finishes.

    With ``redo``, then the cached rows compiled by an older program (:func:`program` other than
    ``PROGRAM``): the new record supersedes the old one, which the page keeps as before → after.
    ``match``: only the rows whose key contains it (e.g. ``"llama2-7b|q,v|remat=full|clients=10|v5e-8"``)."""
    stop = None
    if until:
        h, m = (int(x) for x in until.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        stop = now.replace(hour=h, minute=m, second=0, microsecond=0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    count = 0
    chosen = [row for row in rows() if match is None or match in key(row)]
    todo = [(row, False) for row in chosen] + ([(row, True) for row in chosen] if redo else [])
    for row, again in todo:
        cached = load_cache().get(key(row))  # read again each time: another runner may have added it
        if cached is not None and (not again or program(cached) == PROGRAM):
            continue
        if cached is None and again:  # failed in the first pass
            continue
        if (stop and dt.datetime.now(dt.timezone.utc) >= stop) or (limit is not None and count >= limit):
            break  # before claiming: a claimed row is skipped by every other runner
        if not claim(row, "redo_" if again else ""):  # another runner compiles it now
            continue
        cmd = command(row)
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "fedhl_jax.plan_cli", *cmd[1:]], capture_output=True,
                             text=True, env=env, cwd=REPO)
        if res.returncode != 0:
            print(f"{key(row)}: failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        plan = json.loads(res.stdout.strip().splitlines()[-1])
        rec = {"kind": "row", "key": key(row), **row, "command": shlex.join(cmd), "plan": plan,
               "wall_seconds": round(time.time() - t0, 1), "date": dt.date.today().isoformat()}
        with open(CACHE, "a") as f:
            f.write(json.dumps(rec) + "\n")
        count += 1
        mem = plan["memory"]
        print(f"{key(row)}: {mem['total'] / GIB:.2f} GiB per chip, fits={plan['fits']} "
              f"({plan['compile_seconds'][0]:.0f} s)", flush=True)


def direct_memory(cfg, model_cfg, mesh) -> dict:
    """``memory_analysis()`` of a run's round built straight from the engine, not through the command:
    ``jax.jit(round_step, in_shardings=..., donate_argnums=0)`` over ``mesh`` (a ``clients x model``
    mesh of the topology's devices), lowered from plain shapes.

    Args:
      cfg: the run's ``TrainConfig``.
      model_cfg: the model's ``LlamaConfig`` (in the config's dtype).
      mesh: ``engine.make_mesh(clients, model, devices=...)``.

    Returns:
      ``{"argument", "output", "temp", "generated_code", "alias"}`` bytes per device.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from fedhl_jax import engine
    from fedhl_jax import model as M
    from fedhl_jax.build import build_algorithm
    from fedhl_jax.local import make_optimizer

    alg = build_algorithm(cfg.fed)
    shapes = M.lora_targets(model_cfg, cfg.model.targets)
    o, n = cfg.optim, cfg.fed.clients_per_round
    opt = make_optimizer(o.optimizer, o.lr, lr_b=o.lr_b, weight_decay=o.weight_decay, momentum=o.momentum,
                         grad_clip=o.grad_clip, trainable=alg.trainable)
    tcfg = model_cfg.replace(remat=cfg.model.remat)
    step = engine.make_round_step(alg, lambda p, a, t, m: M.loss_fn(tcfg, p, a, t, m), opt,
                                  clients_per_chunk=cfg.fed.clients_per_chunk, merge_delta=M.merge_delta,
                                  to_client=lambda ad: M.stacked_adapter(model_cfg, ad),
                                  from_client=lambda ad: M.per_layer_adapter(model_cfg, ad), mesh=mesh)
    state = jax.eval_shape(lambda k: alg.init(shapes, k), jax.random.PRNGKey(0))
    base = jax.eval_shape(lambda k: M.init_params(model_cfg, k), jax.random.PRNGKey(0))
    tok = jax.ShapeDtypeStruct((n, o.local_steps, o.batch_size, cfg.data.seq_len), jnp.int32)
    inputs = engine.RoundInputs(jax.ShapeDtypeStruct((n, cfg.fed.r_max), jnp.float32),
                                jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.float32),
                                (tok, tok.update(dtype=jnp.float32)), jax.ShapeDtypeStruct((2,), jnp.uint32))
    rep, per_client = NamedSharding(mesh, P()), NamedSharding(mesh, P(engine.CLIENTS))
    in_sh = (jax.tree.map(lambda _: rep, state), engine.base_shardings(base, mesh),
             engine.RoundInputs(per_client, per_client, per_client, (per_client, per_client), rep))
    ma = jax.jit(step, in_shardings=in_sh, donate_argnums=0).lower(state, base, inputs).compile().memory_analysis()
    return {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes, "temp": ma.temp_size_in_bytes,
            "generated_code": ma.generated_code_size_in_bytes, "alias": ma.alias_size_in_bytes}


def check() -> None:
    """The first cached row that fits (XLA gave its ``memory_analysis()``), compiled by today's program,
    against :func:`direct_memory`; appends a ``check`` record."""
    done = [r for r in load_cache().values()
            if r.get("kind", "row") == "row" and program(r) == PROGRAM and "refused" not in r["plan"]["memory"]]
    if not done:
        raise SystemExit(f"no row that fits and was compiled by today's program ({PROGRAM} server SVD) to check; "
                         "run `python scripts/plan_table.py run --limit 1` first")
    from fedhl_jax import engine
    from fedhl_jax.config import load_config
    from fedhl_jax.model.planning import MODEL_SHAPES
    from fedhl_jax.slice_plan import parse_topology, topology_devices

    rec = done[0]
    cfg = load_config(None, [a for a in shlex.split(rec["command"]) if "=" in a and not a.startswith("-")])
    devices = topology_devices(parse_topology(rec["plan"]["topology"]))
    mesh = engine.make_mesh(rec["plan"]["mesh"]["clients"], rec["plan"]["mesh"]["model"], devices=devices)
    t0 = time.time()
    direct = direct_memory(cfg, MODEL_SHAPES[rec["model"]].replace(dtype=cfg.model.dtype), mesh)
    ratios = {k: (rec["plan"]["memory"][k] / v if v else float(rec["plan"]["memory"][k] == 0))
              for k, v in direct.items()}
    out = {"kind": "check", "key": rec["key"], "command": rec["command"], "server_svd": program(rec),
           "command_memory": rec["plan"]["memory"], "direct_memory": direct, "ratios": ratios,
           "seconds": round(time.time() - t0, 1), "date": dt.date.today().isoformat()}
    with open(CACHE, "a") as f:
        f.write(json.dumps(out) + "\n")
    print(json.dumps(out, indent=1))


def _gib(x: float | None) -> str:
    return "–" if x is None else f"{x / GIB:.2f}"


def at_a_glance(cache: dict[str, dict]) -> list[str]:
    """Markdown lines: which slice holds each round (model x LoRA x remat x clients), per-chip total GiB
    in each cell (*no* where it does not fit, *≥* where XLA refused it, *pending* where not compiled)."""
    lines = ["### At a glance: which slice holds the round", "",
             "Per-chip total GiB of each round on each slice; **bold** where it fits the chip's HBM, *(no)* where",
             "it does not (≥: XLA refused it, a lower bound); the mesh of each is in the table below.", "",
             "| model | LoRA | remat | clients | " + " | ".join(SLICES) + " |",
             "| --- | --- | --- | ---: | " + " | ".join("---:" for _ in SLICES) + " |"]
    for head in [(m, t, r, c) for t in TARGETS for m in MODELS for r in REMATS for c in CLIENTS]:
        cells = []
        for sl in SLICES:
            rec = cache.get(key(dict(zip(("model", "targets", "remat", "clients"), head), slice=sl)))
            if rec is None:
                cells.append("pending")
                continue
            mem, fits = rec["plan"]["memory"], rec["plan"]["fits"]
            total = ("≥ " if "refused" in mem else "") + _gib(mem["total"])
            cells.append(f"**{total}**" if fits else f"{total} (no)")
        m, t, r, c = head
        lines.append(f"| {MODELS[m]} | {t} | `{r}` | {c} | " + " | ".join(cells) + " |")
    return lines + [""] + remat_reading(cache) + ["Every compiled round, with its mesh and memory breakdown:", ""]


def dense_server_gib(model: str, targets: str) -> float:
    """GiB of FedHL's dense float32 server state ``G`` (one ``d_out x d_in`` matrix per adapted module
    and layer) for one of the table's models and LoRA targets, before any sharding."""
    from fedhl_jax.model.adapters import lora_targets
    from fedhl_jax.model.planning import MODEL_SHAPES, TARGET_SETS

    shapes = lora_targets(MODEL_SHAPES[model], TARGET_SETS[targets]).values()
    return sum(d_out * d_in for d_out, d_in in shapes) * 4 / GIB


def remat_reading(cache: dict[str, dict]) -> list[str]:
    """Markdown lines naming the compiled rounds whose per-chip total does not move with remat (within
    1%, both compiled and fitting): there the peak lies outside the clients' activations."""
    same = []
    for row in (r for r in rows() if r["remat"] == REMATS[0]):
        recs = [cache.get(key(dict(row, remat=r))) for r in REMATS]  # full, none
        if any(rec is None or not rec["plan"]["fits"] for rec in recs):
            continue
        full, none = (rec["plan"]["memory"]["total"] for rec in recs)
        if abs(none - full) <= 0.01 * full:
            same.append((row["model"], row["targets"], row["clients"], row["slice"], full, none))
    if not same:
        return []
    named = "; ".join(f"{MODELS[m]} {t}, {c} clients, {sl}: {_gib(f)} and {_gib(n)} GiB"
                      for m, t, c, sl, f, n in same)
    models = sorted({(m, t) for m, t, *_ in same})
    dense = ", ".join(f"{MODELS[m]} {t} {dense_server_gib(m, t):.1f} GiB" for m, t in models)
    return [f"Where remat `none` and `full` give the same total ({named}), the peak is not in the clients'",
            "training, whose activations remat shrinks. The largest resident object there is FedHL's dense",
            f"float32 server state `G` ({dense}, before the `model` axis splits it), held with its update",
            "through the server's step: for these rounds the server state, not remat, decides the slice.",
            ""]


def render_section(cache: dict[str, dict]) -> str:
    """The Markdown section: done rows, the check, and the pending rows with their commands."""
    lines = [
        BEGIN,
        "## A round compiled for TPU slices (XLA, per chip)",
        "",
        "`fedhl-plan` compiles the run's own round (`engine.make_round_step`: FedHL with its dense server",
        "state, AdamW on the clients, the `clients x model` mesh, remat, `clients_per_chunk`) for a TPU",
        "topology through `libtpu` on a CPU-only machine, from shapes (no weight is read), and reads",
        "`compiled.memory_analysis()`: what one chip holds. *total* = arguments + output - alias",
        "(the donated server state) + temporaries + generated code, against the chip's HBM (v5e 16 GiB,",
        "v5p 95 GiB, v6e 32 GiB). It needs `libtpu` (`pip install -e '.[tpu-plan]'`, the version jax's",
        "own `tpu` extra pins; a 214 MB wheel), nothing else: for example",
        "",
        "```bash",
        "fedhl-plan --topology v5p:2x2x1 --model-shape llama2-7b model.dtype=bfloat16 model.remat=full \\",
        "    fed.num_clients=10 mesh.clients=2 mesh.model=2 fed.clients_per_chunk=2",
        "```",
        "",
        "prints the per-chip figures, whether they fit, and the largest `clients_per_chunk` that fits",
        "(bisection over the chunks that split evenly over the mesh, one compile each, at most",
        "`--max-compiles`, default 4); `--json` prints one JSON object. The model's shape comes from",
        "`model.name_or_path`'s `config.json` (no weights needed) or `--model-shape` (`llama2-7b`,",
        "`llama31-8b`, `qwen25-7b`, `smollm2-135m`).",
        "",
        "Every row: bfloat16 base and compute, 5 local steps of 4 x 512 tokens per client, ranks 2-16",
        "(`r_max` 16), all clients in every round, FedHL with the randomized SVD",
        f"(`{' '.join(COMMON)}`). With the default exact SVD",
        "(`jnp.linalg.svd` of every dense `G`, one per adapted module and layer) XLA's TPU compile is out of",
        "reach of a small machine: on a 2-layer cut of Llama-2-7B (4 SVDs of 4096 x 4096) it ran 546 s of",
        "CPU and reached 10 GB of host memory without a result (randomized: 70 s, 1.7 GB, done), and the 32-layer",
        "round (64 SVDs) passed 21 GB of host memory and was stopped. The mesh splits the round's",
        "clients over as many chips as divide them while the base's shard (1/`model` of it) stays under",
        "half a chip's HBM; `clients_per_chunk` is the `clients` axis (one client per chip at a time, the",
        "least memory), so a row that does not fit has no chunk that does on that mesh. Each row is one",
        "compile (`--max-compiles 1`: no chunk search; run the command without it for the largest",
        "`clients_per_chunk` that fits). When XLA refuses to compile a program because it does not fit a",
        "chip's HBM (`RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: ... the total memory required for HLO",
        "temporaries (X) exceeds available HBM (Y)`), there is no `memory_analysis()`: the row says *no (XLA",
        "refused)*, its temporaries and total are XLA's figure for the temporaries alone (≥: a lower bound",
        "of the need). Made by `python scripts/plan_table.py run` (cache:",
        "[results/plan_tpu.jsonl](results/plan_tpu.jsonl)); each row's command is in the cache.",
        "",
        "Shapes: Llama-2-7B, Llama-3.1-8B (vocab 128,256, 8 KV heads, `llama3` RoPE scaling) and Qwen2.5-7B",
        "(vocab 152,064, 4 KV heads, q/k/v biases) as published in their `config.json`",
        "(`LlamaConfig.llama2_7b()`, `.llama31_8b()`, `.qwen25_7b()`).",
        "",
        "The test of the command (`tests/test_plan_tpu.py`, a tiny round compiled for `v5e:2x2` and checked",
        "against a direct `memory_analysis()`) runs where `libtpu` is installed and is skipped elsewhere. CI",
        "does not install it: on the 2-core CI machine the install took 11 s and the test 57 s, more than the",
        "minute it may add.",
        "",
        *at_a_glance(cache),
        "| model | LoRA | remat | clients | slice (topology) | mesh clients x model | chunk | arguments GiB "
        "| temporaries GiB | output - alias GiB | total GiB | HBM GiB | fits | compile s |",
        "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    pending = []
    for row in rows():
        rec = cache.get(key(row))
        if rec is None:
            pending.append(row)
            continue
        p, mem = rec["plan"], rec["plan"]["memory"]
        mesh = f"{p['mesh']['clients']} x {p['mesh']['model']}" if p["mesh"] else "one chip"
        lines.append(f"| {MODELS[row['model']]} | {row['targets']} | `{row['remat']}` | {row['clients']} | "
                     f"{row['slice']} (`{p['topology']}`) | {mesh} | {p['clients_per_chunk']} | "
                     f"{_gib(mem['argument'])} | {'≥ ' + _gib(mem['total']) if 'refused' in mem else _gib(mem['temp'])} | "
                     f"{_gib(None if 'refused' in mem else mem['output'] - mem['alias'])} | "
                     f"{'≥ ' if 'refused' in mem else ''}{_gib(mem['total'])} | {p['hbm_bytes'] / GIB:.0f} | "
                     f"{'yes' if p['fits'] else ('**no** (XLA refused)' if 'refused' in mem else '**no**')} | "
                     f"{p['compile_seconds'][0]:.0f}{'' if program(rec) == PROGRAM else ' †'} |")
    old = [rec for k, rec in cache.items() if not k.startswith("check|") and program(rec) != PROGRAM]
    again = superseded()
    if old:
        lines += ["", f"† {len(old)} rows were compiled before the server's randomized SVD was batched "
                      "(`truncation.svd_all`:", "one factorization per module shape instead of one per module and "
                      "layer; the same SVD, module by module).",
                  *(["What the batching changed in rows compiled both ways is under *Compiled again* below."]
                    if again else []),
                  "`python scripts/plan_table.py run --redo` compiles them again with today's program."]
    if again:
        lines += ["", "### Compiled again with the batched server SVD", "",
                  "The same row before (one SVD per module and layer) and after (`run --redo`). The compile times",
                  "were taken under different loads of the shared machine; for the two programs compiled side by",
                  "side see the randomized SVD in [algorithms.md](algorithms.md).", "",
                  "| row | total GiB before → after | temporaries GiB before → after | compile s before → after |",
                  "| --- | ---: | ---: | ---: |"]
        for k, recs in again.items():
            a, b = recs[0]["plan"], cache[k]["plan"]
            lines.append(f"| {k.replace('|', ', ')} | {_gib(a['memory']['total'])} → {_gib(b['memory']['total'])} | "
                         f"{_gib(a['memory']['temp'])} → {_gib(b['memory']['temp'])} | "
                         f"{a['compile_seconds'][0]:.0f} → {b['compile_seconds'][0]:.0f} |")
    checks = [r for k, r in cache.items() if k.startswith("check|")]
    if checks:
        lines += ["", "### The command against a direct `memory_analysis()`", "",
                  "`python scripts/plan_table.py check` builds the same round straight from the engine",
                  "(`jax.jit(round_step, in_shardings=..., donate_argnums=0)` over the topology's mesh) and compiles",
                  "it again; the command's figures over the direct ones:", "",
                  "| row | server SVD | arguments | temporaries | output | alias | generated code |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for c in checks:
            r = c["ratios"]
            lines.append(f"| {c['key'].replace('|', ', ')} | {c.get('server_svd', 'per-module')} | {r['argument']:.4f} | "
                         f"{r['temp']:.4f} | {r['output']:.4f} | {r['alias']:.4f} | {r['generated_code']:.4f} |")
    if not checks:
        lines += ["", "### The command against a direct `memory_analysis()`", "",
                  "Pending for a 7-8B row: `python scripts/plan_table.py check` compiles the first cached row's",
                  "round again straight from the engine (`jax.jit(round_step, in_shardings=..., donate_argnums=0)`)",
                  "and records the ratios here. On the small `v5e:2x2` round, `tests/test_plan_tpu.py` finds the",
                  "command's figures equal to that direct `memory_analysis()` to the byte."]
    if pending:
        secs = [r["plan"]["compile_seconds"][0] for k, r in cache.items() if not k.startswith("check|")]
        took = (f"took {min(secs) / 60:.0f}-{max(secs) / 60:.0f} minutes" if secs else "takes minutes")
        lines += ["", f"### Pending rows ({len(pending)} of {len(rows())})", "",
                  f"Not compiled yet: one 7-8B round {took} to compile on one core of a shared 2-core CPU",
                  "(the server's SVDs and the clients' training are one program).",
                  "`python scripts/plan_table.py run` compiles them in this order (several runners may share",
                  "the work) and `python scripts/plan_table.py render` adds them here;",
                  "`python scripts/plan_table.py commands` prints each row's `fedhl-plan` command.", "",
                  "| model | LoRA | remat | clients | slices |", "| --- | --- | --- | ---: | --- |"]
        groups: dict[tuple, list[str]] = {}
        for row in pending:
            groups.setdefault((row["model"], row["targets"], row["remat"], row["clients"]), []).append(row["slice"])
        for (m, t, r, c), slices in groups.items():
            lines.append(f"| {MODELS[m]} | {t} | `{r}` | {c} | {', '.join(slices)} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def render() -> None:
    """Writes the section into docs/memory_planning.md (replacing it; the first time, before the section
    ``ANCHOR``)."""
    text = PAGE.read_text()
    section = render_section(load_cache())
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + "\n" + rest.split(END, 1)[1].lstrip("\n")
    elif ANCHOR in text:  # after the accelerator round's table, before the CPU checks
        head, rest = text.split(ANCHOR, 1)
        text = head + section + "\n" + ANCHOR + rest
    else:
        text = text.rstrip("\n") + "\n\n" + section
    PAGE.write_text(text)
    print(f"wrote {PAGE}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("run", "check", "render", "commands"))
    p.add_argument("--until", default=None, help="HH:MM (UTC): start no compile after this time")
    p.add_argument("--limit", type=int, default=None, help="compile at most this many rows")
    p.add_argument("--redo", action="store_true",
                   help="run: after the pending rows, compile again the rows an older program compiled")
    p.add_argument("--match", default=None, help="run: only the rows whose key contains this text")
    args = p.parse_args(argv)
    if args.what == "run":
        run(args.until, args.limit, args.redo, args.match)
    elif args.what == "check":
        check()
    elif args.what == "commands":
        cache = load_cache()
        print("\n".join(shlex.join(command(r)) for r in rows() if key(r) not in cache))
    else:
        render()


if __name__ == "__main__":
    main()
