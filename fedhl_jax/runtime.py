"""How the project's jitted functions are compiled: the CPU float32 matmul mode.

XLA's CPU backend (jaxlib 0.12) hands float32 dots, reductions and elementwise fusions to
YNNPACK by default. That is the fastest path for training on CPU, but it rounds more than XLA's
own kernels: on SmolLM2-135M-Instruct (30 layers) the float32 logits of a 46-token prompt are
1.9e-4 from transformers' float32 logits with YNNPACK and 5.3e-5 without it, while the argmax
and greedy continuations are the same (docs/model.md, "Parity with transformers").

Two modes, process-wide:

* ``"fast"`` (default): XLA's defaults.
* ``"accurate"``: YNNPACK fusions off (``xla_cpu_experimental_ynn_fusion_type=""``), for
  logits that match a float32 PyTorch reference to 1e-4. Measured on 2 CPU cores
  (docs/performance.md, "CPU float32 matmul modes"): SmolLM2 local training 154 against 190
  tokens/s, a held-out loss pass 1.20× the time, batched generation about as fast (1.01×).

The mode changes only CPU compilations; on GPU/TPU the option has no effect. Set it with
``set_cpu_matmul`` (the CLI does, from ``model.cpu_matmul``) or with the environment variable
``FEDHL_CPU_MATMUL`` before the first compilation. Functions wrapped by :func:`jit` read the
mode at call time and keep one compiled version per mode, so switching never reuses a
program compiled for the other mode.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable

import jax

CPU_MATMUL_MODES = ("fast", "accurate")
#: The XLA debug option (a repeated enum; empty = no YNNPACK fusion of any kind).
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


def _initial_mode() -> str:
    mode = os.environ.get("FEDHL_CPU_MATMUL", "fast")
    if mode not in CPU_MATMUL_MODES:
        raise ValueError(f"FEDHL_CPU_MATMUL must be one of {list(CPU_MATMUL_MODES)}, got {mode!r}")
    return mode


_MODE = _initial_mode()


def cpu_matmul() -> str:
    """The current process-wide CPU float32 matmul mode (``"fast"`` or ``"accurate"``)."""
    return _MODE


def set_cpu_matmul(mode: str) -> None:
    """Sets the process-wide CPU float32 matmul mode for functions compiled from now on.

    Args:
      mode: ``"fast"`` (XLA's defaults) or ``"accurate"`` (YNNPACK fusions off).

    Raises:
      ValueError: ``mode`` is not one of the two, named in the message.
    """
    global _MODE
    if mode not in CPU_MATMUL_MODES:
        raise ValueError(f"cpu_matmul must be one of {list(CPU_MATMUL_MODES)}, got {mode!r}")
    _MODE = mode


@functools.cache
def _accurate_options_supported() -> bool:
    """Whether this jaxlib's XLA knows the option (it is experimental; older ones do not)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={YNN_OPTION: ""}).lower(1.0).compile()
        return True
    except Exception as e:  # noqa: BLE001 - XLA rejects an unknown option with a runtime error
        warnings.warn(f"this jaxlib's XLA does not accept {YNN_OPTION} ({type(e).__name__}); "
                      "cpu_matmul='accurate' compiles with XLA's defaults", RuntimeWarning, stacklevel=3)
        return False


def compiler_options(mode: str | None = None) -> dict[str, Any]:
    """The ``jax.jit`` ``compiler_options`` of a CPU matmul mode (default: the current one)."""
    mode = _MODE if mode is None else mode
    if mode not in CPU_MATMUL_MODES:
        raise ValueError(f"cpu_matmul must be one of {list(CPU_MATMUL_MODES)}, got {mode!r}")
    if mode == "accurate" and _accurate_options_supported():
        return {YNN_OPTION: ""}
    return {}


class _ModeJit:
    """``jax.jit(fun, **jit_kwargs)``, built lazily, once per CPU matmul mode.

    Building lazily keeps module import free of backend initialisation (``jax.distributed``
    must come first in multi-process runs). Attributes (``lower``, ``eval_shape``,
    ``_cache_size``, ...) are those of the jitted function of the current mode.
    """

    def __init__(self, fun: Callable, mode: str | None, jit_kwargs: dict):
        functools.update_wrapper(self, fun)
        self._fun, self._mode, self._kwargs = fun, mode, jit_kwargs
        self._jitted: dict[str, Callable] = {}

    def _current(self) -> Callable:
        mode = self._mode or _MODE
        f = self._jitted.get(mode)
        if f is None:
            f = self._jitted[mode] = jax.jit(self._fun, compiler_options=compiler_options(mode) or None,
                                             **self._kwargs)
        return f

    def __call__(self, *args, **kwargs):
        return self._current()(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._current(), name)


def jit(fun: Callable | None = None, *, cpu_matmul: str | None = None, **jit_kwargs):
    """``jax.jit`` that compiles in a CPU matmul mode (default: the process-wide one at call time).

    Usable as ``jit(f, static_argnames=...)`` or as a decorator ``@jit(static_argnames=...)``.

    Args:
      fun: the function.
      cpu_matmul: ``"fast"``, ``"accurate"``, or ``None`` for the process-wide mode.
      **jit_kwargs: passed to ``jax.jit`` (``static_argnames``, ``donate_argnums``, ...).
    """
    if cpu_matmul is not None and cpu_matmul not in CPU_MATMUL_MODES:
        raise ValueError(f"cpu_matmul must be one of {list(CPU_MATMUL_MODES)}, got {cpu_matmul!r}")
    if fun is None:
        return lambda f: _ModeJit(f, cpu_matmul, jit_kwargs)
    return _ModeJit(fun, cpu_matmul, jit_kwargs)
