"""How a message's named arrays travel: one contiguous buffer per dtype and a layout.

Flower 1.42 stores and moves every ``Array`` of an ``ArrayRecord`` as its own object: a SuperNode
pulls a message from the SuperLink object by object, and a ``ClientApp`` pulls it again from its
SuperNode. A LoRA message holds two factors per module (120 arrays for SmolLM2's q and v over 30
layers), so a round paid one round trip per array, twice each way; on a loaded 2-core machine
that was 8 to 12 s of a node's round (docs/deployment.md). Here the arrays of one dtype are
concatenated into one flat buffer (``packed/<dtype>``) and their names, dtypes and shapes go in
``layout`` (UTF-8 JSON as ``uint8``), so a message is a handful of objects whatever the number of
modules. The payload (``payload_bytes``) is unchanged: the same values, bit for bit.

Only NumPy and ``flwr.app`` are imported (a ``ClientApp`` that hands its rounds to a node worker
loads no JAX).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord

#: The names of the layout and of the packed buffers in an ``ArrayRecord``.
LAYOUT, PACKED = "layout", "packed/"


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named host arrays as an ``ArrayRecord`` of one flat buffer per dtype and a layout.

    Args:
      arrays: ``{name: array}`` of any shapes; names are kept in this order.

    Returns:
      ``ArrayRecord({"layout": [n] uint8, "packed/<dtype>": [total] <dtype>, ...})``.
    """
    layout, groups = [], {}
    for name, a in arrays.items():
        a = np.asarray(a)
        layout.append([name, a.dtype.str, list(a.shape)])
        groups.setdefault(a.dtype.str, []).append(a.reshape(-1))
    record = {LAYOUT: Array(np.frombuffer(json.dumps(layout).encode(), np.uint8).copy())}
    for dtype, parts in groups.items():
        record[PACKED + dtype] = Array(np.ascontiguousarray(np.concatenate(parts)))
    return ArrayRecord(record)


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The inverse of ``to_record``. A record without a layout is read as plain named arrays.

    Raises:
      ValueError: the layout and the buffers disagree (a missing buffer or a size that does not
        add up, named in the message).
    """
    if LAYOUT not in record:
        return {k: a.numpy() for k, a in record.items()}
    try:
        layout = json.loads(record[LAYOUT].numpy().tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"the message's array layout is not readable: {e}") from None
    buffers = {k[len(PACKED):]: a.numpy() for k, a in record.items() if k.startswith(PACKED)}
    offsets = dict.fromkeys(buffers, 0)
    out = {}
    for name, dtype, shape in layout:
        if dtype not in buffers:
            raise ValueError(f"the message has no {PACKED + dtype} buffer for {name}")
        size, start = int(np.prod(shape, dtype=np.int64)), offsets[dtype]
        if start + size > buffers[dtype].size:
            raise ValueError(f"the message's {PACKED + dtype} buffer holds {buffers[dtype].size} values; "
                             f"{name} {tuple(shape)} needs up to {start + size}")
        out[name] = buffers[dtype][start:start + size].reshape(shape)
        offsets[dtype] = start + size
    for dtype, used in offsets.items():
        if used != buffers[dtype].size:
            raise ValueError(f"the message's {PACKED + dtype} buffer holds {buffers[dtype].size} values; "
                             f"its layout uses {used}")
    return out
