"""A one-dataset comparison of methods over seeds (``docs/results_smollm2_3rounds.md``, ``bin/results.py``).

The spec (``configs/results_smollm2_3rounds.yaml``, ``suite: methods``) is a base ``TrainConfig``, a table
of methods (dotted overrides), seeds, the seeds that also run the (slow) generation metric, and
optional extra sections of (variant × methods). Runs go through ``results.run_cell`` and are cached
in a JSONL file keyed by the digest of each run's resolved config, as in ``results.run_suite``; the
zero-shot model (held-out loss and generation) is one more cached row.

Runs are ordered seed by seed (every method of seed 0, then seed 1, ...), so an interrupted suite
has whole seeds rather than whole methods.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from fedhl_jax.config import TrainConfig, from_dict
from fedhl_jax.data.registry import dataset_spec
from fedhl_jax.experiments import results_suite as R
from fedhl_jax.simulation import Simulation

ZERO_SHOT = "zero_shot"


def cells(spec: dict) -> list[dict]:
    """``{"section", "id", "labels", "overrides"}`` for the main table and the extra sections."""
    out = []
    for m, ov in spec["methods"].items():
        out.append({"section": "main", "id": f"main:method={m}", "labels": {"method": m}, "overrides": dict(ov)})
    for name, sec in (spec.get("sections") or {}).items():
        for m in sec["methods"]:
            ov = dict(spec["methods"][m], **sec["overrides"])
            out.append({"section": name, "id": f"{name}:method={m}", "labels": {"method": m}, "overrides": ov})
    return out


def run_overrides(spec: dict, cell: dict, seed: int) -> dict:
    """The cell's overrides for one seed: generation only on ``generate_seeds`` of the main table."""
    ov = dict(cell["overrides"])
    if cell["section"] != "main" or seed not in spec.get("generate_seeds", spec["seeds"]):
        ov["eval.generate_examples"] = 0
    return ov


def zero_shot_cell(base: dict, log: Callable = lambda *_: None) -> dict:
    """Held-out loss and generation metric of the starting model (no training)."""
    t0 = time.perf_counter()
    sim = Simulation(from_dict(TrainConfig, R.merge_overrides(base, {"seed": 0})), log=log)
    res = sim.evaluate(sim.init_state(), 0, generate=True)
    rec = {k: float(v) for k, v in res.items() if k.startswith("eval_") and not isinstance(v, str) and np.ndim(v) == 0}
    rec["eval_sample"] = str(res.get("eval_sample", ""))
    rec["seconds"] = time.perf_counter() - t0
    jax.clear_caches()
    return rec


def run_suite(spec: dict, cache: Path, *, only: str | None = None, log: Callable = print) -> dict:
    """Runs every run not yet in ``cache`` (only cells whose id contains ``only``, if given).

    Returns:
      ``{"zero_shot": rec | None, "cells": {cell_id: {"cell", "runs": {seed: rec}}}}``.
    """
    by_config = {row["config"]: row["rec"] for row in R.read_cache(cache)}
    base = spec["base"]

    def append(cid, seed, digest, rec):
        by_config[digest] = rec
        R.append_cache(cache, cid, seed, digest, rec)

    zs_digest = "zero_shot-" + R.config_digest(base, {}, 0)
    if spec.get("zero_shot", True) and zs_digest not in by_config and (only is None or only in ZERO_SHOT):
        rec = zero_shot_cell(base)
        append(ZERO_SHOT, 0, zs_digest, rec)
        log(f"zero-shot: eval loss {rec.get('eval_loss', float('nan')):.4f} ({rec['seconds']:.0f} s)", flush=True)
    todo = [(c, s) for c in cells(spec) if c["section"] == "main" for s in [None]]
    order = [(c, s) for s in spec["seeds"] for c, _ in todo]
    order += [(c, s) for c in cells(spec) if c["section"] != "main" for s in spec["seeds"]]
    out = {"zero_shot": by_config.get(zs_digest), "cells": {}}
    t0 = time.perf_counter()
    for i, (cell, seed) in enumerate(order):
        ov = run_overrides(spec, cell, seed)
        d = R.config_digest(base, ov, seed)
        if d not in by_config and (only is None or only in cell["id"]):
            rec = R.run_cell(base, ov, seed)
            append(cell["id"], seed, d, rec)
            log(f"[{i + 1}/{len(order)}] {cell['id']} seed {seed}: eval loss {rec['final_eval_loss']:.4f} "
                f"({rec['seconds']:.1f} s; {time.perf_counter() - t0:.0f} s so far)", flush=True)
        if d in by_config:
            out["cells"].setdefault(cell["id"], {"cell": cell, "runs": {}})["runs"][seed] = by_config[d]
    return out


# --------------------------------------------------------------------------- report


_fmt = functools.partial(R.fmt, single=" (1 seed)")
_fmt_paired = functools.partial(R.fmt_paired, single=" (1 seed)", wins=True)


def render(spec: dict, res: dict, out_dir: Path, *, seconds: float, stem: str) -> str:
    """Writes the plots ``out_dir/figures/<stem>_*.png`` and returns the page's Markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells_ = res["cells"]
    methods = list(spec["methods"])
    seeds = spec["seeds"]
    gen_seeds = spec.get("generate_seeds", seeds)
    main = {m: f"main:method={m}" for m in methods}
    n_runs = sum(len(c["runs"]) for c in cells_.values())
    n_total = len(cells(spec)) * len(seeds)
    b, f, e = spec["base"], spec["base"]["fed"], spec["base"]["eval"]
    zs = res.get("zero_shot") or {}
    metric = f"eval_{dataset_spec(b['data']['dataset']).metric}"
    metric_name = dataset_spec(b["data"]["dataset"]).metric_name
    n_gen = e.get("generate_examples", 0)
    L = [f"# {spec.get('title', 'Results')}", "",
         f"{n_runs} of {n_total} runs done, seeds {seeds}; **{seconds / 60:.0f} min of compute** in all (sum of "
         f"the runs' wall times{', zero-shot evaluation included' if zs else ''}, on "
         f"{spec.get('machine', 'this machine')}). Regenerate: `python bin/results.py --config "
         f"configs/{stem}.yaml` (finished runs are cached in `docs/results/{stem}.jsonl` and reused; the page is "
         "regenerated from the cache alone).", "",
         spec.get("setup", "").strip(), "",
         f"Held-out loss: mean over response tokens of the first {e.get('loss_examples')} GSM8K test answers "
         f"after round {f['rounds']} (lower is better; the zero-shot model: "
         f"{zs['eval_loss']:.3f})." if zs.get("eval_loss") is not None else "", "",
         f"{metric_name.capitalize()}: greedy answers to the first {n_gen} test questions, chat-formatted, "
         f"at most {e.get('max_new_tokens')} new tokens; on seed{'s' if len(gen_seeds) > 1 else ''} "
         f"{', '.join(map(str, gen_seeds))}"
         + (f" only (one pass over {n_gen} questions costs about {spec['generation_minutes']} min here)"
            if "generation_minutes" in spec and len(gen_seeds) < len(seeds) else "") + ". Zero-shot: "
         + (f"**{zs[metric]:.3f}**" if metric in zs else "–") + ".", "",
         "Paired differences: mean ± standard deviation over seeds of (method − reference) on the same seed, "
         "hence the same data split; `*`: |mean| exceeds the standard deviation; (k/n below): seeds on which the "
         "method's loss is below the reference's.", ""]
    L += ["## Main table", "",
          f"| method | held-out loss | − FedHL (paired) | − FlexLoRA (paired) | {metric_name} ({n_gen}) | "
          "MB per round | MB in all |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        cid = main[m]
        runs = cells_.get(cid, {}).get("runs", {})
        em = [r[metric] for r in runs.values() if r.get(metric) is not None]
        mb = [r["bytes"] / 2**20 for r in runs.values()]
        rounds = len(next(iter(runs.values()))["eval_loss"]) if runs else 0
        L.append(" | ".join([
            f"| {m}", _fmt(R.stats(cells_, cid)),
            _fmt_paired(R.paired(cells_, cid, main["fedhl"])) if m != "fedhl" else "",
            _fmt_paired(R.paired(cells_, cid, main["flexlora"])) if m != "flexlora" else "",
            f"{np.mean(em):.3f}" if em else "–",
            f"{np.mean(mb) / rounds:.1f}" if mb else "–",
            f"{np.mean(mb):.0f}" if mb else "–"]) + " |")
    pairs = spec.get("pairs") or []
    if pairs:
        L += ["", "## Paired comparisons named in the discussion", "", "| comparison | paired difference of held-out loss |",
              "|---|---|"]
        for a, bb in pairs:
            L.append(f"| {a} − {bb} | {_fmt_paired(R.paired(cells_, main[a], main[bb]))} |")
        rounds = spec["base"]["fed"]["rounds"]
        L += ["", "The same pairs round by round (held-out loss after each round, paired by seed):", "",
              "| comparison | " + " | ".join(f"round {t + 1}" for t in range(rounds)) + " |",
              "|---" * (rounds + 1) + "|"]
        for a, bb in pairs:
            ra, rb = cells_.get(main[a], {}).get("runs", {}), cells_.get(main[bb], {}).get("runs", {})
            common = sorted(set(ra) & set(rb))
            row = [_fmt_paired(np.asarray([ra[s_]["eval_loss"][t] - rb[s_]["eval_loss"][t] for s_ in common])
                               if common else None) for t in range(rounds)]
            L.append(f"| {a} − {bb} | " + " | ".join(row) + " |")
    for name, sec in (spec.get("sections") or {}).items():
        L += ["", f"## {sec.get('title', name)}", "", sec.get("text", "").strip(), "",
              "| method | held-out loss | − same method in the main table (paired) |", "|---|---|---|"]
        ids = {m: f"{name}:method={m}" for m in sec["methods"]}
        for m in sec["methods"]:
            L.append(f"| {m} | {_fmt(R.stats(cells_, ids[m]))} | {_fmt_paired(R.paired(cells_, ids[m], main[m]))} |")
        if len(sec["methods"]) == 2:
            a, bb = sec["methods"]
            L += ["", f"{a} − {bb} in this section: {_fmt_paired(R.paired(cells_, ids[a], ids[bb]))}; in the main "
                  f"table: {_fmt_paired(R.paired(cells_, main[a], main[bb]))}."]
    # plots: held-out loss against megabytes communicated; FedHL's weights per rank
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in methods:
        runs = list(cells_.get(main[m], {}).get("runs", {}).values())
        if not runs:
            continue
        loss = np.mean([r["eval_loss"] for r in runs], axis=0)
        per_round = np.mean([r["bytes"] / len(r["eval_loss"]) for r in runs]) / 2**20
        x = np.concatenate([[0.0], per_round * np.arange(1, len(loss) + 1)])
        y = np.concatenate([[zs.get("eval_loss", np.nan)], loss])
        ax.plot(x, y, marker="o", ms=3, label=m, ls="--" if m.startswith("fedit") else "-")
    R.save_plot(fig, ax, out_dir / "figures" / f"{stem}_loss_vs_mb.png",
                xlabel="megabytes communicated (down + up, all clients, float32)", ylabel="held-out loss",
                title=f"{spec.get('short_title', '')}: loss against communication (mean of seeds)")
    shown = [m for m in spec.get("weight_plot", ["fedhl"]) if main[m] in cells_]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 3.6), squeeze=False)
        for ax, m in zip(axes[0], shown):
            runs = cells_[main[m]]["runs"]
            run = runs[min(runs)]
            p, ranks = np.asarray(run["p"]), np.asarray(run["ranks"])
            for r in sorted(set(ranks.ravel().tolist())):
                sel = ranks == r
                ax.plot(np.arange(1, len(p) + 1), [p[t][sel[t]].sum() for t in range(len(p))], marker="o", ms=3,
                        label=f"rank {r}")
            ax.set_yscale("log")
            ax.set_title(f"{m}: total weight of each rank group", fontsize=9)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "figures" / f"{stem}_weights.png", dpi=110)
        plt.close(fig)
    L += ["", R.DISCUSSION_BEGIN, R.DISCUSSION_END, "", "## Plots", "",
          f"![loss against MB](figures/{stem}_loss_vs_mb.png)", ""]
    if shown:
        L += [f"![weights per rank](figures/{stem}_weights.png)", ""]
    return "\n".join(L)
