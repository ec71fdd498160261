"""Quorum and stragglers: a round's deadline, a node that sleeps past it, a round below quorum
(skipped or stopping the run), through ``server_app.serve`` on a grid of in-process nodes."""

import json
import os
import queue
import threading
import time

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
pytest.importorskip("flwr", reason="flwr (Flower) is not installed; pip install -r requirements.txt")

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402

from fedhl_jax.config import ConfigError, load_config, save_config  # noqa: E402
from fedhl_jax.flower import client_app  # noqa: E402
from fedhl_jax.flower.server_app import serve  # noqa: E402
from fedhl_jax.flower.strategy import RoundPolicy  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.test_deploy import FEDERATION, RANKS, strategy_for, task_identity  # noqa: E402,F401

DEADLINE, SLEEP = 4.0, 7.0  # seconds: node 1 sleeps past the first round's deadline


class NodeGrid:
    """A grid of in-process nodes: each node runs its messages one after another in its own
    thread (as a SuperNode does); ``send_and_receive`` returns what arrived before the deadline,
    whatever round it answers, so a straggler's late reply reaches the next round."""

    def __init__(self, contexts: dict):
        self.contexts, self.replies = contexts, queue.Queue()
        self.inbox = {node: queue.Queue() for node in contexts}
        for node in contexts:
            threading.Thread(target=self._serve, args=(node,), daemon=True).start()

    def _serve(self, node):
        while True:
            msg = self.inbox[node].get()
            handler = client_app.query if msg.metadata.message_type == "query" else client_app.train
            self.replies.put((msg, handler(msg, self.contexts[node])))

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for m in messages:
            self.inbox[m.metadata.dst_node_id].put(m)
        waiting, out, end = {id(m) for m in messages}, [], time.time() + timeout
        while waiting and (left := end - time.time()) > 0:
            try:
                msg, reply = self.replies.get(timeout=left)
            except queue.Empty:
                break
            waiting.discard(id(msg))
            out.append(reply)
        return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quorum")
    cfg = load_config(None, tiny_overrides(tmp, **{**FEDERATION, "checkpoint.every": 1}))
    save_config(cfg, tmp / "run.yaml")
    return tmp, cfg


def contexts(cfg_path, delay: dict):
    out = {}
    for pid, rank in enumerate(RANKS):
        nc = {"partition-id": pid, "rank": rank}
        if pid in delay:
            nc["delay"] = delay[pid]
        out[100 + pid] = Context(run_id=1, node_id=100 + pid, node_config=nc, state=RecordDict(),
                                 run_config={"config": str(cfg_path), "overrides": ""})
    return out


def reference(cfg, cfg_path, rounds, drop=(), skip=()):
    """The in-process strategy and nodes (no transport): ``drop`` ``(round, partition)`` replies
    lost; ``skip``: rounds not aggregated. Compiles the nodes' steps as a side effect."""
    strategy = strategy_for(cfg)
    ctx = contexts(cfg_path, {})
    for server_round in range(1, rounds + 1):
        msgs = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid=None)
        if server_round in skip:
            strategy._round = None
            continue
        replies = [client_app.train(m, ctx[m.metadata.dst_node_id]) for m in msgs
                   if (server_round, int(m.content["config"]["partition-id"])) not in drop]
        strategy.aggregate_train(server_round, replies)
    return {k: np.asarray(v) for k, v in strategy.algorithm.global_delta(strategy.state).items()}


def run(tmp, cfg, name, policy, delay):
    from safetensors.numpy import load_file

    out, logs = tmp / name, []
    code = serve(NodeGrid(contexts(tmp / "run.yaml", delay)), cfg, out, policy=policy, discover_timeout=5,
                 log=logs.append)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (
        out / "metrics.jsonl").exists() else []
    final = out / "final" / "global_adapter.safetensors"
    return code, lines, logs, (load_file(str(final)) if final.exists() else None), out


def maxdiff(got, want):
    return max(float(np.abs(np.asarray(got[k]) - want[k]).max()) for k in want)


def test_policy_values_are_checked():
    with pytest.raises(ConfigError, match="min-replies must be an integer >= 1, got 0"):
        RoundPolicy(min_replies=0)
    with pytest.raises(ConfigError, match="on-short-round must be 'skip' or 'stop', got 'retry'"):
        RoundPolicy(on_short_round="retry")
    with pytest.raises(ConfigError, match="min-reply-fraction must be in"):
        RoundPolicy.from_run_config({"min-reply-fraction": 1.5})
    with pytest.raises(ConfigError, match="round-timeout='soon' is not a number"):
        RoundPolicy.from_run_config({"round-timeout": "soon"})
    assert RoundPolicy(min_replies=2, min_fraction=0.9).quorum(3) == 3
    with pytest.raises(ConfigError, match="min-replies=4 .* needs 4 replies, but a round samples 3 clients"):
        RoundPolicy(min_replies=4).quorum(3)


def test_a_straggler_past_the_deadline_is_left_out_and_its_late_reply_dropped(setup, task_identity):
    """Node 1 sleeps past round 1's deadline: round 1 aggregates the two others (quorum 2); its
    late reply reaches round 2 and is dropped, never applied; round 2 has every node. The result
    is the in-process strategy's with that one reply lost."""
    tmp, cfg = setup
    want = reference(cfg, tmp / "run.yaml", 2, drop={(1, 1)})
    code, lines, logs, got, _ = run(tmp, cfg, "straggler", RoundPolicy(min_replies=2, deadline=DEADLINE),
                                    {1: f"0:{SLEEP}"})
    assert code == 0, logs
    assert lines[0]["missing"] == [1] and lines[0]["p"][1] == 0 and not lines[0]["short_round"]
    assert lines[1]["missing"] == [] and not lines[1]["short_round"]
    assert any("round 2: node 101: a late reply of round 1 dropped" in x for x in logs), logs
    diff = maxdiff(got, want)
    print(f"straggler: maxdiff {diff:.3g} against the in-process rounds without its reply")
    assert diff < 1e-5


def test_a_round_below_quorum_is_skipped_or_stops_the_run(setup, task_identity):
    """min-replies=3 with node 1 asleep in round 1: ``skip`` keeps the state through round 1 (its
    metrics line says so) and aggregates round 2; ``stop`` ends the run at round 1 (exit 1, the
    reason in status.json) without aggregating it."""
    tmp, cfg = setup
    want = reference(cfg, tmp / "run.yaml", 2, skip={1})
    code, lines, logs, got, _ = run(tmp, cfg, "skip", RoundPolicy(min_replies=3, deadline=DEADLINE),
                                    {1: f"0:{SLEEP}"})
    assert code == 0, logs
    assert lines[0]["short_round"] and not lines[0]["applied"] and lines[0]["missing"] == [1]
    assert not lines[1]["short_round"] and lines[1]["applied"]
    assert any("round 1: 2 of 3 replies, below the quorum of 3" in x for x in logs), logs
    diff = maxdiff(got, want)
    print(f"short round skipped: maxdiff {diff:.3g}")
    assert diff < 1e-5
    code, lines, logs, got, out = run(tmp, cfg, "stop", RoundPolicy(min_replies=3, deadline=DEADLINE,
                                                                  on_short_round="stop"), {1: f"0:{SLEEP}"})
    status = json.loads((out / "status.json").read_text())
    assert code == 1 and got is None and lines == []
    assert status["state"] == "failed" and "below the quorum of 3 (on-short-round=stop)" in status["reason"]
