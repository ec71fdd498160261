"""Loading a base model straight into its shards over a device mesh.

:func:`fedhl_jax.model.load_pretrained` puts every tensor whole on the default device, so a
model larger than one device cannot load even when the mesh's ``model`` axis would hold it.
:func:`load_sharded` reads the same files (a Hugging Face safetensors folder or a GGUF file,
both memory-mapped) shard by shard: for each leaf of the parameter tree and each device, only
the rows and columns of that device's shard are read (and, for GGUF, dequantised), then put on
that device. The stacked ``[L, ...]`` layer weights are assembled per shard, one layer's slice
at a time. No device ever holds more than its own shards, and no process more than one shard
of one leaf (plus one layer's slice of it while it is decoded).

The result equals :func:`~fedhl_jax.model.load_pretrained`'s parameters value for value, with
each leaf laid out as ``layout(shapes, mesh)`` says (by default the frozen base's layout of the
round, ``engine.base_shardings``); the same checks run first, from the headers only (names,
shapes, layer count, tensor types), and every slice read is checked for NaN/Inf.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedhl_jax.model.architecture import LlamaConfig
from fedhl_jax.model.checkpoint import (_NP_DTYPES, _gguf_file, check_finite_weight, checkpoint_index,
                                        open_safetensors)
from fedhl_jax.model.llama import param_shapes, unflatten_params

#: ``read(index) -> array``: the region ``index`` (a tuple of unit-step slices, one per
#: dimension) of one parameter in Hugging Face layout, as a NumPy array.
Reader = Callable[[tuple], np.ndarray]


def _span(s: slice, n: int) -> tuple[int, int]:
    """``(start, stop)`` of a unit-step slice over ``n`` elements."""
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"shard index {s} has step {step}; only contiguous shards are read")
    return start, max(start, stop)


# --------------------------------------------------------------------------- safetensors
def safetensors_readers(index: dict[str, tuple[str, str]], stack: contextlib.ExitStack) -> dict[str, Reader]:
    """One reader per parameter of a checkpoint folder (:func:`checkpoint_index`).

    Each file is opened once (``safe_open``, memory-mapped) and stays open until ``stack``
    closes; a read copies only the requested region (``get_slice``).

    Args:
      index: ``{parameter_path: (file, key)}``.
      stack: owns the open files.

    Returns:
      ``{parameter_path: read}``; the values keep the file's dtype and are checked for NaN/Inf.
    """
    handles = {}
    for file, _ in index.values():
        if file not in handles:
            handles[file] = stack.enter_context(open_safetensors(file))

    def reader(file: str, key: str) -> Reader:
        tensor = handles[file].get_slice(key)

        def read(idx: tuple) -> np.ndarray:
            w = np.asarray(tensor[tuple(idx)])
            check_finite_weight(w, key, file)
            return w

        return read

    return {path: reader(file, key) for path, (file, key) in index.items()}


# --------------------------------------------------------------------------- GGUF
def gguf_readers(file: str, dtype: str) -> tuple[LlamaConfig, dict[str, Reader]]:
    """The config of a GGUF file and one reader per parameter, after every check of
    :func:`fedhl_jax.model.gguf.load_gguf` (metadata, names, shapes, types).

    A read dequantises only the blocks that hold the requested region: the shard's rows (in
    llama.cpp's q/k row order, mapped back to Hugging Face's with the same permutation as
    :func:`~fedhl_jax.model.gguf.unpermute_qk`) and, within them, the blocks that cover its
    columns (32 values for Q8_0/Q4_0/Q4_1, one for F32/F16/BF16).

    Args:
      file: the ``.gguf`` file.
      dtype: the config's parameter dtype.

    Returns:
      ``(cfg, {parameter_path: read})``; reads return float32.

    Raises:
      GGUFError: as :func:`~fedhl_jax.model.gguf.load_gguf`, before anything is decoded.
    """
    import gguf

    from fedhl_jax.model import gguf as G

    reader = G.open_gguf(file)
    meta, names = G.read_metadata(reader), [t.name for t in reader.tensors]
    G.check_gguf_metadata(meta, names, file)
    try:
        cfg = G.config_from_gguf(meta, tensor_names=names, dtype=dtype, rope_freqs=G.read_rope_freqs(reader, file))
    except ValueError as e:  # an unsupported architecture or setting: name the file
        raise G.GGUFError(f"{file}: {' '.join(str(e).split())}") from e
    plan = G.check_gguf_tensors(reader, cfg, file)
    heads = G.qk_heads(cfg)  # the q/k rows (and biases) llama.cpp permutes, as load_gguf undoes them

    def tensor_reader(t, path: str, shape: tuple[int, ...]) -> Reader:
        qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        raw = np.asarray(t.data).view(np.uint8).reshape(rows, -1)  # a view of the memory map
        short = path.rsplit(".", 1)[-1]
        order = G.unpermute_qk(np.arange(rows), heads[short]) if short in heads else None  # HF row -> file row

        def read(idx: tuple) -> np.ndarray:
            (r0, r1), (c0, c1) = ((_span(idx[0], rows), _span(idx[1], cols)) if len(shape) == 2
                                  else ((0, 1), _span(idx[0], cols)))
            b0, b1 = c0 // block, -(-c1 // block)  # the blocks that cover columns [c0, c1)
            picked = slice(r0, r1) if order is None else order[r0:r1]
            data = raw[picked, b0 * type_bytes:b1 * type_bytes]
            w = G.dequantize(data, qtype, (r1 - r0, (b1 - b0) * block), t.name)[:, c0 - b0 * block:c1 - b0 * block]
            check_finite_weight(w, t.name, file)
            return w if len(shape) == 2 else w[0]

        return read

    return cfg, {path: tensor_reader(t, path, shape) for t, path, shape in plan}


# --------------------------------------------------------------------------- placement
def place_leaf(shape: tuple[int, ...], sharding: jax.sharding.Sharding, read: Reader, dtype) -> jax.Array:
    """A global array of ``shape`` laid out as ``sharding``, read shard by shard.

    Each distinct shard this process addresses is read once (``read(index)``), cast to
    ``dtype`` and put on every device that holds it before the next one is read, so at most
    one shard is on the host at a time (``jax.make_array_from_callback`` reads every
    addressable shard before placing any).

    Args:
      shape: the global shape.
      sharding: its layout.
      read: ``read(index) -> array`` of shape ``sharding.shard_shape(shape)``.
      dtype: the stored dtype.

    Returns:
      The array (``jax.make_array_from_single_device_arrays``).

    Raises:
      ValueError: a read of the wrong shape (naming both shapes).
    """
    by_index: dict[tuple, list] = {}
    for device, idx in sharding.addressable_devices_indices_map(shape).items():
        idx = tuple(slice(*s.indices(n)) for s, n in zip(idx, shape))
        by_index.setdefault(tuple((s.start, s.stop) for s in idx), [idx]).append(device)
    expected = sharding.shard_shape(shape)
    arrays = {}
    for idx, *devices in by_index.values():
        host = np.asarray(read(idx), dtype)
        if host.shape != expected:
            raise ValueError(f"shard {idx} of a {shape} weight was read as {host.shape}, expected {expected}")
        for device in devices:
            arrays[device] = jax.device_put(host, device)
        del host
    ordered = [arrays[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, ordered)


def _stacked_reader(readers: dict[str, Reader], sub: str, num_layers: int, dtype) -> Reader:
    """``read`` of the stacked leaf ``layers.<sub>`` (``[L, ...]``): one layer's slice at a time."""
    def read(idx: tuple) -> np.ndarray:
        layers = range(num_layers)[idx[0]]
        out = None
        for j, layer in enumerate(layers):
            part = readers[f"layers.{layer}.{sub}"](idx[1:])
            if out is None:
                out = np.empty((len(layers),) + part.shape, dtype)
            out[j] = part
        return out
    return read


def load_sharded(path_or_id: str | os.PathLike, mesh: jax.sharding.Mesh, *, dtype: str = "float32",
                 layout: Callable | None = None, on_leaf: Callable[[str, jax.Array], None] | None = None
                 ) -> tuple[LlamaConfig, dict]:
    """Loads a checkpoint like :func:`~fedhl_jax.model.load_pretrained`, each weight straight into its shards.

    Peak memory while loading: on each device, its shards of the leaves placed so far (the
    whole base divided over the ``model`` axis where the layout splits it; replicated leaves
    whole); on the host, one shard of one leaf (for a stacked leaf ``[L, ...]``, its ``L``
    layers' slices, read one layer at a time) plus, for GGUF, the dequantised blocks of one
    layer's slice.

    Args:
      path_or_id: what ``load_pretrained`` accepts: a Hugging Face folder or Hub id, or a GGUF
        file or a folder holding one.
      mesh: the devices (every process of a multi-process mesh reads only its own shards).
      dtype: ``"float32"`` or ``"bfloat16"``: parameter and compute dtype.
      layout: ``layout(shapes, mesh) -> shardings``, both trees shaped like the parameters
        (``shapes`` of ``jax.ShapeDtypeStruct``); default ``engine.base_shardings`` (the round's
        layout of the frozen base over the ``model`` axis).
      on_leaf: called as ``on_leaf(dotted_path, array)`` after each leaf is placed (progress,
        memory measurements).

    Returns:
      ``(cfg, params)``: the parameters of ``load_pretrained`` as global arrays laid out by ``layout``.

    Raises:
      As :func:`~fedhl_jax.model.load_pretrained` (the checks run from the headers before any
      weight is read; a NaN/Inf is named while its shard is read).
    """
    if layout is None:
        from fedhl_jax.engine import base_shardings as layout  # imported here: the engine pulls in the data stack
    with contextlib.ExitStack() as stack:
        if (gguf_file := _gguf_file(path_or_id)) is not None:
            cfg, readers = gguf_readers(gguf_file, dtype)
        else:
            cfg, index = checkpoint_index(path_or_id, dtype=dtype)
            readers = safetensors_readers(index, stack)
        np_dtype = _NP_DTYPES[cfg.dtype]
        shapes = jax.eval_shape(lambda: unflatten_params(
            cfg, {p: jnp.zeros(s, cfg.jnp_dtype) for p, s in param_shapes(cfg).items()}))
        shardings = layout(shapes, mesh)

        def load(key_path, shape, sharding):
            keys = [str(k.key) for k in key_path]
            path = ".".join(keys)
            read = (_stacked_reader(readers, ".".join(keys[1:]), cfg.num_layers, np_dtype) if keys[0] == "layers"
                    else readers[path])
            array = place_leaf(shape.shape, sharding, read, np_dtype)
            if on_leaf is not None:
                on_leaf(path, array)
            return array

        params = jax.tree_util.tree_map_with_path(load, shapes, shardings)
    return cfg, params
