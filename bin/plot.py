#!/usr/bin/env python3
"""``fedhl-plot`` from a checkout: python bin/plot.py runs/a runs/b --metric eval_loss --out curves.png"""
from fedhl_jax.plotting import main

raise SystemExit(main())
