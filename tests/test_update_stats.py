"""update_stats: the global update's norm and its energy beyond rank k, against float64 NumPy."""

import numpy as np
import pytest

from fedhl_jax.update_stats import update_stats


def _adapters(seed, shapes):
    rng = np.random.default_rng(seed)
    return {f"m{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_float64_reference(seed):
    shapes = [(12, 8), (12, 8), (6, 10)]
    before, after = _adapters(seed, shapes), _adapters(seed + 100, shapes)
    out = update_stats(before, after, ranks=(2, 5))
    d = {k: after[k].astype(np.float64) - before[k].astype(np.float64) for k in after}
    total = sum(np.sum(v ** 2) for v in d.values())
    assert out["update_norm"] == pytest.approx(np.sqrt(total), rel=1e-6)
    assert out["global_norm"] == pytest.approx(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in after.values())),
                                               rel=1e-6)
    for k in (2, 5):
        tail = sum(np.sum(np.linalg.svd(v, compute_uv=False)[k:] ** 2) for v in d.values())
        assert out["energy_beyond"][k] == pytest.approx(tail / total, rel=1e-4)


def test_a_rank_k_update_has_no_energy_beyond_k():
    rng = np.random.default_rng(3)
    before = {"a": np.zeros((16, 16), np.float32)}
    after = {"a": (rng.normal(size=(16, 2)) @ rng.normal(size=(2, 16))).astype(np.float32)}
    out = update_stats(before, after, ranks=(2, 8, 16))
    assert out["energy_beyond"][2] < 1e-6 and out["energy_beyond"][16] == 0.0
    assert out["update_norm"] == pytest.approx(np.linalg.norm(after["a"].astype(np.float64)), rel=1e-6)


def test_no_update_is_zero_energy_and_mismatch_is_an_error():
    a = _adapters(0, [(4, 4)])
    out = update_stats(a, a)
    assert out["update_norm"] == 0.0 and out["energy_beyond"] == {2: 0.0, 8: 0.0, 16: 0.0}
    with pytest.raises(ValueError, match="same modules"):
        update_stats(a, _adapters(0, [(4, 5)]))
