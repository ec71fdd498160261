"""fedhl_jax.runtime: the CPU float32 matmul mode of the project's jitted functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedhl_jax import runtime
from fedhl_jax.config import ModelConfig


@pytest.fixture(autouse=True)
def restore_mode():
    before = runtime.cpu_matmul()
    yield
    runtime.set_cpu_matmul(before)


def chain(a, b):
    return jnp.tanh(a @ b).sum()


def ynn_fusions(f, *args) -> int:
    """YNNPACK fusions in the compiled program (their backend config names the kind)."""
    return f.lower(*args).compile().as_text().count('"kind":"__ynn_fusion"')


ARGS = (jnp.ones((64, 256)), jnp.ones((256, 64)))
ON_CPU = jax.default_backend() == "cpu"


def test_modes_and_their_options():
    assert runtime.compiler_options("fast") == {}
    assert runtime.compiler_options("accurate") == {runtime.YNN_OPTION: ""}
    for bad in ("exact", "", None):
        with pytest.raises(ValueError, match=repr(bad)):
            runtime.set_cpu_matmul(bad)
    with pytest.raises(ValueError, match="'highest'"):
        runtime.jit(chain, cpu_matmul="highest")
    with pytest.raises(ValueError, match="'exact'"):
        ModelConfig(cpu_matmul="exact")


def test_environment_variable_sets_the_first_mode(monkeypatch):
    monkeypatch.setenv("FEDHL_CPU_MATMUL", "accurate")
    assert runtime._initial_mode() == "accurate"
    monkeypatch.setenv("FEDHL_CPU_MATMUL", "precise")
    with pytest.raises(ValueError, match="FEDHL_CPU_MATMUL.*'precise'"):
        runtime._initial_mode()


@pytest.mark.skipif(not ON_CPU, reason="YNNPACK fusions exist on the CPU backend only")
def test_accurate_mode_compiles_without_ynnpack_fusions():
    assert ynn_fusions(runtime.jit(chain, cpu_matmul="accurate"), *ARGS) == 0
    # XLA's default on this CPU hands this dot/reduction to YNNPACK; if a later jaxlib stops
    # doing so, the two modes coincide and the mode is moot, which this assertion reports.
    assert ynn_fusions(runtime.jit(chain, cpu_matmul="fast"), *ARGS) >= 1


@pytest.mark.skipif(not ON_CPU, reason="YNNPACK fusions exist on the CPU backend only")
def test_process_mode_is_read_at_call_time_with_one_program_per_mode():
    f = runtime.jit(chain)
    runtime.set_cpu_matmul("fast")
    y_fast = f(*ARGS)
    assert ynn_fusions(f, *ARGS) >= 1
    runtime.set_cpu_matmul("accurate")
    y_acc = f(*ARGS)
    assert ynn_fusions(f, *ARGS) == 0
    assert set(f._jitted) == {"fast", "accurate"}
    assert f._cache_size() == 1  # the accurate program's own cache: one compile
    np.testing.assert_allclose(float(y_fast), float(y_acc), rtol=1e-6)
    np.testing.assert_allclose(float(y_acc), np.tanh(np.full((64, 64), 256.0)).sum(), rtol=1e-6)


def test_decorator_form_keeps_static_arguments_and_the_wrapped_function():
    @runtime.jit(static_argnames=("n",))
    def power(x, n):
        """x to the n."""
        return x ** n

    assert power(jnp.float32(3.0), n=2) == 9.0
    assert power(jnp.float32(2.0), n=3) == 8.0
    assert power.__doc__ == "x to the n." and power.__name__ == "power"
    assert callable(power.__wrapped__)


def test_accurate_mode_is_closer_to_float64_on_a_long_float32_reduction_chain():
    """The point of the mode: XLA's own float32 kernels round no worse than the default ones.

    A product of 12 random 96x96 float32 matrices, each renormalised, against float64; the
    accurate mode's error must not exceed the fast mode's by more than float32 noise.
    """
    rng = np.random.default_rng(0)
    mats = rng.standard_normal((12, 96, 96)).astype(np.float32) / np.sqrt(96)

    def prod(ms):
        x = jnp.eye(96, dtype=ms.dtype)
        for i in range(ms.shape[0]):
            x = x @ ms[i]
            x = x / jnp.sqrt(jnp.mean(x * x))
        return x

    ref = np.eye(96)
    for m in mats.astype(np.float64):
        ref = ref @ m
        ref = ref / np.sqrt(np.mean(ref * ref))
    errs = {m: float(np.abs(np.asarray(runtime.jit(prod, cpu_matmul=m)(mats)) - ref).max())
            for m in runtime.CPU_MATMUL_MODES}
    assert errs["accurate"] < 1e-4, errs
    assert errs["accurate"] <= 2 * errs["fast"] + 1e-6, errs
