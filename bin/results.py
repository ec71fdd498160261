#!/usr/bin/env python3
"""Runs the comparison suite of configs/results.yaml and writes docs/results.md (docs/results_quick.md
with --quick) with its plots.

  python bin/results.py --quick      # one seed, few rounds, Fed-GSM8K main table + sections
  python bin/results.py              # the full suite (3 seeds, every dataset)
  python bin/results.py --config configs/results_smollm2.yaml   # SmolLM2: docs/results_smollm2.md

Finished (cell, seed) runs are cached in docs/results_<mode>.jsonl, so an interrupted suite resumes.
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from fedhl_jax.experiments import methods_suite as MS  # noqa: E402
from fedhl_jax.experiments import results as R  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "results.yaml")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    p.add_argument("--only", help="run only the cells whose id contains this text (e.g. main:dataset=gsm8k)")
    p.add_argument("--compile-cache", default=str(Path.home() / ".cache" / "fedhl_jax" / "xla"),
                   help="XLA persistent compilation cache shared by the cells ('' turns it off)")
    args = p.parse_args(argv)
    if args.compile_cache:  # cells of one method differ only in data: their round step compiles once
        import jax

        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    spec = OmegaConf.to_container(OmegaConf.load(args.config))
    if spec.get("suite") == "methods":  # one dataset, methods × seeds (configs/results_smollm2.yaml)
        return run_methods_suite(spec, args)
    mode = "quick" if args.quick else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / f"results_{mode}.jsonl"
    t0 = time.perf_counter()
    results = R.run_suite(spec, cache, quick=args.quick, only=args.only)
    unique = {id(r): r for c in results.values() for r in c["runs"].values()}  # shared runs counted once
    seconds = sum(r["seconds"] for r in unique.values())
    md = R.render(spec, results, args.out, quick=args.quick, seconds=seconds)
    page = args.out / ("results_quick.md" if args.quick else "results.md")
    page.write_text(R.keep_discussion(page.read_text() if page.exists() else None, md))
    print(f"wrote {page} ({time.perf_counter() - t0:.0f} s this call)")
    return 0


def run_methods_suite(spec: dict, args) -> int:
    stem = args.config.stem
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = MS.run_suite(spec, args.out / f"{stem}.jsonl", only=args.only)
    runs = [r for c in res["cells"].values() for r in c["runs"].values()] + [res["zero_shot"] or {}]
    seconds = sum(r.get("seconds", 0.0) for r in runs)
    md = MS.render(spec, res, args.out, seconds=seconds, stem=stem)
    page = args.out / f"{stem}.md"
    page.write_text(R.keep_discussion(page.read_text() if page.exists() else None, md))
    print(f"wrote {page} ({time.perf_counter() - t0:.0f} s this call)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
