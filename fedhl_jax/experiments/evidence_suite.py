"""A comparison of aggregation rules at tuned step sizes, with intervals (``docs/results_smollm2.md``).

The spec (``configs/results_smollm2.yaml``, ``suite: evidence``) is a base ``TrainConfig``, a table of
methods (dotted overrides), a learning-rate grid, and settings (cross-silo, cross-device, a second
dataset) each with its methods and seeds. The suite runs, in this order, each run cached in a JSONL
file (keyed by the digest of its resolved config, as in ``results_suite``) as soon as it finishes:

1. **Zero-shot**: the starting model's held-out and validation loss (and the generation metric).
2. **Tuning** (the first setting, ``tune.seed``). Two rules:

   * ``tune.search: grid``: every method at every learning rate of ``tune.grid`` (in the grid's
     order, all methods at one rate before the next), then, for a method whose best rate lies on an
     edge of what it has tried, the next rate beyond that edge (×2 or ÷2, at most ``tune.extend``
     times);
   * ``tune.search: bracket``: a walk on the ×2 ladder ``tune.ladder`` from ``tune.start``: the rate
     above the best one tried so far, then the rate below it, until the best rate's two neighbours
     on the ladder have both run (or the best is an end of the ladder). This assumes the
     validation loss is unimodal in log(lr) over the ladder; it costs 3 runs for a method whose
     best is the start (the grid rule: 4 or 5). Each pass runs every untuned method's next rate.

   The best rate is the one with the lowest *validation* loss (``data.validation_examples``
   training rows that no client holds): the held-out (test) rows never choose anything.
3. **Seeds**: the first setting's other seeds, each method at its own best rate (the tuning run at
   that rate is the run of ``tune.seed``: same config, same digest).
4. **Other settings**: their methods (``leaders``: the ``spec["leaders"]`` methods with the lowest
   tuned validation loss in the first setting; ``also``: methods run beside them) at the rate tuned
   in the first setting.
5. **Final generation**: the generation metric of the best method (lowest tuned validation loss),
   one pass, ``final_generation``'s overrides.

A run's record (``results_suite.run_cell``) holds the held-out loss after the last round with its
per-example losses (and the validation loss, in the tuning runs only: elsewhere it chooses nothing),
and per round the global update's norm and its energy beyond ranks 2, 8 and 16, so the page can pair
methods over seeds and examples (``stats``) and relate loss to step size.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from fedhl_jax.experiments import results_suite as R
from fedhl_jax.experiments import stats as S

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
    """The cache key of one run (``results_suite.config_digest``, memoised: the tuning rule asks often)."""
    return _digest(json.dumps(spec["base"], sort_keys=True), json.dumps(overrides(spec, setting, method, lr),
                                                                        sort_keys=True), seed)


@functools.lru_cache(maxsize=4096)
def _digest(base: str, ov: str, seed: int) -> str:
    return R.config_digest(json.loads(base), json.loads(ov), seed)


def tried(spec: dict, by_config: dict, method: str) -> dict[float, dict]:
    """``{lr: record}`` of the tuning runs of ``method`` that are in the cache (any rate)."""
    first, seed = setting_names(spec)[0], spec["tune"]["seed"]
    out = {}
    for lr in candidate_rates(spec):
        d = digest(spec, first, method, lr, seed)
        if d in by_config:
            out[lr] = by_config[d]
    return out


def _bracket(spec: dict) -> bool:
    mode = spec["tune"].get("search", "grid")
    if mode not in ("grid", "bracket"):
        raise ValueError(f"tune.search must be 'grid' or 'bracket', got {mode!r}")
    return mode == "bracket"


def _ladder(spec: dict) -> list[float]:
    ladder = sorted(float(x) for x in spec["tune"]["ladder"])
    start = float(spec["tune"]["start"])
    if start not in ladder:
        raise ValueError(f"tune.start={start!r} is not on tune.ladder={ladder}")
    return ladder


def candidate_rates(spec: dict) -> list[float]:
    """Every rate tuning may try: the ladder (``bracket``), or the grid and up to ``tune.extend``
    steps beyond each edge (``grid``)."""
    if _bracket(spec):
        return _ladder(spec)
    grid = [float(x) for x in spec["tune"]["grid"]]
    k = int(spec["tune"].get("extend", 0))
    lo, hi = min(grid), max(grid)
    return grid + [hi * 2 ** (i + 1) for i in range(k)] + [lo / 2 ** (i + 1) for i in range(k)]


def next_rate(spec: dict, runs: dict[float, dict]) -> float | None:
    """The next rate to try for a method given its finished tuning runs, or None when tuned.

    The grid first, in its order; then, while the best rate (lowest validation loss) is the largest
    (smallest) tried, the next one up (down), at most ``tune.extend`` steps beyond the grid.
    """
    if _bracket(spec):
        ladder, start = _ladder(spec), float(spec["tune"]["start"])
        if start not in runs:
            return start
        i = ladder.index(best_rate({lr: r for lr, r in runs.items() if lr in ladder}))
        for j in (i + 1, i - 1):  # up first
            if 0 <= j < len(ladder) and ladder[j] not in runs:
                return ladder[j]
        return None
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


def check_setting_methods(spec: dict, setting: str) -> tuple[str | list[str], list[str]]:
    """A setting's ``methods`` and ``also``, after checking that every method they name is in the spec."""
    st = spec["settings"][setting]
    ms, also = st.get("methods", "all"), list(st.get("also") or [])
    if isinstance(ms, str) and ms not in ("all", "leaders"):
        raise ValueError(f"settings.{setting}.methods must be 'all', 'leaders' or a list of methods, got {ms!r}")
    unknown = [m for m in (also if isinstance(ms, str) else list(ms) + also) if m not in spec["methods"]]
    if unknown:
        raise ValueError(f"settings.{setting} names method(s) {unknown} that are not in methods: {list(spec['methods'])}")
    return ms, also


def setting_methods(spec: dict, setting: str, by_config: dict) -> list[str] | None:
    """The methods a setting runs: ``methods`` (``all``, ``leaders`` or a list), then those of ``also``
    that it does not name (for example a reference method that is not among the leaders). None while
    the leaders are not known."""
    ms, also = check_setting_methods(spec, setting)
    if ms == "all":
        base = list(spec["methods"])
    elif ms == "leaders":
        base = leaders(spec, by_config)
        if base is None:
            return None
    else:
        base = list(ms)
    return base + [m for m in also if m not in base]


class Run(NamedTuple):
    """One run the suite can start now (``ready``).

    Attributes:
      rid: its id in the cache (``run_id``, ``ZERO_SHOT`` or the final generation's).
      overrides: its dotted overrides of the spec's base.
      seed: its seed.
      digest: its cache key.
      stage: 0 zero-shot, 1 tuning, 2 the settings' seeds, 3 the final generation pass.
      validation: whether it computes the validation loss (where the loss chooses: the tuning runs).
    """

    rid: str
    overrides: dict
    seed: int
    digest: str
    stage: int
    validation: bool = True


def ready(spec: dict, by_config: dict) -> list[Run]:
    """The runs whose configs are known given the cached records, in the suite's order (module docstring).

    Tuning offers each untuned method's next rate (with ``tune.search: grid``, only the runs at the grid
    rate of the current column); the settings offer every seed of every method whose rate is tuned (and
    of a ``leaders`` setting only once the leaders are known), cached runs included (a ``rerun`` may ask
    for them again); the final generation pass comes once every method is tuned. A run whose inputs
    are not known yet (a method's next rate before its current one has finished) is not offered, so
    any runs offered together are independent of one another.

    Args:
      spec: the suite spec.
      by_config: ``{digest: record}`` of the finished runs.

    Returns:
      Zero-shot and tuning runs not in ``by_config``; the settings' runs (cached or not); the final
      generation pass when not cached. Stages in increasing order.
    """
    base, out = spec["base"], []
    first, tune_seed = setting_names(spec)[0], spec["tune"]["seed"]
    zs = "zero_shot-" + R.config_digest(base, {}, tune_seed)
    if spec.get("zero_shot", True) and zs not in by_config:
        out.append(Run(ZERO_SHOT, dict(spec.get("zero_shot_overrides") or {}), tune_seed, zs, 0))
    # 1. tuning: every untuned method's next rate (round-robin, so that an interrupted suite has whole grid columns)
    todo = [(m, next_rate(spec, tried(spec, by_config, m))) for m in spec["methods"]]
    todo = [(m, lr) for m, lr in todo if lr is not None]
    lr_now = todo[0][1] if todo and not _bracket(spec) and todo[0][1] in spec["tune"]["grid"] else None
    out += [Run(run_id(first, m, lr), overrides(spec, first, m, lr), tune_seed, digest(spec, first, m, lr, tune_seed), 1)
            for m, lr in todo if lr_now is None or lr == lr_now]
    # 2. the settings' seeds at each method's own rate
    best = tuned(spec, by_config)
    for setting in setting_names(spec):
        methods = setting_methods(spec, setting, by_config)
        for seed in spec["settings"][setting]["seeds"] if methods is not None else ():
            out += [Run(run_id(setting, m, best[m]), overrides(spec, setting, m, best[m]), seed,
                        digest(spec, setting, m, best[m], seed), 2, validation=(setting, seed) == (first, tune_seed))
                    for m in methods if best.get(m) is not None]
    # 3. one generation pass of the best method
    fg = final_generation(spec, by_config)
    if fg is not None and fg[2] not in by_config:
        out.append(Run(fg[0], fg[1], tune_seed, fg[2], 3, validation=False))
    return out


def execute(run: Run, base: dict) -> dict:
    """Trains (or, for the zero-shot run, evaluates) one run and returns its record.

    The validation loss is computed only where it chooses (``run.validation``): ``eval.validation`` is
    not part of the digest, since it trains nothing.
    """
    if run.stage == 0:
        from fedhl_jax.experiments.methods_suite import zero_shot_cell

        return zero_shot_cell(R.merge_overrides(base, run.overrides))
    ov = run.overrides if run.validation else dict(run.overrides, **{"eval.validation": False})
    return R.run_cell(base, ov, run.seed)


def run_suite(spec: dict, cache: Path, *, only: str | None = None, log: Callable = print,
              max_runs: int | None = None, rerun: str | None = None, workers: int = 1,
              runner: Callable[[Run, dict], dict] | None = None) -> dict:
    """Runs what is not yet in ``cache``, in the module docstring's order (see there).

    With one worker, the runs train in this process one after another: each tuning pass (every untuned
    method's next rate) as a whole, then the settings' seeds (setting, seed, method), then the final
    generation pass. With ``workers`` > 1, up to that many runs train at once in worker processes
    (``workers.pool``, each pinned to its own cores), started in the same order as soon as their configs
    are known (``ready``): a method's seeds start once its own tuning has finished. Records are
    appended to the cache by this process, each as its run finishes, so an interrupted suite loses only
    the runs in flight. Runs are independent, so the records do not depend on the order; the float
    rounding of a run may depend on the cores it had (its digest does not).

    Args:
      spec: the suite spec.
      cache: the JSONL run cache (appended to as each run finishes).
      only: run only runs whose id contains this text.
      max_runs: stop after this many new runs (None: until done).
      rerun: run once more the cached runs whose ``"<id> seed <seed>"`` contains this text (e.g.
        ``"codealpaca:method=fedit_r16:lr=0.008 seed 0"``, or ``"seed 0"`` with ``only``), to record
        what an older record lacks. The new record is appended and supersedes the old one; a run the
        cache already holds twice is not rerun again, so an interrupted rerun resumes. Superseded
        records still count toward the compute.
      workers: runs trained at once (1: in this process).
      runner: ``(run, base) -> record`` (default ``execute``); with ``workers`` > 1 a module-level
        function, sent to the workers.

    Returns:
      ``{"by_config": {digest: rec}, "tuned": {method: lr}, "leaders": [...] | None,
      "superseded": [(id, seed, digest, rec)] (records replaced by a rerun),
      "seconds": sum of every cached run's wall time, superseded ones included}``.

    Raises:
      ValueError: ``workers`` < 1 (naming it) or a setting naming an unknown method, before any run.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers!r}")
    for setting in setting_names(spec):  # before any run
        check_setting_methods(spec, setting)
    rows = R.read_cache(cache)
    by_config = {row["config"]: row["rec"] for row in rows}  # the last record of a config wins
    count = Counter(row["config"] for row in rows)
    superseded = [(row["id"], row["seed"], row["config"], row["rec"]) for row in rows
                  if row["rec"] is not by_config[row["config"]]]  # every record but a config's last
    base = spec["base"]
    done = [0]
    t0 = time.perf_counter()

    def again(r: Run) -> bool:
        return (rerun is not None and r.stage != 0 and r.digest in by_config and count.get(r.digest, 0) == 1
                and rerun in f"{r.rid} seed {r.seed}")

    def wanted() -> list[Run]:
        return [r for r in ready(spec, by_config) if (r.digest not in by_config or again(r))
                and (only is None or only in r.rid)]

    def finish(r: Run, rec: dict) -> None:
        if r.digest in by_config:  # a rerun
            superseded.append((r.rid, r.seed, r.digest, by_config[r.digest]))
            count[r.digest] = 2
        by_config[r.digest] = rec
        R.append_cache(cache, r.rid, r.seed, r.digest, rec)
        done[0] += 1
        if r.stage == 0:
            log(f"zero-shot: test {rec.get('eval_loss', math.nan):.4f} ({rec['seconds']:.0f} s)", flush=True)
        else:
            log(f"{r.rid} seed {r.seed}: test {rec['final_eval_loss']:.4f}, "
                f"val {rec.get('final_val_loss', math.nan):.4f} ({rec['seconds']:.0f} s; "
                f"{time.perf_counter() - t0:.0f} s so far)", flush=True)

    def budget(in_flight: int = 0) -> bool:  # may another run start (``in_flight`` runs not yet finished)?
        return max_runs is None or done[0] + in_flight < max_runs

    if workers == 1:
        run = runner or execute
        while budget():
            todo = wanted()
            if not todo:
                break
            for r in [r for r in todo if r.stage == todo[0].stage]:  # a whole pass of one stage
                if not budget():
                    break
                finish(r, run(r, base))
        return _summary(spec, by_config, superseded)
    _run_parallel(runner or execute, base, workers, wanted, finish, budget)
    return _summary(spec, by_config, superseded)


def _run_parallel(runner: Callable, base: dict, workers: int, wanted: Callable[[], list[Run]],
                  finish: Callable[[Run, dict], None], may_start: Callable[[int], bool]) -> None:
    """Keeps up to ``workers`` runs of ``wanted()`` in flight in a worker pool; ``finish`` records each as
    it ends. A failed run stops new starts; the runs in flight still finish and are recorded before the
    error is raised."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from fedhl_jax.experiments.workers import pool

    flight, error = {}, None
    with pool(workers) as ex:
        while True:
            if error is None:
                busy = {r.digest for r in flight.values()}
                for r in wanted():
                    if len(flight) >= workers or not may_start(len(flight)):
                        break
                    if r.digest not in busy:
                        flight[ex.submit(runner, r, base)] = r
                        busy.add(r.digest)
            if not flight:
                break
            finished, _ = wait(flight, return_when=FIRST_COMPLETED)
            for f in finished:
                r = flight.pop(f)
                try:
                    rec = f.result()
                except BaseException as e:  # noqa: BLE001 - re-raised once the others are recorded
                    error = error or e
                    continue
                finish(r, rec)
    if error is not None:
        raise error


def final_generation(spec: dict, by_config: dict) -> tuple[str, dict, str] | None:
    """``(run id, overrides, digest)`` of the final generation pass (the best tuned method), or None
    before every method is tuned or without ``final_generation`` in the spec."""
    lead, fg = leaders(spec, by_config), spec.get("final_generation")
    if not fg or not lead:
        return None
    m, first, seed = lead[0], setting_names(spec)[0], spec["tune"]["seed"]
    lr = tuned(spec, by_config)[m]
    ov = dict(overrides(spec, first, m, lr), **fg["overrides"])
    return f"{FINAL_GENERATION}:method={m}:lr={lr:g}", ov, R.config_digest(spec["base"], ov, seed)


def _summary(spec: dict, by_config: dict, superseded: list | None = None) -> dict:
    fg, superseded = final_generation(spec, by_config), superseded or []
    return {"by_config": by_config, "tuned": tuned(spec, by_config), "leaders": leaders(spec, by_config),
            "final_generation": [(fg[0], by_config[fg[2]])] if fg and fg[2] in by_config else [],
            "superseded": superseded,
            "seconds": sum(r.get("seconds", 0.0) for r in by_config.values())
            + sum(r.get("seconds", 0.0) for *_, r in superseded)}


# --------------------------------------------------------------------------- report


def runs_of(spec: dict, by_config: dict, setting: str, method: str, lr: float | None) -> dict[int, dict]:
    """``{seed: record}`` of a method's cached runs in a setting at rate ``lr``."""
    if lr is None:
        return {}
    seeds = spec["settings"][setting]["seeds"]
    out = {s: by_config.get(digest(spec, setting, method, lr, s)) for s in seeds}
    return {s: r for s, r in out.items() if r is not None}


def example_losses(runs: dict[int, dict], seeds: list[int], key: str = "eval_loss_examples") -> np.ndarray | None:
    """``[S, E]`` per-example losses of ``seeds`` (None when a seed is missing)."""
    if not seeds or any(s not in runs or key not in runs[s] for s in seeds):
        return None
    return np.asarray([runs[s][key] for s in seeds], np.float64)


def compare(a: dict[int, dict], b: dict[int, dict], key: str = "eval_loss_examples") -> dict | None:
    """Paired comparison ``a − b`` over their common seeds: bootstrap interval (seeds × examples),
    paired t-test over seeds (with ≥ 2 seeds) and the decision; None without a common seed."""
    seeds = sorted(set(a) & set(b))
    la, lb = example_losses(a, seeds, key), example_losses(b, seeds, key)
    if la is None or lb is None:
        return None
    ok = np.isfinite(la).all(0) & np.isfinite(lb).all(0)  # examples without a target token drop out
    la, lb = la[:, ok], lb[:, ok]
    ci = S.paired_bootstrap_ci(la, lb)
    t = S.paired_t_test(la, lb) if len(seeds) >= 2 else None
    return {"ci": ci, "t": t, "seeds": len(seeds), "examples": int(ok.sum())}


def at_norm(points: list[tuple[float, np.ndarray]], g: float) -> np.ndarray:
    """Per-example losses interpolated at final ``‖G‖_F = g``, linearly in ``log ‖G‖_F``.

    Args:
      points: ``(‖G‖_F, per-example losses [E])`` of one method at the rates it ran (one seed).
      g: the norm, inside ``[min, max]`` of the points' norms.

    Returns:
      ``[E]`` float64: ``(1 − w)·L_i + w·L_j`` between the two rates whose norms bracket ``g``, with
      ``w = (log g − log g_i) / (log g_j − log g_i)`` (each example's loss on the same line as the mean's).

    Raises:
      ValueError: fewer than two points, or ``g`` outside their range (naming it and the range).
    """
    pts = sorted(points, key=lambda p: p[0])
    if len(pts) < 2:
        raise ValueError(f"interpolation needs the runs of at least two rates, got {len(pts)}")
    lo, hi = pts[0][0], pts[-1][0]
    if not lo <= g <= hi:
        raise ValueError(f"‖G‖_F = {g!r} is outside the range the runs reached, [{lo!r}, {hi!r}]")
    j = next(k for k in range(1, len(pts)) if g <= pts[k][0])
    (gi, li), (gj, lj) = pts[j - 1], pts[j]
    w = 0.0 if gj == gi else (math.log(g) - math.log(gi)) / (math.log(gj) - math.log(gi))
    return (1.0 - w) * np.asarray(li, np.float64) + w * np.asarray(lj, np.float64)


def answer_mean(rec: dict) -> float:
    """A run's held-out loss as the page defines it: the mean over answers of each answer's mean token
    loss (answers without a target token left out); the pooled ``final_eval_loss`` for a record without
    per-answer losses."""
    if "eval_loss_examples" not in rec:
        return float(rec["final_eval_loss"])
    x = np.asarray(rec["eval_loss_examples"], np.float64)
    return float(x[np.isfinite(x)].mean())


def mean_ci(runs: dict[int, dict], key: str = "eval_loss_examples") -> S.Interval | None:
    """The 95% bootstrap interval (seeds × examples) of a method's mean per-example loss."""
    seeds = sorted(runs)
    la = example_losses(runs, seeds, key)
    if la is None:
        return None
    la = la[:, np.isfinite(la).all(0)]
    return S.paired_bootstrap_ci(la, np.zeros_like(la))


def with_key(runs: dict[int, dict], key: str) -> dict[int, dict]:
    """The seeds of ``runs`` whose record holds ``key`` (runs cached before a field was stored lack it)."""
    return {s: r for s, r in runs.items() if key in r}


def generation_section(spec: dict, by_config: dict, best: dict, metric: str = "rouge_l") -> list[str]:
    """The page's generation-metric tables: each method's mean score per setting (over every seed that
    ran), its 95% interval over the seeds that stored per-answer scores, and the named pairs' paired
    differences with intervals and p (empty when no run of the suite scored ``metric``).

    Args:
      spec, by_config, best: the suite spec, the cache by config digest and the tuned rates.
      metric: the generation metric (``rouge_l`` or ``exact_match``: higher is better).

    Returns:
      Markdown lines.
    """
    key, per = f"eval_{metric}", f"eval_{metric}_examples"
    label = metric.replace("_", " ").replace("rouge l", "ROUGE-L")
    rows, pairs = [], []
    for s in setting_names(spec):
        runs = {m: runs_of(spec, by_config, s, m, best.get(m)) for m in spec["methods"]}
        runs = {m: with_key(rs, key) for m, rs in runs.items()}
        if not any(runs.values()):
            continue
        for m, rs in runs.items():
            if not rs:
                continue
            seeds = ", ".join(f"seed {sd}: {rs[sd][key]:.3f}" for sd in sorted(rs))
            k = with_key(rs, per)
            ci = mean_ci(k, per)
            n = len(next(iter(k.values()))[per]) if k else 0
            rows.append(f"| {s} | {m} | {np.mean([r[key] for r in rs.values()]):.3f} ({seeds}) | "
                        + (f"{_fmt_ci(ci)} ({len(k)} seed{'s' if len(k) != 1 else ''} × {n})" if ci else "–")
                        + " |")
        for a, b in spec.get("pairs", []):
            ra, rb = with_key(runs.get(a, {}), per), with_key(runs.get(b, {}), per)
            if ra and rb:
                pairs.append("| " + " | ".join([s, f"{a} − {b}"] + _fmt_cmp(compare(ra, rb, per), (a, b))) + " |")
    if not rows:
        return []
    L = ["", f"## Generation quality: {label}", "",
         f"{label} of greedy answers (higher is better), each method at its tuned rate: the mean over every seed "
         f"that ran (per-seed values in brackets) and the 95% bootstrap interval over the seeds whose runs stored "
         f"per-answer scores (runs cached before per-answer scores were stored give only their mean).", "",
         f"| setting | method | {label}: mean (per seed) | 95% interval (seeds × answers) |", "|---|---|---|---|"]
    L += rows
    if pairs:
        L += ["", f"Paired differences of {label} (a − b; positive: a scores higher; over the seeds both stored "
              "per answer):", "",
              "| setting | a − b | difference [95% interval] | p (paired t) | seeds × answers | decision |",
              "|---|---|---|---|---|---|"]
        L += pairs
    return L


def em_count(rec: dict) -> tuple[int, int]:
    """``(questions answered exactly, questions asked)`` of a record with ``eval_exact_match``: from the
    per-question scores when stored, else from the mean and ``eval_generated``."""
    if "eval_exact_match_examples" in rec:
        per = rec["eval_exact_match_examples"]
        return int(round(sum(per))), len(per)
    n = int(rec.get("eval_generated") or 0)
    if n < 1:
        raise ValueError(f"an exact-match record without eval_generated: {sorted(rec)}")
    return int(round(rec["eval_exact_match"] * n)), n


def _has_count(rec: dict) -> bool:
    return "eval_exact_match_examples" in rec or bool(rec.get("eval_generated"))


def _fmt_em(rec: dict) -> str:
    if not _has_count(rec):
        return f"{rec['eval_exact_match']:.3f}"  # a record that kept neither the scores nor the count
    k, n = em_count(rec)
    return f"{_fmt_ci(S.wilson_ci(k, n))} ({k} of {n} test questions; Wilson 95% interval)"


def em_versus(rec: dict, base: dict) -> str:
    """Exact match of ``rec`` minus ``base`` (the zero-shot model) with its 95% interval: the paired
    bootstrap over questions when both stored per-question scores, else Newcombe's interval for
    independent proportions (conservative for runs scored on the same questions)."""
    if "eval_exact_match_examples" in rec and "eval_exact_match_examples" in base:
        ci, how = S.paired_bootstrap_ci(rec["eval_exact_match_examples"], base["eval_exact_match_examples"]), \
            "paired bootstrap over questions"
    else:
        ci, how = S.newcombe_diff_ci(*em_count(rec), *em_count(base)), \
            "Newcombe's interval for independent proportions, conservative here: one run kept only its count"
    verdict = "not decided" if S.decision(ci) == S.NOT_DECIDED else ("higher" if ci.low > 0 else "lower")
    return f"against the zero-shot model {_fmt_ci(ci, sign=True)} ({how}): {verdict}"


def _fmt_ci(ci: S.Interval | None, digits: int = 3, sign: bool = False) -> str:
    if ci is None:
        return "–"
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(ci.mean)} [{f.format(ci.low)}, {f.format(ci.high)}]"


def _fmt_marked(ci: S.Interval) -> str:
    """A signed interval, marked • when it excludes 0 (the one-seed tables)."""
    return f"{_fmt_ci(ci, sign=True)}{'' if S.decision(ci) == S.NOT_DECIDED else ' •'}"


def _fmt_cmp(c: dict | None, names: tuple[str, str]) -> list[str]:
    if c is None:
        return ["–", "–", "–", "not run"]
    p = f"{c['t'].p:.3g}" if c["t"] is not None else "– (1 seed)"
    return [_fmt_ci(c["ci"], sign=True), p, f"{c['seeds']} × {c['examples']}", S.decision(c["ci"], names)]


def fewer_seeds(spec: dict, by_config: dict, best: dict, n: int = 2) -> list[dict]:
    """The named pairs decided again over each setting's first ``n`` seeds only: what a design with ``n``
    seeds per setting would have concluded from the same runs.

    Args:
      spec, by_config, best: the suite spec, the cache by config digest and the tuned rates.
      n: the seeds kept (the first ``n`` of the setting's ``seeds``).

    Returns:
      ``{"setting", "pair", "all", "first"}`` per named pair that both methods ran in a setting with
      more than ``n`` seeds: ``all`` and ``first`` are ``compare``'s results over all the common seeds and
      over the first ``n`` of them (pairs without ``n`` common first seeds are left out).
    """
    out = []
    for s in setting_names(spec):
        keep = list(spec["settings"][s]["seeds"])[:n]
        if len(spec["settings"][s]["seeds"]) <= n:
            continue
        for a, b in spec.get("pairs", []):
            ra, rb = runs_of(spec, by_config, s, a, best.get(a)), runs_of(spec, by_config, s, b, best.get(b))
            if not all(k in ra and k in rb for k in keep):
                continue
            full = compare(ra, rb)
            first = compare({k: ra[k] for k in keep}, {k: rb[k] for k in keep})
            if full is not None and first is not None:
                out.append({"setting": s, "pair": (a, b), "all": full, "first": first})
    return out


def fewer_seeds_section(spec: dict, by_config: dict, best: dict, n: int = 2) -> list[str]:
    """The page's table of ``fewer_seeds``: each named pair's decision over all seeds and over the first
    ``n``, and how many decisions change (empty when no setting has more than ``n`` seeds)."""
    rows = fewer_seeds(spec, by_config, best, n)
    if not rows:
        return []
    changed = [r for r in rows if S.decision(r["all"]["ci"], r["pair"]) != S.decision(r["first"]["ci"], r["pair"])]
    L = ["", f"### With {n} seeds instead", "",
         f"The same pairs over the first {n} seeds of each setting only, from the same runs: what a design with {n} "
         f"seeds per setting would have decided. {len(changed)} of {len(rows)} decisions change.", "",
         f"| setting | a − b | all seeds | decision | first {n} seeds | decision |", "|---|---|---|---|---|---|"]
    for r in rows:
        a, f = r["all"], r["first"]
        da, df = S.decision(a["ci"], r["pair"]), S.decision(f["ci"], r["pair"])
        L.append(f"| {r['setting']} | {r['pair'][0]} − {r['pair'][1]} | {_fmt_ci(a['ci'], sign=True)} ({a['seeds']}) "
                 f"| {da} | {_fmt_ci(f['ci'], sign=True)} | {'**' + df + '**' if df != da else df} |")
    return L


def _lr(lr: float | None) -> str:
    return "–" if lr is None else f"{lr:g}"


def _spread(by_config: dict) -> str:
    """How the runs' wall times spread: a machine shared with other jobs stretches some of them."""
    secs = sorted(r["seconds"] for r in by_config.values() if "seconds" in r)
    if len(secs) < 2:
        return ""
    return (f"; the median run took {np.median(secs):.0f} s, the longest {secs[-1]:.0f} s: a run that shares "
            "the machine with other jobs takes longer")


def render(spec: dict, res: dict, out_dir: Path, *, stem: str) -> str:
    """Writes the plots ``out_dir/figures/<stem>_*.png`` and returns the page's Markdown (from the cache alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_config, best, lead = res["by_config"], res["tuned"], res["leaders"]
    names, methods = setting_names(spec), list(spec["methods"])
    first, tune_seed = names[0], spec["tune"]["seed"]
    n_tune = sum(len(tried(spec, by_config, m)) for m in methods)
    zs = by_config.get("zero_shot-" + R.config_digest(spec["base"], {}, tune_seed)) or {}
    L = [f"# {spec.get('title', 'Results')}", "",
         f"**{res['seconds'] / 3600:.1f} h of compute** so far ({len(by_config)} cached runs"
         + (f" and {len(res.get('superseded', []))} earlier record(s) they superseded" if res.get("superseded") else "")
         + f": the sum of their wall times on {spec.get('machine', 'this machine')}{_spread(by_config)}). Regenerate: `fedhl-results --config configs/{stem}.yaml` "
         f"(finished runs are cached in `docs/results/{stem}.jsonl` as they finish and reused; the page is "
         "regenerated from the cache alone, and an interrupted suite resumes where it stopped).", "",
         spec.get("setup", "").strip(), "",
         "How to read the intervals: the loss of a method is the mean over held-out answers of each answer's mean "
         "token loss; an interval is a 95% two-level paired bootstrap over seeds and answers "
         "(`fedhl_jax/experiments/stats.py`); p is the two-sided paired t-test over seeds. A difference whose "
         "interval holds 0 is **not decided**.", ""]
    if res.get("superseded"):
        L += [f"Reruns (`--rerun`): {len(res['superseded'])} cached run(s) ran again with the same config to store "
              "what the first record lacked; the page uses the rerun. Held-out loss, first run → rerun: "
              + "; ".join(f"{rid} seed {sd}: {answer_mean(old):.4f} → {answer_mean(by_config[d]):.4f}"
                          for rid, sd, d, old in res["superseded"]) + ".", ""]
    # ---- the table a practitioner reads first
    L += ["## Which method, per setting", "",
          "Held-out loss (lower is better) with its 95% interval, each method at its own learning rate (chosen on "
          "the validation rows in the first setting, seed "
          f"{tune_seed}), and the megabytes sent per round (down + up, all clients, float32).", ""]
    head = ["method", "tuned lr"] + [spec["settings"][s].get("short", s) for s in names] + ["MB per round"]
    L += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in methods:
        row = [m, _lr(best.get(m))]
        mb = None
        for s in names:
            runs = runs_of(spec, by_config, s, m, best.get(m))
            ci = mean_ci(runs)
            row.append(f"{_fmt_ci(ci)} ({len(runs)} seed{'s' if len(runs) != 1 else ''})" if ci else "–")
            if runs and mb is None:
                r0 = next(iter(runs.values()))
                mb = r0["bytes"] / len(r0["train_loss"]) / 2**20
        row.append(f"{mb:.1f}" if mb is not None else "–")
        L.append("| " + " | ".join(row) + " |")
    L.append("")
    if zs:
        L += [f"Zero-shot model: held-out loss {zs.get('eval_loss', float('nan')):.3f} (pooled over tokens)"
              + (f", exact match {_fmt_em(zs)}" if "eval_exact_match" in zs else "") + "."]
    for rid, rec in res.get("final_generation", []):
        metric = next((k for k in rec if k in ("eval_exact_match", "eval_rouge_l")), None)
        if metric == "eval_exact_match":
            L.append(f"Final generation pass ({rid.split(':', 1)[1]}, seed {tune_seed}): exact match {_fmt_em(rec)}"
                     + (f"; {em_versus(rec, zs)}" if "eval_exact_match" in zs and _has_count(zs) and _has_count(rec)
                        else "") + ".")
        elif metric:
            L.append(f"Final generation pass ({rid.split(':', 1)[1]}, seed {tune_seed}): "
                     f"{metric[5:].replace('_', ' ')} {rec[metric]:.3f}.")
    # ---- named comparisons
    L += ["", "## Named comparisons", "",
          "Paired differences of held-out loss (a − b, negative: a is better), each method at its own tuned rate.", "",
          "| setting | a − b | difference [95% interval] | p (paired t) | seeds × answers | decision |",
          "|---|---|---|---|---|---|"]
    for s in names:
        for a, b in spec.get("pairs", []):
            ra, rb = runs_of(spec, by_config, s, a, best.get(a)), runs_of(spec, by_config, s, b, best.get(b))
            if not ra or not rb:
                continue
            L.append("| " + " | ".join([s, f"{a} − {b}"] + _fmt_cmp(compare(ra, rb), (a, b))) + " |")
    L += fewer_seeds_section(spec, by_config, best)
    L += generation_section(spec, by_config, best)
    # ---- step size
    L += ["", "## Step size: every method at every learning rate it was tuned on", "",
          (f"Tuning rule: a walk on the ×2 ladder {', '.join(f'{x:g}' for x in _ladder(spec))} from "
           f"{float(spec['tune']['start']):g}, one step up, then down, until the best rate's two neighbours ran "
           "(it assumes the validation loss is unimodal in log lr). " if _bracket(spec) else
           f"Tuning rule: the grid {', '.join(f'{float(x):g}' for x in spec['tune']['grid'])}, extended by up to "
           f"{int(spec['tune'].get('extend', 0))} ×2 step(s) beyond an edge that holds the best rate. ") +
          f"Setting {first}, seed {tune_seed}. Validation loss (pooled over tokens; it chose the rate, **bold**), "
          "held-out loss (the mean over answers, as everywhere on this page), the norm of the final global adapter "
          "‖G‖_F, the mean update norm ‖ΔG‖_F per round, and the share of round 1's update energy beyond rank 2 "
          "and of the mean round's beyond rank 8 and 16.", "",
          "| method | lr | validation loss | held-out loss | ‖G‖_F | mean ‖ΔG‖_F | beyond r2 (round 1) | "
          "beyond r8 | beyond r16 |", "|---|---|---|---|---|---|---|---|---|"]
    curves, points = {}, {}  # per method: (‖G‖_F, held-out loss, lr) and (‖G‖_F, per-answer losses)
    for m in methods:
        runs = tried(spec, by_config, m)
        for lr in sorted(runs):
            r = runs[lr]
            eb = r.get("energy_beyond", {})
            v = f"{r.get('final_val_loss', float('nan')):.4f}"
            L.append("| " + " | ".join([
                m, f"{lr:g}", f"**{v}**" if lr == best.get(m) else v, f"{answer_mean(r):.4f}",
                f"{r['global_norm'][-1]:.3f}" if r.get("global_norm") else "–",
                f"{np.mean(r['update_norm']):.3f}" if r.get("update_norm") else "–",
                f"{eb['2'][0]:.3f}" if eb.get("2") else "–",
                f"{np.mean(eb['8']):.3f}" if eb.get("8") else "–",
                f"{np.mean(eb['16']):.3f}" if eb.get("16") else "–"]) + " |")
            if r.get("global_norm"):
                curves.setdefault(m, []).append((r["global_norm"][-1], answer_mean(r), lr))
                if "eval_loss_examples" in r:
                    points.setdefault(m, []).append((r["global_norm"][-1], r["eval_loss_examples"]))
    # the named pairs at one common learning rate (seed ``tune_seed``: intervals over answers only)
    rates = sorted({lr for m in spec["methods"] for lr in tried(spec, by_config, m)})
    rows = []
    for a, b in spec.get("pairs", []):
        ta, tb = tried(spec, by_config, a), tried(spec, by_config, b)
        cells = []
        for lr in sorted(rates):
            c = compare({tune_seed: ta[lr]}, {tune_seed: tb[lr]}) if lr in ta and lr in tb else None
            cells.append(_fmt_marked(c["ci"]) if c else "–")
        rows.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    if rows:
        L += ["", f"The named pairs at the same learning rate (held-out loss, seed {tune_seed}; 95% bootstrap over "
              "answers only, so they say nothing about seed-to-seed variation; •: the interval excludes 0):", "",
              "| a − b | " + " | ".join(f"lr {lr:g}" for lr in sorted(rates)) + " |", "|---" * (len(rates) + 1) + "|"]
        L += rows
    # matched update norm: each method's held-out loss interpolated at common ‖G‖ (log-linear in ‖G‖)
    common = [c for c in curves.values() if len(c) >= 2]
    if len(common) >= 2:
        lo = max(min(g for g, _, _ in c) for c in common)
        hi = min(max(g for g, _, _ in c) for c in common)
        if lo < hi:
            grid = np.exp(np.linspace(np.log(lo), np.log(hi), 3))
            L += ["", "At matched update size: each method's held-out loss interpolated (linearly in log ‖G‖_F, "
                  "between the rates it ran) at the same final ‖G‖_F, within the range every method reached:", "",
                  "| method | " + " | ".join(f"‖G‖_F = {g:.3f}" for g in grid) + " |", "|---" * (len(grid) + 1) + "|"]
            for m, c in curves.items():
                if len(c) < 2:
                    continue
                c = sorted(c)
                y = np.interp(np.log(grid), np.log([g for g, _, _ in c]), [v for _, v, _ in c])
                L.append(f"| {m} | " + " | ".join(f"{v:.4f}" for v in y) + " |")
            # the named pairs at matched norm, per answer (seed ``tune_seed``: intervals over answers only)
            rows = []
            for a, b in spec.get("pairs", []):
                if len(points.get(a, [])) < 2 or len(points.get(b, [])) < 2:
                    continue
                cells = []
                for g in grid:
                    la, lb = at_norm(points[a], g), at_norm(points[b], g)
                    ok = np.isfinite(la) & np.isfinite(lb)
                    cells.append(_fmt_marked(S.paired_bootstrap_ci(la[ok], lb[ok])))
                rows.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
            if rows:
                L += ["", f"The named pairs at matched ‖G‖_F: each answer's loss interpolated as above (seed "
                      f"{tune_seed}; 95% bootstrap over answers only, so the intervals leave out seed-to-seed "
                      "variation and the error of the interpolation; •: the interval excludes 0):", "",
                      "| a − b | " + " | ".join(f"‖G‖_F = {g:.3f}" for g in grid) + " |", "|---" * (len(grid) + 1) + "|"]
                L += rows
    # ---- plots
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m, c in curves.items():
            c = sorted(c)
            ax.plot([g for g, _, _ in c], [v for _, v, _ in c], marker="o", ms=3, label=m)
        ax.set_xscale("log")
        R.save_plot(fig, ax, out_dir / "figures" / f"{stem}_loss_vs_norm.png",
                    xlabel="‖G‖_F after the last round (the rates of the grid)", ylabel="held-out loss",
                    title=f"{spec.get('short_title', '')}: loss against update size ({first}, seed {tune_seed})",
                    fontsize=9)
        L += ["", f"![loss against update size](figures/{stem}_loss_vs_norm.png)"]
    if lead is not None:
        extra = {name: [m for m in setting_methods(spec, name, by_config) if m not in lead]
                 for name, st in spec["settings"].items() if name != first and st.get("methods", "all") == "leaders"}
        also = [f"{', '.join(ms)} in {name}" for name, ms in extra.items() if ms]
        L += ["", f"Leading methods (lowest tuned validation loss, {first}): {', '.join(lead)}; they run the other "
              "settings at the rate tuned here" + (f", and beside them {'; '.join(also)}." if also else ".")]
    L += ["", R.DISCUSSION_BEGIN, R.DISCUSSION_END, ""]
    return "\n".join(L)
