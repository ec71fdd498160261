#!/usr/bin/env python3
"""``fedhl-results`` from a checkout: python bin/results.py [--quick] [--config configs/results.yaml]"""
from fedhl_jax.experiments.cli import main

raise SystemExit(main())
