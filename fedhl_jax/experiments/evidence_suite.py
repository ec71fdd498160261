"""A comparison of aggregation rules at tuned step sizes, with intervals (``docs/results_smollm2.md``).

The spec (``configs/results_smollm2.yaml``, ``suite: evidence``) is a base ``TrainConfig``, a table of
methods (dotted overrides), a learning-rate grid, and settings (cross-silo, cross-device, a second
dataset) each with its methods and seeds. The suite runs, in this order, each run cached in a JSONL
file (keyed by the digest of its resolved config, as in ``results_suite``) as soon as it finishes:

1. **Zero-shot**: the starting model's held-out and validation loss (and the generation metric).
2. **Tuning** (the first setting, ``tune.seed``): every method at every learning rate of
   ``tune.grid`` (in the grid's order, all methods at one rate before the next), then, for a method
   whose best rate lies on an edge of what it has tried, the next rate beyond that edge (×2 or ÷2,
   at most ``tune.extend`` times). The best rate is the one with the lowest *validation* loss
   (``data.validation_examples`` training rows that no client holds): the held-out (test) rows
   never choose anything.
3. **Seeds**: the first setting's other seeds, each method at its own best rate (the tuning run at
   that rate is the run of ``tune.seed``: same config, same digest).
4. **Other settings**: their methods (``leaders``: the ``spec["leaders"]`` methods with the lowest
   tuned validation loss in the first setting) at the rate tuned in the first setting.
5. **Final generation**: the generation metric of the best method (lowest tuned validation loss),
   one pass, ``final_generation``'s overrides.

A run's record (``results_suite.run_cell``) holds the held-out and validation loss after the last
round with their per-example losses, and per round the global update's norm and its energy beyond
ranks 2, 8 and 16, so the page can pair methods over seeds and examples (``stats``) and relate loss
to step size.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

from fedhl_jax.experiments import results_suite as R

ZERO_SHOT = "zero_shot"
FINAL_GENERATION = "final_generation"


def setting_names(spec: dict) -> list[str]:
    """The settings in spec order; the first is the tuning setting."""
    return list(spec["settings"])


def run_id(setting: str, method: str, lr: float) -> str:
    return f"{setting}:method={method}:lr={lr:g}"


def overrides(spec: dict, setting: str, method: str, lr: float) -> dict:
    """The dotted overrides of one run: the method's, then the setting's, then the learning rate."""
    return dict(spec["methods"][method], **(spec["settings"][setting].get("overrides") or {}), **{"optim.lr": lr})


def digest(spec: dict, setting: str, method: str, lr: float, seed: int) -> str:
    return R.config_digest(spec["base"], overrides(spec, setting, method, lr), seed)


def tried(spec: dict, by_config: dict, method: str) -> dict[float, dict]:
    """``{lr: record}`` of the tuning runs of ``method`` that are in the cache (any rate)."""
    first, seed = setting_names(spec)[0], spec["tune"]["seed"]
    out = {}
    for lr in candidate_rates(spec):
        d = digest(spec, first, method, lr, seed)
        if d in by_config:
            out[lr] = by_config[d]
    return out


def candidate_rates(spec: dict) -> list[float]:
    """Every rate tuning may try: the grid and up to ``tune.extend`` steps beyond each edge."""
    grid = [float(x) for x in spec["tune"]["grid"]]
    k = int(spec["tune"].get("extend", 0))
    lo, hi = min(grid), max(grid)
    return grid + [hi * 2 ** (i + 1) for i in range(k)] + [lo / 2 ** (i + 1) for i in range(k)]


def next_rate(spec: dict, runs: dict[float, dict]) -> float | None:
    """The next rate to try for a method given its finished tuning runs, or None when tuned.

    The grid first, in its order; then, while the best rate (lowest validation loss) is the largest
    (smallest) tried, the next one up (down), at most ``tune.extend`` steps beyond the grid.
    """
    grid = [float(x) for x in spec["tune"]["grid"]]
    for lr in grid:
        if lr not in runs:
            return lr
    best = best_rate(runs)
    k = int(spec["tune"].get("extend", 0))
    lo, hi = min(runs), max(runs)
    if best == hi and hi * 2 <= max(grid) * 2 ** k * (1 + 1e-9):
        return hi * 2
    if best == lo and lo / 2 >= min(grid) / 2 ** k * (1 - 1e-9):
        return lo / 2
    return None


def _val(rec: dict) -> float:
    v = rec.get("final_val_loss", math.nan)
    return v if math.isfinite(v) else math.inf  # a diverged run is never the best


def best_rate(runs: dict[float, dict]) -> float | None:
    """The rate of lowest final validation loss (ties: the smaller rate), or None without runs."""
    return min(runs, key=lambda lr: (_val(runs[lr]), lr)) if runs else None


def tuned(spec: dict, by_config: dict) -> dict[str, float | None]:
    """``{method: its best rate}`` for every method whose tuning is complete (None otherwise)."""
    out = {}
    for m in spec["methods"]:
        runs = tried(spec, by_config, m)
        out[m] = best_rate(runs) if runs and next_rate(spec, runs) is None else None
    return out


def leaders(spec: dict, by_config: dict) -> list[str] | None:
    """The ``spec["leaders"]`` methods of lowest tuned validation loss (None until all are tuned)."""
    best = tuned(spec, by_config)
    if any(v is None for v in best.values()):
        return None
    first, seed = setting_names(spec)[0], spec["tune"]["seed"]
    val = {m: _val(by_config[digest(spec, first, m, lr, seed)]) for m, lr in best.items()}
    return sorted(val, key=lambda m: (val[m], m))[: int(spec.get("leaders", len(val)))]


def setting_methods(spec: dict, setting: str, by_config: dict) -> list[str] | None:
    ms = spec["settings"][setting].get("methods", "all")
    if ms == "all":
        return list(spec["methods"])
    if ms == "leaders":
        return leaders(spec, by_config)
    return list(ms)


def run_suite(spec: dict, cache: Path, *, only: str | None = None, log: Callable = print,
              max_runs: int | None = None) -> dict:
    """Runs what is not yet in ``cache``, in the module docstring's order (see there).

    Args:
      spec: the suite spec.
      cache: the JSONL run cache (appended to as each run finishes).
      only: run only runs whose id contains this text.
      max_runs: stop after this many new runs (None: until done).

    Returns:
      ``{"by_config": {digest: rec}, "tuned": {method: lr}, "leaders": [...] | None,
      "seconds": sum of the cached runs' wall times}``.
    """
    by_config = {row["config"]: row["rec"] for row in R.read_cache(cache)}
    base = spec["base"]
    first, tune_seed = setting_names(spec)[0], spec["tune"]["seed"]
    done = [0]
    t0 = time.perf_counter()

    def run(rid: str, ov: dict, seed: int, d: str) -> bool:
        if d in by_config or (only is not None and only not in rid):
            return True
        if max_runs is not None and done[0] >= max_runs:
            return False
        rec = R.run_cell(base, ov, seed)
        by_config[d] = rec
        R.append_cache(cache, rid, seed, d, rec)
        done[0] += 1
        log(f"{rid} seed {seed}: test {rec['final_eval_loss']:.4f}, val {rec.get('final_val_loss', math.nan):.4f} "
            f"({rec['seconds']:.0f} s; {time.perf_counter() - t0:.0f} s so far)", flush=True)
        return True

    zs = "zero_shot-" + R.config_digest(base, {}, tune_seed)
    if spec.get("zero_shot", True) and zs not in by_config and (only is None or only in ZERO_SHOT):
        from fedhl_jax.experiments.methods_suite import zero_shot_cell

        rec = zero_shot_cell(R.merge_overrides(base, spec.get("zero_shot_overrides") or {}))
        by_config[zs] = rec
        R.append_cache(cache, ZERO_SHOT, tune_seed, zs, rec)
        log(f"zero-shot: test {rec.get('eval_loss', math.nan):.4f} ({rec['seconds']:.0f} s)", flush=True)
    # 2. tuning, round-robin over methods so that an interrupted suite has whole grid columns
    while True:
        todo = [(m, next_rate(spec, tried(spec, by_config, m))) for m in spec["methods"]]
        todo = [(m, lr) for m, lr in todo if lr is not None]
        if not todo:
            break
        lr_now = todo[0][1] if todo[0][1] in spec["tune"]["grid"] else None
        progressed = False
        for m, lr in todo:
            if lr_now is not None and lr != lr_now:
                continue
            if not run(run_id(first, m, lr), overrides(spec, first, m, lr), tune_seed,
                       digest(spec, first, m, lr, tune_seed)):
                return _summary(spec, by_config)
            progressed = progressed or digest(spec, first, m, lr, tune_seed) in by_config
        if not progressed:  # everything left is filtered out by ``only``
            break
    best = tuned(spec, by_config)
    # 3.-4. the settings' seeds at each method's own rate
    for setting in setting_names(spec):
        methods = setting_methods(spec, setting, by_config)
        if methods is None:
            continue
        for seed in spec["settings"][setting]["seeds"]:
            for m in methods:
                if best.get(m) is None:
                    continue
                if not run(run_id(setting, m, best[m]), overrides(spec, setting, m, best[m]), seed,
                           digest(spec, setting, m, best[m], seed)):
                    return _summary(spec, by_config)
    # 5. one generation pass of the best method
    fg = spec.get("final_generation")
    lead = leaders(spec, by_config)
    if fg and lead:
        m = lead[0]
        ov = dict(overrides(spec, first, m, best[m]), **fg["overrides"])
        run(f"{FINAL_GENERATION}:method={m}:lr={best[m]:g}", ov, tune_seed, R.config_digest(base, ov, tune_seed))
    return _summary(spec, by_config)


def _summary(spec: dict, by_config: dict) -> dict:
    return {"by_config": by_config, "tuned": tuned(spec, by_config), "leaders": leaders(spec, by_config),
            "seconds": sum(r.get("seconds", 0.0) for r in by_config.values())}
