"""A Flower node's per-round overhead, with and without its long-lived node worker.

Runs a local deployment (``flower-superlink``, one ``flower-supernode`` per node, each with its own
JSONL file of short GSM8K rows and the compilation cache on; ``flwr run deploy/flower``) for
``--rounds`` rounds, once with each node training in Flower's per-message ``ClientApp`` process and
once with ``worker='<socket>'`` (``python -m fedhl_jax.flower.worker``, one per node, started
before the run), and reads the nodes' timings from the server's ``metrics.jsonl``:
``node_seconds`` (the ``ClientApp`` process's life until its reply) and ``node_train_seconds``
(the train call). A node's overhead in a round is ``node_seconds`` minus the warm local step
(the median train call of the worker's rounds 2 on). Prints one JSON line per (mode, round) and a
table of medians over the nodes::

    nice -n 10 python benchmarks/node_overhead.py --model tiny --rounds 4
    nice -n 10 python benchmarks/node_overhead.py --model smollm2 --rounds 4

(``smollm2``: the GGUF of ``../shared/models/smollm2-135m-instruct-gguf``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_deploy import LocalFederation  # noqa: E402

MODELS = {
    "tiny": {"model.name_or_path": "auto"},
    "smollm2": {"model.name_or_path": str((REPO / ".." / "shared" / "models" / "smollm2-135m-instruct-gguf").resolve())},
}


def node_files(folder: Path, nodes: int, rows: int, max_chars: int) -> list[Path]:
    """``nodes`` JSONL files of ``rows`` short GSM8K training rows each (question + answer under
    ``max_chars`` characters, so they fit a short ``seq_len``)."""
    from fedhl_jax.assets import __file__ as assets

    source = Path(assets).parent / "gsm8k" / "train.jsonl"
    short = [line for line in source.read_text().splitlines()
             if sum(len(v) for v in json.loads(line).values()) < max_chars][: nodes * rows]
    if len(short) < nodes * rows:
        raise SystemExit(f"only {len(short)} GSM8K rows under {max_chars} characters; need {nodes * rows}")
    files = []
    for i in range(nodes):
        path = folder / f"node{i}.jsonl"
        path.write_text("\n".join(short[i * rows:(i + 1) * rows]) + "\n")
        files.append(path)
    return files


def start_worker(federation: LocalFederation, sock: Path, name: str) -> None:
    """``python -m fedhl_jax.flower.worker --socket sock`` in its own process group; waits for it."""
    log = federation.tmp / f"{name}.log"
    federation.logs.append(log)
    proc = subprocess.Popen([sys.executable, "-m", "fedhl_jax.flower.worker", "--socket", str(sock)],
                            env=federation.env, cwd=federation.tmp, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    federation.procs.append(proc)
    deadline = time.time() + 120
    while not Path(f"{sock}.key").exists():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the node worker at {sock} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def run_mode(args, tmp: Path, cfg_path: Path, files: list[Path], ranks: list[int], worker: bool) -> list[dict]:
    """One deployment of ``args.rounds`` rounds; the server's metrics lines."""
    mode = "worker" if worker else "per-message"
    folder = tmp / mode
    folder.mkdir()
    out = folder / "server"
    federation = LocalFederation(folder)
    try:
        federation.start_link()
        for i, (path, rank) in enumerate(zip(files, ranks)):
            config = f"partition-id={i} rank={rank} data='{path}' compile-cache='{tmp / 'jax-cache'}'"
            if worker:
                sock = folder / f"worker{i}.sock"
                start_worker(federation, sock, f"worker{i}")
                config += f" worker='{sock}'"
            federation.add_node(i, config)
        proc = federation.run(f"config='{cfg_path}' out='{out}'")
        federation.procs.append(proc)
        output, _ = proc.communicate(timeout=args.timeout)
        done = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if len(done) != args.rounds:  # the stream may end before the export's line; the metrics count
            raise SystemExit(f"{mode}: {len(done)} of {args.rounds} rounds in {out}/metrics.jsonl\n{output[-4000:]}")
    except BaseException:
        federation.dump_logs()
        raise
    finally:
        federation.close()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    failed = [(m["round"] + 1, m["missing"]) for m in metrics if m.get("missing")]
    if failed:  # a round timed without a node's reply measures nothing
        raise SystemExit(f"{mode}: rounds without some node's reply (round, clients): {failed}; see the nodes' "
                         f"errors with the server's log in {out}")
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rows", type=int, default=32, help="rows per node file")
    parser.add_argument("--modes", default="per-message,worker")
    parser.add_argument("--timeout", type=float, default=3000)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = parser.parse_args(argv)

    from fedhl_jax.config import load_config, save_config

    ranks = [2, 4]
    overrides = {**MODELS[args.model], "data.dataset": "gsm8k", "data.source": "auto", "data.seq_len": args.seq_len,
                 "data.eval_examples": 0, "fed.num_clients": len(ranks), "fed.participation": 1.0,
                 "fed.ranks": json.dumps(ranks), "fed.rank_distribution": "list", "fed.rounds": args.rounds,
                 "optim.local_steps": args.local_steps, "optim.batch_size": args.batch_size, "checkpoint.every": 1}
    lines = []
    with tempfile.TemporaryDirectory(prefix="node-overhead-") as d:
        tmp = Path(d)
        cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
        cfg_path = tmp / "run.yaml"
        save_config(cfg, cfg_path)
        files = node_files(tmp, len(ranks), args.rows, max_chars=2 * args.seq_len)
        runs = {}
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            runs[mode] = run_mode(args, tmp, cfg_path, files, ranks, worker=mode == "worker")
            if args.out:  # each mode's metrics as soon as it is done
                args.out.parent.mkdir(parents=True, exist_ok=True)
                Path(f"{args.out}.{mode}.metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in runs[mode]))
            print(f"{mode}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    warm_runs = [m for m in runs.get("worker", runs[next(iter(runs))]) if m["round"] >= 1]
    warm = float(np.median([s for m in warm_runs for s in m["node_train_seconds"]]))
    for mode, metrics in runs.items():
        for m in metrics:
            node, train = np.asarray(m["node_seconds"], float), np.asarray(m["node_train_seconds"], float)
            start = np.asarray(m.get("node_start_seconds", [np.nan] * len(node)), float)
            line = {"model": args.model, "mode": mode, "round": m["round"] + 1, "node_seconds": node.tolist(),
                    "train_seconds": train.tolist(), "start_seconds": start.tolist(), "warm_step_seconds": warm,
                    "overhead_seconds": (node - warm).tolist(), "round_seconds": m.get("seconds")}
            lines.append(line)
            print(json.dumps(line), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"\n{args.model}: medians over the nodes; overhead = node process - warm step ({warm:.2f} s)")
    print("| round | " + " | ".join(f"{mode}: node process / Flower start / train call / overhead" for mode in runs) + " |")
    for r in range(1, args.rounds + 1):
        cells = []
        for mode in runs:
            line = next(x for x in lines if x["mode"] == mode and x["round"] == r)
            cells.append(" / ".join(f"{np.median(line[k]):.1f} s" for k in
                                    ("node_seconds", "start_seconds", "train_seconds", "overhead_seconds")))
        print(f"| {r} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
