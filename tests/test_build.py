"""``fedhl_jax.build``: the clients' training pieces, one construction for the simulation and a node."""

import types

import numpy as np

from fedhl_jax import model as M
from fedhl_jax.build import client_pieces
from fedhl_jax.config import load_config
from fedhl_jax.lora import Adapter
from fedhl_jax.simulation import Simulation
from tests.conftest import tiny_overrides


def test_client_pieces_are_the_simulations_and_an_nnx_model_trains_at_full_width(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, **{"optim.length_bucket": 16}))
    sim = Simulation(cfg, log=lambda *_: None, mesh=None)
    p = client_pieces(cfg, sim.model_cfg, sim.algorithm)
    assert p.length_bucket == 16 and p.to_client is not None and p.from_client is not None
    # the simulation's loss and layout are these: the same value on a random rank-2 adapter
    rng = np.random.default_rng(0)
    r_max = sim.cfg.fed.r_max
    adapter = Adapter(B={k: 0.1 * rng.normal(size=(o, r_max)).astype(np.float32) for k, (o, i) in sim.shapes.items()},
                      A={k: 0.1 * rng.normal(size=(r_max, i)).astype(np.float32) for k, (o, i) in sim.shapes.items()},
                      mask=np.asarray([1.0, 1.0] + [0.0] * (r_max - 2), np.float32), scale=np.float32(2.0))
    inputs, _ = sim.schedule(0)
    tokens, mask = (np.asarray(x)[0, 0] for x in inputs.batch)  # client 0, step 0: [b, T]
    got = float(p.loss(sim.base, p.to_client(adapter), tokens, mask))
    assert np.isfinite(got) and got == float(sim.loss(sim.base, sim.to_client(adapter), tokens, mask))
    assert got != float(p.loss(sim.base, p.to_client(adapter._replace(scale=np.float32(0.0))), tokens, mask))
    # an NNX bridge: its own loss, the adapter as it is, full-width steps
    assert p.merge_delta is M.merge_delta and sim.merge_delta is p.merge_delta
    bridge = types.SimpleNamespace(loss=object(), merge_delta=object())
    q = client_pieces(cfg, sim.model_cfg, sim.algorithm, bridge)
    assert q.loss is bridge.loss and q.to_client is None and q.from_client is None and q.length_bucket == 0
    assert q.merge_delta is bridge.merge_delta
    # the optimizer trains the algorithm's factors only, as the simulation's
    assert type(q.optimizer) is type(sim.optimizer)
