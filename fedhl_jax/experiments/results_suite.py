"""The comparison suite behind ``docs/results.md`` (``bin/results.py``).

Cells are defined in ``configs/results.yaml``: a base ``TrainConfig`` plus dotted overrides per
dataset, rank-heterogeneity level, method, partition and ablation. Each (cell, seed) runs in this
process through ``Simulation`` and its outcome is appended to a JSONL cache, so an interrupted
suite continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from omegaconf import OmegaConf

from fedhl_jax.config import MeshConfig, TrainConfig, from_dict
from fedhl_jax.data.registry import dataset_spec
from fedhl_jax.driver import drive_rounds
from fedhl_jax.simulation import Simulation
from fedhl_jax.update_stats import update_stats


def merge_overrides(base: dict, overrides: dict) -> dict:
    """``base`` (a config as a dict) with dotted ``overrides`` (``{"fed.rounds": 2}``) merged in."""
    conf = OmegaConf.merge(OmegaConf.create(base),
                           OmegaConf.from_dotlist([f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    return OmegaConf.to_container(conf)


def cells(spec: dict, quick: bool) -> list[dict]:
    """Expands the suite into cells ``{"section", "id", "labels", "overrides"}``."""
    out = []
    qk = spec.get("quick", {})
    datasets = spec["datasets"] if not quick else {k: v for k, v in spec["datasets"].items() if k == "gsm8k"}
    methods = spec["methods"]
    rounds = {"fed.rounds": qk["rounds"]} if quick else {}

    def add(section, labels, *parts):
        ov = {}
        for p in parts:
            ov.update(p)
        ov.update(rounds)  # quick mode: few rounds everywhere
        cid = section + ":" + "/".join(f"{k}={v}" for k, v in labels.items())
        out.append({"section": section, "id": cid, "labels": labels, "overrides": ov})

    for ds, ds_ov in datasets.items():
        for level, lv_ov in spec["heterogeneity"].items():
            for m, m_ov in methods.items():
                if m.startswith("fedit"):
                    continue
                add("main", {"dataset": ds, "ranks": level, "method": m}, ds_ov, lv_ov, m_ov)
        for m, m_ov in methods.items():
            if m.startswith("fedit"):
                add("main", {"dataset": ds, "ranks": "homogeneous", "method": m}, ds_ov, m_ov)
    uniform = spec["heterogeneity"]["uniform"]
    for part, p_ov in spec["partitions"].items():
        for m in spec["partition_methods"]:
            add("partition", {"partition": part, "method": m}, uniform, p_ov, methods[m])
    for m in spec["cross_device_methods"]:
        add("cross_device", {"method": m}, uniform, methods[m], spec["cross_device"])
    ablations = spec["ablations"] if not quick else {k: spec["ablations"][k] for k in qk.get("ablations", [])}
    for name, a_ov in ablations.items():
        add("ablation", {"variant": name, "method": "fedhl"}, uniform, methods["fedhl"], a_ov)
    for name, ms in (spec.get("ablation_methods", {}) if not quick else {}).items():
        for m in ms:  # controls: the same variant for another method
            add("ablation", {"variant": name, "method": m}, uniform, methods[m], spec["ablations"][name])
    return out


def run_cell(base: dict, overrides: dict, seed: int, log: Callable = lambda *_: None) -> dict:
    """Trains one (cell, seed) through the run driver's loop (``driver.drive_rounds``, the in-process
    executor) and returns its curves and final metrics.

    The held-out loss (and the validation loss, with ``data.validation_examples``) after every
    ``eval.every``-th round and the last (``eval_rounds``: which, 1-based); per-example losses of the
    last evaluation with ``eval.per_example``; per round, the global update's norm and its energy
    beyond ranks 2, 8 and 16 (``update_stats``)."""
    data = merge_overrides(base, dict(overrides, seed=seed))
    gen = data.get("eval", {}).get("generate_examples", 0)  # generation only once, at the end
    cfg = from_dict(TrainConfig, data)
    t0 = time.perf_counter()
    sim = Simulation(cfg, log=log)
    rec = {"eval_loss": [], "eval_rounds": [], "train_loss": [], "p": [], "ranks": [], "trunc_error": [],
           "bytes": 0, "update_norm": [], "global_norm": [], "energy_beyond": {}}
    every, rounds = cfg.eval.every, cfg.fed.rounds
    host = lambda delta: {k: np.asarray(v) for k, v in delta.items()}  # the round donates the state's buffers
    last = {"delta": host(sim.global_delta(sim.init_state())), "eval": {}}

    def record(r):
        m = r.metrics
        rec["train_loss"].append(m["train_loss"])
        rec["p"].append(np.asarray(m["p"]).tolist())
        rec["ranks"].append(np.asarray(m["ranks"]).tolist())
        if "trunc_error" in m:
            rec["trunc_error"].append(np.asarray(m["trunc_error"]).tolist())
        rec["bytes"] += m["bytes_down"] + m["bytes_up"]
        delta = sim.global_delta(r.state)
        u = update_stats(last["delta"], delta)
        last["delta"] = host(delta)
        rec["update_norm"].append(u["update_norm"])
        rec["global_norm"].append(u["global_norm"])
        for k, v in u["energy_beyond"].items():
            rec["energy_beyond"].setdefault(str(k), []).append(v)
        if (r.t + 1) % every == 0 or r.t + 1 == rounds:
            ev = sim.evaluate(r.state, r.t, generate=False)
            last["eval"] = ev
            rec["eval_loss"].append(ev["eval_loss"])
            rec["eval_rounds"].append(r.t + 1)
            if "eval_val_loss" in ev:
                rec.setdefault("val_loss", []).append(ev["eval_val_loss"])

    state = drive_rounds(sim, sim.init_state(), range(rounds), [record])
    if gen:
        g = sim.evaluator.generation(sim.global_delta(state), n=gen)
        rec.update({k: v for k, v in g.items() if k not in ("eval_sample", "eval_generated")})
    rec["final_eval_loss"] = rec["eval_loss"][-1]
    if "val_loss" in rec:
        rec["final_val_loss"] = rec["val_loss"][-1]
    for key, name in (("eval_loss_examples", "eval_loss_examples"), ("eval_val_loss_examples", "val_loss_examples")):
        if key in last["eval"]:
            rec[name] = [round(float(x), 6) for x in last["eval"][key]]
    rec["seconds"] = time.perf_counter() - t0
    jax.clear_caches()
    return rec


# Options added after cached results were made, with the value that leaves those runs unchanged
# (prompt_format "auto" is the Alpaca template for stories260K, which has no chat template). At
# these values they stay out of the digest, so the caches keep their keys.
_LATER_DEFAULTS = {("data", "prompt_format"): "auto", ("eval", "loss_examples"): None,
                   ("eval", "generate_every"): None, ("eval", "zero_shot"): False,
                   ("eval", "generate_batch_size"): None, ("model", "cpu_matmul"): "fast",
                   ("fed", "options", "beta_cap"): None, ("data", "validation_examples"): 0,
                   ("eval", "per_example"): False, ("model", "kind"): "llama", ("model", "factory"): None,
                   ("eval", "length_bucket"): 64,  # bit-identical to the full width (tests/test_metrics.py)
                   ("optim", "length_bucket"): 0}  # 32, the default, trains to float rounding only, but ten rounds
                   # of AdamW can move a final loss by 0.002 (docs/performance.md): a different run
_LATER_SECTIONS = {"mesh": MeshConfig()}
_NOT_IN_DIGEST = (("eval", "validation"),)  # what a run reports besides its results, not what it trains


def config_digest(base: dict, overrides: dict, seed: int) -> str:
    """A digest of the cell's fully resolved ``TrainConfig`` (code defaults included).

    A changed config, or a changed default, reruns the cell instead of reusing a stale result. Changes
    to the numerics of the code itself are not seen: delete the cache after those.
    """
    cfg = dataclasses.asdict(from_dict(TrainConfig, merge_overrides(base, dict(overrides, seed=seed))))
    for (*path, key), default in _LATER_DEFAULTS.items():  # options added later, at values that
        node = functools.reduce(lambda d, k: d.get(k, {}), path, cfg)  # reproduce the older runs exactly
        if node.get(key, default) == default:
            node.pop(key, None)
    for *path, key in _NOT_IN_DIGEST:
        functools.reduce(lambda d, k: d.get(k, {}), path, cfg).pop(key, None)
    for section, default in _LATER_SECTIONS.items():  # whole sections added later, likewise
        if cfg.get(section) == dataclasses.asdict(default):
            cfg.pop(section)
    blob = json.dumps(cfg, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def read_cache(cache: Path) -> list[dict]:
    """The rows ``{"id", "seed", "config", "rec"}`` of a JSONL results cache (none when it is missing);
    a torn last line from an interrupted run is skipped."""
    rows = []
    if cache.exists():
        for line in cache.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def append_cache(cache: Path, cid: str, seed: int, digest: str, rec: dict) -> None:
    """Appends one finished run to a JSONL results cache."""
    with open(cache, "a") as f:
        f.write(json.dumps({"id": cid, "seed": seed, "config": digest, "rec": rec}) + "\n")


def run_suite(spec: dict, cache: Path, *, quick: bool, only: str | None = None, log: Callable = print) -> dict:
    """Runs every (cell, seed) not yet in ``cache`` (only cells whose id contains ``only``, if given).

    Cells whose merged configs are identical (e.g. the Dirichlet row of the partition section and the
    main table's Fed-GSM8K uniform cell) share one run: the cache is keyed by a digest of the config.

    Returns:
      ``{cell_id: {"cell", "runs": {seed: rec}}}`` for every cell with at least one finished run.
    """
    seeds = spec.get("quick", {}).get("seeds", [0]) if quick else spec["seeds"]
    todo = [(c, s) for c in cells(spec, quick) for s in seeds]
    digests = {(c["id"], s): config_digest(spec["base"], c["overrides"], s) for c, s in todo}
    by_config, legacy = {}, {}  # config digest -> rec; (id, seed) -> digest of rows without one
    for row in read_cache(cache):
        key = (row["id"], row["seed"])
        if "config" not in row:  # written before digests were stored: taken as its cell's current config
            if key in digests:
                legacy[key] = digests[key]
                by_config[digests[key]] = row["rec"]
            continue
        by_config[row["config"]] = row["rec"]
        if key in legacy and legacy[key] != row["config"]:
            by_config.pop(legacy.pop(key), None)  # a later row of the same cell supersedes the old one
    results = {}
    t0 = time.perf_counter()
    for i, (cell, seed) in enumerate(todo):
        d = digests[(cell["id"], seed)]
        if d not in by_config and only is not None and only not in cell["id"]:
            continue
        if d not in by_config:
            rec = run_cell(spec["base"], cell["overrides"], seed)
            by_config[d] = rec
            append_cache(cache, cell["id"], seed, d, rec)
            log(f"[{i + 1}/{len(todo)}] {cell['id']} seed {seed}: eval loss {rec['final_eval_loss']:.4f} "
                f"({rec['seconds']:.1f} s; {time.perf_counter() - t0:.0f} s so far)", flush=True)
        results.setdefault(cell["id"], {"cell": cell, "runs": {}})["runs"][seed] = by_config[d]
    return results


# --------------------------------------------------------------------------- report


DISCUSSION_BEGIN, DISCUSSION_END = "<!-- discussion: kept when the page is regenerated -->", "<!-- /discussion -->"


def keep_discussion(old_page: str | None, new_page: str) -> str:
    """Carries the hand-written discussion block of ``old_page`` over into the regenerated ``new_page``.

    The block is everything between ``DISCUSSION_BEGIN`` and ``DISCUSSION_END``; the tables around it
    are regenerated. A page without the block gets an empty one before its plots.
    """
    block = f"{DISCUSSION_BEGIN}\n{DISCUSSION_END}"
    if old_page and DISCUSSION_BEGIN in old_page and DISCUSSION_END in old_page:
        i, j = old_page.index(DISCUSSION_BEGIN), old_page.index(DISCUSSION_END) + len(DISCUSSION_END)
        block = old_page[i:j]
    return new_page.replace(f"{DISCUSSION_BEGIN}\n{DISCUSSION_END}", block)


def stats(results, cid, key="final_eval_loss"):
    runs = results.get(cid, {}).get("runs", {})
    vals = [r[key] for r in runs.values() if r.get(key) is not None]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals)), len(vals)


def fmt(st, digits=3, single: str = "") -> str:
    """``mean ± std`` of ``stats``' triple; ``single`` is appended to a one-seed mean."""
    if st is None:
        return "–"
    m, s, n = st
    return f"{m:.{digits}f} ± {s:.{digits}f}" if n > 1 else f"{m:.{digits}f}{single}"


def paired(results, cid, ref, key="final_eval_loss"):
    """Per-seed differences ``cid − ref`` over the seeds both cells have run, or None."""
    a, b = results.get(cid, {}).get("runs", {}), results.get(ref, {}).get("runs", {})
    d = [a[s][key] - b[s][key] for s in sorted(set(a) & set(b))]
    return np.asarray(d) if d else None


def fmt_paired(d, digits=3, *, single: str = "", wins: bool = False) -> str:
    """``mean ± std`` of paired differences (``*``: |mean| > std); ``single`` is appended to a
    one-seed difference; ``wins``: how many seeds are below 0 (``(k/n below)``)."""
    if d is None:
        return "–"
    if len(d) == 1:
        return f"{d[0]:+.{digits}f}{single}"
    m, s = float(d.mean()), float(d.std())
    out = f"{m:+.{digits}f} ± {s:.{digits}f}" + (" *" if abs(m) > s else "")
    return out + (f" ({int(np.sum(d < 0))}/{len(d)} below)" if wins else "")


def save_plot(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, fontsize: int = 10) -> None:
    """Labels, grid and legend of a one-axis line plot, then writes it to ``path`` (110 dpi) and closes it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mb_per_round(results, cid) -> str:
    """Mean bytes communicated per round (down + up, all clients) of a cell's runs, in MB."""
    runs = results.get(cid, {}).get("runs", {}).values()
    return f"{np.mean([r['bytes'] / len(r['eval_loss']) for r in runs]) / 2**20:.2f}" if runs else "–"


def _beyond_spread(a, b) -> bool:
    """The two means differ by more than the sum of their seed standard deviations."""
    return a is not None and b is not None and a[2] > 1 and b[2] > 1 and abs(a[0] - b[0]) > a[1] + b[1]


def _style(ax, title: str, ylabel: str | None = None) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("round")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def render(spec: dict, results: dict, out_dir: Path, *, quick: bool, seconds: float) -> str:
    """Writes the plots into ``out_dir/figures`` and returns the Markdown of ``docs/results.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {}
    for cid, r in results.items():
        by[(r["cell"]["section"], tuple(sorted(r["cell"]["labels"].items())))] = cid

    def cid_of(section, **labels):
        return by.get((section, tuple(sorted(labels.items()))))

    datasets = [d for d in spec["datasets"] if any(cid_of("main", dataset=d, ranks="uniform", method="fedhl") == c
                                                   for c in results)]
    levels = list(spec["heterogeneity"])
    methods = [m for m in spec["methods"] if not m.startswith("fedit")]
    seeds = spec.get("quick", {}).get("seeds") if quick else spec["seeds"]
    total = len(cells(spec, quick))
    complete = sum(len(r["runs"]) == len(seeds) for r in results.values())
    base_opt = spec["base"]["optim"]
    rounds = spec["quick"]["rounds"] if quick else spec["base"]["fed"]["rounds"]
    L = ["# Results", "",
         f"Mode: **{'quick (one seed, few rounds): indicative only' if quick else 'full'}**; seeds {seeds}; "
         f"{complete} of {total} cells have all their runs ({seconds / 60:.0f} min of compute; `–`: not run yet). "
         f"Regenerate: `python bin/results.py{' --quick' if quick else ''}` (cells from `configs/results.yaml`; "
         "finished runs are cached and reused).", "",
         "Base model: stories260K-hf (real pretrained weights, TinyStories) with LoRA on q and v; 10 clients, all "
         f"participating; Dirichlet(0.3) label skew; AdamW, {base_opt['local_steps']} local steps of batch "
         f"{base_opt['batch_size']}, {rounds} rounds. Fed-Dolly is the "
         "151-row subset in `../shared` (IID; about 90 training and 23 held-out rows fit seq 512, so batch 2 and "
         "4 rounds): small, so its cells are indicative; the same config runs on the full 15k-row set. All in "
         "`configs/results.yaml`. Metric: held-out loss of the global model on "
         "response tokens (lower is better); `*` marks a method whose mean differs from FedHL's by more than the sum "
         "of the two seed standard deviations.", ""]
    L += ["## Main table: held-out loss (methods × datasets × rank heterogeneity)", ""]
    head = "| method | " + " | ".join(f"{d} / {lv}" for d in datasets for lv in levels) + " |"
    L += [head, "|---" * (len(datasets) * len(levels) + 1) + "|"]
    for m in methods:
        cells_ = []
        for d in datasets:
            for lv in levels:
                st = stats(results, cid_of("main", dataset=d, ranks=lv, method=m))
                ref = stats(results, cid_of("main", dataset=d, ranks=lv, method="fedhl"))
                cells_.append(fmt(st) + (" *" if m != "fedhl" and _beyond_spread(st, ref) else ""))
        L.append(f"| {m} | " + " | ".join(cells_) + " |")
    for m in [m for m in spec["methods"] if m.startswith("fedit")]:
        cells_ = []
        for d in datasets:
            st = stats(results, cid_of("main", dataset=d, ranks="homogeneous", method=m))
            cells_ += [fmt(st)] + [""] * (len(levels) - 1)
        L.append(f"| {m} (all clients at rank {m.split('_r')[-1]}) | " + " | ".join(cells_) + " |")
    # paired differences: every method of a seed sees the same split, so the split's variance cancels
    L += ["", "Paired differences against FedHL (same seed, hence the same data split and held-out set): mean ± "
          "standard deviation over seeds of (method − FedHL); negative is better than FedHL; `*`: |mean| exceeds "
          "the standard deviation. FedIT rows are paired with FedHL under uniform ranks.", "",
          head, "|---" * (len(datasets) * len(levels) + 1) + "|"]
    for m in [m for m in spec["methods"] if m != "fedhl"]:
        cells_ = []
        for d in datasets:
            for lv in levels:
                if m.startswith("fedit"):
                    pair = (cid_of("main", dataset=d, ranks="homogeneous", method=m),
                            cid_of("main", dataset=d, ranks="uniform", method="fedhl")) if lv == "uniform" else None
                else:
                    pair = (cid_of("main", dataset=d, ranks=lv, method=m),
                            cid_of("main", dataset=d, ranks=lv, method="fedhl"))
                cells_.append(fmt_paired(paired(results, *pair)) if pair else "")
        L.append(f"| {m} | " + " | ".join(cells_) + " |")
    # generation metrics
    L += ["", "Generation metrics of the same runs (uniform ranks; FedIT: its homogeneous rank): GSM8K exact match "
          "and ROUGE-L on the first "
          f"{spec['base']['eval'].get('generate_examples', 0)} held-out prompts (near zero at this model size), and "
          "the bytes each round communicates (down + up, all clients, float32).", "",
          "| method | " + " | ".join(f"{d} ({dataset_spec(d).metric_name})" for d in datasets)
          + " | MB per round (Fed-GSM8K) |", "|---" * (len(datasets) + 2) + "|"]
    for m in list(spec["methods"]):
        row = []
        for d in datasets:
            cid = cid_of("main", dataset=d, ranks="uniform" if not m.startswith("fedit") else "homogeneous", method=m)
            key = f"eval_{dataset_spec(d).metric}"
            row.append(fmt(stats(results, cid, key)))
        row.append(_mb_per_round(results, cid_of("main", dataset="gsm8k", method=m,
                                                 ranks="uniform" if not m.startswith("fedit") else "homogeneous")))
        L.append(f"| {m} | " + " | ".join(row) + " |")
    # partitions, cross-device, ablations
    pm = spec["partition_methods"]
    L += ["", "## Partitions (Fed-GSM8K, uniform ranks)", "",
          "The Dirichlet row is the main table's cell (identical config, one run). rank_correlated: the low-rank "
          "clients hold labels no other client has.", "",
          "| partition | " + " | ".join(pm) + " | " + " | ".join(f"{m} − {pm[0]} (paired)" for m in pm[1:]) + " |",
          "|---" * (2 * len(pm)) + "|"]
    for part in spec["partitions"]:
        ids = [cid_of("partition", partition=part, method=m) for m in pm]
        L.append(f"| {part} | " + " | ".join(fmt(stats(results, c)) for c in ids) + " | "
                 + " | ".join(fmt_paired(paired(results, c, ids[0])) for c in ids[1:]) + " |")
    L += ["", "## Cross-device (100 clients, 10% per round, Fed-GSM8K, uniform ranks)", "",
          "| method | held-out loss | paired difference against FedHL | bytes per round (MB, down + up) |",
          "|---|---|---|---|"]
    xd_ref = cid_of("cross_device", method="fedhl")
    for m in spec["cross_device_methods"]:
        cid = cid_of("cross_device", method=m)
        diff = fmt_paired(paired(results, cid, xd_ref)) if m != "fedhl" else ""
        L.append(f"| {m} | {fmt(stats(results, cid))} | {diff} | {_mb_per_round(results, cid)} |")
    default_cid = cid_of("main", dataset="gsm8k", ranks="uniform", method="fedhl")
    L += ["", "## FedHL ablations (Fed-GSM8K, uniform ranks)", "",
          "Paired differences as above: (variant − default) per seed; `*`: |mean| exceeds the standard deviation.",
          "The last column pairs the FedHL variant with FlexLoRA under the same variant where FlexLoRA has it (a "
          "control row below), else with FlexLoRA's default (its weights are data-size weights).",
          "", "| variant | overrides | held-out loss | paired difference | minus FlexLoRA (paired) |",
          "|---|---|---|---|---|"]
    flex = cid_of("main", dataset="gsm8k", ranks="uniform", method="flexlora")
    L.append(f"| default | optimal weights, ε = 1e-2 relative, power 2, balanced split | "
             f"{fmt(stats(results, default_cid))} | | {fmt_paired(paired(results, default_cid, flex))} |")

    def ablation_row(label, cid, overrides, ref=default_cid, vs_flex=None):
        ov = ", ".join(f"{k}={v}" for k, v in overrides.items())
        last = fmt_paired(paired(results, cid, vs_flex)) if vs_flex else ""
        return (f"| {label} | {ov} | {fmt(stats(results, cid))} | {fmt_paired(paired(results, cid, ref))} "
                f"| {last} |")

    for name, ov in spec["ablations"].items():
        ctrl = cid_of("ablation", variant=name, method="flexlora")
        L.append(ablation_row(name, cid_of("ablation", variant=name, method="fedhl"), ov,
                              vs_flex=ctrl if ctrl in results else flex))
    for name, ms in spec.get("ablation_methods", {}).items():
        for m in ms:
            L.append(ablation_row(f"{m}, {name} (paired with {m}'s default)",
                                  cid_of("ablation", variant=name, method=m), spec["ablations"][name],
                                  cid_of("main", dataset="gsm8k", ranks="uniform", method=m)))

    # plots
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(5.2 * max(len(datasets), 1), 3.8), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for m in list(spec["methods"]):
            cid = cid_of("main", dataset=d, ranks="uniform" if not m.startswith("fedit") else "homogeneous", method=m)
            runs = results.get(cid, {}).get("runs", {})
            if runs:
                curve = np.mean([r["eval_loss"] for r in runs.values()], axis=0)
                ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", ms=3, label=m)
        _style(ax, f"{d}, uniform ranks {{2,4,8,16}}", "held-out loss")
    fig.tight_layout()
    suffix = "_quick" if quick else ""
    fig.savefig(out_dir / "figures" / f"results_convergence{suffix}.png", dpi=110)
    plt.close(fig)
    cid = cid_of("main", dataset="gsm8k", ranks="uniform", method="fedhl")
    if cid in results:
        run = results[cid]["runs"][min(results[cid]["runs"])]
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
        ranks = np.asarray(run["ranks"])
        for r in sorted(set(ranks.ravel().tolist())):
            sel = ranks == r
            p = np.asarray(run["p"])
            axes[0].plot(np.arange(1, len(p) + 1), [p[t][sel[t]].mean() for t in range(len(p))], marker="o", ms=3,
                         label=f"rank {r}")
            if run["trunc_error"]:
                e = np.asarray(run["trunc_error"])
                axes[1].plot(np.arange(1, len(e) + 1), [e[t][sel[t]].mean() for t in range(len(e))], marker="o",
                             ms=3, label=f"rank {r}")
        axes[0].set_yscale("log")
        axes[1].set_yscale("symlog", linthresh=1e-6)
        _style(axes[0], "FedHL weight p_i per client (mean by rank)")
        _style(axes[1], "truncation error r̂_i (summed over modules)")
        fig.tight_layout()
        fig.savefig(out_dir / "figures" / f"results_weights{suffix}.png", dpi=110)
        plt.close(fig)
    # the ε sweep: FedHL's held-out loss against ε (relative mode), with uniform weights as a reference
    sweep = [(float(ov["fed.options.eps"]), cid_of("ablation", variant=n, method="fedhl"))
             for n, ov in spec["ablations"].items() if set(ov) == {"fed.options.eps"}]
    sweep.append((from_dict(TrainConfig, merge_overrides(spec["base"], {})).fed.options["eps"], default_cid))
    sweep = sorted((e, st) for e, st in ((e, stats(results, c)) for e, c in sweep) if st is not None)
    has_sweep = len(sweep) > 1
    if has_sweep:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        ax.errorbar([e for e, _ in sweep], [st[0] for _, st in sweep], yerr=[st[1] for _, st in sweep],
                    marker="o", ms=4, capsize=3, label="FedHL, optimal weights")
        for name, style in (("weights_uniform", "--"), ("weights_data_size", ":")):
            st = stats(results, cid_of("ablation", variant=name, method="fedhl"))
            if st is not None:
                ax.axhline(st[0], ls=style, color="gray", label=name.replace("_", " "))
        ax.set_xscale("log")
        _style(ax, "ε sweep (relative to mean r̂²), Fed-GSM8K", "held-out loss")
        ax.set_xlabel("ε")
        fig.tight_layout()
        fig.savefig(out_dir / "figures" / f"results_eps{suffix}.png", dpi=110)
        plt.close(fig)
    L += ["", DISCUSSION_BEGIN, DISCUSSION_END]
    L += ["", "## Plots", "", f"![convergence](figures/results_convergence{suffix}.png)", "",
          f"![weights](figures/results_weights{suffix}.png)", ""]
    if has_sweep:
        L += [f"![eps sweep](figures/results_eps{suffix}.png)", ""]
    return "\n".join(L)
