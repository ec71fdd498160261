"""``fedhl-results``: runs a comparison suite and writes its page, plots and run cache.

  fedhl-results --quick      # one seed, few rounds: docs/results_quick.md
  fedhl-results              # the full suite of configs/results.yaml (3 seeds, every dataset): docs/results.md
  fedhl-results --config configs/results_smollm2.yaml   # SmolLM2, tuned rates: docs/results_smollm2.md
  fedhl-results --config configs/results_smollm2.yaml --render-only   # its page from the cache alone
  fedhl-results --config configs/results_smollm2.yaml --workers 2     # two runs at once, one per core

Under ``--out`` (default ``docs``, relative to the current directory) the page is ``<page>.md``, its
plots go to ``figures/`` and the finished (cell, seed) runs are cached in ``results/<mode>.jsonl``
(``results/results_quick.jsonl``, ``results/results_full.jsonl``, ``results/<config stem>.jsonl``),
so an interrupted suite resumes and a finished one regenerates its page from the cache alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from fedhl_jax.experiments import evidence_suite as ES
from fedhl_jax.experiments import methods_suite as MS
from fedhl_jax.experiments import results_suite as R

#: The folder under ``--out`` that holds the run caches (the plots go to ``figures/``, written by the renderers).
RESULTS_DIR = "results"


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line; a missing ``--config`` file is an error naming it (exit status 2)."""
    p = argparse.ArgumentParser(prog="fedhl-results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", type=Path, default=Path("configs") / "results.yaml",
                   help="suite spec (default: configs/results.yaml, relative to the current directory)")
    p.add_argument("--out", type=Path, default=Path("docs"),
                   help="folder of the page; plots go to its figures/, run caches to its results/")
    p.add_argument("--only", help="run only the cells whose id contains this text (e.g. main:dataset=gsm8k); "
                   "cached runs of the other cells are still shown")
    p.add_argument("--rerun", metavar="TEXT",
                   help="run once more the cached runs whose '<id> seed <seed>' contains TEXT, superseding their "
                   "records (e.g. to store a field older records lack; suite: evidence)")
    p.add_argument("--render-only", action="store_true",
                   help="write the page from the cached runs without training (suite: evidence)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs trained at once, each in its own process pinned to its share of the cores "
                   "(suite: evidence; default 1: in this process)")
    p.add_argument("--compile-cache", default=str(Path.home() / ".cache" / "fedhl_jax" / "xla"),
                   help="XLA persistent compilation cache shared by the cells ('' turns it off)")
    args = p.parse_args(argv)
    if not args.config.is_file():
        p.error(f"--config {args.config}: no such file (run from the repository root or pass --config)")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    return args


def main(argv=None) -> int:
    """Command line of ``fedhl-results``; returns the exit status."""
    args = parse_args(argv)
    if args.compile_cache:  # cells of one method differ only in data: their round step compiles once
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    spec = OmegaConf.to_container(OmegaConf.load(args.config))
    if args.workers > 1 and spec.get("suite") != "evidence":
        print(f"fedhl-results: error: --workers {args.workers}: only a 'suite: evidence' spec runs in workers; "
              f"{args.config} is suite {spec.get('suite', 'results')!r}", file=sys.stderr)
        return 2
    if spec.get("suite") == "methods":  # one dataset, methods × seeds (configs/results_smollm2_3rounds.yaml)
        return run_methods_suite(spec, args)
    if spec.get("suite") == "evidence":  # tuned rates, settings, intervals (configs/results_smollm2.yaml)
        return run_evidence_suite(spec, args)
    mode = "quick" if args.quick else "full"
    (args.out / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    cache = args.out / RESULTS_DIR / f"results_{mode}.jsonl"
    t0 = time.perf_counter()
    results = R.run_suite(spec, cache, quick=args.quick, only=args.only)
    unique = {id(r): r for c in results.values() for r in c["runs"].values()}  # shared runs counted once
    seconds = sum(r["seconds"] for r in unique.values())
    md = R.render(spec, results, args.out, quick=args.quick, seconds=seconds)
    page = args.out / ("results_quick.md" if args.quick else "results.md")
    page.write_text(R.keep_discussion(page.read_text() if page.exists() else None, md))
    print(f"wrote {page} ({time.perf_counter() - t0:.0f} s this call)")
    return 0


def run_methods_suite(spec: dict, args: argparse.Namespace) -> int:
    """A ``suite: methods`` spec: one dataset, methods × seeds; the page is ``<config stem>.md``."""
    stem = args.config.stem
    (args.out / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = MS.run_suite(spec, args.out / RESULTS_DIR / f"{stem}.jsonl", only=args.only)
    runs = [r for c in res["cells"].values() for r in c["runs"].values()] + [res["zero_shot"] or {}]
    seconds = sum(r.get("seconds", 0.0) for r in runs)
    md = MS.render(spec, res, args.out, seconds=seconds, stem=stem)
    page = args.out / f"{stem}.md"
    page.write_text(R.keep_discussion(page.read_text() if page.exists() else None, md))
    print(f"wrote {page} ({time.perf_counter() - t0:.0f} s this call)")
    return 0


def run_evidence_suite(spec: dict, args: argparse.Namespace) -> int:
    """A ``suite: evidence`` spec (``evidence_suite``); the page is ``<config stem>.md``. ``--render-only``
    writes the page from the cache without training."""
    stem = args.config.stem
    (args.out / RESULTS_DIR).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = ES.run_suite(spec, args.out / RESULTS_DIR / f"{stem}.jsonl", only=args.only,
                       max_runs=0 if args.render_only else None, rerun=args.rerun, workers=args.workers)
    md = ES.render(spec, res, args.out, stem=stem)
    page = args.out / f"{stem}.md"
    page.write_text(R.keep_discussion(page.read_text() if page.exists() else None, md))
    print(f"wrote {page} ({time.perf_counter() - t0:.0f} s this call)")
    return 0
