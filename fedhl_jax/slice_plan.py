"""A run's round compiled for a TPU slice on any machine, and XLA's per-chip memory of it.

``libtpu`` lets XLA compile for a TPU topology it is not running on
(``jax.experimental.topologies.get_topology_desc``, as MaxText's ``train_compile.py`` does). The
round is the run's own (``engine.make_round_step`` with the config's algorithm, optimizer, LoRA
targets, ranks, remat, dtype, ``clients_per_chunk`` and ``clients × model`` mesh); the base weights,
the server state and the round's inputs are abstract ``jax.ShapeDtypeStruct`` with their shardings,
so no weight is read or allocated. ``compiled.memory_analysis()`` then gives the bytes one chip
holds: arguments, temporaries, output, generated code and the donated (aliased) state.

Everything that can be checked without compiling (the topology's name, the mesh against its chip
count, the model shape, the ranks against the LoRA modules) is checked first, by
:func:`parse_topology`, :func:`slice_mesh` and :func:`model_shape`, so bad input costs no compile.
The command is ``fedhl_jax.plan_cli``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedhl_jax import engine
from fedhl_jax import model as M
from fedhl_jax.build import build_algorithm
from fedhl_jax.config import TrainConfig
from fedhl_jax.errors import ConfigError
from fedhl_jax.local import make_optimizer
from fedhl_jax.model.planning import MODEL_SHAPES

GIB = 2.0**30
#: HBM per chip, in GiB (Google Cloud TPU documentation); the topology's devices report no size
#: until they are attached (``memory_stats`` needs an addressable device).
CHIP_HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
#: ``device_kind`` of a topology's devices -> chip.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
#: Cloud slice names -> topologies (``v5p-8`` counts TensorCores: 4 chips of 2).
SLICE_NAMES = {"v4-8": "v4:2x2x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1",
               "v5p-16": "v5p:2x2x2", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4"}
#: Chips of one host, by chip: v5e and v6e hosts hold up to 8, v4 and v5p hosts 4 (``2x2x1``).
_HOST_CHIPS = {"v4": 4, "v5e": 8, "v5p": 4, "v6e": 8}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


class PlanError(ValueError):
    """Bad input to the plan (an unknown topology, a mesh that does not fit the slice, ...)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice by name.

    Attributes:
      name: ``chip:AxB[xC]``, e.g. ``v5p:2x2x1``.
      chip: ``v4``, ``v5e``, ``v5p`` or ``v6e``.
      dims: the chip grid, e.g. ``(2, 2, 1)``.
    """

    name: str
    chip: str
    dims: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.dims)

    @property
    def hbm_bytes(self) -> int:
        """HBM of one chip (:data:`CHIP_HBM_GIB`)."""
        return int(CHIP_HBM_GIB[self.chip] * GIB)


def parse_topology(name: str) -> Topology:
    """``"v5p:2x2x1"`` (or a slice name such as ``"v5p-8"``) as a :class:`Topology`; needs no libtpu.

    Raises:
      PlanError: naming the value and the accepted forms.
    """
    full = SLICE_NAMES.get(name, name)
    m = _TOPOLOGY.match(full)
    if not m:
        raise PlanError(f"unknown TPU topology {name!r}: write chip:AxB[xC] with chip one of "
                        f"{', '.join(CHIP_HBM_GIB)} (e.g. v5e:2x4, v5p:2x2x1), or a slice name "
                        f"({', '.join(SLICE_NAMES)})")
    dims = tuple(int(d) for d in m.groups()[1:] if d is not None)
    if min(dims) < 1:
        raise PlanError(f"TPU topology {name!r} has an empty dimension")
    return Topology(full, m.group(1), dims)


def libtpu_available() -> bool:
    """Whether ``libtpu`` (the TPU compiler) is importable (``pip install 'fedhl-jax[tpu-plan]'``)."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(topo: Topology) -> list:
    """The devices of ``topo`` (one per chip), for compiling only.

    A slice of at most one host's chips (:data:`_HOST_CHIPS`) is described as one host, as the
    machine that runs it is; a v4 chip's two TensorCores are one device (``megacore``), as on v5p.

    Raises:
      PlanError: ``libtpu`` is not installed, or it does not know the topology.
    """
    if not libtpu_available():
        raise PlanError("compiling for a TPU topology needs libtpu: pip install 'fedhl-jax[tpu-plan]'")
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {}
    if topo.chips <= _HOST_CHIPS[topo.chip]:
        kwargs["chips_per_host_bounds"] = tuple(topo.dims) + (1,) * (3 - len(topo.dims))
    if topo.chip == "v4":
        kwargs["chip_config_name"] = "megacore"
    # No TPU is attached: skip the cloud metadata query, let several planning processes load libtpu
    # at once (it otherwise takes a machine-wide lock, /tmp/libtpu_lockfile), name this host as the
    # only worker.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # (libtpu logs an error block without it)
    try:
        devices = list(topologies.get_topology_desc(topology_name=topo.name, platform="tpu", **kwargs).devices)
    except Exception as e:  # noqa: BLE001 - libtpu raises its runtime error for a topology it refuses
        raise PlanError(f"libtpu refuses TPU topology {topo.name!r}: {' '.join(str(e).split())[:300]}") from None
    if len(devices) != topo.chips:
        raise PlanError(f"TPU topology {topo.name!r} gave {len(devices)} devices for {topo.chips} chips")
    kind = DEVICE_KINDS.get(devices[0].device_kind)
    if kind != topo.chip:
        raise PlanError(f"TPU topology {topo.name!r} gave {devices[0].device_kind!r} devices, not {topo.chip}")
    return devices


def slice_mesh(mesh_cfg, clients_per_round: int, chips: int) -> tuple[int, int] | None:
    """The run's ``(clients, model)`` mesh on a slice of ``chips`` chips (``simulation.mesh_from_config``'s rule).

    Returns:
      ``None`` for the automatic layout on one chip (the round's clients do not split evenly over
      the chips), else ``(clients, model)`` with ``clients × model = chips``.

    Raises:
      PlanError: ``clients × model`` is not the chip count, or the round's clients do not split
        evenly over ``clients`` (the message names the values).
    """
    if not mesh_cfg.explicit:
        return (chips, 1) if chips > 1 and clients_per_round % chips == 0 else None
    model = mesh_cfg.model
    clients = mesh_cfg.clients if mesh_cfg.clients is not None else max(1, chips // model)
    if clients * model != chips:
        given = f"mesh.clients={mesh_cfg.clients}" if mesh_cfg.clients is not None else "mesh.clients=null"
        raise PlanError(f"{given} x mesh.model={model} = {clients * model} chips, but the topology has {chips}; "
                        "clients x model must equal the chip count")
    if clients_per_round % clients:
        raise PlanError(f"the {clients_per_round} clients of a round do not split evenly over mesh.clients={clients}; "
                        f"choose a mesh.clients that divides {clients_per_round}")
    return clients, model


def model_shape(cfg: TrainConfig, preset: str | None = None) -> M.LlamaConfig:
    """The model's shape, in the config's dtypes, without reading any weight.

    Args:
      cfg: the run's config: ``model.name_or_path`` is ``auto`` (the embedded model's
        ``config.json``), ``random`` (``model.random_*``, vocabulary ``model.random_vocab_size``),
        a local folder (its ``config.json`` alone is read; the weights need not be there) or a GGUF
        file (its metadata).
      preset: a shape from :data:`~fedhl_jax.model.planning.MODEL_SHAPES` instead
        (``llama2-7b``, ``llama31-8b``, ``qwen25-7b``, ``smollm2-135m``).

    Raises:
      PlanError: an unknown preset, a Hub id (it needs network), or an unreadable ``config.json``.
    """
    from fedhl_jax.model.architecture import read_config_json
    from fedhl_jax.model.hub import resolve_model_source
    from fedhl_jax.simulation import random_model_config

    mc = cfg.model
    if preset is not None:
        if preset not in MODEL_SHAPES:
            raise PlanError(f"unknown model shape {preset!r}; known: {', '.join(MODEL_SHAPES)}")
        shape = MODEL_SHAPES[preset]
    else:
        try:
            source = resolve_model_source(mc.name_or_path)
        except (FileNotFoundError, ValueError) as e:
            raise PlanError(str(e)) from None
        if source.kind == "hub":
            raise PlanError(f"model.name_or_path={mc.name_or_path!r} is a Hub id; the plan reads no network: give a "
                            "local folder holding its config.json, or --model-shape")
        if source.kind == "random":
            shape = random_model_config(mc, mc.random_vocab_size)
        else:
            try:
                shape = (M.gguf_config(source.path) if source.path.endswith(".gguf")
                         else M.LlamaConfig.from_hf(read_config_json(source.path)))
            except (OSError, ValueError, KeyError) as e:
                raise PlanError(f"model.name_or_path={mc.name_or_path!r}: {e}") from None
    return shape.replace(dtype=mc.dtype, compute_dtype=mc.compute_dtype)


class RoundProgram(NamedTuple):
    """The run's round for a slice, ready to lower.

    Attributes:
      fn: ``engine.compile_round_step(engine.make_round_step(...))`` (the state donated).
      args: ``(state, base, inputs)`` as ``jax.ShapeDtypeStruct`` with their shardings.
      mesh: ``(clients, model)`` or ``None`` (one chip).
      clients_per_chunk: the chunk the round runs (rounded up to the ``clients`` axis, as the engine does).
    """

    fn: Any
    args: tuple
    mesh: tuple[int, int] | None
    clients_per_chunk: int | None


def _abstract(tree, sharding):
    """``tree``'s leaves as ``ShapeDtypeStruct`` with ``sharding(leaf)``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)), tree)


def round_program(cfg: TrainConfig, model_cfg: M.LlamaConfig, devices: Sequence, *,
                  clients_per_chunk: int | None = None) -> RoundProgram:
    """The run's round step (as ``Simulation`` builds it) over ``devices``, from shapes only.

    Args:
      cfg: the run's config (algorithm, ranks, optimizer, LoRA targets, remat, data shape, mesh).
      model_cfg: the model's shape (:func:`model_shape`).
      devices: the slice's devices (:func:`topology_devices`, or any devices).
      clients_per_chunk: overrides ``fed.clients_per_chunk``.

    Returns:
      A :class:`RoundProgram`. The mesh is ``cfg.mesh`` on ``devices`` (:func:`slice_mesh`); on one
      chip the round has no mesh, as in a run, and its arguments sit on the first device.

    Raises:
      PlanError: the mesh does not fit the devices.
      ConfigError: ``fed.ranks`` above the smallest LoRA module dimension.
    """
    fed, o = cfg.fed, cfg.optim
    n = fed.clients_per_round
    shape = slice_mesh(cfg.mesh, n, len(devices))
    if shape is None:
        sharded_on = Mesh(np.array(devices[:1], dtype=object).reshape(1, 1), (engine.CLIENTS, engine.MODEL))
        mesh = None
    else:
        sharded_on = mesh = engine.make_mesh(*shape, devices=devices)
    algorithm = build_algorithm(fed)
    shapes = M.lora_targets(model_cfg, cfg.model.targets)
    smallest = min(min(s) for s in shapes.values())
    if fed.r_max > smallest:
        raise ConfigError(f"rank {fed.r_max} in fed.ranks exceeds min(d_out, d_in)={smallest} of the LoRA modules "
                          f"{sorted({m.split('.')[-1] for m in shapes})}")
    optimizer = make_optimizer(o.optimizer, o.lr, lr_b=o.lr_b, weight_decay=o.weight_decay, momentum=o.momentum,
                               grad_clip=o.grad_clip, trainable=algorithm.trainable)
    train_cfg = model_cfg.replace(remat=cfg.model.remat)
    chunk = fed.clients_per_chunk if clients_per_chunk is None else clients_per_chunk
    step = engine.make_round_step(
        algorithm, lambda p, a, t, m: M.loss_fn(train_cfg, p, a, t, m), optimizer, clients_per_chunk=chunk,
        merge_delta=M.merge_delta, to_client=lambda ad: M.stacked_adapter(model_cfg, ad),
        from_client=lambda ad: M.per_layer_adapter(model_cfg, ad), mesh=mesh)
    if mesh is not None and chunk is not None:
        chunk = -(-chunk // shape[0]) * shape[0]

    everywhere = NamedSharding(sharded_on, P())
    key = jax.random.key(cfg.seed)
    state = _abstract(jax.eval_shape(lambda k: algorithm.init(shapes, k), jax.random.PRNGKey(cfg.seed)),
                      lambda x: everywhere)
    params = jax.eval_shape(lambda k: M.init_params(model_cfg, k), key)
    place = engine.base_shardings(params, sharded_on)
    base = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, place)
    clients = NamedSharding(sharded_on, P(engine.CLIENTS))
    tokens = (n, o.local_steps, o.batch_size, cfg.data.seq_len)
    inputs = engine.RoundInputs(
        mask=jax.ShapeDtypeStruct((n, fed.r_max), jnp.float32, sharding=clients),
        scale=jax.ShapeDtypeStruct((n,), jnp.float32, sharding=clients),
        num_examples=jax.ShapeDtypeStruct((n,), jnp.float32, sharding=clients),
        batch=(jax.ShapeDtypeStruct(tokens, jnp.int32, sharding=clients),
               jax.ShapeDtypeStruct(tokens, jnp.float32, sharding=clients)),
        key=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=everywhere))
    return RoundProgram(engine.compile_round_step(step), (state, base, inputs), shape, chunk)


def memory_of(compiled) -> dict:
    """XLA's per-device figures of a compiled program (``compiled.memory_analysis()``), in bytes.

    Returns:
      ``{"argument", "output", "temp", "generated_code", "alias", "total"}`` with
      ``total = argument + output - alias + temp + generated_code``: what one chip holds at the
      program's peak (the donated state's buffers serve as its output, so they count once).
    """
    ma = compiled.memory_analysis()
    out = {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
           "temp": int(ma.temp_size_in_bytes), "generated_code": int(ma.generated_code_size_in_bytes),
           "alias": int(ma.alias_size_in_bytes)}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


#: XLA:TPU's refusal of a program larger than a chip's HBM, in the two forms libtpu has used (binary
#: units): ``RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory
#: required for HLO temporaries (16.15G) exceeds available HBM (15.75G).`` (the libtpu of jax 0.12) and
#: ``RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used
#: 21.95G of 15.48G hbm. Exceeded hbm capacity by 6.47G.`` (earlier releases).
_HBM_REFUSALS = (
    re.compile(r"Ran out of memory on HBM, the total memory required for (?P<what>[^(]+?) \((?P<need>[0-9.]+)"
               r"(?P<nu>[KMGT]?)i?B?\) exceeds available HBM \((?P<usable>[0-9.]+)(?P<uu>[KMGT]?)i?B?\)"),
    re.compile(r"Ran out of memory in memory space hbm\. Used (?P<need>[0-9.]+)(?P<nu>[KMGT]?)i?B? of "
               r"(?P<usable>[0-9.]+)(?P<uu>[KMGT]?)i?B? hbm"),
)


def hbm_refusal(message: str) -> dict | None:
    """XLA's "ran out of memory on HBM" compile error, read.

    Args:
      message: an exception's text.

    Returns:
      ``{"used": bytes, "usable": bytes, "what": str, "error": the error's line}``: ``used`` is what
      XLA reports needing when it gave up (``what``: "HLO temporaries" in the current form, the
      program in the older one), a lower bound of the program's whole need; ``usable`` is the
      chip's HBM less what the runtime reserves. None when the message is not that error.
    """
    for pattern in _HBM_REFUSALS:
        m = pattern.search(message)
        if m is not None:
            break
    else:
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    line = next((ln.strip() for ln in message.splitlines() if m.group(0) in ln), m.group(0))
    return {"used": int(float(m.group("need")) * scale[m.group("nu")]),
            "usable": int(float(m.group("usable")) * scale[m.group("uu")]),
            "what": (m.groupdict().get("what") or "the program").strip(), "error": line}


def compile_round(cfg: TrainConfig, model_cfg: M.LlamaConfig, devices: Sequence, *,
                  clients_per_chunk: int | None = None) -> dict:
    """Compiles :func:`round_program` and returns its :func:`memory_of` plus ``"seconds"`` (lower +
    compile), ``"mesh"`` and ``"clients_per_chunk"``.

    A program XLA refuses because it does not fit a chip's HBM is an answer, not a failure: the
    figures of :func:`memory_of` are then None, ``"total"`` is what XLA reports it had placed (a
    lower bound), and ``"refused"`` holds :func:`hbm_refusal` of the error. Any other compile error
    is raised.
    """
    prog = round_program(cfg, model_cfg, devices, clients_per_chunk=clients_per_chunk)
    t0 = time.perf_counter()
    try:
        mem = memory_of(prog.fn.lower(*prog.args).compile())
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError / JaxRuntimeError, by jax version
        refused = hbm_refusal(str(e))
        if refused is None:
            raise
        mem = {"argument": None, "output": None, "temp": None, "generated_code": None, "alias": None,
               "total": refused["used"], "refused": refused}
    seconds = time.perf_counter() - t0
    return {**mem, "seconds": round(seconds, 1), "mesh": prog.mesh, "clients_per_chunk": prog.clients_per_chunk}


def fits(mem: dict, budget: int) -> bool:
    """Whether a :func:`compile_round` result fits ``budget`` bytes (a refused program never does)."""
    return "refused" not in mem and mem["total"] <= budget


def chunk_candidates(clients: int, clients_axis: int) -> list[int]:
    """``clients_per_chunk`` values worth compiling: the divisors of ``clients`` that are multiples of
    the mesh's ``clients`` axis (each chunk then splits evenly over it, with no remainder), ascending."""
    return [c for c in range(clients_axis, clients + 1, clients_axis) if clients % c == 0]


def largest_fitting_chunk(measure, candidates: Sequence[int], budget: int, *, first: tuple[int, dict] | None = None,
                          max_compiles: int = 4) -> dict:
    """Binary search for the largest ``clients_per_chunk`` whose program fits ``budget`` bytes.

    Memory grows with the chunk (more clients train at once), so the candidates that fit form a prefix.

    Args:
      measure: ``measure(chunk) -> memory dict`` (:func:`compile_round`; a program XLA refused for
        HBM does not fit); one call per compile.
      candidates: ascending chunk sizes (:func:`chunk_candidates`).
      budget: bytes of one chip.
      first: ``(chunk, memory)`` already compiled (the config's own chunk), used as a bound; it counts
        as one of the compiles.
      max_compiles: at most this many compiles in all.

    Returns:
      ``{"chunk": largest fitting (0: none fits), "conclusive": whether the search ended within
      the cap, "tried": [{"clients_per_chunk", "total", "fits"}, ...]}``.
    """
    tried: list[dict] = []
    lo, hi = -1, len(candidates)  # candidates[:lo+1] fit, candidates[hi:] do not (known so far)

    def record(chunk, mem):
        nonlocal lo, hi
        ok = fits(mem, budget)
        tried.append({"clients_per_chunk": chunk, "total": mem["total"], "fits": ok})
        below = [i for i, c in enumerate(candidates) if c <= chunk]
        above = [i for i, c in enumerate(candidates) if c >= chunk]
        if ok and below:
            lo = max(lo, below[-1])
        if not ok and above:
            hi = min(hi, above[0])
        return ok

    best = 0
    if first is not None:
        if record(*first):
            best = first[0]
    while hi - lo > 1 and len(tried) < max_compiles:
        mid = (lo + hi + 1) // 2
        record(candidates[mid], measure(candidates[mid]))
    if lo >= 0:
        best = max(best, candidates[lo])
    return {"chunk": best, "conclusive": hi - lo <= 1, "tried": tried}
