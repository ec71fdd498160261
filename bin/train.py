#!/usr/bin/env python3
"""``fedhl-train`` from a checkout: python bin/train.py --config configs/quickstart.yaml --out runs/quickstart"""
from fedhl_jax.cli import main

raise SystemExit(main())
