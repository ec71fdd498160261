"""Shared test helpers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDHL_SHARED_DIR", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (needs ../shared)")
    return path


def np_truncate(G: np.ndarray, r: int) -> np.ndarray:
    """float64 NumPy oracle of the best rank-r approximation."""
    U, S, Vt = np.linalg.svd(np.asarray(G, np.float64), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r]


def np_tail(G: np.ndarray, r: int) -> float:
    S = np.linalg.svd(np.asarray(G, np.float64), compute_uv=False)
    return float(np.sum(S[r:] ** 2))
