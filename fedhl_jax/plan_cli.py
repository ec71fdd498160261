"""``fedhl-plan`` (also ``bin/plan.py``): compile a run's round for a TPU slice and print its per-chip memory.

    fedhl-plan --config FILE --topology v5p:2x2x1 [key=value ...] [--model-shape llama2-7b] [--json]

The round is the run's own (``fedhl_jax.slice_plan``), compiled by XLA for the topology through
``libtpu`` (``pip install 'fedhl-jax[tpu-plan]'``) on any machine, from shapes only: no weights are
read. It prints the memory one chip holds (arguments, output, temporaries, generated code, the
donated state) against the chip's HBM, whether it fits, and the largest ``clients_per_chunk`` that
fits (a binary search over the chunks that split evenly over the mesh, one compile each, at most
``--max-compiles`` compiles in all). Bad input (an unknown topology, a mesh that does not divide the
chips, an unknown key) is one line on stderr and exit status 2, before anything compiles.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedhl_jax.errors import ConfigError

EXIT_BAD_INPUT = 2


def parse_args(argv=None):
    from fedhl_jax.model.planning import MODEL_SHAPES

    p = argparse.ArgumentParser(
        prog="fedhl-plan",
        description="Compile a run's round for a TPU slice (libtpu, no TPU needed) and print XLA's per-chip memory.",
        epilog="Overrides are dotted key=value pairs, as for fedhl-train, e.g. model.remat=full fed.num_clients=100 "
               "mesh.clients=2 mesh.model=4.")
    p.add_argument("--config", type=Path, default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--topology", required=True,
                   help="TPU topology chip:AxB[xC] (v4, v5e, v5p, v6e; e.g. v5e:2x4, v5p:2x2x1) or a slice name (v5p-8)")
    p.add_argument("--model-shape", default=None, choices=sorted(MODEL_SHAPES),
                   help="a published model shape instead of model.name_or_path's config.json")
    p.add_argument("--max-compiles", type=int, default=4,
                   help="compiles in all, the first included; 1: no clients_per_chunk search (default 4)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p.parse_intermixed_args(argv)


def server_svd(cfg) -> str:
    """How the round's server factors its dense adapters (``truncation.svd_all``): ``"batched"`` (the
    randomized SVD, one batched factorization per module shape), ``"per-module"`` (the exact SVD,
    one per module and layer) or ``"none"`` (an algorithm without a dense server adapter)."""
    method = cfg.fed.options.get("svd_method")
    return "none" if method is None else ("batched" if method == "randomized" else "per-module")


def plan(cfg, topology: str, *, model_shape: str | None = None, max_compiles: int = 4) -> dict:
    """The plan of one run on one slice (what the command prints).

    Args:
      cfg: the run's ``TrainConfig``.
      topology: the slice (``slice_plan.parse_topology``).
      model_shape: a ``planning.MODEL_SHAPES`` name instead of ``model.name_or_path``.
      max_compiles: cap on compiles (the config's own chunk first, then the search).

    Returns:
      A JSON-ready dict: ``topology``, ``chip``, ``chips``, ``hbm_bytes``, ``model`` (its shape),
      ``round`` (clients, local steps, batch, sequence, ``r_max``, targets, remat, dtype, algorithm),
      ``mesh`` (``{"clients", "model"}``, or null: one chip), ``clients_per_chunk``, ``memory``
      (per-chip bytes: ``argument``, ``output``, ``temp``, ``generated_code``, ``alias``, ``total``;
      when XLA refused the program for HBM, those are None, ``total`` is what it had placed and
      ``refused`` its error, ``slice_plan.compile_round``), ``fits``, ``largest_fitting_chunk`` (``{"chunk", "conclusive", "tried"}``), ``compiles``,
      ``compile_seconds``.

    Raises:
      PlanError, ConfigError: bad input, before any compile.
    """
    from fedhl_jax import slice_plan as S

    topo = S.parse_topology(topology)
    if max_compiles < 1:
        raise S.PlanError(f"--max-compiles must be >= 1, got {max_compiles}")
    n = cfg.fed.clients_per_round
    mesh = S.slice_mesh(cfg.mesh, n, topo.chips)
    model_cfg = S.model_shape(cfg, model_shape)
    devices = S.topology_devices(topo)
    seconds = []

    def measure(chunk):
        mem = S.compile_round(cfg, model_cfg, devices, clients_per_chunk=chunk)
        seconds.append(mem.pop("seconds"))
        return mem

    first = measure(None)
    chunk = first.pop("clients_per_chunk")
    first.pop("mesh")
    axis = mesh[0] if mesh is not None else 1
    search = S.largest_fitting_chunk(
        lambda c: {k: v for k, v in measure(c).items() if k not in ("mesh", "clients_per_chunk")},
        S.chunk_candidates(n, axis), topo.hbm_bytes, first=(chunk if chunk is not None else n, first),
        max_compiles=max_compiles)
    o = cfg.optim
    return {
        "topology": topo.name, "chip": topo.chip, "chips": topo.chips, "hbm_bytes": topo.hbm_bytes,
        "model": {"shape": model_shape or cfg.model.name_or_path, "family": model_cfg.family,
                  "hidden_size": model_cfg.hidden_size, "intermediate_size": model_cfg.intermediate_size,
                  "num_layers": model_cfg.num_layers, "num_heads": model_cfg.num_heads,
                  "num_kv_heads": model_cfg.num_kv_heads, "head_dim": model_cfg.head_dim,
                  "vocab_size": model_cfg.vocab_size, "dtype": model_cfg.dtype,
                  "compute_dtype": model_cfg.compute_dtype or model_cfg.dtype},
        "round": {"algorithm": cfg.fed.algorithm, "clients": n, "local_steps": o.local_steps,
                  "batch_size": o.batch_size, "seq_len": cfg.data.seq_len, "r_max": cfg.fed.r_max,
                  "targets": list(cfg.model.targets), "remat": cfg.model.remat, "optimizer": o.optimizer,
                  "server_svd": server_svd(cfg)},
        "mesh": None if mesh is None else {"clients": mesh[0], "model": mesh[1]},
        "clients_per_chunk": chunk,
        "memory": first,
        "fits": S.fits(first, topo.hbm_bytes),
        "largest_fitting_chunk": search,
        "compiles": len(seconds),
        "compile_seconds": seconds,
    }


def render_text(p: dict) -> str:
    """The plan as a few lines for a terminal."""
    gib = 2.0**30
    m, r, mem = p["model"], p["round"], p["memory"]
    mesh = (f"clients={p['mesh']['clients']} x model={p['mesh']['model']}" if p["mesh"]
            else "one chip (the round's clients do not split evenly over the chips)")
    chunk = p["clients_per_chunk"] if p["clients_per_chunk"] is not None else f"all {r['clients']}"
    search = p["largest_fitting_chunk"]
    lines = [
        f"topology {p['topology']}: {p['chips']} x {p['chip']}, {p['hbm_bytes'] / gib:.0f} GiB HBM per chip",
        f"model {m['shape']}: hidden {m['hidden_size']}, {m['num_layers']} layers, vocab {m['vocab_size']}, "
        f"{m['dtype']} base, {m['compute_dtype']} compute",
        f"round: {r['algorithm']}, {r['clients']} clients x {r['local_steps']} steps x {r['batch_size']} x "
        f"{r['seq_len']} tokens, r_max {r['r_max']}, LoRA on {','.join(r['targets'])}, remat {r['remat']}",
        f"mesh: {mesh}; clients_per_chunk: {chunk}",
    ]
    if "refused" in mem:  # XLA would not place the program in a chip's HBM: no memory_analysis
        lines += [
            f"XLA refused the program: it does NOT fit ({mem['refused']['error']})",
            f"  {mem['refused']['what']} alone  {mem['total'] / gib:9.2f} GiB (a lower bound of the need) of "
            f"{mem['refused']['usable'] / gib:.2f} GiB usable ({p['hbm_bytes'] / gib:.0f} GiB HBM)",
        ]
    else:
        lines += [
            "per-chip memory (XLA memory_analysis):",
            f"  arguments       {mem['argument'] / gib:9.2f} GiB",
            f"  output          {mem['output'] / gib:9.2f} GiB",
            f"  temporaries     {mem['temp'] / gib:9.2f} GiB",
            f"  generated code  {mem['generated_code'] / gib:9.2f} GiB",
            f"  alias (donated) {mem['alias'] / gib:9.2f} GiB",
            f"  total           {mem['total'] / gib:9.2f} GiB of {p['hbm_bytes'] / gib:.0f} GiB: "
            + ("fits" if p["fits"] else "does NOT fit"),
        ]
    lines += [
        f"largest clients_per_chunk that fits: {search['chunk'] or 'none'}"
        + ("" if search["conclusive"] else f" (search stopped at the cap of {len(search['tried'])} compiles)"),
        f"compiles: {p['compiles']} ({', '.join(f'{s:.0f} s' for s in p['compile_seconds'])})",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from fedhl_jax.config import load_config
    from fedhl_jax.slice_plan import PlanError

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = plan(cfg, args.topology, model_shape=args.model_shape, max_compiles=args.max_compiles)
    except (ConfigError, PlanError, FileNotFoundError) as e:
        print(f"fedhl-plan: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sys.stdout.write(json.dumps(result) + "\n" if args.json else render_text(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
