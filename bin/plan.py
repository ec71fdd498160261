#!/usr/bin/env python3
"""``fedhl-plan`` from a checkout: python bin/plan.py --config configs/quickstart.yaml --topology v5e:2x2"""
from fedhl_jax.plan_cli import main

raise SystemExit(main())
