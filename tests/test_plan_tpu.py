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


#: XLA:TPU's refusals as jax raises them: the first as this project's Llama-2-7B round without remat
#: gave it for v5e:2x4 (libtpu of jax 0.12), the others in the older form (from public reports).
REFUSALS = [
    ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (16.15G) exceeds available HBM (15.75G). HLO module: jit_round_step.\nSee "
     "https://openxla.org/xla/errors/error_1000 for more details.", int(16.15 * 2**30), int(15.75 * 2**30)),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 21.95G of "
     "15.48G hbm.\n Exceeded hbm capacity by 6.47G.\n\nTotal hbm usage >= 22.47G:\n    reserved        530.00M",
     int(21.95 * 2**30), int(15.48 * 2**30)),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 63.80G of "
     "30.75G hbm. Exceeded hbm capacity by 33.05G.", int(63.80 * 2**30), int(30.75 * 2**30)),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 1.50T of "
     "95.74G hbm.", int(1.5 * 2**40), int(95.74 * 2**30)),
]


@pytest.mark.parametrize("message,used,usable", REFUSALS)
def test_hbm_refusal_is_read(message, used, usable):
    got = S.hbm_refusal(message)
    assert got["used"] == used and got["usable"] == usable
    assert got["error"].startswith("RESOURCE_EXHAUSTED") and "\n" not in got["error"]
    assert got["what"] == ("HLO temporaries" if "E1000" in message else "the program")
    assert S.hbm_refusal("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                         "vmem. Used 32.42M of 16.00M vmem.") is None
    assert S.hbm_refusal("INTERNAL: something else") is None


class _Refusing:
    """A stand-in for a ``RoundProgram`` whose compile raises ``message``."""

    def __init__(self, message):
        self.message, self.args, self.mesh, self.clients_per_chunk = message, (), {"clients": 2, "model": 4}, 2
        self.fn = self

    def lower(self, *args):
        return self

    def compile(self):
        raise RuntimeError(self.message)


def test_a_program_xla_refuses_for_hbm_is_a_plan_that_does_not_fit(monkeypatch):
    """A round too large for a chip is not a crash of the command: XLA's refusal becomes a plan
    with ``fits`` false, the placed bytes as a lower bound, and the error; another compile error
    still raises."""
    import jax

    message, used, usable = REFUSALS[0]
    monkeypatch.setattr(S, "round_program", lambda *a, **k: _Refusing(message))
    mem = S.compile_round(None, None, [])
    assert mem["total"] == used and mem["refused"]["usable"] == usable and mem["argument"] is None
    assert not S.fits(mem, 10**15) and S.fits({"total": 5}, 10)
    monkeypatch.setattr(S, "round_program", lambda *a, **k: _Refusing("INTERNAL: a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        S.compile_round(None, None, [])

    # the command: one refused compile, then the search tries smaller chunks, which fit
    calls = []

    def compile_round(cfg, model_cfg, devices, clients_per_chunk=None):
        calls.append(clients_per_chunk)
        chunk = clients_per_chunk or 10
        base = {"seconds": 1.0, "mesh": {"clients": 2, "model": 4}, "clients_per_chunk": chunk}
        if chunk > 2:
            return {**base, "argument": None, "output": None, "temp": None, "generated_code": None, "alias": None,
                    "total": used, "refused": S.hbm_refusal(message)}
        return {**base, "argument": 2**30, "output": 2**29, "temp": 2**30, "generated_code": 2**20, "alias": 2**29,
                "total": 2**31 + 2**20}

    monkeypatch.setattr(S, "compile_round", compile_round)
    monkeypatch.setattr(S, "topology_devices", lambda topo: jax.devices())
    cfg = load_config(None, [*TINY, "mesh.clients=2", "mesh.model=4", "fed.num_clients=10"])
    p = plan_cli.plan(cfg, "v5e:2x4", max_compiles=3)
    assert p["fits"] is False and p["memory"]["refused"]["used"] == used
    assert p["largest_fitting_chunk"]["chunk"] == 2 and [t["fits"] for t in p["largest_fitting_chunk"]["tried"]][0] is False
    text = plan_cli.render_text(p)
    assert "XLA refused the program: it does NOT fit (RESOURCE_EXHAUSTED" in text
    assert f"HLO temporaries alone  {used / 2**30:9.2f} GiB (a lower bound of the need) of {usable / 2**30:.2f} GiB usable (16 GiB HBM)" in text
    assert "largest clients_per_chunk that fits: 2" in text
    json.dumps(p)  # still one JSON object for --json
    # the server's SVD: exact by default (one per module), the randomized one batched per module shape
    assert p["round"]["server_svd"] == "per-module"
    cfg = load_config(None, [*TINY, "mesh.clients=2", "mesh.model=4", "fed.num_clients=10",
                             "fed.options.svd_method=randomized"])
    assert plan_cli.plan(cfg, "v5e:2x4", max_compiles=1)["round"]["server_svd"] == "batched"
    cfg = load_config(None, [*TINY, "mesh.clients=2", "mesh.model=4", "fed.num_clients=10", "fed.algorithm=hetlora"])
    assert plan_cli.plan(cfg, "v5e:2x4", max_compiles=1)["round"]["server_svd"] == "none"


def test_plan_table_redo_compiles_old_rows_again_and_the_page_keeps_before_and_after(monkeypatch, tmp_path):
    """``run`` fills the pending rows, ``run --redo`` then compiles again only the rows an older program
    compiled; the page marks old rows with † and lists the recompiled ones as before → after."""
    import subprocess

    pt = _plan_table()
    monkeypatch.setattr(pt, "CACHE", tmp_path / "plan.jsonl")
    monkeypatch.setattr(pt, "CLAIMS", tmp_path / "claims")
    rows = pt.rows()

    def record(row, total, svd=None, seconds=100.0):
        rnd = {"server_svd": svd} if svd else {}
        mem = {"argument": 1, "output": 2, "temp": total - 2, "generated_code": 0, "alias": 1, "total": total}
        return {"kind": "row", "key": pt.key(row), **row, "command": "fedhl-plan",
                "plan": {"topology": "v5e:2x4", "mesh": {"clients": 2, "model": 4}, "clients_per_chunk": 2,
                         "hbm_bytes": 16 * 2**30, "round": rnd, "memory": mem, "fits": True,
                         "compile_seconds": [seconds]}}

    old = record(rows[0], 3 * 2**30, seconds=900.0)  # before the server SVD was batched: no field
    pt.CACHE.write_text(json.dumps(old) + "\n" + json.dumps(record(rows[1], 2**30, "batched")) + "\n")
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        plan = record(rows[0], 5 * 2**30, "batched", seconds=300.0)["plan"]
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(plan) + "\n", stderr="")

    monkeypatch.setattr(pt.subprocess, "run", fake_run)
    section = pt.render_section(pt.load_cache())
    assert "900 † |" in section and "† 1 rows were compiled before" in section and "### Compiled again" not in section
    # at a glance: the first round on its three slices, two compiled (both fit), one pending
    assert "| Llama-2-7B | q,v | `full` | 10 | **3.00** | **1.00** | pending |" in section
    pt.run(None, None, redo=True, match=pt.key(rows[1]))  # a row of today's program: nothing to do
    assert calls == []
    pt.run(None, None)  # the pending rows only
    assert len(calls) == len(rows) - 2 and pt.program(pt.load_cache()[pt.key(rows[0])]) == "per-module"
    pt.run(None, None, redo=True)  # now the one old row, and nothing else
    assert len(calls) == len(rows) - 1
    cache = pt.load_cache()
    assert all(pt.program(r) == "batched" for r in cache.values()) and len(cache) == len(rows)
    assert pt.superseded() == {pt.key(rows[0]): [old]}
    pt.run(None, None, redo=True)  # nothing left to do
    assert len(calls) == len(rows) - 1
    section = pt.render_section(cache)
    assert " †" not in section and "Pending rows" not in section and "pending |" not in section
    assert "| Llama-2-7B | q,v | `full` | 10 | **5.00** | **1.00** | **5.00** |" in section
    # a round that does not fit, and one XLA refused (its figure a lower bound)
    big, refused = record(rows[0], 20 * 2**30), record(rows[1], 40 * 2**30)
    big["plan"]["fits"] = refused["plan"]["fits"] = False
    refused["plan"]["memory"]["refused"] = {"used": 40 * 2**30}
    glance = pt.at_a_glance({pt.key(rows[0]): big, pt.key(rows[1]): refused})
    assert "| Llama-2-7B | q,v | `full` | 10 | 20.00 (no) | ≥ 40.00 (no) | pending |" in glance
    assert f"| {pt.key(rows[0]).replace('|', ', ')} | 3.00 → 5.00 | 3.00 → 5.00 | 900 → 300 |" in section


def test_plan_table_names_the_rounds_whose_memory_remat_does_not_move():
    """Rows whose per-chip total is the same (within 1%) with remat none and full, both fitting, are named
    with the dense server state's size; a row that moves with remat, or does not fit, is not."""
    pt = _plan_table()

    def rec(remat, clients, total, fits=True):
        row = dict(model="llama2-7b", targets="q,v", remat=remat, clients=clients, slice="v5p-8")
        return pt.key(row), {"plan": {"fits": fits, "memory": {"total": total * pt.GIB}}}

    cache = dict([rec("full", 10, 10.0), rec("none", 10, 10.05),  # same within 1%: named
                  rec("full", 100, 10.0), rec("none", 100, 30.0)])  # remat moves it: not named
    text = " ".join(pt.remat_reading(cache))
    assert "Llama-2-7B q,v, 10 clients, v5p-8: 10.00 and 10.05 GiB" in text and "100 clients," not in text
    # 32 layers x (q 4096x4096 + v 4096x4096) float32 = 4 GiB exactly
    assert "Llama-2-7B q,v 4.0 GiB" in text and pt.dense_server_gib("llama2-7b", "q,v") == 4.0
    cache.update([rec("none", 10, 10.05, fits=False)])
    assert pt.remat_reading(cache) == []
    # all linear modules of Llama-3.1-8B: 32 x (2 x 4096^2 + 2 x 1024x4096 + 3 x 14336x4096) x 4 bytes
    expected = 32 * (2 * 4096**2 + 2 * 1024 * 4096 + 3 * 14336 * 4096) * 4 / 2**30
    assert abs(pt.dense_server_gib("llama31-8b", "all-linear") - expected) < 1e-12


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
