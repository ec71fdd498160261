"""Heterogeneous-rank LoRA on a Flax NNX MLP classifier with client label skew.

A frozen random MLP (``base``) is the pretrained model; the task's teacher is the same MLP with a
rank-``target_rank`` change to each hidden layer, and the labels are the teacher's argmax classes.
Each client holds the examples of a few classes only (label skew) and trains a LoRA of its own
rank on the hidden layers (``fc1``, ``fc2``) through ``fedhl_jax.nnx_bridge`` and the round engine.
After every round the global adapter ``G`` is merged into the base and scored on a pooled,
class-balanced held-out set (cross-entropy and accuracy).

As in the bias experiment (docs/bias_experiment.md), FedHL keeps the part of ``G`` that the
low-rank clients cannot hold and keeps improving; FlexLoRA re-truncates the aggregate every round
and stalls.

    python examples/nnx_classifier/train.py --rounds 40
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fedhl_jax import engine
from fedhl_jax.algorithms import make_algorithm
from fedhl_jax.local import make_optimizer
from fedhl_jax.lora import lora_scale, rank_mask
from fedhl_jax.nnx_bridge import nnx_lora


class MLP(nnx.Module):
    """``x [..., d_in]`` → logits ``[..., classes]``: two GELU hidden layers and a linear head."""

    def __init__(self, d_in: int, hidden: int, classes: int, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.gelu(self.fc2(nnx.gelu(self.fc1(x)))))


def cross_entropy(model: MLP, x, y):
    """Mean cross-entropy of ``model`` on ``x [m, d_in]`` with labels ``y [m]``."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@dataclasses.dataclass(frozen=True)
class Setup:
    d_in: int = 32
    hidden: int = 64
    classes: int = 10
    target_rank: int = 8
    target_scale: float = 2.0
    ranks: tuple[int, ...] = (1, 2, 4, 8, 1, 2, 4, 8)
    classes_per_client: int = 6
    samples: int = 128
    local_steps: int = 5
    lr: float = 1e-3
    alpha: float = 16.0
    rounds: int = 40
    seed: int = 0
    methods: tuple[str, ...] = ("fedhl", "flexlora", "hetlora")


def make_task(s: Setup):
    """The frozen base MLP, the bridge, and the data: ``X [n, m, d_in]``, ``Y [n, m]`` per client
    (label skew) and a pooled held-out set ``(Xt [M, d_in], Yt [M])``."""
    rng = np.random.default_rng(s.seed)
    base_model = MLP(s.d_in, s.hidden, s.classes, nnx.Rngs(s.seed))
    bridge = nnx_lora(base_model, cross_entropy, [r"fc\d"], r_max=max(s.ranks))
    target = {}
    for name, (d_out, d_in) in bridge.shapes.items():
        u = rng.normal(size=(d_out, s.target_rank)) / np.sqrt(d_out)
        v = rng.normal(size=(s.target_rank, d_in)) / np.sqrt(d_in)
        target[name] = jnp.asarray(s.target_scale * u @ v, jnp.float32)
    teacher = bridge.bind(bridge.merge_delta(bridge.base, target))
    pool = rng.normal(size=(40 * s.samples * len(s.ranks), s.d_in)).astype(np.float32)
    labels = np.asarray(jnp.argmax(teacher(pool), -1))
    n = len(s.ranks)
    X, Y = np.zeros((n, s.samples, s.d_in), np.float32), np.zeros((n, s.samples), np.int32)
    for i in range(n):  # client i: classes i, i+1, ... (mod classes) only
        own = (i + np.arange(s.classes_per_client)) % s.classes
        idx = np.flatnonzero(np.isin(labels, own))
        pick = rng.choice(idx, s.samples, replace=len(idx) < s.samples)
        X[i], Y[i] = pool[pick], labels[pick]
    test_rows = np.concatenate([np.flatnonzero(labels == c)[-100:] for c in range(s.classes)])
    return bridge, target, (jnp.asarray(X), jnp.asarray(Y)), (jnp.asarray(pool[test_rows]), jnp.asarray(labels[test_rows]))


def run(s: Setup = Setup()) -> dict:
    """Every method of ``s.methods`` for ``s.rounds`` rounds.

    Returns:
      ``{method: {"loss": [rounds], "accuracy": [rounds], "seconds": float}}`` on the held-out set,
      plus ``"base"``: the loss and accuracy of the base model before any round.
    """
    bridge, _, (X, Y), (Xt, Yt) = make_task(s)
    ranks = np.asarray(s.ranks)
    n = len(ranks)
    steps = lambda a: jnp.broadcast_to(a[:, None], (n, s.local_steps) + a.shape[1:])  # full batch each step

    @jax.jit
    def score(base, delta):
        logits = bridge.bind(bridge.merge_delta(base, delta))(Xt)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, Yt).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == Yt)

    zero = {k: jnp.zeros(v) for k, v in bridge.shapes.items()}
    out = {"base": [float(v) for v in score(bridge.base, zero)]}
    for name in s.methods:
        alg = make_algorithm(name, int(ranks.max()))
        alg.check_ranks(ranks)
        step = engine.compile_round_step(engine.make_round_step(
            alg, bridge.loss, make_optimizer("adamw", s.lr, trainable=alg.trainable), merge_delta=bridge.merge_delta))
        state = alg.init(bridge.shapes, jax.random.PRNGKey(s.seed))
        inputs = dict(mask=rank_mask(ranks, int(ranks.max())), scale=lora_scale(ranks, s.alpha),
                      num_examples=jnp.full((n,), float(s.samples)), batch=(steps(X), steps(Y)))
        losses, accs = [], []
        t0 = time.perf_counter()
        for t in range(s.rounds):
            state, _ = step(state, bridge.base, engine.RoundInputs(**inputs, key=engine.round_key(s.seed, t)))
            loss, acc = score(bridge.base, alg.global_delta(state))
            losses.append(float(loss))
            accs.append(float(acc))
        out[name] = {"loss": losses, "accuracy": accs, "seconds": time.perf_counter() - t0,
                     "compilations": step._cache_size()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=Setup.rounds)
    p.add_argument("--seed", type=int, default=Setup.seed)
    p.add_argument("--methods", nargs="+", default=list(Setup.methods))
    p.add_argument("--out", help="write the curves as JSON")
    args = p.parse_args(argv)
    res = run(Setup(rounds=args.rounds, seed=args.seed, methods=tuple(args.methods)))
    print(f"base model: held-out loss {res['base'][0]:.4f}, accuracy {res['base'][1]:.3f}")
    print("| method | loss, round 1 | loss, last round | accuracy, last round | seconds |")
    print("|---|---|---|---|---|")
    for name in args.methods:
        r = res[name]
        print(f"| {name} | {r['loss'][0]:.4f} | {r['loss'][-1]:.4f} | {r['accuracy'][-1]:.3f} | {r['seconds']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
