"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# One persistent XLA compilation cache for the whole session, shared with the bin/train.py
# subprocesses the tests start (they inherit the environment): the many small runs of the same
# tiny configuration compile their round once. Only compile time changes, never a result.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="fedhl-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
SHARED = Path(os.environ.get("FEDHL_SHARED_DIR", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (needs ../shared)")
    return path


def np_truncate(G: np.ndarray, r: int) -> np.ndarray:
    """float64 NumPy oracle of the best rank-r approximation."""
    U, S, Vt = np.linalg.svd(np.asarray(G, np.float64), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


def np_tail(G: np.ndarray, r: int) -> float:
    S = np.linalg.svd(np.asarray(G, np.float64), compute_uv=False)
    return float(np.sum(S[r:] ** 2))


def write_arith_gsm8k(path: Path, n: int = 60, seed: int = 0) -> Path:
    """A synthetic GSM8K-schema JSONL file (question / answer ending in '#### N')."""
    import json

    rng = np.random.default_rng(seed)
    names = ["Tom", "Ann", "Bo", "Kim", "Lee", "Max"]
    with open(path, "w") as f:
        for i in range(n):
            a, b = (int(x) for x in rng.integers(1, 20, size=2))
            who = names[i % len(names)]
            q = f"{who} has {a} apples and buys {b} more. How many apples does {who} have?"
            ans = f"{who} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"
            f.write(json.dumps({"question": q, "answer": ans}) + "\n")
    return path


def tiny_overrides(tmp_path: Path, **extra) -> list[str]:
    """Overrides for a run that needs nothing outside the test: random tiny Llama, synthetic data."""
    data = write_arith_gsm8k(tmp_path / "arith.jsonl")
    base = {
        "model.name_or_path": "random", "model.random_hidden_size": 32, "model.random_intermediate_size": 48,
        "model.random_num_layers": 2, "model.random_num_heads": 4, "model.random_num_kv_heads": 2,
        "data.source": str(data), "data.seq_len": 48, "data.eval_examples": 8,
        "fed.num_clients": 6, "fed.participation": 0.5, "fed.ranks": "[1,2,4]", "fed.rank_distribution": "list",
        "fed.rounds": 4, "optim.local_steps": 2, "optim.batch_size": 2, "optim.lr": 0.01,
        "eval.every": 2, "eval.batch_size": 4, "checkpoint.every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def flip_checkpoint_bytes(step_dir: Path) -> list[Path]:
    """Flips 16 bytes in the middle of every array-data file of an Orbax (OCDBT) checkpoint.

    Which data file is the largest varies from save to save (OCDBT flushes chunks and B-tree
    nodes into files as the writes land, and the per-process B-tree nodes are no longer read
    after the merge), so flipping only the largest one sometimes touches nothing that is read.
    Flipping every data file always corrupts what a restore reads: the chunks still decode, to
    other values, which the checkpoint's checksum catches. Falls back to every non-metadata file
    when the checkpoint has no OCDBT data folder. Sizes are kept.
    """
    files = sorted(f for f in step_dir.rglob("*") if f.is_file() and f.parent.name == "d"
                   and f.parent.parent.name.startswith("ocdbt.process_"))
    if not files:
        files = sorted(f for f in step_dir.rglob("*") if f.is_file() and "metadata" not in f.name.lower()
                       and "checksum" not in str(f) and "commit" not in f.name)
    assert files, f"no files to flip under {step_dir}"
    for target in files:
        data = bytearray(target.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
        target.write_bytes(bytes(data))
    return files
