"""The wire format of a message's arrays (``fedhl_jax.flower.wire``): one buffer per dtype."""

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, Message, RecordDict  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402

from fedhl_jax.flower.node import pack, unpack  # noqa: E402
from fedhl_jax.flower.strategy import payload_bytes, wire_bytes  # noqa: E402
from fedhl_jax.flower.wire import LAYOUT, PACKED, from_record, to_record  # noqa: E402
from tests.test_deploy import task_identity  # noqa: E402,F401 (a fixture)


def factors(modules: int, rank: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    B = {f"layers.{i}.q_proj": rng.standard_normal((12, 8)).astype(np.float32) for i in range(modules)}
    A = {f"layers.{i}.q_proj": rng.standard_normal((8, 10)).astype(np.float32) for i in range(modules)}
    return pack(B, A, rank)


def test_round_trip_is_bit_exact_and_keeps_names_order_and_dtypes():
    arrays = factors(5)
    arrays["base_delta/x"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    arrays["steps"] = np.array([1, 2, 3], np.int32)
    arrays["empty"] = np.zeros((0, 4), np.float32)
    record = to_record(arrays)
    assert sorted(record) == sorted([LAYOUT, PACKED + "<f4", PACKED + "<i4"])
    got = from_record(record)
    assert list(got) == list(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
        np.testing.assert_array_equal(got[k], a, err_msg=k)
    # the factors come back at the client's rank and unpack as before
    shapes = {f"layers.{i}.q_proj": (12, 10) for i in range(5)}
    B, A = unpack(got, shapes, 8, 3)
    assert B["layers.0.q_proj"].shape == (12, 8) and not B["layers.0.q_proj"][:, 3:].any()


def test_a_record_of_plain_named_arrays_is_still_read():
    arrays = factors(2)
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    got = from_record(record)
    assert sorted(got) == sorted(arrays)
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k])


def test_a_message_is_a_few_objects_whatever_the_number_of_modules(task_identity):
    """Flower moves each object of a message's tree with its own round trip: 120 factor arrays
    were 120 arrays and their chunks; packed, a message holds two arrays (layout and buffer)."""

    def objects(arrays):
        return get_all_nested_objects(Message(RecordDict({"arrays": to_record(arrays)}), 5, "train"))

    few, many = objects(factors(2)), objects(factors(60))
    kinds = [type(o).__name__ for o in many.values()]
    assert kinds.count("Array") == 2 and len(many) == len(few) <= 8
    plain = get_all_nested_objects(Message(RecordDict({"arrays": ArrayRecord(
        {k: Array(v) for k, v in factors(60).items()})}), 5, "train"))
    assert len(plain) > 120
    # the payload is unchanged and the serialised message is smaller than the plain one
    msg = Message(RecordDict({"arrays": to_record(factors(60))}), 5, "train")
    plain_msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in factors(60).items()})}), 5,
                        "train")
    assert payload_bytes(from_record(msg.content["arrays"])) == payload_bytes(factors(60))
    assert payload_bytes(factors(60)) < wire_bytes(msg) < wire_bytes(plain_msg)


@pytest.mark.parametrize("damage,match", [
    ("drop_buffer", r"no packed/<f4 buffer for B/layers.0.q_proj"),
    ("short_buffer", r"packed/<f4 buffer holds 10 values; B/layers.0.q_proj \(12, 3\) needs up to 36"),
    ("long_buffer", r"packed/<f4 buffer holds \d+ values; its layout uses \d+"),
    ("bad_layout", r"the message's array layout is not readable"),
])
def test_a_damaged_record_is_a_clear_error(damage, match):
    record = to_record(factors(2))
    buffer = record[PACKED + "<f4"].numpy()
    parts = {k: a for k, a in record.items()}
    if damage == "drop_buffer":
        del parts[PACKED + "<f4"]
    elif damage == "short_buffer":
        parts[PACKED + "<f4"] = Array(buffer[:10].copy())
    elif damage == "long_buffer":
        parts[PACKED + "<f4"] = Array(np.concatenate([buffer, np.zeros(3, np.float32)]))
    else:
        parts[LAYOUT] = Array(np.frombuffer(b"\xff{not json", np.uint8).copy())
    with pytest.raises(ValueError, match=match):
        from_record(ArrayRecord(parts))
