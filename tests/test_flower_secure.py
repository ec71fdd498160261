"""A federation of organisations that keep their own data: a local deployment with TLS and
SuperNode authentication, three nodes each given only its JSONL file and its rank, an unknown
node refused, and a server that loads no base weight."""

import json
import time

import numpy as np
import pytest

pytest.importorskip("flwr", reason="flwr (Flower) is not installed; pip install -r requirements.txt")
pytest.importorskip("cryptography", reason="the test makes its certificates and node keys with cryptography")

from fedhl_jax.config import load_config, save_config  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.test_deploy import LocalFederation, flwr_run  # noqa: E402
from tests.test_flower_local_data import LOCAL, RANKS, simulate, write_node_files  # noqa: E402


def test_tls_authenticated_nodes_with_their_own_files_match_the_simulation(tmp_path):
    """SuperLink with TLS (certificates made here) and ``--enable-supernode-auth``; three
    SuperNodes whose keys were registered, each started with only ``rank=<r> data='<file>'``;
    a fourth with an unregistered key is refused and the run goes on with the three. The global
    adapter equals the in-process simulation of the same data, the server loads no base weight,
    and each round's metrics carry the wire bytes beside the payload."""
    from safetensors.numpy import load_file

    cfg = load_config(None, tiny_overrides(tmp_path, **LOCAL))
    sim, want, metrics = simulate(cfg, 2)
    files = write_node_files(sim, tmp_path)
    cfg_path, out = tmp_path / "run.yaml", tmp_path / "server"
    save_config(cfg, cfg_path)
    federation = LocalFederation(tmp_path, secure=True)
    t0 = time.perf_counter()
    try:
        federation.start_link()
        for i, rank in enumerate(RANKS):
            federation.add_node(i, f"rank={rank} data='{files[i]}'")
        federation.add_node("unknown", f"rank=1 data='{files[0]}'", register=False)
        output = flwr_run(federation, f"config='{cfg_path}' out='{out}' min-replies=3")
        intruder = (tmp_path / "flower-supernode.unknown.log").read_text()
    except BaseException:
        federation.dump_logs()
        raise
    finally:
        federation.close()
    seconds = time.perf_counter() - t0
    got = load_file(str(out / "final" / "global_adapter.safetensors"))
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"TLS + node auth, nodes with their own files vs simulation: maxdiff {diff:.3g}; payload/wire bytes per "
          f"round {[(m['bytes_down'], m['wire_bytes_down'], m['bytes_up'], m['wire_bytes_up']) for m in lines]}; "
          f"{seconds:.0f} s\nunknown node's log tail: {intruder[-600:]}")
    assert diff < 1e-5
    assert "base weights loaded on the server: 0" in output
    assert output.count(" -> node ") == 3  # the three registered nodes, not the unknown one
    assert [m["round"] for m in lines] == [0, 1] and all(not m["missing"] for m in lines)
    for m, sim_m in zip(lines, metrics):
        assert m["bytes_down"] == sim_m["bytes_down"] and m["bytes_up"] == sim_m["bytes_up"]
        assert m["wire_bytes_down"] > m["bytes_down"] and m["wire_bytes_up"] > m["bytes_up"]
