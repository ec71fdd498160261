"""Loading the base straight into its shards (``model.sharded_load``): values, layout and peak memory."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from fedhl_jax import engine
from fedhl_jax.model import export_merged, load_gguf, load_pretrained, param_shapes, path_to_hf_key
from fedhl_jax.model.checkpoint import NonFiniteWeightError
from fedhl_jax.model.gguf import GGUFError
from fedhl_jax.model.llama import flatten_params
from fedhl_jax.model.sharded_load import gguf_readers, load_sharded
from tests.conftest import REPO
from tests.gguf_helpers import CFG, write_tiny_gguf

TINY = REPO / "tests" / "fixtures" / "tiny_llama"


def write_hf_folder(folder: Path, cfg=CFG, seed: int = 0, files: int = 2) -> dict[str, np.ndarray]:
    """A Hugging Face folder of ``cfg`` with random float32 weights in ``files`` safetensors shards
    (plus the index); returns ``{parameter_path: weight}``."""
    rng = np.random.default_rng(seed)
    flat = {p: (1.0 + 0.2 * rng.standard_normal(s) if len(s) == 1 else 0.2 * rng.standard_normal(s)).astype(np.float32)
            for p, s in param_shapes(cfg).items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    paths = list(flat)
    names = [f"model-{i + 1:05d}-of-{files:05d}.safetensors" for i in range(files)]
    weight_map = {}
    for name, part in zip(names, np.array_split(np.arange(len(paths)), files)):
        tensors = {path_to_hf_key(paths[i]): flat[paths[i]] for i in part}
        save_file(tensors, str(folder / name))
        weight_map.update({key: name for key in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return flat


def test_gguf_reads_any_region_of_any_type(tmp_path):
    """A GGUF read of rows × columns (quantised blocks cut mid-block, llama.cpp's q/k row order
    undone) equals the same region of the whole decoded tensor, bit for bit."""
    file = tmp_path / "m.gguf"
    write_tiny_gguf(file)  # Q8_0, Q4_0, Q4_1, F16, BF16 and F32 tensors; permuted attn_q / attn_k
    cfg, readers = gguf_readers(str(file), "float32")
    whole = {p: np.asarray(v) for p, v in flatten_params(load_gguf(file)[1]).items()}
    assert set(readers) == set(whole) and cfg.num_layers == CFG.num_layers
    for path, w in whole.items():
        n = w.shape[-1]
        cols = [(0, n), (12, 24), (5, n - 3), (n - 1, n)]  # 12:24 and 5:n-3 cut Q4/Q8 blocks of 32
        rows = [(0, w.shape[0]), (8, 16), (3, 4)] if w.ndim == 2 else [None]
        for r in rows:
            for c0, c1 in cols:
                idx = (slice(*r), slice(c0, c1)) if w.ndim == 2 else (slice(c0, c1),)
                got = readers[path](idx)
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, w[idx], err_msg=f"{path} {idx}")


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_one_device_mesh_equals_load_pretrained(tmp_path, stored):
    """On a 1-device mesh the result is ``load_pretrained``'s, leaf for leaf, for a float32 and a
    bfloat16 checkpoint loaded in either dtype."""
    folder = TINY if stored == "float32" else export_merged(tmp_path / "bf16", *load_pretrained(TINY),
                                                            hf_config_source=TINY, dtype="bfloat16")
    with safe_open(str(Path(folder) / "model.safetensors"), framework="np") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == ("F32" if stored == "float32" else "BF16")
    mesh = engine.make_mesh(1, 1, jax.devices()[:1])
    for dtype in ("float32", "bfloat16"):
        cfg0, want = load_pretrained(folder, dtype=dtype)
        seen = []
        cfg, got = load_sharded(folder, mesh, dtype=dtype, on_leaf=lambda path, a: seen.append(path))
        assert cfg == cfg0
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert len(seen) == len(jax.tree.leaves(want)) and "layers.self_attn.q_proj" in seen


def test_non_finite_weight_is_named_while_read(tmp_path):
    flat = write_hf_folder(tmp_path / "hf", files=1)
    key = path_to_hf_key("layers.1.mlp.up_proj")
    tensors = {path_to_hf_key(p): w for p, w in flat.items()}
    tensors[key][5, 7] = np.nan
    save_file(tensors, str(tmp_path / "hf" / "model-00001-of-00001.safetensors"))
    mesh = engine.make_mesh(1, 1, jax.devices()[:1])
    with pytest.raises(NonFiniteWeightError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.* 1 non-finite"):
        load_sharded(tmp_path / "hf", mesh)


def test_shape_mismatch_is_refused_before_any_read(tmp_path):
    file = tmp_path / "m.gguf"
    write_tiny_gguf(file, meta={"llama.feed_forward_length": 128})
    reads = []
    with pytest.raises(GGUFError, match=r"shape mismatch for 'blk\.0\.ffn_gate\.weight'"):
        load_sharded(file, engine.make_mesh(1, 1, jax.devices()[:1]), on_leaf=lambda *a: reads.append(a))
    assert not reads


#: The measurement, in a process of 8 CPU devices.
SCRIPT = """
import sys, json, numpy as np, jax
sys.path.insert(0, {repo!r})
from pathlib import Path
from fedhl_jax import engine
from fedhl_jax.model import forward, load_pretrained
from fedhl_jax.model import sharded_load as SL
from fedhl_jax.model.llama import layer_shapes
assert jax.device_count() == 8

def bytes_per_device():
    # Each device buffer once (a global array and its shards' views share buffers).
    total, seen = {{}}, set()
    for x in jax.live_arrays():
        for s in x.addressable_shards:
            if (s.device, s.data.unsafe_buffer_pointer()) not in seen:
                seen.add((s.device, s.data.unsafe_buffer_pointer()))
                total[s.device] = total.get(s.device, 0) + s.data.nbytes
    return total

largest_read = [0]
place_leaf = SL.place_leaf
def recording_place_leaf(shape, sharding, read, dtype):
    def recorded(idx):  # the largest array the host holds for one shard
        out = read(idx)
        largest_read[0] = max(largest_read[0], np.asarray(out).nbytes)
        return out
    return place_leaf(shape, sharding, recorded, dtype)
SL.place_leaf = recording_place_leaf

tokens = np.random.default_rng(0).integers(0, 272, (2, 16))
results = {{}}
for source in {sources!r}:
    for clients, model in ((1, 8), (2, 4)):
        mesh = engine.make_mesh(clients, model)
        peak, largest_read[0] = 0, 0
        already = bytes_per_device()  # what earlier loads left (the peak counts what this one adds)
        def on_leaf(path, array):
            global peak
            peak = max(peak, max(n - already.get(d, 0) for d, n in bytes_per_device().items()))
        cfg, params = SL.load_sharded(source, mesh, on_leaf=on_leaf)
        read_max = largest_read[0]
        before = bytes_per_device()[jax.devices()[0]]
        cfg0, want = load_pretrained(source)  # the unsharded path: everything on device 0
        whole_on_one = bytes_per_device()[jax.devices()[0]] - before
        for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(want),
                           jax.tree.leaves(engine.base_shardings(want, mesh))):
            assert a.sharding == s, (a.sharding, s)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        f = jax.jit(lambda p, t: forward(cfg, p, t))
        got, ref = np.asarray(f(params, tokens)), np.asarray(f(want, tokens))
        gathered = np.asarray(f(jax.device_get(params), tokens))
        base = sum(x.nbytes for x in jax.tree.leaves(want))
        layer = sum(int(np.prod(s)) * 4 for s in layer_shapes(cfg).values())
        shard_max = max(x.nbytes // model for x in jax.tree.leaves(want))
        results[f"{{Path(source).name}} {{clients}}x{{model}}"] = dict(
            peak=peak, base=base, layer=layer, model=model, read_max=read_max, shard_max=shard_max,
            whole_on_one=whole_on_one, logit_diff=float(np.abs(got - ref).max()), logit_max=float(np.abs(ref).max()),
            gathered_equal=bool(np.array_equal(gathered, ref)))
        del params, want

# A run with a model axis loads its base this way (load_pretrained is never called), in the layout
# the round expects (tests/test_mesh.py trains on that layout).
import fedhl_jax.model as M
from fedhl_jax.config import load_config
from fedhl_jax.simulation import Simulation
from tests.conftest import tiny_overrides
def refuse(*args, **kwargs):
    raise AssertionError("load_pretrained called with a model mesh")
M.load_pretrained = refuse
overrides = tiny_overrides(Path({tmp!r}), **{{"model.name_or_path": {sources!r}[1], "mesh.clients": 1,
                                              "mesh.model": 8, "data.eval_examples": 0, "data.seq_len": 128}})
sim = Simulation(load_config(None, overrides), log=lambda *_: None)
assert sim.base is sim.params
for x, s in zip(jax.tree.leaves(sim.base), jax.tree.leaves(engine.base_shardings(sim.base, sim.mesh))):
    assert x.sharding == s, (x.sharding, s)
results["run"] = dict(leaves=len(jax.tree.leaves(sim.base)))
print("RESULTS " + json.dumps(results))
"""


def test_eight_devices_hold_an_eighth_each(tmp_path):
    """On 8 CPU devices, a safetensors folder (two shard files) and a GGUF file (quantised
    tensors, permuted q/k) load with a ``1 x 8`` and a ``2 x 4`` mesh.

    Bound on every device, after every leaf: ``base / model + one layer`` bytes (``model`` the
    mesh's ``model`` axis; the tiny model's dims all divide by 8, so every leaf splits and the
    measured peak is exactly ``base / model``). The largest read on the host is one device's
    shard of one leaf (``leaf / model``). The unsharded path puts the whole base on device 0.
    Weights are bit-identical to ``load_pretrained``'s, laid out as ``engine.base_shardings``;
    the logits of the same program are identical, those of the sharded program (its contractions
    split over ``model`` and summed in another order) within 1e-5 of the largest logit (measured:
    about 2e-6).
    """
    write_hf_folder(tmp_path / "hf")
    write_tiny_gguf(tmp_path / "m.gguf")
    script = SCRIPT.format(repo=str(REPO), sources=[str(tmp_path / "hf"), str(tmp_path / "m.gguf")],
                           tmp=str(tmp_path))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.split("RESULTS ", 1)[1])
    assert len(results) == 5 and "run" in results, results  # a run with mesh.model=8 loads the base sharded
    del results["run"]
    for name, r in results.items():
        print(name, {k: r[k] for k in ("peak", "base", "layer", "read_max", "logit_diff", "logit_max")},
              f"peak/base={r['peak'] / r['base']:.4f}")
        assert r["base"] / r["model"] <= r["peak"] <= r["base"] / r["model"] + r["layer"], (name, r)
        assert r["peak"] == r["base"] // r["model"], (name, r)  # every dim of the tiny model splits
        assert r["read_max"] == r["shard_max"], (name, r)
        assert r["whole_on_one"] == r["base"], (name, r)
        assert r["gathered_equal"], (name, r)
        assert r["logit_diff"] <= 1e-5 * r["logit_max"], (name, r)


#: One of two processes with 4 CPU devices each (``jax.distributed`` over localhost).
PROCESS = """
import sys, numpy as np, jax
sys.path.insert(0, {repo!r})
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
from fedhl_jax import engine
from fedhl_jax.model import load_pretrained
from fedhl_jax.model import sharded_load as SL
assert jax.device_count() == 8 and jax.local_device_count() == 4
reads = []
place_leaf = SL.place_leaf
SL.place_leaf = lambda shape, sharding, read, dtype: place_leaf(
    shape, sharding, lambda idx: (reads.append(idx), read(idx))[1], dtype)
for source in {sources!r}:
    reads.clear()
    cfg, params = SL.load_sharded(source, engine.make_mesh(1, 8))
    want = [np.asarray(x) for x in jax.tree.leaves(load_pretrained(source)[1])]
    for a, b in zip(jax.tree.leaves(params), want):
        assert not a.is_fully_addressable and len(a.addressable_shards) == 4
        for s in a.addressable_shards:
            np.testing.assert_array_equal(np.asarray(s.data), b[s.index])
    read = sum(int(np.prod([s.stop - s.start for s in idx])) for idx in reads)
    print(f"READ {{read / sum(b.size for b in want)}}")
"""


def test_two_processes_read_only_their_shards(tmp_path):
    """With a mesh over 2 processes x 4 devices, each process reads exactly half of the base
    (the shards of its own devices), and its shards equal ``load_pretrained``'s values."""
    from tests.test_mesh import free_port

    write_hf_folder(tmp_path / "hf")
    write_tiny_gguf(tmp_path / "m.gguf")
    script = PROCESS.format(repo=str(REPO), port=free_port(), sources=[str(tmp_path / "hf"), str(tmp_path / "m.gguf")])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(pid)], env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for pid in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert [line for line in out.splitlines() if line.startswith("READ")] == ["READ 0.5"] * 2, out[-3000:]


@pytest.mark.parametrize("family", ["tiny_qwen2", "tiny_qwen3", "tiny_llama32"])
def test_other_families_load_sharded_as_unsharded(tmp_path, family):
    """Qwen2 (q/k/v biases, q/k rows in Hugging Face's order in GGUF), Qwen3 (q/k norms) and Llama-3.2
    (``llama3`` RoPE from ``rope_freqs``): the sharded reader of the HF folder and of its GGUF export
    equals the unsharded loaders leaf for leaf."""
    from fedhl_jax.model import export_gguf

    folder = Path(__file__).parent / "fixtures" / family
    mesh = engine.make_mesh(1, 1, jax.devices()[:1])
    cfg0, params0 = load_pretrained(folder)
    file = export_gguf(tmp_path / f"{family}.gguf", cfg0, params0, dtype="f32")
    for src in (folder, file):
        cfg_w, want = load_pretrained(src)
        cfg, got = load_sharded(src, mesh)
        assert cfg == cfg_w
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
