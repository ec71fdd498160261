"""``fedhl-plan``: the run's round compiled for a TPU slice (libtpu), its per-chip memory, and bad input."""

import importlib.util
import json

import pytest

from fedhl_jax import plan_cli
from fedhl_jax import slice_plan as S
from fedhl_jax.config import load_config
from tests.conftest import REPO

TINY = ["model.name_or_path=random", "fed.num_clients=4", "data.seq_len=32", "optim.local_steps=2",
        "optim.batch_size=2", "model.targets=all-linear"]


def run_cli(capsys, *argv):
    code = plan_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- bad input: no libtpu, no compile


@pytest.mark.parametrize("name", ["v9x:2x2", "v5e", "v5e:2x", "tpu:2x2", "v5p:0x2x1"])
def test_unknown_topology_is_one_line_naming_it(capsys, name):
    code, out, err = run_cli(capsys, "--topology", name, *TINY)
    assert code == plan_cli.EXIT_BAD_INPUT and not out
    assert err.count("\n") == 1 and repr(name) in err
    assert ("chip:AxB" in err) != ("empty dimension" in err)


def test_mesh_that_does_not_divide_the_chips_is_refused(capsys):
    code, _, err = run_cli(capsys, "--topology", "v5e:2x2", *TINY, "mesh.clients=3", "mesh.model=1")
    assert code == plan_cli.EXIT_BAD_INPUT
    assert "mesh.clients=3 x mesh.model=1 = 3 chips" in err and "has 4" in err
    code, _, err = run_cli(capsys, "--topology", "v5p-8", *TINY, "fed.num_clients=6", "mesh.clients=4", "mesh.model=1")
    assert code == plan_cli.EXIT_BAD_INPUT and "6 clients" in err and "mesh.clients=4" in err


def test_unknown_config_key_and_model_shape_are_refused(capsys):
    code, _, err = run_cli(capsys, "--topology", "v5e:2x2", "fed.nope=1")
    assert code == plan_cli.EXIT_BAD_INPUT and "fed.nope" in err
    with pytest.raises(SystemExit) as e:
        plan_cli.main(["--topology", "v5e:2x2", "--model-shape", "gpt-9"])
    assert e.value.code == 2
    code, _, err = run_cli(capsys, "--topology", "v5e:2x2", "model.name_or_path=someone/some-model")
    assert code == plan_cli.EXIT_BAD_INPUT and "Hub id" in err


def test_parse_topology_slices_and_hbm():
    t = S.parse_topology("v5p-8")
    assert (t.name, t.chip, t.dims, t.chips) == ("v5p:2x2x1", "v5p", (2, 2, 1), 4)
    assert S.parse_topology("v5e:2x4").hbm_bytes == 16 * 2**30
    assert S.parse_topology("v6e:2x4").chips == 8


def test_slice_mesh_follows_the_run():
    cfg = load_config(None, ["fed.num_clients=10"])
    assert S.slice_mesh(cfg.mesh, 10, 8) is None  # 10 clients do not split over 8 chips: one chip
    assert S.slice_mesh(cfg.mesh, 16, 8) == (8, 1)
    cfg = load_config(None, ["mesh.model=4"])
    assert S.slice_mesh(cfg.mesh, 10, 8) == (2, 4)


def test_chunk_search_finds_the_boundary_within_the_cap():
    candidates = S.chunk_candidates(100, 4)
    assert candidates == [4, 20, 100]
    assert S.chunk_candidates(12, 1) == [1, 2, 3, 4, 6, 12]
    calls = []

    def measure(c):  # memory grows with the chunk; 6 fits a budget of 60, 12 does not
        calls.append(c)
        return {"total": 10 * c}

    cands = S.chunk_candidates(12, 1)
    res = S.largest_fitting_chunk(measure, cands, 60, first=(1, {"total": 10}), max_compiles=5)
    assert res["chunk"] == 6 and res["conclusive"] and calls == [4, 12, 6]  # bisection, not a scan
    assert len(res["tried"]) == 1 + len(calls) <= 5
    capped = S.largest_fitting_chunk(measure, cands, 60, first=(1, {"total": 10}), max_compiles=2)
    assert len(capped["tried"]) == 2 and not capped["conclusive"] and 1 <= capped["chunk"] <= 6
    none = S.largest_fitting_chunk(measure, cands, 5, first=(1, {"total": 10}), max_compiles=4)
    assert none == {"chunk": 0, "conclusive": True, "tried": [{"clients_per_chunk": 1, "total": 10, "fits": False}]}


# ---------------------------------------------------------------- compiled for v5e:2x2 (needs libtpu)


def _plan_table():
    spec = importlib.util.spec_from_file_location("plan_table", REPO / "scripts" / "plan_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_round_on_v5e_matches_a_direct_memory_analysis(capsys):
    pytest.importorskip("libtpu")
    from fedhl_jax import engine

    argv = [*TINY, "mesh.clients=2", "mesh.model=2", "fed.clients_per_chunk=2", "model.remat=full"]
    code, out, err = run_cli(capsys, "--topology", "v5e:2x2", "--json", "--max-compiles", "1", *argv)
    assert code == 0, err
    p = json.loads(out)
    assert (p["topology"], p["chip"], p["chips"], p["hbm_bytes"]) == ("v5e:2x2", "v5e", 4, 16 * 2**30)
    assert p["mesh"] == {"clients": 2, "model": 2} and p["clients_per_chunk"] == 2
    assert p["round"]["clients"] == 4 and p["round"]["remat"] == "full" and p["round"]["r_max"] == 16
    mem = p["memory"]
    assert set(mem) == {"argument", "output", "temp", "generated_code", "alias", "total"}
    assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]
    assert mem["argument"] > 0 and mem["temp"] > 0 and mem["alias"] > 0  # the server state is donated
    # one compile: the chunk that fits is known, a larger one is not searched
    assert p["fits"] is True and p["compiles"] == 1
    assert p["largest_fitting_chunk"]["chunk"] == 2 and not p["largest_fitting_chunk"]["conclusive"]

    text = plan_cli.render_text(p)
    assert "mesh: clients=2 x model=2; clients_per_chunk: 2" in text and "of 16 GiB: fits" in text
    assert f"{mem['temp'] / 2**30:9.2f} GiB" in text and "search stopped at the cap of 1 compiles" in text

    cfg = load_config(None, argv)
    model_cfg = S.model_shape(cfg)
    mesh = engine.make_mesh(2, 2, devices=S.topology_devices(S.parse_topology("v5e:2x2")))
    direct = _plan_table().direct_memory(cfg, model_cfg, mesh)
    assert direct == {k: mem[k] for k in direct}


def test_regenerating_the_planning_page_keeps_the_slice_section():
    from fedhl_jax.model.planning import SLICE_BEGIN, SLICE_END, keep_slice_section

    section = f"{SLICE_BEGIN}\n## A round compiled for TPU slices\n| row |\n{SLICE_END}"
    old = f"# Memory planning\n\nold table\n\n{section}\n\n## Planner against XLA (CPU)\n\nold check\n"
    new = "# Memory planning\n\nnew table\n\n## Planner against XLA (CPU)\n\nnew check\n"
    out = keep_slice_section(old, new)
    assert out == f"# Memory planning\n\nnew table\n\n{section}\n\n## Planner against XLA (CPU)\n\nnew check\n"
    assert keep_slice_section("# no section\n", new) == new
    assert _plan_table().BEGIN == SLICE_BEGIN and _plan_table().END == SLICE_END
